"""Lightning callbacks of the pruning family: rounds at the right epochs, the right sites, the
optimizer after edits and rewinds, DDP refusal, bad arguments, resume through the engine."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sobre
from sobre.core.edits import replay
from sobre.core.errors import CheckpointError, ConfigError, SobreError
from sobre.core.masks import iter_masks, restore_masks
from sobre.core.serialization import load_tree
from sobre.engine import ClassificationRoutine, SafeModelCheckpoint, SafetensorsCheckpointIO
from sobre.models import create
from sobre.prune.callbacks import (
    EasierCallback,
    EntropyGuidedPruningCallback,
    IMPCallback,
    _swap,
)
from sobre.prune.easier import Easier, removed_sites
from sobre.prune.egp import EntropyGuidedPruner
from sobre.prune.imp import IMPSchedule, MagnitudePruner
from sobre.prune.sites import find_sites

LR = 1e-2
BATCHES = 4  # training batches per epoch


def _net(seed: int = 0, always_on: bool = True) -> nn.Module:
    """MLP 8 -> 16 -> 16 -> 16 -> 3; ``always_on``: relu2 is ON for every input (zero entropy)."""
    torch.manual_seed(seed)
    net = create("mlp", num_classes=3, in_features=8, hidden=(16, 16, 16))
    if always_on:
        with torch.no_grad():
            net.features.fc2.bias.fill_(50.0)
    return net


def _loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 8, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)  # random labels: val accuracy well below 1
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64 // BATCHES)
    return train, DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)


def _fit(
    callbacks: list[pl.Callback], epochs: int, net: nn.Module | None = None, **kwargs
) -> ClassificationRoutine:
    net = _net() if net is None else net
    routine = ClassificationRoutine(net=net, num_classes=3, lr=LR, scheduler="cosine")
    options = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=callbacks, **options)
    train, val = _loaders()
    trainer.fit(routine, train, val)
    return routine


def _optimizer_holds_the_net(routine: ClassificationRoutine) -> bool:
    """The optimizer steps exactly the routine's parameters, in ``parameters()`` order."""
    (optimizer,) = routine.trainer.optimizers
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    return held == [id(p) for p in routine.parameters()]


class LowestSite(pl.Callback):
    """Listed before the EASIER callback: the site EASIER should remove at each epoch end."""

    def __init__(self) -> None:
        self.sites: list[str] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.sites.append(Easier().rank(pl_module.net, trainer.train_dataloader)[0][0])


# --------------------------------------------------------------------------- EASIER


def test_easier_removes_the_lowest_entropy_site_every_finetune_epochs():
    probe = LowestSite()
    easier = EasierCallback(finetune_epochs=2, max_removed=3, tolerance=100.0)
    routine = _fit([probe, easier], epochs=6)
    curve = easier.curve
    assert [c["removed"] for c in curve] == [0, 1, 2]
    assert [c["epoch"] for c in curve] == [1, 3, 5]
    assert probe.sites[1] == "features.relu2"  # the always-ON site goes first
    assert [c["next"] for c in curve[:2]] == [probe.sites[1], probe.sites[3]]
    assert curve[0]["entropy"] == 0.0
    assert "next" not in curve[2]  # no removal at the last epoch: nothing would fine-tune it
    assert removed_sites(routine.net) == curve[2]["sites"] == [probe.sites[1], probe.sites[3]]
    assert isinstance(routine.net.features.relu2, nn.Identity)
    assert all(c["within"] for c in curve) and easier.stopped is None
    assert curve[0]["val_acc"] == easier.dense_acc
    # the optimizer followed both swaps and kept its Adam state: one step per batch throughout
    assert _optimizer_holds_the_net(routine)
    (optimizer,) = routine.trainer.optimizers
    assert int(optimizer.state[routine.net.classifier.weight]["step"]) == 6 * BATCHES
    # no sobre checkpoint IO: each depth is kept in memory, with the edits to replay it
    assert sorted(easier.depth_states) == [0, 1, 2] and all(c["checkpoint"] is None for c in curve)
    assert len(easier.depth_states[1]["edits"]) == 1
    assert routine.trainer.callback_metrics["prune/removed"] == 2


