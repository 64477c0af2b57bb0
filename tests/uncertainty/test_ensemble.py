"""DeepEnsemble (sequential vs vmap, member independence, checkpoints) and EnsembleLoss."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.members import num_members, split_members
from sobre.core.serialization import load_tree, save_tree
from sobre.uncertainty.ensemble import DeepEnsemble, EnsembleLoss

M, B, K = 3, 5, 4


def tiny(momentum: float | None = 0.1) -> nn.Module:
    """Conv-BN-ReLU-Linear on (1, 8, 8) inputs, K outputs."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, K),
    )


def ensemble(mode: str = "auto", seed: int = 0) -> DeepEnsemble:
    return DeepEnsemble.from_factory(tiny, M, seed=seed, mode=mode)  # type: ignore[arg-type]


def by_member(logits: Tensor) -> Tensor:
    """(M·B, K) member-major -> (M, B, K)."""
    return split_members(logits, M).transpose(0, 1)


@pytest.fixture
def x() -> Tensor:
    return torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


@pytest.mark.parametrize("train", [False, True])
def test_vmap_equals_sequential(x: Tensor, train: bool) -> None:
    seq = ensemble("sequential")
    vm = copy.deepcopy(seq)
    vm.mode = vm.resolved_mode = "vmap"
    seq.train(train)
    vm.train(train)
    out_seq, out_vm = seq(x), vm(x)
    assert out_seq.shape == out_vm.shape == (M * B, K)
    assert (out_seq - out_vm).abs().max() < 1e-5
    for (name, a), (_, b) in zip(seq.named_buffers(), vm.named_buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name  # running stats written back
    bn = seq.members[1][1]
    assert int(bn.num_batches_tracked) == int(train)


def test_output_is_member_major(x: Tensor) -> None:
    ens = ensemble("vmap").eval()
    out = by_member(ens(x))
    for m, member in enumerate(ens.members):
        assert torch.allclose(out[m], member(x), atol=1e-6)
    assert not torch.allclose(out[0], out[1])  # independently initialised


@pytest.mark.parametrize("mode", ["sequential", "vmap"])
def test_member_gradient_depends_only_on_its_rows(x: Tensor, mode: str) -> None:
    ens = ensemble(mode).train()
    target = 1
    by_member(ens(x))[target].square().sum().backward()
    for m, member in enumerate(ens.members):
        grads = [p.grad for p in member.parameters()]
        if m == target:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None or not g.any() for g in grads)


