"""Group-robust baselines (bias.md §0.4): GroupDRO with (pseudo) group labels, and JTT.

- :class:`GroupDRO` (Sagawa et al., ICLR 2020) minimises the worst expected group loss with the
  online algorithm of their Alg. 1: per step, group losses ℓ_g of the batch, then
  q_g ← q_g · exp(η ℓ_g), q ← q / Σ q, and the loss Σ_g q_g ℓ_g replaces the cross-entropy.
  Groups are g = (y, b) (or b alone), b true or pseudo (:mod:`sobre.fairness.discovery`).
- JTT (Just Train Twice, Liu et al., ICML 2021): ERM for T epochs, error set E = the training
  samples it misclassifies, then retrain a fresh model on the training set where every sample of
  E appears λ_up times (:func:`jtt_upsample`; :func:`jtt` runs both stages with the plain loop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from sobre.core import dist
from sobre.core.errors import ConfigError
from sobre.core.methods import Regularizer, StepContext
from sobre.core.registry import check_choice
from sobre.fairness.base import BiasRegularizer, train
from sobre.fairness.discovery import misclassified

GroupBy = Literal["yb", "b"]

__all__ = ["GroupBy", "GroupDRO", "JTTUpsample", "jtt", "jtt_upsample", "upsample_indices"]


class GroupDRO(BiasRegularizer):
    """Online GroupDRO loss Σ_g q_g ℓ_g; it replaces the task cross-entropy (``task_weight = 0``).

    ℓ_g is the mean cross-entropy of the batch's samples in group g (0 for a group absent from
    the batch, as in the authors' code); q is updated by exponentiated gradient ascent before the
    loss is formed, in training only. In distributed runs the group sums and counts are
    all-reduced, so ℓ_g and q are the global ones on every rank; the local loss is scaled by the
    world size so that DDP's gradient average gives the gradient of the global objective. q is a
    buffer: it is saved in ``state_dict`` and a resume continues exactly. Use strong weight decay
    (the paper's 1e-1 to 1) or early stopping: without them the model fits every group and the
    weights stop mattering.

    Args:
        num_classes: number of classes y.
        num_bias: number of bias values b (clusters, for pseudo labels).
        eta: step size η of the group weights (0.01 in the paper).
        groups: ``"yb"`` for g = (y, b) (``num_classes · num_bias`` groups), ``"b"`` for g = b.
    """

    name = "groupdro"
    task_weight = 0.0
    q: Tensor

    def __init__(
        self, num_classes: int, num_bias: int, *, eta: float = 0.01, groups: GroupBy = "yb"
    ) -> None:
        super().__init__()
        check_choice("groups", groups, get_args(GroupBy), "GroupDRO")
        if num_classes < 1 or num_bias < 1 or not eta > 0:
            raise ConfigError(
                f"GroupDRO: need num_classes >= 1, num_bias >= 1 and eta > 0, got {num_classes}, "
                f"{num_bias} and {eta}; e.g. GroupDRO(10, 10, eta=0.01) on Biased-MNIST"
            )
        self.num_classes, self.num_bias, self.eta, self.groups = num_classes, num_bias, eta, groups
        n = num_classes * num_bias if groups == "yb" else num_bias
        self.register_buffer("q", torch.full((n,), 1.0 / n))

    def group_index(self, y: Tensor, b: Tensor) -> Tensor:
        """g of each sample: y · num_bias + b (``"yb"``) or b (``"b"``)."""
        if (b >= self.num_bias).any() or (y < 0).any() or (y >= self.num_classes).any():
            raise ConfigError(
                f"GroupDRO: labels out of range (y in {int(y.min())}..{int(y.max())}, b up to "
                f"{int(b.max())}) for num_classes={self.num_classes}, num_bias={self.num_bias}; "
                f"pass the dataset's numbers of classes and bias values (clusters)"
            )
        return y * self.num_bias + b if self.groups == "yb" else b

    def forward(self, ctx: StepContext) -> Tensor:
        if ctx.outputs is None or ctx.targets is None:
            raise ConfigError("GroupDRO needs the step's outputs and targets (a training step)")
        b = self.bias_labels(ctx)
        y = ctx.targets.long()
        g = self.group_index(y, b).to(ctx.outputs.device)
        per_sample = F.cross_entropy(ctx.outputs, y, reduction="none")
        n = len(self.q)
        sums = torch.zeros(n, dtype=per_sample.dtype, device=per_sample.device).index_add(
            0, g, per_sample
        )
        counts = dist.all_reduce_sum(torch.bincount(g, minlength=n).to(per_sample.dtype))
        denom = counts.clamp_min(1.0)
        if self.training and ctx.stage == "train":
            group_loss = dist.all_reduce_sum(sums.detach()) / denom
            q = self.q * torch.exp(self.eta * group_loss.to(self.q))
            self.q.copy_(q / q.sum())
        return dist.world_size() * (self.q.to(sums) * sums / denom).sum()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_bias={self.num_bias}, eta={self.eta}, "
            f"groups={self.groups!r}"
        )


def upsample_indices(errors: Tensor, lambda_up: int) -> Tensor:
    """Indices of JTT's upsampled set: every sample once, those in E λ_up times in all."""
    errors = torch.as_tensor(errors)
    if errors.dim() != 1 or errors.dtype != torch.bool:
        raise ConfigError(
            f"upsample_indices: errors must be a 1-D bool mask (one per sample), got "
            f"{tuple(errors.shape)} {errors.dtype}; use misclassified(model, loader)"
        )
    if isinstance(lambda_up, bool) or not isinstance(lambda_up, int) or lambda_up < 1:
        raise ConfigError(
            f"upsample_indices: lambda_up must be an integer >= 1, got {lambda_up!r}; JTT uses "
            f"e.g. 100 (Waterbirds) or 50 (CelebA)"
        )
    wrong = errors.nonzero().flatten()
    return torch.cat([torch.arange(len(errors)), wrong.repeat(lambda_up - 1)])


def jtt_upsample(
    model: nn.Module, dataset: Dataset, *, lambda_up: int, batch_size: int = 256
) -> tuple[Tensor, Subset]:
    """JTT's second-stage training set from the first-stage ERM ``model``.

    Returns:
        ``(errors, upsampled)``: the (N,) bool error set E (samples ``model`` misclassifies) and
        ``dataset`` with each sample of E repeated λ_up times (shuffle it when training).
    """
    errors = misclassified(model, DataLoader(dataset, batch_size=batch_size))
    return errors, Subset(dataset, upsample_indices(errors, lambda_up).tolist())


def jtt(
    make_model: Callable[[], nn.Module],
    dataset: Dataset,
    *,
    identify_epochs: int,
    epochs: int,
    lambda_up: int,
    batch_size: int = 256,
    seed: int = 0,
    regularizers: Sequence[Regularizer] = (),
    **train_kwargs: Any,
) -> tuple[nn.Module, Tensor]:
    """Just Train Twice with the plain loop: ERM for ``identify_epochs`` (T), then a fresh
    ``make_model()`` trained ``epochs`` on the set upsampled by λ_up.

    Returns:
        The final model and the error set E of the first stage.
    """
    gen = torch.Generator().manual_seed(seed)
    first = make_model()
    train(
        first,
        DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen),
        epochs=identify_epochs,
        **train_kwargs,
    )
    errors, upsampled = jtt_upsample(first, dataset, lambda_up=lambda_up, batch_size=batch_size)
    final = make_model()
    train(
        final,
        DataLoader(upsampled, batch_size=batch_size, shuffle=True, generator=gen),
        epochs=epochs,
        regularizers=regularizers,
        **train_kwargs,
    )
    return final, errors


