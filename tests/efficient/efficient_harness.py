"""Plain-PyTorch harness of the efficient-training trend tests (spec efficient-training, CPU).

Protocols (spec §1 and its Calibration section; §3/§4 transfer):
- ``mnist5k_split``: the 4,000 real MNIST training images, and the 1,000 held-out ones (the
  datamodule's val + test) as the test set.
- ``transfer_split``: pretrain on digits 0-4, fine-tune on 5-9 (labels remapped to 0-4), the
  spec's substitute for missing pretrained weights.
- ``resnet8``: CIFAR ResNet-8, width 16, one input channel.
- ``fit``: SGD loop with per-epoch hooks (``before_epoch(epoch)`` returns nothing; the hook is
  where a method updates its masks), an optional ``optimizer_wrapper`` (e.g. a masked optimizer)
  and a step-LR drop; returns per-epoch records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from sobre.data import mnist5k_datasets
from sobre.models import create


def _tensors(data: object) -> tuple[Tensor, Tensor]:
    if isinstance(data, TensorDataset):
        return data.tensors[0], data.tensors[1]
    assert isinstance(data, ConcatDataset)
    parts = [_tensors(d) for d in data.datasets]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def mnist5k_split() -> tuple[TensorDataset, TensorDataset]:
    """(train 4000, test 1000): the datamodule's train split, and val + test held out."""
    train, val, test = mnist5k_datasets()
    xv, yv = _tensors(val)
    xt, yt = _tensors(test)
    return TensorDataset(*_tensors(train)), TensorDataset(torch.cat([xv, xt]), torch.cat([yv, yt]))


def _classes(data: TensorDataset, classes: range) -> TensorDataset:
    x, y = data.tensors
    keep = (y >= classes.start) & (y < classes.stop)
    return TensorDataset(x[keep], y[keep] - classes.start)


def transfer_split() -> dict[str, tuple[TensorDataset, TensorDataset]]:
    """``{"source": (train, test) of digits 0-4, "target": (train, test) of 5-9 as 0-4}``."""
    train, test = mnist5k_split()
    return {
        name: (_classes(train, r), _classes(test, r))
        for name, r in (("source", range(0, 5)), ("target", range(5, 10)))
    }


def resnet8(num_classes: int = 10, seed: int = 0, width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-8 (16/32/64 channels times ``width``) for one-channel 28x28 inputs."""
    torch.manual_seed(seed)
    return create("resnet8", num_classes=num_classes, in_channels=1, width=width)


def loader(data: TensorDataset, batch_size: int = 100, seed: int = 0) -> DataLoader:
    """Shuffled training loader, seeded."""
    return DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 500) -> float:
    """Top-1 accuracy in eval mode (training flag restored)."""
    training = model.training
    model.eval()
    x, y = data.tensors
    correct = sum(
        int((model(xb).argmax(1) == yb).sum())
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
    )
    model.train(training)
    return correct / len(y)


@dataclass
class Run:
    """Per-epoch records of :func:`fit` (``test_acc`` after every epoch, the loss, LR)."""

    test_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    @property
    def final(self) -> float:
        return self.test_acc[-1]


def fit(
    model: nn.Module,
    train: TensorDataset,
    test: TensorDataset,
    *,
    epochs: int,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 100,
    drop_at: tuple[int, ...] = (),
    seed: int = 0,
    params: list[Tensor] | None = None,
    optimizer_wrapper: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    after_epoch: Callable[[int, torch.optim.Optimizer], bool | None] | None = None,
) -> Run:
    """SGD (momentum, weight decay), LR x0.1 at each epoch of ``drop_at``.

    ``after_epoch(epoch, optimizer)`` may return True to stop early (NeVe).
    """
    opt: torch.optim.Optimizer = torch.optim.SGD(
        params if params is not None else [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    if optimizer_wrapper is not None:
        opt = optimizer_wrapper(opt)
    criterion = nn.CrossEntropyLoss()
    data = loader(train, batch_size, seed)
    run = Run()
    for epoch in range(epochs):
        if epoch in drop_at:
            for group in opt.param_groups:
                group["lr"] *= 0.1
        if before_epoch is not None:
            before_epoch(epoch)
        model.train()
        total, n = 0.0, 0
        for x, y in data:
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        run.train_loss.append(total / n)
        run.lr.append(opt.param_groups[0]["lr"])
        run.test_acc.append(accuracy(model, test))
        if after_epoch is not None and after_epoch(epoch, opt):
            break
    return run
