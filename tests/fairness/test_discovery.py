"""Bias discovery without labels (#17): GCE, k-means, silhouette, NMI, pseudo labels, biasedness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics import silhouette_score as sk_silhouette
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.errors import ConfigError
from sobre.core.methods import DatasetTransform
from sobre.fairness.base import train
from sobre.fairness.discovery import (
    GCELoss,
    PseudoBias,
    biasedness,
    discover_bias,
    kmeans,
    misclassified,
    normalized_mutual_info,
    pseudo_bias_labels,
    silhouette_score,
    train_bias_capturing,
    with_pseudo_bias,
)
from sobre.fairness.groups import GroupDRO


def _blobs(k: int = 4, n: int = 40, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(k).repeat_interleave(n)
    centres = torch.randn(k, d, generator=g) * 10
    return centres[truth] + torch.randn(k * n, d, generator=g) * 0.5, truth


def test_gce_gradient_is_q_times_that_of_the_generalised_ce() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (8,), generator=g)
    q = 0.7
    GCELoss(q)(logits, y).backward()
    ours = logits.grad.clone()
    logits.grad = None
    p_y = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    ((1 - p_y.pow(q)) / q).mean().backward()
    torch.testing.assert_close(ours, q * logits.grad)
    # and it is CE weighted by p_y^q · q
    logits.grad = None
    (F.cross_entropy(logits, y, reduction="none") * p_y.detach().pow(q) * q).mean().backward()
    torch.testing.assert_close(ours, logits.grad)
    with pytest.raises(ConfigError, match="q must lie"):
        GCELoss(0.0)


def test_kmeans_recovers_separated_blobs_and_is_seeded() -> None:
    z, truth = _blobs()
    labels, centres = kmeans(z, 4, seed=3)
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == 1.0
    assert centres.shape == (4, 3)
    state = torch.get_rng_state()
    assert torch.equal(kmeans(z, 4, seed=3)[0], labels)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ConfigError, match="1 <= k <= N"):
        kmeans(z, 0)
    with pytest.raises(ConfigError, match=r"\(N, D\)"):
        kmeans(z[:, 0], 2)


def test_kmeans_with_fewer_distinct_points_than_clusters() -> None:
    z = torch.tensor([[0.0, 0.0]] * 6 + [[1.0, 1.0]] * 2)
    labels, centres = kmeans(z, 3, seed=0)
    assert labels.min() >= 0 and labels.max() < 3 and torch.isfinite(centres).all()
    assert len(torch.unique(labels[:6])) == len(torch.unique(labels[6:])) == 1
    assert labels[0] != labels[-1]


def test_silhouette_matches_sklearn() -> None:
    z, _ = _blobs(k=3, n=20)
    labels = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(1))
    labels[0] = 5  # a singleton cluster scores 0
    ours = silhouette_score(z, labels)
    assert ours == pytest.approx(sk_silhouette(z.numpy(), labels.numpy()), abs=1e-6)
    with pytest.raises(ConfigError, match="2 <= clusters"):
        silhouette_score(z, torch.zeros(60, dtype=torch.long))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-2, 4), st.integers(0, 3)), min_size=1, max_size=60),
)
def test_nmi_equals_sklearn(pairs: list[tuple[int, int]]) -> None:
    a, b = (np.array(v) for v in zip(*pairs, strict=True))
    ours = normalized_mutual_info(torch.as_tensor(a), torch.as_tensor(b))
    assert ours == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-9)


def test_nmi_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="same non-empty"):
        normalized_mutual_info(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ConfigError, match="integer classes"):
        normalized_mutual_info(torch.tensor([0.5, 1.0]), torch.tensor([0, 1]))


class _Colour(nn.Module):
    """A 'bias-capturing model' on 2-d inputs: feature = x itself, prediction = argmax of x."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Identity()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x) * self.scale