def test_a_vmap_training_step_equals_a_sequential_one(x: Tensor) -> None:
    y = torch.arange(B) % K
    results = []
    for mode in ("sequential", "vmap"):
        ens = ensemble(mode).train()
        opt = torch.optim.SGD(ens.parameters(), lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            EnsembleLoss(num_members=M)(ens(x), y).backward()
            opt.step()
        results.append(ens.state_dict())
    for key, value in results[0].items():
        assert torch.allclose(value.float(), results[1][key].float(), atol=1e-5), key


def test_auto_resolves_once_and_leaves_no_trace(x: Tensor) -> None:
    auto, seq = ensemble("auto").train(), ensemble("sequential").train()
    assert auto.resolved_mode is None
    out = auto(x)
    assert auto.resolved_mode in ("sequential", "vmap")
    assert (out - seq(x)).abs().max() < 1e-5
    # the timing runs did not move the running statistics: one forward's worth only
    for (name, a), (_, b) in zip(auto.named_buffers(), seq.named_buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_vmap_incompatible_member_raises_and_auto_falls_back(x: Tensor) -> None:
    # BatchNorm with momentum=None calls .item() on num_batches_tracked in train mode
    factory = lambda: tiny(momentum=None)  # noqa: E731
    vm = DeepEnsemble.from_factory(factory, M, seed=0, mode="vmap").train()
    before = [b.clone() for b in vm.buffers()]
    with pytest.raises(ConfigError, match=r"cannot run under torch\.func\.vmap.*mode='sequential'"):
        vm(x)
    assert all(torch.equal(a, b) for a, b in zip(before, vm.buffers(), strict=True))
    auto = DeepEnsemble.from_factory(factory, M, seed=0, mode="auto").train()
    seq = DeepEnsemble.from_factory(factory, M, seed=0, mode="sequential").train()
    assert torch.allclose(auto(x), seq(x), atol=1e-6)
    assert auto.resolved_mode == "sequential"


def test_from_factory_seeds_members_and_keeps_the_global_rng() -> None:
    state = torch.random.get_rng_state()
    ens = ensemble(seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    for m, member in enumerate(ens.members):
        torch.manual_seed(7 + m)
        assert torch.equal(member[0].weight, tiny()[0].weight)
    assert ens.num_members == num_members(ens) == M  # what the engine's routine reads


def test_members_must_share_one_architecture() -> None:
    wider = nn.Sequential(
        nn.Conv2d(1, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(180, K)
    )
    with pytest.raises(ConfigError, match=r"member 1 differs from member 0.*0\.weight"):
        DeepEnsemble([tiny(), wider])
    swapped = tiny()
    swapped[2] = nn.GELU()
    with pytest.raises(ConfigError, match="GELU"):
        DeepEnsemble([tiny(), swapped])
    shared = tiny()
    with pytest.raises(ConfigError, match="distinct modules"):
        DeepEnsemble([shared, shared])
    with pytest.raises(ConfigError, match="mode='fast'"):
        DeepEnsemble([tiny()], mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_members"):
        DeepEnsemble.from_factory(tiny, 0, seed=0)


def test_checkpoint_roundtrip_through_safetensors(tmp_path: Path, x: Tensor) -> None:
    trained = ensemble("vmap", seed=0).train()
    trained(x)  # move the running statistics
    trained.eval()
    path = save_tree(trained.state_dict(), tmp_path / "de.safetensors")
    state, _ = load_tree(path)
    assert "members.2.1.running_mean" in state
    fresh = ensemble("sequential", seed=99).eval()
    assert not torch.allclose(fresh(x), trained(x))
    fresh.load_state_dict(state)
    assert (fresh(x) - trained(x)).abs().max() < 1e-5


def test_ensemble_loss_is_the_mean_of_member_cross_entropies() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(M * B, K, generator=gen), torch.randint(0, K, (B,), generator=gen)
    per_member = [F.cross_entropy(by_member(logits)[m], y) for m in range(M)]
    loss = EnsembleLoss(num_members=M)(logits, y)
    assert torch.allclose(loss, torch.stack(per_member).mean())
    summed = EnsembleLoss(nn.CrossEntropyLoss(reduction="sum"), num_members=M)(logits, y)
    assert torch.allclose(summed, torch.stack(per_member).sum() * B)
    soft = F.one_hot(y, K).float()  # (B, K) targets are repeated row-wise too
    assert torch.allclose(EnsembleLoss(num_members=M)(logits, soft), loss)


@pytest.mark.parametrize("rows", [B, M * B - 1, (M + 1) * B])
def test_ensemble_loss_rejects_wrong_row_counts(rows: int) -> None:
    with pytest.raises(ConfigError, match=rf"{M * B} logit rows .* got {rows} rows"):
        EnsembleLoss(num_members=M)(torch.zeros(rows, K), torch.zeros(B, dtype=torch.long))
    with pytest.raises(ConfigError, match="num_members"):
        EnsembleLoss(num_members=0)


def test_ensemble_transform_trains_in_a_recipe_and_reloads(tiny_recipe, runs_dir):
    import sobre
    from sobre.core.edits import edit_log

    tiny_recipe["trainer"]["max_epochs"] = 1
    tiny_recipe["stages"] = [
        {
            "name": "train",
            "transforms": [
                {
                    "class_path": "sobre.uncertainty.ensemble.Ensemble",
                    "init_args": {"num_members": 3, "seed": 5},
                }
            ],
        }
    ]
    tiny_recipe["evaluate"] = {"measure": False, "report": False}
    result = sobre.fit(tiny_recipe)
    net = result.routine.net
    assert isinstance(net, DeepEnsemble) and net.num_members == 3
    assert [e["op"] for e in edit_log(net)] == ["deep_ensemble"]
    first = [p.detach() for p in net.members[0].parameters()]
    second = [p.detach() for p in net.members[1].parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    loaded = sobre.load(result.run_dir / "checkpoints/train/best.safetensors").net
    assert isinstance(loaded, DeepEnsemble) and loaded.num_members == 3
    x = torch.randn(4, 1, 8, 8)
    out = loaded(x)
    assert out.shape == (12, 3)
