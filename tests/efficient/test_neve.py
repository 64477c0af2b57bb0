"""NeVe (#48): neural velocity on a noise probe, the plateau LR rule and the stop rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.errors import ConfigError
from sobre.efficient.neve import NeuralVelocity, VelocityPlateau, VelocityReport, neuron_similarity


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _perturb(model: nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _report(mse: float | None, mean: float | None = 1.0) -> VelocityReport:
    return VelocityReport(epoch=0, mse=mse, mean_velocity=mean)


def _sgd(lr: float = 0.1, groups: int = 1) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]} for _ in range(groups)], lr)


def test_reference_then_velocity_of_an_unchanged_model_is_zero():
    velocity = NeuralVelocity(_net(), input_shape=(1, 6, 6), n_probe=8)
    assert velocity.names == ["0", "1", "5"]  # Conv2d, BatchNorm2d, Linear
    ref = velocity.measure()
    assert ref.is_reference and ref.epoch == -1
    assert ref.velocity is None and ref.mean_velocity is None and ref.mse is None
    first = velocity.measure()
    assert first.epoch == 0 and first.mse is None  # M needs two velocities
    assert all(bool((r == 1.0).all()) for r in first.rho.values())
    assert all(bool((v == 0.0).all()) for v in first.velocity.values())
    assert first.mean_velocity == 0.0 and first.total_velocity == 0.0
    second = velocity.measure()
    assert second.mse == 0.0 and second.mean_velocity == 0.0  # 0 is the fixed point


def test_unchanged_model_after_a_change_decays_by_minus_mu():
    model = _net()
    velocity = NeuralVelocity(model, input_shape=(1, 6, 6), n_probe=8, mu=0.5)
    velocity.measure()
    _perturb(model)
    moved = velocity.measure()
    for name, rho in moved.rho.items():
        torch.testing.assert_close(moved.velocity[name], 1.0 - rho)  # v^{-1} = 0
    assert moved.mean_velocity > 0
    still = velocity.measure()  # same weights: rho = 1, v^t = 1 - (1 + mu v^{t-1})
    for name, v in still.velocity.items():
        assert torch.equal(still.rho[name], torch.ones_like(v))
        torch.testing.assert_close(v, -0.5 * moved.velocity[name])
    assert still.mean_velocity == pytest.approx(0.5 * moved.mean_velocity)
    expected = sum(float((1.5 * v).square().mean()) for v in moved.velocity.values()) / 3
    assert still.mse == pytest.approx(expected)
    assert still.total_velocity == pytest.approx(0.5 * moved.total_velocity)


@settings(max_examples=30, deadline=None)
@given(
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
    row=st.integers(0, 4),
)
def test_similarity_is_invariant_to_a_positive_scale_per_neuron(scale, seed, row):
    y = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(seed))
    scaled = y.clone()
    scaled[row] *= scale
    rho = neuron_similarity(scaled, y)
    torch.testing.assert_close(rho, torch.ones(5, dtype=torch.float64))
    assert float(neuron_similarity(-y, y)[row]) == pytest.approx(-1.0)


def test_similarity_zero_rows_and_clamp():
    y = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [1.0, 0.0]])
    prev = torch.tensor([[0.0, 0.0], [3.0, 1.0], [1.0, 2.0], [0.0, 1.0]])
    rho = neuron_similarity(y, prev)
    assert rho.tolist() == [1.0, 0.0, 1.0, 0.0]  # both zero, one zero, identical, orthogonal
    with pytest.raises(ConfigError, match="changed shape"):
        neuron_similarity(y, prev[:3])


def test_velocity_concatenates_samples_instead_of_averaging():
    # Two samples: one identical, one reversed. NEq's mean cosine would be 0; NeVe's single
    # concatenated vector is dominated by the large sample.
    y = torch.tensor([[[10.0, 0.0], [0.0, 1.0]]])
    prev = torch.tensor([[[10.0, 0.0], [0.0, -1.0]]])
    assert float(neuron_similarity(y, prev)) == pytest.approx(99 / 101)


def test_probe_from_a_loader_keeps_the_first_n_samples():
    data = TensorDataset(torch.rand(30, 1, 6, 6), torch.zeros(30, dtype=torch.long))
    velocity = NeuralVelocity(_net(), probe=DataLoader(data, batch_size=8), n_probe=20)
    assert velocity.outputs.num_samples == 20
    listed = NeuralVelocity(_net(), probe=[torch.rand(5, 1, 6, 6)], n_probe=20)
    assert listed.outputs.num_samples == 5


def test_noise_probe_shape_inferred_from_a_leading_linear():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    velocity = NeuralVelocity(mlp, n_probe=4, noise="gaussian")
    assert velocity.outputs.probe[0].shape == (4, 6)
    assert velocity.measure().is_reference


def test_state_dict_round_trip_continues_identically():
    model = _net()
    velocity = NeuralVelocity(model, input_shape=(1, 6, 6), n_probe=8)
    velocity.measure()
    _perturb(model, seed=1)
    velocity.measure()
    state = velocity.state_dict()
    resumed = NeuralVelocity(model, input_shape=(1, 6, 6), n_probe=8, seed=5)  # other noise
    resumed.load_state_dict(state)
    _perturb(model, seed=2)
    a, b = velocity.measure(), resumed.measure()
    assert a.epoch == b.epoch == 1
    assert a.mse == b.mse and a.mean_velocity == b.mean_velocity
    assert all(torch.equal(a.velocity[n], b.velocity[n]) for n in a.velocity)
    other = NeuralVelocity(_net(), input_shape=(1, 6, 6), targets=nn.Linear)
    with pytest.raises(ConfigError, match="same model and targets"):
        other.load_state_dict(state)


def test_plateau_decays_after_patience_bad_epochs_by_factor_never_below_min_lr():
    opt = _sgd(0.1, groups=2)
    plateau = VelocityPlateau(opt, factor=0.5, patience=2, min_lr=0.03)
    assert not plateau.step(_report(None))  # reference / epoch 0: no M, LR untouched
    plateau.step(_report(1.0))
    plateau.step(_report(1.0))  # not strictly better (threshold 0): bad epoch 1
    plateau.step(_report(2.0))  # bad epoch 2 = patience: still waiting
    assert plateau.num_decays == 0 and opt.param_groups[0]["lr"] == 0.1
    plateau.step(_report(3.0))  # bad epoch 3 > patience: decay
    assert plateau.num_decays == 1
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
    assert plateau.best == math.inf  # the authors' local plateau forgets the best value
    for m in (5.0, 6.0, 7.0, 8.0):  # 5.0 improves on inf, then three bad epochs
        plateau.step(_report(m))
    assert [g["lr"] for g in opt.param_groups] == [0.03, 0.03]  # clamped at min_lr
    for m in (5.0, 6.0, 7.0, 8.0):
        plateau.step(_report(m))
    assert plateau.num_decays == 2 and opt.param_groups[0]["lr"] == 0.03  # no decay below


def test_plateau_improving_signal_never_decays():
    opt = _sgd()
    plateau = VelocityPlateau(opt, patience=0)
    for m in (1.0, 0.5, 0.25, 0.125):
        plateau.step(_report(m))
    assert plateau.num_decays == 0 and opt.param_groups[0]["lr"] == 0.1


def test_stop_fires_below_threshold_and_stays():
    plateau = VelocityPlateau(_sgd(), stop_below=1e-3)
    assert not plateau.step(_report(None, mean=None))  # the reference never stops
    assert not plateau.step(_report(None, mean=1e-3))  # strict
    assert plateau.step(_report(0.1, mean=9e-4))
    assert plateau.should_stop and plateau.step(_report(0.1, mean=0.5))
    never = VelocityPlateau(_sgd(), stop_below=None)
    assert not never.step(_report(0.1, mean=0.0))


def test_stop_fires_on_a_converged_model():
    model = _net()
    velocity = NeuralVelocity(model, input_shape=(1, 6, 6), n_probe=8)
    plateau = VelocityPlateau(_sgd(), stop_below=1e-3)
    assert not plateau.step(velocity.measure())
    _perturb(model)
    stops = [plateau.step(velocity.measure()) for _ in range(12)]  # then frozen: v halves
    assert not stops[0] and stops[-1]
    assert stops.index(True) > 1


def test_plateau_state_dict_round_trip():
    opt = _sgd()
    plateau = VelocityPlateau(opt, patience=1)
    for m in (1.0, 2.0, 3.0, 0.5):
        plateau.step(_report(m))
    state = plateau.state_dict()
    assert all(isinstance(v, (int, float, bool, type(None))) for v in state.values())
    resumed = VelocityPlateau(_sgd(), patience=7)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state and resumed.num_decays == 1
    with pytest.raises(ConfigError, match="not a VelocityPlateau state"):
        resumed.load_state_dict({"best": 1.0})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "cannot infer the input shape.*input_shape=\\(C, H, W\\)"),
        ({"input_shape": (1, 6, 6), "noise": "gauss"}, "did you mean 'gaussian'"),
        ({"probe": "gaussian"}, "noise='gaussian'"),
        ({"input_shape": (1, 6, 6), "targets": nn.LSTM}, "matches no module.*Conv2d"),
        ({"input_shape": (1, 6, 6), "targets": "conv"}, "matches no module"),
        ({"probe": DataLoader(TensorDataset(torch.rand(0, 1, 6, 6)))}, "yielded no samples"),
        ({"input_shape": (1, 6, 6), "n_probe": 0}, "n_probe must be >= 1"),
        ({"input_shape": (1, 6, 6), "mu": 1.0}, "mu must be in \\[0, 1\\)"),
    ],
)
def test_neural_velocity_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        NeuralVelocity(_net(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patience": -1}, "patience must be an int >= 0"),
        ({"patience": 2.5}, "patience must be an int >= 0"),
        ({"factor": 1.0}, "factor must be in \\(0, 1\\).*0.5"),
        ({"factor": 0.0}, "factor must be in \\(0, 1\\)"),
        ({"stop_below": -1e-3}, "stop_below must be >= 0"),
        ({"threshold": 1.0}, "threshold must be in \\[0, 1\\)"),
        ({"min_lr": -1.0}, "min_lr must be >= 0"),
    ],
)
def test_velocity_plateau_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        VelocityPlateau(_sgd(), **kwargs)
    with pytest.raises(ConfigError, match="needs a torch optimizer"):
        VelocityPlateau(object())  # type: ignore[arg-type]
