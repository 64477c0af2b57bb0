"""ε-SupInfoNCE and FairKL (Barbano et al., "Unbiased Supervised Contrastive Learning", ICLR 2023).

Paper #8 (bias.md §1), after the released ``losses.py`` (EIDOSLAB/unbiased-contrastive-learning).
For L2-normalised features z, s_ij = z_i·z_j / τ, P(i) the samples of i's class (i excluded),
N(i) those of other classes and ω = e^(−ε):

- ε-SupInfoNCE, "out" form (default): each positive competes with itself-with-margin and the
  negatives only, ℓ_i = −(1/|P(i)|) Σ_{p∈P(i)} [s_ip − log(ω e^{s_ip} + Σ_{n∈N(i)} e^{s_in})];
- "in" form: ℓ_i = −[log Σ_p e^{s_ip} − log((ω/|P(i)|) Σ_p e^{s_ip} + Σ_n e^{s_in})];
- ε-SupCon (``strong=True``, out form): the denominator is ω Σ_{p∈P(i)} e^{s_ip} + Σ_n e^{s_in};
  ε = 0 gives SupCon (Khosla et al.), and ε = 0 in the plain out form gives SupInfoNCE.

The loss is (τ/τ_base) times the mean of ℓ_i over the anchors with a positive (the release
counts an anchor without positive as 0 in its mean: the same when every anchor has one, as in
batches of 256 over 10 classes). Log-denominators are log-sum-exps, exact in float64; the release
adds 1e-6 inside the log after subtracting each row's maximum (the self-similarity 1/τ, absent
from the denominator), which shifts the value by up to about 3e-4: ``log_eps=1e-6`` reproduces it.

FairKL, on features z with labels y and bias labels b, compares the similarities s_ij = z_i·z_j/T
of four pair sets: positive-aligned (y=, b=), positive-conflicting (y=, b≠), negative-aligned
(y≠, b=) and negative-conflicting (y≠, b≠), with means μ and standard deviations σ:

- ``mode="moments"`` (the released surrogate): (μ_pc − μ_pa)² + (μ_na − μ_nc)²
  + k [(σ_pa − σ_pc)² + (σ_na − σ_nc)²];
- ``mode="kl"``: the Gaussian KL(N(μ_a, σ_a²) ‖ N(μ_c, σ_c²)) of aligned against conflicting
  similarities, summed over positives and negatives (the divergence the paper motivates; the
  direction, aligned against conflicting, is our reading);
- plus the alignment term −μ_pc + μ_na (``alignment_term``), as released.

The released function defaults to k = 0 and its training script never calls it with the bias
labels (bias.md §1, pitfalls); k = 1 here, and :class:`FairKLObjective` wires the two losses.

``behaviour="released"`` reproduces the release: the positive-aligned set contains the self-pairs
(i, i), σ is ``torch.std`` of the whole masked B×B matrix (zeros included) and an empty set has
μ = σ = 0. ``behaviour="fixed"`` (default) excludes self-pairs, takes μ and σ over each set's own
entries and drops the comparisons of a set that is empty in the batch. A batch without
positive-conflicting pairs (common at rho ≥ 0.997) gives FairKL no signal: :class:`FairKL` counts
them (:attr:`FairKL.no_conflict_fraction`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.methods import StepContext
from sobre.core.registry import check_choice
from sobre.fairness.base import BiasRegularizer, check_weights

__all__ = ["EpsSupInfoNCE", "FairKL", "FairKLObjective"]

log = logging.getLogger(__name__)

Form = Literal["out", "in"]
Mode = Literal["moments", "kl"]
Behaviour = Literal["fixed", "released"]


def _number(owner: str, name: str, value: object, *, zero: bool = False) -> float:
    """``value`` as a float if it is a positive (or, with ``zero``, non-negative) number."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value >= 0 if zero else value > 0)
    ):
        what = "a non-negative" if zero else "a positive"
        raise ConfigError(f"{owner}: {name} must be {what} number, got {value!r}; e.g. 0.1")
    return float(value)


