"""Leakage probe: separable, independent and XOR attributes, determinism, features_of, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.errors import ConfigError
from sobre.fairness.probe import features_of, leakage, probe_attack


def _gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _split(z: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
    half = len(z) // 2
    return z[:half], p[:half], z[half:], p[half:]


def test_linearly_separable_attribute_is_fully_leaked():
    z = _gaussian(1000, 8, 0)
    score = z[:, 0] + 0.5 * z[:, 3]
    z, score = z[score.abs() > 0.2][:600], score[score.abs() > 0.2][:600]  # a margin of 0.2
    p = (score > 0).long()
    assert leakage(*_split(z, p)) >= 0.97
    assert leakage(*_split(z, p), probe="mlp") >= 0.95


def test_independent_attribute_is_at_chance():
    z = _gaussian(4000, 8, 1)
    p = torch.randint(0, 4, (4000,), generator=torch.Generator().manual_seed(2))
    acc = leakage(*_split(z, p))
    # chance 1/4; the std of an accuracy over 2,000 test samples is about 0.01
    assert abs(acc - 0.25) < 0.05


def test_xor_attribute_needs_the_mlp_probe():
    z = _gaussian(1000, 2, 3)
    p = ((z[:, 0] > 0) ^ (z[:, 1] > 0)).long()
    linear = leakage(*_split(z, p), probe="linear")
    mlp = leakage(*_split(z, p), probe="mlp", hidden=32, epochs=300)
    # chance is 1/2; a linear probe gains a little from the sample's quadrant imbalance
    assert abs(linear - 0.5) < 0.15
    assert mlp >= 0.9


def test_same_seed_same_accuracy_and_global_rng_untouched():
    z = _gaussian(300, 4, 4)
    p = ((z[:, 0] > 0) ^ (z[:, 1] > 0)).long()
    args = _split(z, p)
    kw = {"probe": "mlp", "hidden": 16, "epochs": 20, "batch_size": 32}
    torch.manual_seed(123)
    first = leakage(*args, seed=7, **kw)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert leakage(*args, seed=7, **kw) == first
    assert torch.equal(torch.rand(1), after)
    others = {leakage(*args, seed=s, **kw) for s in range(4)}
    assert len(others) > 1  # the seed does drive initialisation and batch order


def test_standardisation_makes_feature_scale_irrelevant():
    z = _gaussian(400, 6, 5)
    p = (z[:, 1] > 0).long()
    scale = torch.tensor([1e4, 1e-4, 1.0, 3.0, 1e3, 7.0])
    zt, pt, ze, pe = _split(z, p)
    assert leakage(zt * scale + 50, pt, ze * scale + 50, pe) == leakage(zt, pt, ze, pe)


class _TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.bn(self.conv(x)).relu().mean((2, 3))))


@pytest.mark.parametrize("with_bias", [False, True])
def test_features_of_pools_conv_maps_like_a_manual_forward(with_bias: bool):
    torch.manual_seed(0)
    model = _TinyConv().train()
    model.bn.running_mean.uniform_(-1, 1)  # eval mode must use these statistics
    x = torch.randn(10, 3, 6, 6)
    y = torch.arange(10) % 2
    b = torch.arange(10) % 3
    data = TensorDataset(x, y, b) if with_bias else TensorDataset(x, y)
    out = features_of(model, DataLoader(data, batch_size=4), "bn")
    assert len(out) == (3 if with_bias else 2)
    assert model.training  # mode restored
    assert not model.bn._forward_hooks  # tap removed
    model.eval()
    with torch.no_grad():
        manual = model.bn(model.conv(x)).mean((2, 3))
    assert out[0].shape == (10, 5)
    torch.testing.assert_close(out[0], manual)
    assert torch.equal(out[1], y)
    if with_bias:
        assert torch.equal(out[2], b)
    assert features_of(model, DataLoader(data, batch_size=4), "bn", max_batches=2)[0].shape == (
        8,
        5,
    )


def test_features_of_vector_layer_and_bare_inputs():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.randn(7, 3, 2, 2)
    (z,) = features_of(model, [x[:4], x[4:]], "1")
    torch.testing.assert_close(z, model(x).detach())


def test_features_of_bad_layers_and_loaders():
    model = _TinyConv()
    data = DataLoader(TensorDataset(torch.randn(4, 3, 6, 6), torch.zeros(4).long()), batch_size=2)
    with pytest.raises(ConfigError, match="matches no module"):
        features_of(model, data, "bnn")
    with pytest.raises(ConfigError, match="matches 4 modules"):
        features_of(model, data, "*")
    with pytest.raises(ConfigError, match="no batch"):
        features_of(model, [], "bn")
    with pytest.raises(ConfigError, match="batch 1 has 1 items"):
        features_of(
            model, [(torch.randn(2, 3, 6, 6), torch.zeros(2)), (torch.randn(2, 3, 6, 6),)], "bn"
        )


def test_bad_inputs_name_the_fix():
    z, p = _gaussian(20, 3, 6), torch.arange(20) % 2
    with pytest.raises(ConfigError, match=r"2-D .*pool"):
        leakage(z.reshape(20, 3, 1), p, z, p)
    with pytest.raises(ConfigError, match="3 dimensions but features_test has 2"):
        leakage(z, p, z[:, :2], p)
    with pytest.raises(ConfigError, match="19 rows but attr_train has 20"):
        leakage(z[:19], p, z, p)
    with pytest.raises(ConfigError, match="single class"):
        leakage(z, torch.zeros(20).long(), z, p)
    with pytest.raises(ConfigError, match="probe='svm' is unknown"):
        leakage(z, p, z, p, probe="svm")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="integer classes"):
        leakage(z, p.float(), z, p)
    with pytest.raises(ConfigError, match="NaN"):
        leakage(z, p, z.clone().fill_(float("nan")), p)


def test_mi_estimate_is_log_k_when_readable_and_zero_when_independent():
    z = _gaussian(2000, 8, 3)
    p = (z[:, 0] > 0).long() + 2 * (z[:, 1] > 0).long()  # 4 classes, linearly readable
    readable = probe_attack(*_split(z, p))
    assert readable.entropy == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.01)
    # samples near the two boundaries keep the cross-entropy above 0: about 2/3 of log 4
    assert readable.mi_nats > 0.6 * readable.entropy and readable.accuracy > 0.9
    noise = probe_attack(
        *_split(z, torch.randint(0, 4, (2000,), generator=torch.Generator().manual_seed(4)))
    )
    assert noise.mi_nats < 0.05
    assert leakage(*_split(z, p)) == readable.accuracy