def test_easier_stops_outside_the_tolerance_and_restores_the_last_depth_inside():
    easier = EasierCallback(finetune_epochs=1, max_removed=3, tolerance=0.0, dense_acc=1.0)
    routine = _fit([easier], epochs=4)
    assert [c["removed"] for c in easier.curve] == [0, 1]  # nothing more after the stop
    assert [c["within"] for c in easier.curve] == [True, False]
    assert easier.stopped is not None
    assert easier.stopped["kept"] == 0 and easier.stopped["restored"]
    assert easier.stopped["epoch"] == 1 and easier.stopped["dense_acc"] == 1.0
    assert removed_sites(routine.net) == []
    assert all(isinstance(m, nn.ReLU) for m in routine.net.features if not hasattr(m, "weight"))
    assert _optimizer_holds_the_net(routine)


def test_easier_writes_one_reloadable_checkpoint_per_depth(tmp_path):
    easier = EasierCallback(finetune_epochs=1, max_removed=2, tolerance=100.0)
    routine = _fit(
        [easier], epochs=3, plugins=[SafetensorsCheckpointIO()], default_root_dir=tmp_path
    )
    paths = [c["checkpoint"] for c in easier.curve]
    assert paths == [str(tmp_path / "checkpoints" / f"depth_{k}.safetensors") for k in range(3)]
    assert easier.depth_states == {}
    tree, _ = load_tree(paths[2])  # the last depth: the model the fit ended with
    state = tree["callbacks"]["EasierCallback"]
    assert [c["removed"] for c in state["curve"]] == [0, 1, 2]
    fresh = replay(_net(seed=1), state["edits"])
    weights = {k.removeprefix("net."): v for k, v in tree["state_dict"].items() if k[:4] == "net."}
    restore_masks(fresh, weights)
    fresh.load_state_dict(weights)
    x = torch.randn(5, 8)
    assert removed_sites(fresh) == removed_sites(routine.net)
    assert torch.allclose(fresh(x), routine.net.eval()(x))


# --------------------------------------------------------------------------- EGP / NEPENTHE


def test_egp_rounds_linearise_the_zero_entropy_site_and_keep_the_optimizer():
    egp = EntropyGuidedPruningCallback(every_n_epochs=1, rounds=5)
    routine = _fit([egp], epochs=3)
    assert [h["round"] for h in egp.history] == [1, 2]
    assert [h["epoch"] for h in egp.history] == [0, 1]  # none at the last epoch
    first = egp.history[0]["linearized"]
    assert "features.relu2" in first  # always ON: the zero-entropy site
    assert egp.history[1]["linearized_total"][: len(first)] == first
    assert isinstance(routine.net.features.relu2, nn.Identity)
    assert 0 < egp.history[0]["sparsity"] < egp.history[1]["sparsity"]
    pool = egp.history[0]["pool"]  # the layers of linearised sites left the pruning pool
    assert "features.fc2" not in pool and "features.fc1" in pool
    assert {m.module for m in iter_masks(routine.net)} == set(pool)
    assert all(h["val_acc"] is not None for h in egp.history)
    assert _optimizer_holds_the_net(routine)
    (optimizer,) = routine.trainer.optimizers
    assert int(optimizer.state[routine.net.features.fc1.parametrizations.weight.original]["step"])
    assert routine.trainer.callback_metrics["prune/removed"] == len(
        egp.history[1]["linearized_total"]
    )


