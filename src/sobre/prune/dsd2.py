"""DSD²: dodging sparse double descent by distilling while pruning (paper #5, AAAI 2024).

With label noise, test accuracy against sparsity falls, rises, then falls again (sparse double
descent). A student pruned with IMP while it learns from a teacher's softened outputs keeps a
monotone curve. The student's objective (paper, authors' ``kd.py``) is

    L = α T² KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - α) CE(z_s, y),   α = 0.8, T = 10.

:class:`DistillationLoss` is the regulariser (its ``task_weight`` is ``1 - α``);
:func:`inject_label_noise` makes the noisy training set of the experiments.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from sobre.core.errors import ConfigError
from sobre.core.methods import Regularizer, StepContext


class DistillationLoss(Regularizer):
    """``α T² KL(teacher_T || student_T)``; the task cross-entropy is weighted ``1 - α``.

    Args:
        teacher: any module mapping the student's inputs to logits; kept in eval mode, never
            trained, not part of the student's parameters or checkpoint.
        T: softmax temperature.
        alpha: weight of the distillation term.
    """

    name = "kd"

    def __init__(self, teacher: nn.Module, T: float = 10.0, alpha: float = 0.8) -> None:  # noqa: N803
        super().__init__()
        if T <= 0 or not 0.0 <= alpha <= 1.0:
            raise ConfigError(
                f"DistillationLoss needs T > 0 and 0 <= alpha <= 1, got T={T}, alpha={alpha}"
            )
        frozen = copy.deepcopy(teacher).eval().requires_grad_(False)  # the caller's stays as is
        object.__setattr__(self, "teacher", frozen)  # unregistered: not trained, not saved
        self.T, self.alpha = T, alpha
        self.task_weight = 1.0 - alpha

    def forward(self, ctx: StepContext) -> Tensor:
        if ctx.outputs is None:
            raise ConfigError("DistillationLoss needs the student's logits in ctx.outputs")
        teacher: nn.Module = self.teacher
        x = ctx.inputs
        device = ctx.outputs.device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        with torch.no_grad():
            z_t = teacher.eval()(x)
        log_p_s = F.log_softmax(ctx.outputs / self.T, dim=1)
        log_p_t = F.log_softmax(z_t / self.T, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
        return self.alpha * self.T**2 * kl


class NoisyLabels(Dataset):
    """A dataset whose first ``round(eps * N)`` samples carry a different, random label.

    Attributes:
        noisy: indices whose label was changed.
        labels: the labels served (noisy ones included).
    """

    def __init__(self, dataset: Dataset, labels: Tensor, noisy: Tensor) -> None:
        self.dataset, self.labels, self.noisy = dataset, labels, noisy

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        return self.dataset[index][0], self.labels[index]


def inject_label_noise(
    dataset: Dataset, eps: float, num_classes: int, seed: int = 0
) -> NoisyLabels:
    """DSD² label noise: the first ``eps * N`` samples get a random *different* label.

    As in the authors' code, the *first* samples are corrupted: shuffle a class-sorted dataset
    first (mnist5k's train split is sorted by class; unshuffled, only classes 0-1 would be noisy).

    Args:
        dataset: yields ``(x, y)`` with integer labels.
        eps: fraction of noisy labels in ``[0, 1)``.
        num_classes: number of classes.
        seed: seed of the replacement labels.
    """
    if not 0.0 <= eps < 1.0:
        raise ConfigError(f"eps is the fraction of noisy labels, in [0, 1); got {eps}")
    labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    n_noisy = round(eps * len(labels))
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, (n_noisy,), generator=gen)  # never the true label
    noisy_labels = labels.clone()
    noisy_labels[:n_noisy] = (labels[:n_noisy] + shift) % num_classes
    return NoisyLabels(dataset, noisy_labels, torch.arange(n_noisy))
