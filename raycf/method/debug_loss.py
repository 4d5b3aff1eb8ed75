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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raycf.method.bank import thresholded_relu

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

    def __post_init__(self) -> None:
        if self.indicator not in INDICATORS:
            raise ValueError(f"unknown indicator {self.indicator!r} (expected one of {', '.join(INDICATORS)})")
        if self.indicator == "centred" and self.stats is None:
            raise ValueError("the centred indicator needs the training split's filter statistics")

    def to(self, device: torch.device | str) -> "DebugLoss":
        """The same loss with its tensors on ``device``."""
        stats = self.stats and FilterStats(self.stats.mean.to(device), self.stats.std.to(device))
        return DebugLoss(self.global_filters.to(device), self.lambda1, self.lambda2, self.indicator, stats)

    def active(self, activations: torch.Tensor) -> torch.Tensor:
        """The indicator ``s`` (B×K)."""
        if self.indicator == "paper":
            return paper_indicator(activations)
        return centred_indicator(activations, self.stats.mean, self.stats.std)

    def __call__(self, logits: torch.Tensor, activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(logits.float(), labels)
        s = self.active(activations.float())
        in_global = self.global_filters[labels]  # G_y, B×K
        count = len(labels)
        in_set = s * in_global
        mc = in_set.sum() / count  # mean over images of Σ_k s·G_y
        nonmc = s.sum() / count - mc  # Σ_k s·(1 − G_y) = Σ_k s − Σ_k s·G_y
        loss = ce - self.lambda1 * mc + self.lambda2 * nonmc
        with torch.no_grad():  # parts stay on the device: the caller reads them once per epoch
            active_mc = (in_set > 0).sum() / count  # s ≥ 0 and G is 0/1: active and in G_y
            parts = {"loss": loss.detach(), "ce": ce.detach(), "mc": mc.detach(), "nonmc": nonmc.detach(), "active_mc": active_mc, "active_nonmc": (s > 0).sum() / count - active_mc}
        return loss, parts


def global_filters_tensor(global_filters, num_classes: int, num_filters: int) -> torch.Tensor:
    """G as a C×K float tensor of 0/1, checked against the model's shape."""
    tensor = torch.tensor(np.asarray(global_filters), dtype=torch.float32)  # a copy: the input may be read-only
    if tuple(tensor.shape) != (num_classes, num_filters):
        raise ValueError(f"global MC filters have shape {tuple(tensor.shape)}, expected (classes, filters) = ({num_classes}, {num_filters})")
    return tensor