def test_nepenthe_stops_outside_the_tolerance_and_restores_the_model_before_the_round():
    pruner = EntropyGuidedPruner(variant="nepenthe", delta=0.0)
    nepenthe = EntropyGuidedPruningCallback(every_n_epochs=1, rounds=3, pruner=pruner, dense_acc=1)
    routine = _fit([nepenthe], epochs=4)
    assert len(nepenthe.history) == 1  # round 1 at epoch 0, out of tolerance at epoch 1
    assert nepenthe.stopped is not None
    assert (nepenthe.stopped["epoch"], nepenthe.stopped["kept"]) == (1, 0)
    assert nepenthe.stopped["restored"]
    assert list(iter_masks(routine.net)) == []  # the dense model is back ...
    assert isinstance(routine.net.features.relu2, nn.ReLU)
    assert _optimizer_holds_the_net(routine)  # ... and trained on by the optimizer


def test_nepenthe_inside_the_tolerance_runs_every_round():
    pruner = EntropyGuidedPruner(variant="nepenthe", delta=100.0)
    nepenthe = EntropyGuidedPruningCallback(every_n_epochs=1, rounds=2, pruner=pruner)
    _fit([nepenthe], epochs=3)
    assert [h["epoch"] for h in nepenthe.history] == [0, 1] and nepenthe.stopped is None
    assert nepenthe.dense_acc == nepenthe.history[0]["val_acc"]


# --------------------------------------------------------------------------- IMP


