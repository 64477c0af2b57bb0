"""ASI (#37): one warm-started subspace iteration per mode at fixed ranks. Exact gradients at full
ranks, convergence to the HOSVD error, exact resume from a state_dict, reset on a shape change,
and rank selection under a byte budget."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_compress import CASES, gradients, relative, smooth
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.measure import saved_activation_bytes
from sobre.efficient.compress import (
    ASIState,
    CompressedConv2d,
    CompressedLinear,
    compress_activations,
    decompress_activations,
    hosvd,
    select_ranks,
    tucker_reconstruct,
)


def asi(layer: nn.Module, ranks) -> nn.Module:
    """An ASI-compressed deep copy of ``layer``."""
    return compress_activations(
        nn.Sequential(copy.deepcopy(layer)), "0", method="asi", ranks=ranks
    )[0]


def step_grads(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gradients` of one fresh step (the parameter gradients zeroed first)."""
    layer.zero_grad(set_to_none=True)
    return gradients(layer, x)


@pytest.mark.parametrize(("make", "shape"), CASES)
def test_full_ranks_reproduce_exact_gradients(make, shape) -> None:
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape)
    gx, gw, gb = gradients(layer, x)
    compressed = asi(layer, 10**6)  # clipped to every mode's size
    for _ in range(2):  # Gaussian start, then the warm-started iteration
        cx, cw, cb = step_grads(compressed, x)
        torch.testing.assert_close(cx, gx)
        torch.testing.assert_close(cb, gb)
        assert relative(cw, gw) < 1e-4


def test_error_approaches_hosvd_at_the_same_ranks() -> None:
    x = smooth(16, 8, 10, 10)
    core, factors = hosvd(x, 0.9)
    ranks = [u.shape[1] for u in factors]
    floor = relative(tucker_reconstruct(core, factors), x)
    state = ASIState(4)
    errors = [relative(tucker_reconstruct(*state.step(x, ranks)), x) for _ in range(6)]
    # measured: HOSVD 0.375; ASI 0.557, 0.421, 0.389, 0.381, 0.379, 0.378 at ranks (10, 7, 3, 3)
    assert errors[0] > errors[-1]
    assert errors[-1] < 1.02 * floor
    assert [u.shape for u in state.factors] == [u.shape for u in factors]


def test_state_dict_round_trip_resumes_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3), nn.Linear(6, 5))
    compress_activations(model, "last:2", method="asi", ranks={"1": (4, 3, 4, 4), "2": 3})
    assert (
        "1.asi_state.factor_3" in model.state_dict()
        and "2.asi_state.factor_1" in model.state_dict()
    )
    batches = [smooth(4, 3, 8, 8, seed=s) for s in range(4)]
    for x in batches[:3]:
        model.zero_grad()
        model(x).square().sum().backward()
    state = copy.deepcopy(model.state_dict())
    twins = []
    for _ in range(2):
        twin = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3), nn.Linear(6, 5))
        compress_activations(twin, "last:2", method="asi", ranks={"1": (4, 3, 4, 4), "2": 3})
        twin.load_state_dict(state)  # empty 0 x 0 buffers take the stored shapes
        twins.append(twin)
    grads = []
    for m in (model, *twins):
        m.zero_grad()
        m(batches[3]).square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shape_change_resets_only_the_changed_mode() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 4, 3, padding=1)
    full, short = smooth(8, 6, 8, 8), smooth(3, 6, 8, 8, seed=1)
    compressed = asi(layer, (4, 3, 4, 4))
    step_grads(compressed, full)
    warm = compressed.asi_state.factors
    step_grads(compressed, short)  # a smaller last batch: mode 0 re-initialised, rank 3 = size
    after = compressed.asi_state.factors
    assert after[0].shape == (3, 3) and after[1].shape == warm[1].shape
    fresh = asi(layer, (4, 3, 4, 4))
    step_grads(fresh, short)
    torch.testing.assert_close(after[0], fresh.asi_state.factors[0])  # seeded re-init
    assert not torch.allclose(after[1], fresh.asi_state.factors[1])  # stayed warm
    _, exact, _ = step_grads(layer, full)
    _, back, _ = step_grads(compressed, full)  # back to 8: reset again, no error
    assert compressed.asi_state.factors[0].shape == (8, 4)
    assert torch.isfinite(back).all() and relative(back, exact) < 1


