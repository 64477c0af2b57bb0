"""A small plain-PyTorch harness for the pruning trend tests on mnist5k (CPU, seconds per run)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.methods import Regularizer, StepContext, task_weight, total
from sobre.core.taps import FeatureTap
from sobre.data import mnist5k_datasets


def mnist5k() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """The real mnist5k splits: 4000 train, 500 val, 500 test."""
    return mnist5k_datasets()


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
