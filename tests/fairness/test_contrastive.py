"""ε-SupInfoNCE and FairKL (paper #8): exact values against naive loops, invariances, the
released vs fixed FairKL, and the objective's bias-label contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.errors import ConfigError
from sobre.core.methods import StepContext
from sobre.fairness.base import train
from sobre.fairness.contrastive import EpsSupInfoNCE, FairKL, FairKLObjective
from sobre.models import create


def _batch(seed: int, n: int = 24, d: int = 8, views: int = 1, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if views == 1 else (n, views, d)
    z = F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    y = torch.randint(0, classes, (n,), generator=g)
    b = torch.randint(0, classes, (n,), generator=g)
    return z, y, b


def _naive(z, y, tau=0.1, base=0.07, epsilon=0.0, strong=False, form="out") -> float:
    """The ε-SupInfoNCE / ε-SupCon formulas anchor by anchor, positive by positive, in floats."""
    if z.dim() == 2:
        z = z[:, None]
    n, views = z.shape[:2]
    ids = torch.arange(n) if y is None else y
    feats = [z[i, v] for v in range(views) for i in range(n)]
    labels = [int(ids[i]) for v in range(views) for i in range(n)]
    omega = math.exp(-epsilon)
    losses = []
    for i, zi in enumerate(feats):
        s = [float(zi @ zj) / tau for zj in feats]
        pos = [j for j in range(len(feats)) if j != i and labels[j] == labels[i]]
        neg_sum = sum(math.exp(s[j]) for j in range(len(feats)) if labels[j] != labels[i])
        if not pos:
            continue
        pos_sum = sum(math.exp(s[p]) for p in pos)
        if form == "in":
            losses.append(-math.log(pos_sum / (omega * pos_sum / len(pos) + neg_sum)))
            continue
        terms = []
        for p in pos:
            den = omega * (pos_sum if strong else math.exp(s[p])) + neg_sum
            terms.append(math.log(math.exp(s[p]) / den))
        losses.append(-sum(terms) / len(pos))
    return tau / base * sum(losses) / len(losses)


@pytest.mark.parametrize("epsilon", [0.0, 0.5])
@pytest.mark.parametrize("strong", [False, True])
def test_out_form_equals_the_naive_loop(epsilon, strong) -> None:
    """ε = 0 is SupInfoNCE (strong: SupCon); exact in float64 (log-sum-exp, nothing in the log)."""
    z, y, _ = _batch(0)
    got = EpsSupInfoNCE(epsilon=epsilon, strong=strong)(z, y).item()
    assert got == pytest.approx(_naive(z, y, epsilon=epsilon, strong=strong), rel=0, abs=1e-12)


def test_in_form_views_and_simclr_equal_the_naive_loop() -> None:
    z, y, _ = _batch(1, n=10, views=2)
    loss = EpsSupInfoNCE(temperature=0.2, epsilon=0.3, form="in")
    assert loss(z, y).item() == pytest.approx(
        _naive(z, y, tau=0.2, epsilon=0.3, form="in"), abs=1e-12
    )
    assert EpsSupInfoNCE()(z).item() == pytest.approx(_naive(z, None), abs=1e-12)


def test_log_eps_raises_the_denominator_as_released() -> None:
    z, y, _ = _batch(2)
    exact, released = EpsSupInfoNCE()(z, y), EpsSupInfoNCE(log_eps=1e-6)(z, y)
    assert 0 < (released - exact).item() < 1e-3


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 20))
def test_losses_are_permutation_invariant(seed, n) -> None:
    z, y, b = _batch(seed, n=n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    for loss in (EpsSupInfoNCE(epsilon=0.1), EpsSupInfoNCE(strong=True), EpsSupInfoNCE(form="in")):
        assert loss(z[perm], y[perm]).item() == pytest.approx(loss(z, y).item(), abs=1e-10)
    for behaviour in ("fixed", "released"):
        for mode in ("moments", "kl"):
            fairkl = FairKL(mode=mode, behaviour=behaviour)
            got = fairkl(z[perm], y[perm], b[perm]).item()
            assert got == pytest.approx(fairkl(z, y, b).item(), rel=1e-9, abs=1e-10)


def _simplex() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 points of a regular simplex (every pair has the same similarity), all 4 sets non-empty."""
    z = F.normalize(torch.eye(8, dtype=torch.float64) - 1 / 8, dim=1)
    return z, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])


def test_fairkl_is_zero_when_aligned_and_conflicting_sets_coincide() -> None:
    z, y, b = _simplex()
    for mode in ("moments", "kl"):
        assert FairKL(mode=mode)(z, y, b).item() == pytest.approx(0.0, abs=1e-12)
    # the release counts the self-pairs (similarity 1) as positive-aligned and takes σ over the
    # whole masked 8x8 matrix: the same batch is not at its optimum there
    assert FairKL(behaviour="released")(z, y, b).item() > 0.1