def _labels(owner: str, name: str, labels: Tensor, n: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.shape != (n,):
        raise ConfigError(
            f"{owner}: {name} must hold one label per sample, shape ({n},); got "
            f"{tuple(labels.shape)}"
        )
    return labels


class EpsSupInfoNCE(nn.Module):
    """ε-SupInfoNCE (or ε-SupCon with ``strong=True``) on L2-normalised features (module doc).

    Args:
        temperature: τ of the similarities s_ij = z_i·z_j / τ.
        epsilon: the margin ε ≥ 0 each positive must keep over the negatives (ω = e^(−ε)).
        form: ``"out"`` (average of the per-positive logs) or ``"in"`` (log of the sum).
        strong: ε-SupCon, all positives in the denominator (out form only).
        base_temperature: τ_base of the scale τ/τ_base.
        log_eps: added inside the log of the denominator after the row-maximum subtraction, as
            the release does with 1e-6; 0 (default) keeps the exact log-sum-exp.

    Call ``loss(z, y=None)`` with ``z`` of shape ``(B, D)`` or ``(B, V, D)`` (V views per sample)
    and labels ``y`` ``(B,)``; ``y=None`` makes the views of one sample its only positives
    (SimCLR, needs V ≥ 2). Features are used as given: normalise them first.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.0,
        form: Form = "out",
        strong: bool = False,
        base_temperature: float = 0.07,
        log_eps: float = 0.0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.temperature = _number(owner, "temperature", temperature)
        self.base_temperature = _number(owner, "base_temperature", base_temperature)
        self.epsilon = _number(owner, "epsilon", epsilon, zero=True)
        self.log_eps = _number(owner, "log_eps", log_eps, zero=True)
        check_choice("form", form, get_args(Form), owner)
        if strong and form != "out":
            raise ConfigError(
                f"{owner}: ε-SupCon (strong=True) exists in the 'out' form only; pass form='out'"
            )
        self.form, self.strong = form, bool(strong)

    def _views(self, z: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """Features ``(V·B, D)`` (view-major) and the class of each row (sample id without y)."""
        owner = type(self).__name__
        if z.dim() == 2:
            z = z.unsqueeze(1)
        if z.dim() != 3 or z.shape[0] < 2:
            raise ConfigError(
                f"{owner}: features must be (B, D) or (B, V, D) with B >= 2, got "
                f"{tuple(z.shape)}; flatten feature maps first (z.flatten(1))"
            )
        n, views = z.shape[:2]
        if y is None:
            if views < 2:
                raise ConfigError(
                    f"{owner}: without labels y the positives are the other views of a sample; "
                    f"pass (B, V, D) features with V >= 2, or pass y"
                )
            y = torch.arange(n, device=z.device)
        y = _labels(owner, "y", y, n).to(z.device)
        return torch.cat(z.unbind(1)), y.repeat(views)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        feats, labels = self._views(z, y)
        sim = feats @ feats.T / self.temperature
        eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        same = labels[:, None] == labels[None, :]
        pos, neg = same & ~eye, ~same
        n_pos = pos.sum(1)
        ninf = torch.tensor(float("-inf"), dtype=sim.dtype, device=sim.device)
        lse_neg = torch.logsumexp(torch.where(neg, sim, ninf), 1, keepdim=True)
        if self.form == "in":
            lse_pos = torch.logsumexp(torch.where(pos, sim, ninf), 1, keepdim=True)
            shift = self.epsilon + n_pos.clamp_min(1).to(sim.dtype).log()[:, None]
            log_den = torch.logaddexp(lse_pos - shift, lse_neg)
            log_num = lse_pos
        elif self.strong:
            log_den = torch.logsumexp(torch.where(pos, sim - self.epsilon, ninf), 1, keepdim=True)
            log_den = torch.logaddexp(log_den, lse_neg)
            log_num = sim
        else:
            log_den = torch.logaddexp(sim - self.epsilon, lse_neg)
            log_num = sim
        if self.log_eps:
            top = sim.detach().amax(1, keepdim=True)
            log_den = top + torch.log(torch.exp(log_den - top) + self.log_eps)
        log_prob = log_num - log_den
        if self.form == "in":
            per_anchor = log_prob[:, 0]
        else:
            per_anchor = torch.where(pos, log_prob, 0.0).sum(1) / n_pos.clamp_min(1)
        valid = n_pos > 0
        per_anchor = torch.where(valid, per_anchor, 0.0)
        scale = self.temperature / self.base_temperature
        return -scale * per_anchor.sum() / valid.sum().clamp_min(1)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, epsilon={self.epsilon}, form={self.form!r}, "
            f"strong={self.strong}, base_temperature={self.base_temperature}"
        )


class FairKL(nn.Module):
    """FairKL: aligned and conflicting similarity distributions made alike (module doc).

    Args:
        temperature: T of the similarities (1 in the release).
        std_weight: k, the weight of the σ terms in ``mode="moments"``.
        mode: ``"moments"`` (released surrogate) or ``"kl"`` (Gaussian KL).
        behaviour: ``"fixed"`` (self-pairs excluded, statistics of each set's own entries) or
            ``"released"`` (the release's statistics, see the module doc).
        alignment_term: add −μ_pc + μ_na (positive-conflicting pairs pulled together,
            negative-aligned ones pushed apart).
        min_std: floor of σ in the KL (a set of one pair, or of equal similarities, has σ = 0;
            our choice, similarities lie in [-1/T, 1/T]).

    Call ``fairkl(z, y, b)`` with features ``(B, D)``, labels and bias labels ``(B,)``.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        std_weight: float = 1.0,
        mode: Mode = "moments",
        behaviour: Behaviour = "fixed",
        alignment_term: bool = True,
        min_std: float = 1e-2,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.temperature = _number(owner, "temperature", temperature)
        self.min_std = _number(owner, "min_std", min_std)
        self.std_weight = _number(owner, "std_weight", std_weight, zero=True)
        check_choice("mode", mode, get_args(Mode), owner)
        check_choice("behaviour", behaviour, get_args(Behaviour), owner)
        self.mode, self.behaviour = mode, behaviour
        self.alignment_term = bool(alignment_term)
        self.batches = 0
        self.batches_without_conflict = 0

    @property
    def no_conflict_fraction(self) -> float:
        """Fraction of the batches seen so far without a positive-conflicting pair (y=, b≠)."""
        return self.batches_without_conflict / self.batches if self.batches else 0.0

    def moments(self, z: Tensor, y: Tensor, b: Tensor) -> dict[str, tuple[Tensor, Tensor, int]]:
        """``{set: (μ, σ, number of pairs)}`` for the sets ``pa``, ``pc``, ``na``, ``nc``."""
        owner = type(self).__name__
        if z.dim() != 2 or len(z) < 2:
            raise ConfigError(
                f"{owner}: features must be (B, D) with B >= 2, got {tuple(z.shape)}; pass one "
                f"view (z[:, 0]) or flatten feature maps (z.flatten(1))"
            )
        y = _labels(owner, "y", y, len(z)).to(z.device)
        b = _labels(owner, "b", b, len(z)).to(z.device)
        sim = z @ z.T / self.temperature
        same_y, same_b = y[:, None] == y[None, :], b[:, None] == b[None, :]
        masks = {
            "pa": same_y & same_b,
            "pc": same_y & ~same_b,
            "na": ~same_y & same_b,
            "nc": ~same_y & ~same_b,
        }
        out = {}
        for name, mask in masks.items():
            if self.behaviour == "released":
                masked = sim * mask
                count = int(mask.sum())
                out[name] = (masked.sum() / max(count, 1), torch.std(masked), count)
                continue
            if name == "pa":
                mask = mask & ~torch.eye(len(z), dtype=torch.bool, device=z.device)
            values = sim[mask]
            zero = sim.new_zeros(())
            if not len(values):
                out[name] = (zero, zero, 0)
            else:
                out[name] = (values.mean(), values.std(correction=0), len(values))
        return out

    def _divergence(
        self, aligned: tuple[Tensor, Tensor, int], conflicting: tuple[Tensor, Tensor, int]
    ) -> Tensor:
        (mu_a, sd_a, n_a), (mu_c, sd_c, n_c) = aligned, conflicting
        if self.behaviour == "fixed" and (n_a == 0 or n_c == 0):
            return mu_a.new_zeros(())
        if self.mode == "moments":
            return (mu_c - mu_a) ** 2 + self.std_weight * (sd_a - sd_c) ** 2
        sd_a, sd_c = sd_a.clamp_min(self.min_std), sd_c.clamp_min(self.min_std)
        return (sd_c / sd_a).log() + (sd_a**2 + (mu_a - mu_c) ** 2) / (2 * sd_c**2) - 0.5

    def forward(self, z: Tensor, y: Tensor, b: Tensor) -> Tensor:
        m = self.moments(z, y, b)
        self.batches += 1
        self.batches_without_conflict += int(m["pc"][2] == 0)
        loss = self._divergence(m["pa"], m["pc"]) + self._divergence(m["na"], m["nc"])
        if self.alignment_term:
            loss = loss - m["pc"][0] + m["na"][0]
        return loss

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, std_weight={self.std_weight}, mode={self.mode!r}, "
            f"behaviour={self.behaviour!r}, alignment_term={self.alignment_term}"
        )


class FairKLObjective(BiasRegularizer):
    """α·ε-SupInfoNCE(z, y) + λ·FairKL(z, y, b) on the L2-normalised features z of ``layer``.

    The paper's recipe (α = 1, β = 0) trains the encoder with these terms only and a linear head
    on the detached features: build the model with ``detach_head=True`` (``simple_conv``:
    ``last_activation="tanh"``, ``normalize=True``), so the task cross-entropy reaches the head
    alone. With ``lambd=0`` (ε-SupInfoNCE alone) no bias label is read
    (``requires_bias_labels`` is false) and (x, y) batches are accepted.

    Args:
        alpha: weight α of ε-SupInfoNCE.
        lambd: weight λ of FairKL.
        epsilon, temperature, form, strong, base_temperature: of :class:`EpsSupInfoNCE`.
        fairkl_temperature, std_weight, mode, behaviour, alignment_term: of :class:`FairKL`
            (``fairkl_temperature`` is its ``temperature``).
        layer: exact module name of the tapped layer (``embedding`` of ``simple_conv``,
            ``avgpool`` of a torchvision ResNet); its output is flattened to (B, D) and
            L2-normalised (a no-op on a normalised embedding).
    """

    name = "fairkl"

    def __init__(
        self,
        alpha: float = 1.0,
        lambd: float = 1.0,
        epsilon: float = 0.1,
        temperature: float = 0.1,
        form: Form = "out",
        strong: bool = False,
        base_temperature: float = 0.07,
        fairkl_temperature: float = 1.0,
        std_weight: float = 1.0,
        mode: Mode = "moments",
        behaviour: Behaviour = "fixed",
        alignment_term: bool = True,
        layer: str = "embedding",
    ) -> None:
        super().__init__()
        check_weights(type(self).__name__, alpha=alpha, lambd=lambd)
        self.tap_layer(layer)
        self.alpha, self.lambd = float(alpha), float(lambd)
        self.requires_bias_labels = self.lambd > 0
        self.contrastive = EpsSupInfoNCE(temperature, epsilon, form, strong, base_temperature)
        self.fairkl = FairKL(fairkl_temperature, std_weight, mode, behaviour, alignment_term)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        z = F.normalize(self.tapped(ctx), dim=1)
        y = ctx.targets.to(z.device)
        terms = {}
        if self.alpha:
            terms[f"{self.name}/contrastive"] = self.alpha * self.contrastive(z, y)
        if self.requires_bias_labels:
            b = self.bias_labels(ctx).to(z.device)
            terms[f"{self.name}/fairkl"] = self.lambd * self.fairkl(z, y, b)
        return terms

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> None:
        """Log the fraction of batches so far in which FairKL found no conflicting pair."""
        if self.requires_bias_labels:
            log.info(
                "FairKL epoch %d: %.1f %% of batches without a positive-conflicting pair",
                epoch,
                100 * self.fairkl.no_conflict_fraction,
            )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, lambd={self.lambd}, layer={self.layer!r}"