def _coloured(seed: int = 0) -> TensorDataset:
    """y ∈ {0, 1}; bias b ∈ {0, 1} = the input's blob; 80 % aligned (b = y)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat(50)
    b = torch.where(torch.rand(100, generator=g) < 0.8, y, 1 - y)
    x = F.one_hot(b, 2).float() * 5 + torch.randn(100, 2, generator=g) * 0.3
    return TensorDataset(x, y, b)


def test_pseudo_labels_by_kmeans_and_by_correctness() -> None:
    data = _coloured()
    y, b = data.tensors[1], data.tensors[2]
    loader = DataLoader(data, batch_size=32)
    b_hat = pseudo_bias_labels(_Colour(), loader, "embedding", n_clusters=2)
    assert normalized_mutual_info(b_hat, b) == 1.0
    assert normalized_mutual_info(pseudo_bias_labels(_Colour(), loader, "embedding"), b) == 1.0
    wrong = pseudo_bias_labels(_Colour(), loader, method="correctness")
    assert torch.equal(wrong, (b != y).long())
    assert torch.equal(misclassified(_Colour(), loader), b != y)
    per_class = pseudo_bias_labels(_Colour(), loader, "embedding", n_clusters=2, per_class=True)
    assert sorted(torch.unique(per_class).tolist()) == [0, 1, 2, 3]
    assert normalized_mutual_info(per_class, y * 2 + b) == pytest.approx(1.0)


def test_pseudo_labels_bad_inputs() -> None:
    data = _coloured()
    with pytest.raises(ConfigError, match="shuffle=False"):
        pseudo_bias_labels(_Colour(), DataLoader(data, shuffle=True), "embedding", n_clusters=2)
    loader = DataLoader(data, batch_size=32)
    with pytest.raises(ConfigError, match="method="):
        pseudo_bias_labels(_Colour(), loader, method="dbscan")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n_clusters"):
        pseudo_bias_labels(_Colour(), loader, n_clusters=0)
    with pytest.raises(ConfigError, match="exceeds"):
        pseudo_bias_labels(_Colour(), DataLoader(TensorDataset(data.tensors[0][:3])), n_clusters=5)
    with pytest.raises(ConfigError, match="needs the labels"):
        pseudo_bias_labels(
            _Colour(), DataLoader(TensorDataset(data.tensors[0])), n_clusters=2, per_class=True
        )
    with pytest.raises(ConfigError, match=r"closest names|some module names"):
        pseudo_bias_labels(_Colour(), loader, "nope", n_clusters=2)
    with pytest.raises(ConfigError, match="loss="):
        train_bias_capturing(_Colour(), loader, loss="mse")  # type: ignore[arg-type]


def test_with_pseudo_bias_yields_x_y_b_hat_and_feeds_a_bias_regularizer() -> None:
    data = _coloured()
    b_hat = torch.arange(100) % 3
    wrapped = with_pseudo_bias(data, b_hat)
    x, y, b = wrapped[7]
    assert torch.equal(x, data.tensors[0][7]) and int(y) == int(data.tensors[1][7])
    assert int(b) == 1 and len(wrapped) == 100
    only_xy = with_pseudo_bias(TensorDataset(*data.tensors[:2]), b_hat)
    assert len(only_xy[0]) == 3
    net = nn.Linear(2, 2)
    history = train(
        net, DataLoader(wrapped, batch_size=25), epochs=1, regularizers=[GroupDRO(2, 3)]
    )
    assert set(history[0]) == {"task", "groupdro"}
    with pytest.raises(ConfigError, match="100 samples"):
        with_pseudo_bias(data, b_hat[:5])
    with pytest.raises(ConfigError, match=">= 0"):
        with_pseudo_bias(data, b_hat - 1)


def test_discover_bias_trains_f_b_and_labels_every_sample() -> None:
    torch.manual_seed(0)
    data = _coloured()
    model = nn.Sequential()
    model.add_module("embedding", nn.Linear(2, 4))
    model.add_module("fc", nn.Linear(4, 2))
    b_hat = discover_bias(model, data, epochs=2, loss="gce", batch_size=32, n_clusters=2)
    assert b_hat.shape == (100,) and set(b_hat.tolist()) <= {0, 1}


def test_biasedness_of_a_bias_classifier_and_of_an_oracle() -> None:
    y = torch.arange(4).repeat_interleave(4)
    b = torch.arange(4).repeat(4)
    shortcut = biasedness(b, y, b)  # predicts the bias
    assert shortcut.nmi_bias == 1.0 and shortcut.nmi_target == 0.0 and shortcut.gap == 1.0
    oracle = biasedness(y, y, b)
    assert oracle.nmi_bias == 0.0 and oracle.nmi_target == 1.0 and oracle.gap == 0.0
    with pytest.raises(ConfigError, match="bias-conflicting"):
        biasedness(y, y, y)


def test_pseudo_bias_stage_transform_applies_and_restores() -> None:
    data = _coloured()
    transform = PseudoBias(n_clusters=2)
    new, state = transform.apply_dataset(_Colour(), data)
    assert isinstance(transform, DatasetTransform)
    assert normalized_mutual_info(state["b_hat"], data.tensors[2]) == 1.0
    assert transform.report() == {"clusters": 2.0, "nmi_true_bias": 1.0}
    x, y, b_hat = new[3]
    assert y == data[3][1]
    assert torch.equal(x, data[3][0]) and b_hat == state["b_hat"][3]
    again = transform.restore_dataset(data, state)
    assert [again[i][2] for i in range(5)] == [new[i][2] for i in range(5)]