class OptimizerAtEpochStart(pl.Callback):
    """Listed after IMPCallback: the optimizer each epoch starts with."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, int]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        (optimizer,) = trainer.optimizers
        lr = optimizer.param_groups[0]["lr"]
        self.seen.append((id(optimizer), lr, len(optimizer.state)))


@pytest.mark.parametrize("retrain", ["lr_rewind", "weight_rewind", "finetune"])
def test_imp_rewinding_recreates_the_optimizer_and_finetuning_keeps_it(retrain):
    probe = OptimizerAtEpochStart()
    imp = IMPCallback(amount=0.5, every_n_epochs=1, rounds=1, retrain=retrain)
    routine = _fit([imp, probe], epochs=3, net=_net(always_on=False))
    (epoch0, epoch1, epoch2) = probe.seen
    assert [h["epoch"] for h in imp.schedule.history] == [0]
    assert imp.schedule.history[0]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert epoch0[1:] == (LR, 0)
    if retrain == "finetune":
        assert epoch1[0] == epoch0[0] and epoch1[2] > 0  # same optimizer, Adam state kept
        assert epoch1[1] == pytest.approx(LR * 0.75)  # cosine over 3 epochs, one step in
    else:
        assert epoch1[0] != epoch0[0]
        assert epoch1[1:] == (LR, 0)  # initial learning rate, no Adam state
        assert epoch2[0] == epoch1[0]  # recreated once per round only
    assert epoch2[1] < epoch1[1]  # the (new) schedule anneals again
    assert _optimizer_holds_the_net(routine)
    assert routine.trainer.callback_metrics["prune/round"] == 1


def test_swap_moves_optimizer_state_by_name_and_refuses_new_parameters():
    old = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))
    routine = ClassificationRoutine(net=old, num_classes=2)
    optimizer = torch.optim.Adam(routine.parameters())
    routine(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    trainer = SimpleNamespace(optimizers=[optimizer])
    new = copy.deepcopy(old)  # same names, new tensors
    new[1] = nn.Identity()  # the PReLU and its weight go
    _swap(trainer, routine, new)
    held = optimizer.param_groups[0]["params"]
    assert [id(p) for p in held] == [id(p) for p in new.parameters()]
    assert all(p in optimizer.state for p in held) and len(optimizer.state) == len(held) == 4
    bigger = copy.deepcopy(new)
    bigger[1] = nn.PReLU()
    with pytest.raises(SobreError, match=r"added trainable parameters \['1.weight'\]"):
        _swap(trainer, routine, bigger)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "make",
    [
        lambda: EntropyGuidedPruningCallback(every_n_epochs=1, rounds=1),
        lambda: EasierCallback(finetune_epochs=1, max_removed=1),
    ],
)
def test_structure_edits_inside_a_distributed_fit_are_refused(make):
    routine = ClassificationRoutine(net=_net(), num_classes=3)
    with pytest.raises(ConfigError, match="recipes/prune"):
        make().setup(SimpleNamespace(world_size=2), routine, "fit")


def test_imp_is_allowed_under_ddp_since_every_rank_decides_alike():
    routine = ClassificationRoutine(net=_net(), num_classes=3)
    IMPCallback().setup(SimpleNamespace(world_size=2), routine, "fit")  # no error
    masks = list(iter_masks(routine.net))  # all ones, before DDP wraps the network
    assert len(masks) == 4 and all(bool(m.mask.all()) for m in masks)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: EntropyGuidedPruningCallback(every_n_epochs=0), "every_n_epochs"),
        (lambda: EntropyGuidedPruningCallback(rounds=0), "rounds"),
        (lambda: EntropyGuidedPruningCallback(pruner=MagnitudePruner()), "EntropyGuidedPruner"),
        (lambda: EntropyGuidedPruningCallback(dense_acc=94.5), "fraction"),
        (lambda: EntropyGuidedPruningCallback(monitor=""), "monitor"),
        (lambda: EasierCallback(finetune_epochs=0), "finetune_epochs"),
        (lambda: EasierCallback(max_removed=0), "max_removed"),
        (lambda: EasierCallback(tolerance=-1.0), "tolerance"),
        (lambda: EasierCallback(easier="auto"), "Easier"),
        (lambda: IMPCallback(schedule=MagnitudePruner()), "IMPSchedule"),
        (lambda: IMPCallback(retrain="rewind"), "lr_rewind"),
        (lambda: IMPCallback(amount=1.5), "amount"),
    ],
)
def test_bad_arguments_name_the_problem(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_easier_refuses_more_removals_than_sites():
    routine = ClassificationRoutine(net=_net(), num_classes=3)
    assert len(find_sites(routine.net)) == 3
    with pytest.raises(ConfigError, match="max_removed=4 but MLP has 3 candidate sites"):
        EasierCallback(max_removed=4).setup(SimpleNamespace(world_size=1), routine, "fit")


def test_nepenthe_without_validation_names_the_fix():
    pruner = EntropyGuidedPruner(variant="nepenthe")
    with pytest.raises(ConfigError, match="check_val_every_n_epoch=1"):
        _fit([EntropyGuidedPruningCallback(pruner=pruner)], epochs=1, limit_val_batches=0)


def test_a_wrapped_schedule_is_used_as_is():
    schedule = IMPSchedule(MagnitudePruner(0.3), every_n_epochs=2, rounds=1)
    imp = IMPCallback(schedule)
    _fit([imp], epochs=2)
    assert imp.schedule is schedule and [h["epoch"] for h in schedule.history] == [1]
    assert schedule.history[0]["reset_optimizer"] is False  # no rewinder: fine-tuning


# --------------------------------------------------------------------------- resume


class Crash(pl.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.at:
            raise RuntimeError("killed")


def _rounds(callback: pl.Callback) -> list[dict]:
    """What a pruning callback did, per round (checkpoint paths left out: two run folders)."""
    if isinstance(callback, EasierCallback):
        return [{k: v for k, v in c.items() if k != "checkpoint"} for c in callback.curve]
    return callback.schedule.history if isinstance(callback, IMPCallback) else callback.history


def _final_weights(run) -> dict[str, torch.Tensor]:
    return load_tree(run / "checkpoints/train/final.safetensors")[0]["state_dict"]


@pytest.mark.parametrize(
    "callback",
    [
        {
            "class_path": "sobre.prune.callbacks.EasierCallback",
            "init_args": {"finetune_epochs": 1, "max_removed": 3, "tolerance": 100.0},
        },
        {
            "class_path": "sobre.prune.callbacks.IMPCallback",
            "init_args": {"amount": 0.3, "rounds": 3, "retrain": "finetune"},
        },
        {
            "class_path": "sobre.prune.callbacks.IMPCallback",
            "init_args": {"amount": 0.3, "rounds": 3, "retrain": "lr_rewind"},
        },
        {
            "class_path": "sobre.prune.callbacks.EntropyGuidedPruningCallback",
            "init_args": {
                "rounds": 3,
                "pruner": {
                    "class_path": "sobre.prune.EntropyGuidedPruner",
                    "init_args": {"eps": 0.9, "exclude": ["classifier"]},
                },
            },
        },
    ],
    ids=["easier", "imp-finetune", "imp-lr_rewind", "egp"],
)
def test_a_crashed_run_resumes_its_rounds_through_the_engine(tiny_recipe, runs_dir, callback):
    tiny_recipe["trainer"].update(max_epochs=4, callbacks=[callback])
    # the default, the best checkpoint, may predate the last edit (see the test below)
    tiny_recipe["evaluate"] = {"measure": False, "report": False, "checkpoint": "final"}
    full = sobre.fit(tiny_recipe)
    with pytest.raises(RuntimeError, match="killed"):
        sobre.fit(tiny_recipe, callbacks=[Crash(at=2)])  # after two rounds were checkpointed
    crashed = sorted((runs_dir / "tiny").iterdir())[-1]
    resumed = sobre.fit(resume=crashed)
    assert resumed.metrics["test/acc"] == full.metrics["test/acc"]
    a, b = _final_weights(full.run_dir), _final_weights(crashed)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    kind = callback["class_path"].rsplit(".", 1)[1]
    ours, theirs = (
        next(c for c in run.routine.trainer.callbacks if type(c).__name__ == kind)
        for run in (full, resumed)
    )
    assert json.dumps(_rounds(ours)) == json.dumps(_rounds(theirs))
    info = json.loads((crashed / "checkpoints/train/final.json").read_text())["info"]
    if kind == "EasierCallback":  # three sites removed, one per epoch, across the crash
        assert [e["op"] for e in info["edits"]] == ["replace_activation"] * 3
        assert removed_sites(resumed.routine.net) == removed_sites(full.routine.net)
    elif kind == "EntropyGuidedPruningCallback":  # a ChannelGate and masks before the crash
        assert theirs.history[0]["linearized"] and info["edits"][0]["op"] == "linearize"
        assert [h["epoch"] for h in theirs.history] == [0, 1, 2]
    masks = [m.module for m in iter_masks(resumed.routine.net)]
    assert masks == [m.module for m in iter_masks(full.routine.net)]
    assert (len(masks) == 0) == (kind == "EasierCallback")


def _plain_trainer(folder, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A Trainer writing sobre checkpoints ``e<epoch>.safetensors`` at every epoch end."""
    every = SafeModelCheckpoint(
        dirpath=folder,
        filename="e{epoch}",
        monitor=None,
        save_top_k=-1,
        auto_insert_metric_name=False,
    )
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=folder,
        plugins=[SafetensorsCheckpointIO()],
        callbacks=[*callbacks, every],
    )