class JTTUpsample:
    """Stage transform (a ``DatasetTransform``) for JTT in recipes: the model the last stage
    trained (ERM for T epochs) defines the error set E; the next stages train on the training
    set with every sample of E repeated λ_up times. Follow it with a fresh-weights transform.

    Args:
        lambda_up: λ_up, the copies of each misclassified sample.
        batch_size: batch of the pass that finds E.
    """

    def __init__(self, lambda_up: int = 20, batch_size: int = 256) -> None:
        if not isinstance(lambda_up, int) or lambda_up < 1:
            raise ConfigError(f"JTTUpsample: lambda_up must be an integer >= 1, got {lambda_up!r}")
        self.lambda_up, self.batch_size = lambda_up, batch_size
        self._report: dict[str, float] = {}

    def apply_dataset(
        self, model: nn.Module, dataset: Dataset
    ) -> tuple[Dataset, dict[str, Tensor]]:
        """The upsampled set and ``{"indices": ...}`` of the samples it holds."""
        errors, upsampled = jtt_upsample(
            model, dataset, lambda_up=self.lambda_up, batch_size=self.batch_size
        )
        self._report = {"errors": float(errors.sum()), "size": float(len(upsampled))}
        return upsampled, {"indices": torch.as_tensor(upsampled.indices)}

    def restore_dataset(self, dataset: Dataset, state: dict[str, Tensor]) -> Dataset:
        """The same upsampled set from the saved indices (a resumed run)."""
        return Subset(dataset, state["indices"].tolist())

    def report(self) -> dict[str, float]:
        """Size of the error set and of the upsampled training set."""
        return dict(self._report)