def test_asi_swap_is_reversible_and_validates_ranks() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    keys = list(model.state_dict())
    for bad, match in [
        (None, "needs ranks"),
        ((2, 2), r"one per mode \(B, C, H, W\)"),
        (0, "int >= 1"),
        ({"0": 2}, "no entry for layer '2'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            compress_activations(model, ["0", "2"], method="asi", ranks=bad)
        assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Linear  # unchanged
    tokens = CompressedLinear(4, 2, method="asi", ranks=(1, 2, 3))  # (B, N, D) inputs
    tokens(torch.randn(2, 5, 4, requires_grad=True)).sum().backward()
    assert [u.shape for u in tokens.asi_state.factors] == [(2, 1), (5, 2), (4, 3)]
    with pytest.raises(ConfigError, match="has 2 modes"):
        tokens(torch.randn(5, 4))
    compress_activations(model, ["0", "2"], method="asi", ranks={"0": 2, "2": (2, 3)})
    assert model[0].ranks == (2, 2, 2, 2) and model[2].ranks == (2, 3)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    compress_activations(model, ["0"], method="hosvd")  # leaving ASI drops the state
    assert isinstance(model[0], CompressedConv2d) and not hasattr(model[0], "asi_state")
    decompress_activations(model)
    assert list(model.state_dict()) == keys and not hasattr(model[2], "ranks")


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3), nn.Flatten(), nn.Linear(6 * 6 * 6, 4)
    )


def _bytes(model: nn.Module, batch: Tensor, ranks: dict[str, tuple[int, ...]]) -> int:
    """Float32 bytes of the factors ASI saves for ``ranks``, measured on the saved core and
    factors of one step."""
    compress_activations(model, list(ranks), method="asi", ranks=ranks)
    model(batch).sum().backward()
    total = 0
    for name in ranks:
        factors = model.get_submodule(name).asi_state.factors
        core = 1
        for u in factors:
            core *= u.shape[1]
        total += 4 * (core + sum(u.numel() for u in factors))
    return total


@settings(max_examples=8, deadline=None)
@given(budget=st.integers(2_000, 40_000))
def test_select_ranks_respects_the_budget(budget: int) -> None:
    torch.manual_seed(0)
    model, batch = _model(), smooth(4, 3, 8, 8)
    ranks = select_ranks(model, batch, budget, layers="last:2")
    assert set(ranks) == {"1", "3"} and len(ranks["1"]) == 4 and len(ranks["3"]) == 2
    assert _bytes(model, batch, ranks) <= budget


def test_select_ranks_grows_with_the_budget_and_raises_below_minimum() -> None:
    torch.manual_seed(0)
    model, batch = _model(), smooth(4, 3, 8, 8)
    small = select_ranks(model, batch, 3_000, layers="last:2")
    large = select_ranks(model, batch, 30_000, layers="last:2")
    assert all(a <= b for n in small for a, b in zip(small[n], large[n], strict=True))
    assert small != large
    # rank 1 everywhere: conv input (4, 6, 8, 8) -> 4 * (1 + 26), linear (4, 216) -> 4 * (1 + 220)
    with pytest.raises(ConfigError, match="minimum 992 bytes"):
        select_ranks(model, batch, 991, layers="last:2")


def test_asi_saves_fewer_measured_bytes_and_measuring_keeps_the_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    x = smooth(8, 3, 16, 16)
    before = saved_activation_bytes(model, x).activations
    compress_activations(model, "1", method="asi", ranks=(4, 4, 4, 4))
    (model(x).sum() + model(x).sum()).backward()  # two pending forwards share the state
    warm = [u.clone() for u in model[1].asi_state.factors]
    after = saved_activation_bytes(model, x).activations
    assert x.nbytes <= after < x.nbytes + (before - x.nbytes) // 2
    for u, v in zip(warm, model[1].asi_state.factors, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["hosvd", "svd", "asi"])
def test_measured_step_bytes_match_the_analytic_count(method: str) -> None:
    """A frozen conv feeding a compressed conv and a compressed head: the whole step keeps
    nothing but the factors (measured with saved-tensor hooks, parameters excluded)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    )
    model[0].requires_grad_(False)
    x = smooth(6, 3, 8, 8)
    compress_activations(
        model, ["1", "3"], method=method, explained_var=0.8, ranks=None if method != "asi" else 3
    )
    measured = saved_activation_bytes(model, x).activations
    model(x).sum().backward()
    analytic = model[1].saved_bytes + model[3].saved_bytes
    assert analytic > 0 and abs(measured - analytic) <= 0.1 * analytic


def test_budget_bytes_picks_asi_ranks_and_refuses_other_methods() -> None:
    torch.manual_seed(0)
    model, batch = _model(), smooth(4, 3, 8, 8)
    expected = select_ranks(model, batch, 5_000, layers="last:2")
    compress_activations(model, "last:2", method="asi", budget_bytes=5_000, batch=batch)
    assert model[1].ranks == expected["1"] and model[3].ranks == expected["3"]
    for kwargs in (
        {"method": "hosvd"},
        {"method": "asi", "ranks": 2, "batch": batch},
        {"method": "asi"},
    ):
        with pytest.raises(ConfigError, match="budget_bytes needs method='asi'"):
            compress_activations(_model(), "last:2", budget_bytes=5_000, **kwargs)
