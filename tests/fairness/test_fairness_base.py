"""The shared pieces of the fairness methods: bias labels from the batch and the plain loop."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.errors import ConfigError
from sobre.core.methods import StepContext
from sobre.fairness.base import BiasRegularizer, bias_report, predict, train
from sobre.models import create


class _Count(BiasRegularizer):
    name = "count"

    def forward(self, ctx: StepContext) -> Tensor:
        return self.bias_labels(ctx).float().mean() * 0.0


def _ctx(extra: tuple) -> StepContext:
    return StepContext(
        nn.Identity(), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), extra=extra
    )


def test_bias_labels_missing_points_to_the_unsupervised_variant() -> None:
    with pytest.raises(ConfigError, match="pseudo bias labels"):
        _Count()(_ctx(()))


def test_bias_labels_unknown_and_wrong_shape() -> None:
    with pytest.raises(ConfigError, match="unknown bias label"):
        _Count()(_ctx((torch.tensor([0, -1, 1, 2]),)))
    with pytest.raises(ConfigError, match="one integer per sample"):
        _Count()(_ctx((torch.tensor([0, 1]),)))
    assert _Count().bias_labels(_ctx((torch.tensor([0, 1, 1, 2]),))).tolist() == [0, 1, 1, 2]


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 12, 12, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y, (y + 1) % 3)


def test_train_lowers_the_loss_and_runs_the_regularizers() -> None:
    torch.manual_seed(0)
    model = create("simple_conv_s", num_classes=3, in_channels=3)
    loader = DataLoader(_data(), batch_size=16)
    history = train(model, loader, epochs=4, regularizers=[_Count()])
    assert set(history[0]) == {"task", "count"}
    assert history[-1]["task"] < history[0]["task"]
    pred, y, b = predict(model, loader)
    assert pred.shape == y.shape == b.shape == (64,)
    report = bias_report(model, loader)
    assert 0.0 <= report.unbiased <= 1.0 and report.accuracy > 0.5


def test_predict_and_train_reject_bad_loaders() -> None:
    model = create("simple_conv_s", num_classes=3, in_channels=3)
    pairs = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), torch.zeros(4).long()), batch_size=2)
    with pytest.raises(ConfigError, match=r"\(x, y, b\)"):
        predict(model, pairs)
    with pytest.raises(ConfigError, match="no batch"):
        train(model, [], epochs=1)
    with pytest.raises(ConfigError, match="epochs"):
        train(model, pairs, epochs=0)


def test_simple_conv_detached_head_trains_only_the_head() -> None:
    model = create("simple_conv_s", num_classes=3, in_channels=3, detach_head=True, normalize=True)
    x = torch.randn(4, 3, 12, 12)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    assert model.fc.weight.grad is not None
    assert all(p.grad is None for p in model.features.parameters())
    assert torch.allclose(model.embed(x).norm(dim=1), torch.ones(4), atol=1e-5)
    with pytest.raises(ConfigError, match="blocks"):
        create("simple_conv", pool_after=[5])
