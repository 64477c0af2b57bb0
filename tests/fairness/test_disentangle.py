"""EnD's (dis)entangling terms and DisP, its re-targeting to private labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.errors import ConfigError
from sobre.core.methods import StepContext, total
from sobre.core.taps import FeatureTap
from sobre.fairness.base import train
from sobre.fairness.disentangle import DisP, EnD, end_terms
from sobre.models import create


def _naive(z: Tensor, y: Tensor, b: Tensor) -> tuple[float, float]:
    """R⊥ and R∥ pair by pair, as the spec writes them (float64)."""
    z = F.normalize(z.double(), dim=1)
    blocks: dict[int, float] = {}
    m_orth = m_par = 0
    s_par = 0.0
    for i in range(len(z)):
        for j in range(i):
            g = float((z[i] @ z[j]).clamp(-1, 1))
            if b[i] == b[j]:
                blocks[int(b[i])] = blocks.get(int(b[i]), 0.0) + g
                m_orth += 1
            elif y[i] == y[j]:
                s_par += (1 + g) / 2
                m_par += 1
    r_orth = sum(abs(v) for v in blocks.values()) / m_orth if m_orth else 0.0
    return r_orth, (1 - s_par / m_par) if m_par else 0.0


def _ctx(z: Tensor, y: Tensor, *extra: Tensor) -> StepContext:
    return StepContext(nn.Identity(), z, y, None, {"embedding": z}, extra=extra)


def test_disp_is_zero_for_orthogonal_and_one_for_identical_same_class_features() -> None:
    y, p = torch.tensor([0, 1, 2, 3]), torch.zeros(4, dtype=torch.long)
    disp = DisP(alpha=1.0, beta=0.0)
    orthogonal = disp(_ctx(torch.eye(4) * 3.0, y, p))
    identical = disp(_ctx(torch.ones(4, 5), y, p))
    assert orthogonal["disp/orthogonal"].item() == pytest.approx(0.0, abs=1e-7)
    assert identical["disp/orthogonal"].item() == pytest.approx(1.0, abs=1e-6)
    assert orthogonal["disp/parallel"].item() == 0.0  # beta = 0: pure DisP


def test_absolute_value_is_taken_of_each_groups_summed_block() -> None:
    # group 0: pairs with similarities +1 and -1 (three samples) cancel inside the block
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([0, 0, 0, 1])
    r_orth, _ = end_terms(z, torch.zeros(4, dtype=torch.long), b)
    assert r_orth.item() == pytest.approx(1 / 3)  # |1 - 1 - 1| / 3 pairs, not 3 / 3
    assert r_orth.item() == pytest.approx(_naive(z, torch.zeros(4), b)[0])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 6),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_end_matches_a_naive_pair_loop(n: int, d: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    y, b = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    r_orth, r_par = end_terms(z, y, b)
    want_orth, want_par = _naive(z, y, b)
    assert r_orth.item() == pytest.approx(want_orth, abs=1e-9)
    assert r_par.item() == pytest.approx(want_par, abs=1e-9)
    assert 0.0 <= r_orth.item() <= 1.0 + 1e-9 and 0.0 <= r_par.item() <= 1.0 + 1e-9


def test_weights_scale_the_terms_and_entangling_pulls_same_target_pairs_together() -> None:
    z, y, b = torch.randn(8, 4), torch.tensor([0, 0, 1, 1] * 2), torch.arange(8) % 3
    terms = EnD(alpha=2.0, beta=3.0)(_ctx(z, y, b))
    r_orth, r_par = end_terms(z, y, b)
    assert terms["end/orthogonal"].item() == pytest.approx(2 * r_orth.item())
    assert terms["end/parallel"].item() == pytest.approx(3 * r_par.item())
    aligned = torch.ones(8, 4)  # same-target pairs already parallel: R∥ = 0
    assert end_terms(aligned, y, b)[1].item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_only_the_tapped_layer_and_below() -> None:
    torch.manual_seed(0)
    model = create("simple_conv_s", num_classes=3, in_channels=3)
    reg = EnD(alpha=1.0, beta=1.0)
    x, y, b = torch.randn(6, 3, 12, 12), torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1] * 3)
    with FeatureTap(model, reg.needs_features, detach=False) as tap:
        out = model(x)
    total(reg.terms(StepContext(model, x, y, out, dict(tap.features), extra=(b,)))).backward()
    assert model.fc.weight.grad is None and model.fc.bias.grad is None
    assert all(p.grad is not None for p in model.features.parameters())
    assert model.features.conv1.weight.grad.abs().sum() > 0


def test_missing_bias_labels_features_and_bad_weights_are_config_errors() -> None:
    z, y = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ConfigError, match="pseudo bias labels"):
        EnD()(_ctx(z, y))
    ctx = StepContext(nn.Identity(), z, y, None, {}, extra=(torch.zeros(4, dtype=torch.long),))
    with pytest.raises(ConfigError, match="layer='embedding'"):
        DisP()(ctx)
    with pytest.raises(ConfigError, match="not all 0"):
        EnD(alpha=0.0, beta=0.0)
    with pytest.raises(ConfigError, match="non-negative"):
        DisP(alpha=-1.0)


def test_disp_is_end_with_its_own_defaults_and_trains_in_the_plain_loop() -> None:
    disp = DisP()
    assert isinstance(disp, EnD) and (disp.alpha, disp.beta, disp.name) == (2.0, 2.0, "disp")
    torch.manual_seed(0)
    y = torch.arange(32) % 2
    data = TensorDataset(torch.randn(32, 3, 8, 8) + y.view(-1, 1, 1, 1), y, torch.arange(32) % 4)
    model = create("simple_conv_s", num_classes=2, in_channels=3)
    history = train(model, DataLoader(data, batch_size=16), epochs=2, regularizers=[disp])
    assert set(history[0]) == {"task", "disp/orthogonal", "disp/parallel"}
    assert all(v >= 0 for h in history for v in h.values())