def test_fairkl_moments_by_hand() -> None:
    z, y, b = _batch(3, n=12)
    m = FairKL().moments(z, y, b)
    sim = z @ z.T
    off = ~torch.eye(12, dtype=torch.bool)
    same_y, same_b = y[:, None] == y[None, :], b[:, None] == b[None, :]
    pa = sim[same_y & same_b & off]
    assert m["pa"][0].item() == pytest.approx(pa.mean().item())
    assert m["pa"][1].item() == pytest.approx(pa.std(correction=0).item())
    assert m["pc"][2] == int((same_y & ~same_b).sum())
    expected = (
        (m["pc"][0] - m["pa"][0]) ** 2
        + (m["na"][0] - m["nc"][0]) ** 2
        + 2.0 * ((m["pa"][1] - m["pc"][1]) ** 2 + (m["na"][1] - m["nc"][1]) ** 2)
        - m["pc"][0]
        + m["na"][0]
    )
    assert FairKL(std_weight=2.0)(z, y, b).item() == pytest.approx(expected.item())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.floats(0.1, 2.0))
def test_fairkl_kl_mode_is_non_negative(seed, temperature) -> None:
    z, y, b = _batch(seed, n=16, classes=2)
    for behaviour in ("fixed", "released"):
        kl = FairKL(temperature, mode="kl", behaviour=behaviour, alignment_term=False)
        assert kl(z, y, b).item() >= -1e-12


def test_batches_without_conflicting_pairs_are_counted_and_stay_finite() -> None:
    z, y, _ = _batch(4, n=16)
    z.requires_grad_(True)
    fixed, released = FairKL(), FairKL(behaviour="released")
    assert fixed(z, y, y).item() == 0.0  # no conflicting pair: nothing to compare
    released(z, y, y).backward()  # the release pulls aligned similarities towards μ_pc = 0
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    fixed(z, y, (y + torch.arange(16)) % 3)
    assert fixed.no_conflict_fraction == 0.5 and released.no_conflict_fraction == 1.0


def test_bad_shapes_and_options_raise_config_errors() -> None:
    z, y, b = _batch(5, n=6)
    with pytest.raises(ConfigError, match=r"\(B, D\) or \(B, V, D\)"):
        EpsSupInfoNCE()(z[:, :, None, None], y)
    with pytest.raises(ConfigError, match=r"\(B, D\) or \(B, V, D\)"):
        EpsSupInfoNCE()(z[0], y)
    with pytest.raises(ConfigError, match="one label per sample"):
        EpsSupInfoNCE()(z, y[:4])
    with pytest.raises(ConfigError, match="V >= 2"):
        EpsSupInfoNCE()(z)
    with pytest.raises(ConfigError, match=r"\(B, D\)"):
        FairKL()(z[:, None], y, b)
    with pytest.raises(ConfigError, match="one label per sample"):
        FairKL()(z, y, b[:, None])
    with pytest.raises(ConfigError, match="'out' form"):
        EpsSupInfoNCE(strong=True, form="in")
    with pytest.raises(ConfigError, match="epsilon"):
        EpsSupInfoNCE(epsilon=-0.1)
    with pytest.raises(ConfigError, match="temperature"):
        EpsSupInfoNCE(temperature=0)
    with pytest.raises(ConfigError, match="behaviour"):
        FairKL(behaviour="paper")
    with pytest.raises(ConfigError, match="mode"):
        FairKL(mode="wasserstein")
    with pytest.raises(ConfigError, match="not all 0"):
        FairKLObjective(alpha=0, lambd=0)


def _ctx(z: torch.Tensor, y: torch.Tensor, extra: tuple = ()) -> StepContext:
    return StepContext(torch.nn.Identity(), z, y, None, {"embedding": z}, extra=extra)


def test_objective_reads_bias_labels_only_with_fairkl() -> None:
    z, y, b = _batch(6, n=12)
    plain = FairKLObjective(lambd=0.0)
    assert not plain.requires_bias_labels
    assert set(plain(_ctx(z, y))) == {"fairkl/contrastive"}  # (x, y) batches are fine
    full = FairKLObjective(alpha=2.0, lambd=0.5, epsilon=0.0)
    assert full.requires_bias_labels
    with pytest.raises(ConfigError, match="bias labels"):
        full(_ctx(z, y))
    terms = full(_ctx(z, y, (b,)))
    assert terms["fairkl/contrastive"].item() == pytest.approx(2 * _naive(z, y), abs=1e-10)
    assert terms["fairkl/fairkl"].item() == pytest.approx(0.5 * FairKL()(z, y, b).item())
    with pytest.raises(ConfigError, match="no features recorded"):
        FairKLObjective(layer="fc")(_ctx(z, y, (b,)))


def test_objective_trains_the_encoder_through_the_plain_loop() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (48,), generator=g)
    x = torch.randn(48, 3, 12, 12, generator=g) + y.view(-1, 1, 1, 1).float()
    loader = DataLoader(TensorDataset(x, y, (y + (torch.arange(48) % 4 == 0)) % 3), batch_size=16)
    model = create(
        "simple_conv_s",
        num_classes=3,
        last_activation="tanh",
        normalize=True,
        detach_head=True,
    )
    before = model.features.conv1.weight.detach().clone()
    objective = FairKLObjective()
    history = train(model, loader, epochs=2, regularizers=[objective])
    assert set(history[0]) == {"task", "fairkl/contrastive", "fairkl/fairkl"}
    assert not torch.equal(model.features.conv1.weight, before)
    assert objective.fairkl.batches == 6 and objective.fairkl.no_conflict_fraction == 0.0
