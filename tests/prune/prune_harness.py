"""A small plain-PyTorch harness for the pruning trend tests on mnist5k (CPU, seconds per run)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.methods import Regularizer, StepContext, task_weight, total
from sobre.core.taps import FeatureTap
from sobre.data import mnist5k_datasets
from sobre.models import create
from sobre.prune.curves import sparsity_curve
from sobre.prune.dsd2 import DistillationLoss, inject_label_noise
from sobre.prune.imp import MagnitudePruner


def mnist5k() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """The real mnist5k splits: 4000 train, 500 val, 500 test."""
    return mnist5k_datasets()


def lacoot_net(seed: int) -> nn.Module:
    """LaCoOT's trend model (spec §4.5): residual MLP, 8 blocks relu(x + f(x)), width 128, BN."""
    torch.manual_seed(seed)
    return create(
        "residual_mlp",
        num_classes=10,
        in_channels=1,
        width=128,
        blocks=8,
        batch_norm=True,
        post_activation=True,
    )


def loader(
    data: TensorDataset, batch_size: int = 128, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    return DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed)
    )


def train(
    model: nn.Module,
    data: DataLoader,
    epochs: int,
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    regularizers: Sequence[Regularizer] = (),
) -> nn.Module:
    """Plain loop: task loss x task weight + regulariser terms, features from one tap."""
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    selectors = list(dict.fromkeys(s for r in regularizers for s in r.needs_features))
    criterion = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for x, y in data:
            with FeatureTap(model, selectors, detach=False) as tap:
                out = model(x)
            ctx = StepContext(model, x, y, out, tap.features)
            terms = {"task": task_weight(regularizers) * criterion(out, y)}
            for reg in regularizers:
                terms.update(reg.terms(ctx))
            opt.zero_grad()
            total(terms).backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Top-1 accuracy in eval mode (training flag restored)."""
    training = model.training
    model.eval()
    x, y = data.tensors
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(training)
    return acc


def train_cosine(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    epochs: int,
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    regularizers: Sequence[Regularizer] = (),
    batch_size: int = 128,
    seed: int = 0,
) -> nn.Module:
    """Fast loop on in-memory tensors: a fresh optimizer, cosine LR over ``epochs`` (per epoch),
    batches from a seeded permutation per epoch (no DataLoader), no feature tap; task loss x task
    weight + regulariser terms. For the many-epoch IMP curves (DSD², double descent)."""
    if any(r.needs_features for r in regularizers):
        raise ValueError("train_cosine opens no feature tap: use train() for such regularizers")
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    criterion = nn.CrossEntropyLoss()
    weight = task_weight(regularizers)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(targets), generator=gen).split(batch_size):
            x, y = inputs[idx], targets[idx]
            out = model(x)
            ctx = StepContext(model, x, y, out)
            terms = {"task": weight * criterion(out, y)}
            for reg in regularizers:
                terms.update(reg.terms(ctx))
            opt.zero_grad()
            total(terms).backward()
            opt.step()
        schedule.step()
    return model


def noisy_mnist5k(eps: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, TensorDataset]:
    """Label-noise data of the double descent runs: ``(x, noisy y, clean y, held-out)``.

    The mnist5k train split in a seeded random order with DSD² noise (``inject_label_noise``: the
    first ``eps * N`` labels replaced by a different one) on it only; the held-out set is val +
    test (1000 images, the spec's test size). The split is sorted by class, so without the
    shuffle the noise would hit only the first classes.
    """
    train_split, val, test = mnist5k()
    order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed))
    x, clean = train_split.tensors[0][order], train_split.tensors[1][order]
    noisy = inject_label_noise(TensorDataset(x, clean), eps, num_classes=10, seed=seed).labels
    held_out = TensorDataset(
        *(torch.cat([a, b]) for a, b in zip(val.tensors, test.tensors, strict=True))
    )
    return x, noisy, clean, held_out


def _lenet300(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create("mlp", num_classes=10, in_channels=1, hidden=(300, 100))


@functools.cache
def _noisy_dense(seed: int, weight_decay: float, epochs: int) -> dict[str, Tensor]:
    """LeNet-300-100 trained on noisy mnist5k (SGD lr 0.05, momentum 0.9, cosine): its weights."""
    x, y, _, _ = noisy_mnist5k()
    net = _lenet300(seed)
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=weight_decay)
    train_cosine(net, x, y, epochs, sgd, seed=seed)
    return {k: v.clone() for k, v in net.state_dict().items()}


def noisy_imp_curve(
    seed: int,
    weight_decay: float,
    amount: float,
    rounds: int,
    epochs: int,
    dense_epochs: int = 40,
    distill_T: float | None = None,  # noqa: N803
) -> tuple[dict, ...]:
    """IMP curve of LeNet-300-100 on :func:`noisy_mnist5k` (DSD² §5.5, double descent §7.5).

    The dense model trains ``dense_epochs`` (SGD lr 0.05, momentum 0.9, ``weight_decay``, cosine,
    batch 128), then each round prunes ``amount`` of the live weights (global L1) and retrains
    ``epochs`` with a fresh optimizer and schedule (LR rewinding). With ``distill_T`` the student
    is trained from the same initialisation with ``DistillationLoss(teacher, T, alpha=0.8)``, the
    teacher being the dense model of the same ``seed`` and ``weight_decay`` (the baseline's round
    0). Points: ``test_acc`` (held-out), ``train_acc`` (noisy labels), entropy on the train set.
    Cached (whatever the call's spelling), so modules of one session share curves and dense models.
    """
    return _noisy_imp_curve(seed, weight_decay, amount, rounds, epochs, dense_epochs, distill_T)


@functools.cache
def _noisy_imp_curve(
    seed: int,
    weight_decay: float,
    amount: float,
    rounds: int,
    epochs: int,
    dense_epochs: int,
    distill_T: float | None,  # noqa: N803
) -> tuple[dict, ...]:
    x, y, _, held_out = noisy_mnist5k()
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=weight_decay)
    dense = _noisy_dense(seed, weight_decay, dense_epochs)
    regs: list[Regularizer] = []
    model = _lenet300(seed)
    if distill_T is None:
        model.load_state_dict(dense)
    else:
        teacher = _lenet300(seed)
        teacher.load_state_dict(dense)
        regs = [DistillationLoss(teacher, T=distill_T, alpha=0.8)]
        train_cosine(model, x, y, dense_epochs, sgd, regs, seed=seed)
    rounds_done = [0]

    def retrain(net: nn.Module) -> None:
        rounds_done[0] += 1
        train_cosine(net, x, y, epochs, sgd, regs, seed=1000 * seed + rounds_done[0])

    def evaluate(net: nn.Module) -> dict[str, float]:
        return {
            "test_acc": accuracy(net, held_out),
            "train_acc": accuracy(net, TensorDataset(x, y)),
        }

    curve = sparsity_curve(
        model,
        MagnitudePruner(amount),
        rounds,
        retrain,
        evaluate,
        loader=DataLoader(TensorDataset(x, y), batch_size=1000),
    )
    return tuple(curve)


def mean_curve(curves: Sequence[Sequence[dict]], keys: Sequence[str]) -> list[dict]:
    """Point-wise mean of ``keys`` over curves of the same rounds (e.g. seeds), with sparsity."""
    return [
        {"sparsity": points[0]["sparsity"]}
        | {k: sum(p[k] for p in points) / len(points) for k in keys}
        for points in zip(*curves, strict=True)
    ]