def test_checkpoints_of_another_depth_are_refused_and_results_are_kept(tmp_path):
    routine = ClassificationRoutine(net=_net(), num_classes=3, lr=LR)
    easier = EasierCallback(finetune_epochs=1, max_removed=2, tolerance=100.0)
    trainer = _plain_trainer(tmp_path, 3, [easier])
    trainer.fit(routine, *_loaders())
    assert [c["removed"] for c in easier.curve] == [0, 1, 2]
    # e1 holds the final structure (the second removal ends epoch 1) but a shorter curve
    trainer.test(routine, _loaders()[1], ckpt_path=tmp_path / "e1.safetensors", verbose=False)
    assert [c["removed"] for c in easier.curve] == [0, 1, 2]  # the fit's results are kept
    with pytest.raises(CheckpointError, match="after 1 structure edits, the model has 2"):
        trainer.test(routine, _loaders()[1], ckpt_path=tmp_path / "e0.safetensors")
    # a plain resume on an unedited network: the edits are in the callback state, not replayed
    fresh = ClassificationRoutine(net=_net(), num_classes=3, lr=LR)  # relu2 is a ReLU again
    again = EasierCallback(finetune_epochs=1, max_removed=2, tolerance=100.0)
    with pytest.raises(CheckpointError, match="had 1 structure edits, this one has 0"):
        _plain_trainer(tmp_path / "again", 3, [again]).fit(
            fresh, *_loaders(), ckpt_path=tmp_path / "e0.safetensors"
        )


