"""The debugging loss L_d of METHOD §5, as pure torch functions.

    L_d = CE(y, z) − λ1 · mean_i Σ_k s_ik G_{y_i,k} + λ2 · mean_i Σ_k s_ik (1 − G_{y_i,k})

``a`` (B×K) is the classifier's pooled vector, ``s`` an "is filter k active"
indicator computed from it, ``G`` (C×K, boolean) the global MC filters of each
class, indexed by the ground-truth label ``y``.  The first term rewards activity
of the class's MC filters, the second penalises activity of the others.

Per-sample normalisation.  The reference sums both terms over its batch of 16
while its cross-entropy is a batch mean; raycf takes all three as batch means,
so its λ do not depend on the batch size.  The reference's values map as
``λ_raycf = λ_reference × 16``: λ1 = 1e-3 → 1.6e-2 and λ2 = 2e-5 → 3.2e-4
(the defaults of ``debug.lambda1`` / ``debug.lambda2``).

Indicators (``debug.indicator``):

* ``paper``: ``s = thresholded_relu_0.5(sigmoid(a))``, exactly the reference.
  With ``a ≥ 0`` (a ReLU trunk), ``sigmoid(a) ≥ 0.5``: the threshold only removes filters
  that are exactly 0, so every non-zero filter counts as active and ``s`` is a
  saturating count with gradient ``sigmoid'(a)`` where ``a > 0``.
  With a signed ``a`` (EfficientNet's SiLU trunk, ConvNeXt's LayerNorm after
  pooling: ``FilterClassifier.nonnegative`` is false) the same formula is a
  real threshold at ``a = 0``: a filter pooled below zero is inactive, with
  no gradient, so "active" means "above zero", not "non-zero" (ConvNeXt's
  ``a`` is normalised over each image's filters: at initialisation about
  half of them are inactive).
* ``centred``: the same thresholded sigmoid of ``(a − μ) / σ``, with μ, σ the
  per-filter mean and standard deviation of ``a`` over the training split
  (base model, no augmentation).  A filter is active when it fires above its
  own average, so ``s`` separates images instead of counting non-zero filters.

Suppression (``debug.suppress``, issue 24 item 6).  Filters a user names
(per class, or for every image) are penalised by their activity:
``+ w · mean_i Σ_k S_{y_i,k} · max(a_ik, 0)`` with ``S`` (C×K, 0/1) the
suppressed filters of each ground-truth class and ``w`` ``debug.suppress_weight``.
It is added to L_d (also when λ1 = λ2 = 0: the suppression treatment alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from raycf.method.bank import THRESHOLD, thresholded_relu

INDICATORS = ("paper", "centred")
MIN_STD = 1e-6  # a filter that never varies over the training split is not rescaled by 1/0


def paper_indicator(activations: torch.Tensor) -> torch.Tensor:
    """The reference's indicator: ``thresholded_relu_0.5(sigmoid(a))`` (B×K)."""
    return thresholded_relu(torch.sigmoid(activations))


