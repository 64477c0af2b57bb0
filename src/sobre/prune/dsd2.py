"""DSD²: dodging sparse double descent by distilling while pruning (paper #5, AAAI 2024).

With label noise, test accuracy against sparsity falls, rises, then falls again (sparse double
descent). A student pruned with IMP while it learns from a teacher's softened outputs keeps a
monotone curve. The student's objective (paper, authors' ``kd.py``) is

    L = α T² KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - α) CE(z_s, y),   α = 0.8, T = 10.

:class:`DistillationLoss` is the regulariser (its ``task_weight`` is ``1 - α``);
:func:`~sobre.core.labels.inject_label_noise` (re-exported here) makes the noisy training set
of the experiments; recipes set ``data.label_noise`` instead.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.labels import NoisyLabels, inject_label_noise
from sobre.core.measure import model_device
from sobre.core.methods import Regularizer, StepContext

__all__ = ["DistillationLoss", "NoisyLabels", "inject_label_noise"]


class DistillationLoss(Regularizer):
    """``α T² KL(teacher_T || student_T)``; the task cross-entropy is weighted ``1 - α``.

    Args:
        teacher: any module mapping the student's inputs to logits; a frozen copy is kept in
            eval mode, never trained, not part of the student's parameters or checkpoint.
        T: softmax temperature.
        alpha: weight of the distillation term.
        from_stage: in a recipe, instead of ``teacher``: the name of an earlier stage whose final
            model is the teacher (the engine loads its checkpoint, see
            :class:`~sobre.core.methods.NeedsStageModel`).
    """

    name = "kd"

    def __init__(
        self,
        teacher: nn.Module | None = None,
        T: float = 10.0,  # noqa: N803
        alpha: float = 0.8,
        from_stage: str | None = None,
    ) -> None:
        super().__init__()
        if T <= 0 or not 0.0 <= alpha <= 1.0:
            raise ConfigError(
                f"DistillationLoss needs T > 0 and 0 <= alpha <= 1, got T={T}, alpha={alpha}"
            )
        if (teacher is None) == (from_stage is None):
            raise ConfigError(
                "DistillationLoss needs exactly one of teacher= (a module) or from_stage= (the "
                "name of an earlier recipe stage whose model teaches)"
            )
        self.from_stage = from_stage
        object.__setattr__(self, "teacher", None)  # unregistered: not trained, not saved
        if teacher is not None:
            self.bind_stage_model(teacher)
        self.T, self.alpha = T, alpha
        self.task_weight = 1.0 - alpha

    def bind_stage_model(self, model: nn.Module) -> None:
        """Use a frozen copy of ``model`` as the teacher (the caller's module stays as is)."""
        object.__setattr__(self, "teacher", copy.deepcopy(model).eval().requires_grad_(False))

    def forward(self, ctx: StepContext) -> Tensor:
        if ctx.outputs is None:
            raise ConfigError("DistillationLoss needs the student's logits in ctx.outputs")
        teacher: nn.Module | None = self.teacher
        if teacher is None:
            raise ConfigError(
                f"DistillationLoss(from_stage={self.from_stage!r}) has no teacher yet: the "
                "engine binds it before the stage; in your own loop call bind_stage_model(teacher)"
            )
        x = ctx.inputs
        device = ctx.outputs.device
        if model_device(teacher) != device:
            teacher.to(device)
        with torch.no_grad():
            z_t = teacher.eval()(x)
        log_p_s = F.log_softmax(ctx.outputs / self.T, dim=1)
        log_p_t = F.log_softmax(z_t / self.T, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
        return self.alpha * self.T**2 * kl