# --------------------------------------------------------------------------- DDP (subprocess)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


class _RankDigest(pl.Callback):
    """Writes the weights, masks and each epoch's starting optimizer of one rank."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.epochs: list[list[float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        (optimizer,) = trainer.optimizers
        self.epochs.append([optimizer.param_groups[0]["lr"], len(optimizer.state)])

    def on_train_end(self, trainer, pl_module) -> None:
        weights = torch.cat([p.detach().flatten() for p in pl_module.net.parameters()])
        masks = {m.module: _digest(m.mask) for m in iter_masks(pl_module.net)}
        record = {"world_size": trainer.world_size, "weights": _digest(weights), "masks": masks}
        record["epochs"] = self.epochs
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _ddp_run(out: Path) -> None:
    """Two CPU ranks (Lightning's launcher re-runs this file), IMP with LR rewinding."""
    imp = {"amount": 0.3, "rounds": 2, "retrain": "lr_rewind"}
    recipe = {
        "name": "ddp",
        "data": {
            "name": "synthetic",
            "input_shape": [1, 8, 8],
            "num_classes": 3,
            "num_samples": 128,
            "batch_size": 16,
        },
        "model": {"arch": "small_cnn", "arch_kwargs": {"width": 4}, "lr": LR},
        "trainer": {
            "max_epochs": 3,
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "enable_progress_bar": False,
            "callbacks": [{"class_path": "sobre.prune.callbacks.IMPCallback", "init_args": imp}],
        },
        "evaluate": {"measure": False, "report": False, "checkpoint": "final"},
    }
    sobre.fit(recipe, runs_dir=out / "runs", callbacks=[_RankDigest(out)])


@pytest.mark.slow
@pytest.mark.distributed
def test_imp_rewinds_identically_on_two_ddp_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SOBRE_RUN_DIR", None)
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["masks"] == ranks[1]["masks"] and len(ranks[0]["masks"]) == 5
    for rank in ranks:  # a fresh optimizer at the initial learning rate after each round
        assert rank["epochs"] == [[LR, 0], [LR, 0], [LR, 0]]


if __name__ == "__main__":
    _ddp_run(Path(sys.argv[1]))


def test_a_recipe_imp_schedule_method_resumes_exactly(tiny_recipe, runs_dir):
    """IMPSchedule as a recipe method: its setup masks keep the optimizer order across a resume."""
    tiny_recipe["trainer"]["max_epochs"] = 4
    tiny_recipe["methods"] = [
        {
            "class_path": "sobre.prune.imp.IMPSchedule",
            "init_args": {
                "pruner": {"class_path": "sobre.prune.imp.MagnitudePruner"},
                "every_n_epochs": 1,
                "rounds": 3,
            },
        }
    ]
    tiny_recipe["evaluate"] = {"measure": False, "report": False, "checkpoint": "final"}
    full = sobre.fit(tiny_recipe)
    with pytest.raises(RuntimeError, match="killed"):
        sobre.fit(tiny_recipe, callbacks=[Crash(at=2)])
    crashed = sorted((runs_dir / "tiny").iterdir())[-1]
    sobre.fit(resume=crashed)
    a, b = _final_weights(full.run_dir), _final_weights(crashed)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