def centred_indicator(activations: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``thresholded_relu_0.5(sigmoid((a − mean) / std))``: active above the filter's training mean."""
    return thresholded_relu(torch.sigmoid((activations - mean) / std.clamp_min(MIN_STD)))


@dataclass(frozen=True)
class FilterStats:
    """Per-filter mean and standard deviation of ``a`` over the training split."""

    mean: torch.Tensor  # K
    std: torch.Tensor  # K

    @classmethod
    def from_sums(cls, total: torch.Tensor, total_squares: torch.Tensor, count: float) -> "FilterStats":
        """From Σa, Σa² and the image count (population variance)."""
        mean = total / count
        variance = (total_squares / count - mean.square()).clamp_min(0.0)
        return cls(mean=mean.float(), std=variance.sqrt().float())


@dataclass(frozen=True)
class DebugLoss:
    """``loss_fn(logits, activations, labels) -> (loss, parts)`` for :func:`raycf.training.loops.train_one_epoch`.

    Parts (batch means, detached tensors on the loss's device): ``loss``,
    ``ce``, ``mc`` = Σ_k s·G_y, ``nonmc`` = Σ_k s·(1−G_y), and ``active_mc`` /
    ``active_nonmc``, the number of filters with ``s > 0`` in and out of G_y.  With λ1 = λ2 = 0 the loss is exactly
    the cross-entropy (the control), and the same parts are reported.
    """

    global_filters: torch.Tensor  # C×K float (0/1)
    lambda1: float
    lambda2: float
    indicator: str = "paper"
    stats: FilterStats | None = None
    suppress: torch.Tensor | None = None  # C×K float (0/1): the filters whose activity is penalised, per true class
    suppress_weight: float = 0.0
    # batch size -> C×K penalties per image (see penalties_per_image): derived, filled on first use, at most two an epoch
    penalty_tables: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.indicator not in INDICATORS:
            raise ValueError(f"unknown indicator {self.indicator!r} (expected one of {', '.join(INDICATORS)})")
        if self.indicator == "centred" and self.stats is None:
            raise ValueError("the centred indicator needs the training split's filter statistics")

    def penalties_per_image(self, count: int) -> torch.Tensor:
        """C×K: each class's weight of ``s`` in a batch of ``count`` images, (−λ1 on its global MC filters, +λ2 elsewhere) / count."""
        if count not in self.penalty_tables:
            self.penalty_tables[count] = (self.lambda2 - (self.lambda1 + self.lambda2) * self.global_filters) / count
        return self.penalty_tables[count]

    def to(self, device: torch.device | str) -> "DebugLoss":
        """The same loss with its tensors on ``device``."""
        stats = self.stats and FilterStats(self.stats.mean.to(device), self.stats.std.to(device))
        suppress = None if self.suppress is None else self.suppress.to(device)
        return DebugLoss(self.global_filters.to(device), self.lambda1, self.lambda2, self.indicator, stats, suppress, self.suppress_weight)

    def active(self, activations: torch.Tensor) -> torch.Tensor:
        """The indicator ``s`` (B×K)."""
        return thresholded_relu(torch.sigmoid(self.indicator_input(activations)))

    def indicator_input(self, activations: torch.Tensor) -> torch.Tensor:
        """What the thresholded sigmoid reads: ``a`` (paper), or ``(a − μ) / σ`` (centred)."""
        if self.indicator == "paper":
            return activations
        return (activations - self.stats.mean) / self.stats.std.clamp_min(MIN_STD)

    def __call__(self, logits: torch.Tensor, activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, parts, s = self.step(logits, activations, labels)
        with torch.no_grad():
            parts.update({name: value / len(labels) for name, value in activity_sums(s, labels, self.global_filters).items()})
        return loss, parts

    def step(self, logits: torch.Tensor, activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """The loss, its ``loss`` / ``ce`` (/ ``suppressed``) parts, and the indicator ``s`` (detached), without the activity parts."""
        ce = F.cross_entropy(logits.float(), labels)
        if self.lambda1 == self.lambda2 == 0:  # the control: the loss is the cross-entropy; s only for the parts
            loss = ce
            with torch.no_grad():
                s = self.active(activations.float())
        else:
            # −λ1 Σ_k s·G_y + λ2 Σ_k s·(1 − G_y), per image, as one weighted sum of s with the per-class penalties (−λ1 in G_y, +λ2 outside)
            penalty, s = IndicatorPenalty.apply(self.indicator_input(activations.float()), self.penalties_per_image(len(labels))[labels])
            loss = ce + penalty
        parts = {"ce": ce.detach()}
        if self.suppress is not None and self.suppress_weight > 0:
            suppressed = suppression_penalty(activations.float(), labels, self.suppress)
            loss = loss + self.suppress_weight * suppressed
            parts["suppressed"] = suppressed.detach()
        return loss, {"loss": loss.detach(), **parts}, s

    def for_epoch(self) -> "EpochDebugLoss":
        """This loss for one epoch of :func:`raycf.training.loops.train_one_epoch`: the activity parts summed over the epoch."""
        return EpochDebugLoss(self)


ACTIVITY_BLOCK = 32  # steps whose indicators are reduced together


class EpochDebugLoss:
    """:class:`DebugLoss` over one epoch: the same loss and gradient; the activity parts
    (``mc``, ``nonmc``, ``active_mc``, ``active_nonmc``) are summed once every
    :data:`ACTIVITY_BLOCK` steps and returned by :meth:`epoch_sums`, not reduced each step:
    on the prefix cache a step is about a millisecond, and their dozen small ops a step
    cost about 5 % of it (benchmarks/bench_debug.py, ``debug_step_over_plain_ce_step``).
    """

    def __init__(self, loss: DebugLoss) -> None:
        self.loss = loss
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (s, labels) of the steps not yet summed
        self.sums: dict[str, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, parts, s = self.loss.step(logits, activations, labels)
        self.pending.append((s, labels))
        if len(self.pending) == ACTIVITY_BLOCK:
            self._reduce()
        return loss, parts

    def epoch_sums(self) -> dict[str, torch.Tensor]:
        """The activity parts summed over every image of the epoch so far (the caller divides by the image count)."""
        self._reduce()
        return dict(self.sums)

    def _reduce(self) -> None:
        if not self.pending:
            return
        indicators, labels = (torch.cat(tensors) for tensors in zip(*self.pending))
        self.pending = []
        with torch.no_grad():
            block = activity_sums(indicators, labels, self.loss.global_filters)
        self.sums = {name: self.sums[name] + value for name, value in block.items()} if self.sums else block


def activity_sums(s: torch.Tensor, labels: torch.Tensor, global_filters: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ over images of Σ_k s·G_y (``mc``), s·(1−G_y) (``nonmc``), and the counts of filters with ``s > 0`` in and out of G_y."""
    in_global = global_filters[labels]  # G_y, B×K
    active = (s > 0).float()
    mc, total, active_mc, active_total = torch.stack([(s * in_global).sum(), s.sum(), (active * in_global).sum(), active.sum()]).unbind()
    return {"mc": mc, "nonmc": total - mc, "active_mc": active_mc, "active_nonmc": active_total - active_mc}


def suppression_penalty(activations: torch.Tensor, labels: torch.Tensor, suppress: torch.Tensor) -> torch.Tensor:
    """``mean_i Σ_k S_{y_i,k} · max(a_ik, 0)``: the suppressed filters' activity per image, averaged over the batch (unweighted)."""
    return (suppress[labels] * activations.clamp_min(0)).sum(dim=1).mean()


class IndicatorPenalty(torch.autograd.Function):
    """``Σ s · W`` with ``s = thresholded_relu_0.5(sigmoid(z))``, and ``s`` itself (no gradient), as one autograd node.

    The same value and gradient as the composed torch ops (``∂/∂z = W · σ(z)(1 − σ(z))`` where
    ``σ(z) > 0.5``, else 0), without recording each elementwise op of a step
    that is otherwise tiny (a few layers on the prefix cache).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = F.threshold(torch.sigmoid(z), THRESHOLD, 0.0)
        ctx.save_for_backward(s, weights)
        ctx.mark_non_differentiable(s)
        ctx.set_materialize_grads(False)  # s gets no gradient: no zero tensor is made for it each step
        return (s * weights).sum(), s

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor, _grad_s: torch.Tensor) -> tuple[torch.Tensor, None]:
        if grad_value is None:
            return None, None
        s, weights = ctx.saved_tensors
        # sigmoid's own backward op, W · s(1 − s) in one op: σ' = σ(1 − σ) where s is kept, and 0 where s = 0
        return torch.ops.aten.sigmoid_backward(weights, s).mul_(grad_value), None


def global_filters_tensor(global_filters, num_classes: int, num_filters: int) -> torch.Tensor:
    """G as a C×K float tensor of 0/1, checked against the model's shape."""
    tensor = torch.tensor(np.asarray(global_filters), dtype=torch.float32)  # a copy: the input may be read-only
    if tuple(tensor.shape) != (num_classes, num_filters):
        raise ValueError(f"global MC filters have shape {tuple(tensor.shape)}, expected (classes, filters) = ({num_classes}, {num_filters})")
    return tensor
