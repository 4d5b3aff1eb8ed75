"""The counterfactual filter generators of every class, as one bank (METHOD §2).

One MC ("minimum correct") generator per class ``c`` maps a pooled vector
``a`` (K) to a mask::

    s = sigmoid(V_c a + β_c)            V_c: K×K, β_c: K
    m = s · [s > 0.5]                   thresholded ReLU (θ = 0.5)
    masked logits = W (a ⊙ m) + b       W, b: the classifier's frozen head

All C generators live in one tensor (C×K×K weights, C×K biases) and are
trained together, each with its own class as the target of every vector.
The loss of generator ``c`` on one vector is::

    CE(masked logits, c) + μ1 ‖m‖₁ − μ2 · z_c(masked)
    μ1 = 0.001 · λ · B_ref,   μ2 = logits_weight · B_ref

(the reference's batch sums made per-sample, so the weights do not depend
on the batch size).  The bank's loss is the per-vector mean summed over the
generators, so each generator gets exactly the gradient it would get alone.
At inference the mask is binarised: the MC set of ``a`` towards ``c`` is
``{k : m_k > 0}``, and the masked prediction uses that 0/1 mask.

The MI ("minimum incorrect") bank is the additive counterpart:
``δ = ReLU(V'_c a + β'_c)``, logits ``W (a + δ) + b``, loss
``CE(·, c) + μ1' ‖δ‖₁``; MI filters = ``{k : δ_k > 0}``.

Pure torch: no Ray, no files (``bank.pt`` bytes in and out).
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raycf.config import CfeConfig
from raycf.errors import UserError

THRESHOLD = 0.5  # θ of the thresholded ReLU
BANK_FORMAT = "raycf.cfe/1"
BANK_FILE = "bank.pt"
EVAL_CHUNK = 256  # vectors per chunk when a whole split is pushed through the bank


# ------------------------------------------------------------------- maths


def thresholded_relu(values: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """``values`` where they exceed ``threshold``, else 0, with gradient only where kept (Keras ``ThresholdedReLU``)."""
    return torch.where(values > threshold, values, 0.0)


def bank_preactivations(weight: torch.Tensor, bias: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``V_c a + β_c`` for every generator c: weight C×K×K, bias C×K, a B×K → B×C×K."""
    num_classes, num_filters, _ = weight.shape
    flat = activations @ weight.reshape(num_classes * num_filters, num_filters).T
    return flat.reshape(len(activations), num_classes, num_filters) + bias


def mc_soft_masks(preactivations: torch.Tensor) -> torch.Tensor:
    """The MC generators' masks ``m = s·[s > 0.5]``, ``s = sigmoid(pre)``."""
    return thresholded_relu(torch.sigmoid(preactivations))


def head_logits(inputs: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor) -> torch.Tensor:
    """``W x + b`` over the last dimension of ``inputs`` (… × K → … × C)."""
    return inputs @ head_weight.T + head_bias


def generator_targets(batch: int, num_classes: int, device: torch.device, classes: torch.Tensor | None = None) -> torch.Tensor:
    """B×C targets: generator j's target is its class, ``classes[j]`` (default ``j``), for every vector."""
    targets = torch.arange(num_classes, device=device) if classes is None else torch.as_tensor(classes, device=device, dtype=torch.long)
    return targets.expand(batch, num_classes)


@dataclass(frozen=True)
class LossWeights:
    """Per-sample loss coefficients (METHOD §2)."""

    mc_sparsity: float  # μ1
    mc_logits: float  # μ2
    mi_sparsity: float  # μ1'

    @classmethod
    def from_config(cls, config: CfeConfig) -> "LossWeights":
        return cls(
            mc_sparsity=0.001 * config.sparsity * config.ref_batch_size,
            mc_logits=config.logits_weight * config.ref_batch_size,
            mi_sparsity=0.001 * config.mi_sparsity * config.ref_batch_size,
        )


def generator_cross_entropy(logits: torch.Tensor, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B×G targets, B×G cross-entropies) of each generator's B×G×C logits towards its class (``classes``, or generator g → class g)."""
    batch, generators, _ = logits.shape
    targets = generator_targets(batch, generators, logits.device, classes)
    cross_entropy = F.cross_entropy(logits.reshape(batch * generators, -1), targets.reshape(-1), reduction="none").reshape(batch, generators)
    return targets, cross_entropy


def mc_loss(
    masks: torch.Tensor,
    activations: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    weights: LossWeights,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MC bank's loss for B×C×K masks of B vectors: per-vector mean, summed over generators.

    Parts (means over vectors and generators, detached tensors: read them
    once per epoch, not per step): ``mc_ce``, ``mc_l1`` (mask mass ‖m‖₁),
    ``mc_logit`` (z_c under the mask).  ``classes`` (G) are the classes of
    the generators when the masks come from part of the bank (B×G×K);
    None: the whole bank, generator c for class c.
    """
    logits = head_logits(activations[:, None, :] * masks, head_weight, head_bias)  # B×C(generator)×C(class)
    targets, cross_entropy = generator_cross_entropy(logits, classes)
    mass = masks.sum(dim=2)
    target_logit = logits.gather(2, targets[:, :, None])[:, :, 0]
    per_sample = cross_entropy + weights.mc_sparsity * mass - weights.mc_logits * target_logit
    parts = {"mc_ce": cross_entropy.detach().mean(), "mc_l1": mass.detach().mean(), "mc_logit": target_logit.detach().mean()}
    return per_sample.mean(dim=0).sum(), parts


def mi_loss(
    deltas: torch.Tensor,
    activations: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    weights: LossWeights,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MI bank's loss for B×C×K additions δ: ``CE(W(a + δ) + b, c) + μ1' ‖δ‖₁`` (``classes`` as in :func:`mc_loss`)."""
    logits = head_logits(activations[:, None, :] + deltas, head_weight, head_bias)
    _, cross_entropy = generator_cross_entropy(logits, classes)
    mass = deltas.sum(dim=2)
    per_sample = cross_entropy + weights.mi_sparsity * mass
    return per_sample.mean(dim=0).sum(), {"mi_ce": cross_entropy.detach().mean(), "mi_l1": mass.detach().mean()}


# ------------------------------------------------------------- the module


class GeneratorBank(nn.Module):
    """C generators ``K → K`` as one batched linear map (weight C×K×K, bias C×K).

    Initialised like the reference's Keras ``Dense``: Glorot-uniform weights,
    zero biases; ``generator`` makes it reproducible.
    """

    def __init__(self, num_classes: int, num_filters: int, generator: torch.Generator | None = None):
        super().__init__()
        limit = math.sqrt(6.0 / (2 * num_filters))
        weight = torch.empty(num_classes, num_filters, num_filters).uniform_(-limit, limit, generator=generator)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(num_classes, num_filters))

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return bank_preactivations(self.weight, self.bias, activations)


class CfeModel(nn.Module):
    """The trainable part: the MC bank and, optionally, the MI bank."""

    def __init__(self, num_classes: int, num_filters: int, train_mi: bool, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.mc = GeneratorBank(num_classes, num_filters, generator)
        self.mi = GeneratorBank(num_classes, num_filters, generator) if train_mi else None

    def forward(self, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(MC masks, MI additions), each B×C×K."""
        masks = mc_soft_masks(self.mc(activations))
        deltas = F.relu(self.mi(activations)) if self.mi is not None else None
        return masks, deltas


def bank_loss(
    model: nn.Module,
    activations: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    weights: LossWeights,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MC loss (+ MI loss) of a batch of vectors; parts per generator and vector.

    ``classes``: the (global) classes of ``model``'s generators when it holds
    part of the bank; None: the whole bank.
    """
    masks, deltas = model(activations)
    loss, parts = mc_loss(masks, activations, head_weight, head_bias, weights, classes)
    if deltas is not None:
        extra, mi_parts = mi_loss(deltas, activations, head_weight, head_bias, weights, classes)
        loss, parts = loss + extra, {**parts, **mi_parts}
    return loss, {"loss": loss.detach() / masks.shape[1], **parts}


# --------------------------------------------------------------- the bank


@dataclass
class CfeBank:
    """A trained generator bank with the classifier head it explains.

    ``bank.pt`` holds a plain dict (``format`` ``raycf.cfe/1``, the tensors
    below, ``class_names``), written with ``torch.save`` and read with
    ``weights_only=True``.
    """

    mc_weight: torch.Tensor  # C×K×K
    mc_bias: torch.Tensor  # C×K
    head_weight: torch.Tensor  # C×K (W)
    head_bias: torch.Tensor  # C (b)
    mi_weight: torch.Tensor | None = None
    mi_bias: torch.Tensor | None = None
    class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return self.mc_weight.shape[0]

    @property
    def num_filters(self) -> int:
        return self.mc_weight.shape[1]

    @property
    def has_mi(self) -> bool:
        return self.mi_weight is not None

    def to(self, device: torch.device | str) -> "CfeBank":
        moved = {name: (value.to(device) if isinstance(value, torch.Tensor) else value) for name, value in self.__dict__.items()}
        return CfeBank(**moved)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The classifier's logits of (masked or modified) vectors, … × K → … × C."""
        return head_logits(inputs, self.head_weight, self.head_bias)

    def empty_mask_prediction(self) -> int:
        """The class the head's bias alone favours (the prediction of an all-zero mask)."""
        return int(self.head_bias.argmax())

    @torch.no_grad()
    def mc_soft_masks(self, activations: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Soft MC masks: B×C×K for every class, or for ``classes`` (B → B×K, B×T → B×T×K)."""
        masks = mc_soft_masks(bank_preactivations(self.mc_weight, self.mc_bias, activations))
        return _select(masks, classes)

    def mc_masks(self, activations: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Binary MC masks (``m > 0``) of vectors towards classes; shapes as :meth:`mc_soft_masks`."""
        return self.mc_soft_masks(activations, classes) > 0

    def masked_logits(self, activations: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Logits of ``a ⊙ mask`` (mask B×K or B×T×K, boolean or float)."""
        expanded = activations if masks.dim() == 2 else activations[:, None, :]
        return self.logits(expanded * masks.to(activations.dtype))

    @torch.no_grad()
    def mi_deltas(self, activations: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """MI additions δ ≥ 0 towards classes; shapes as :meth:`mc_soft_masks`."""
        if not self.has_mi:
            raise UserError("this CFE bank has no MI generators (it was trained with cfe.train_mi: false)")
        deltas = F.relu(bank_preactivations(self.mi_weight, self.mi_bias, activations))
        return _select(deltas, classes)

    def mi_filters(self, activations: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """MI filters (``δ > 0``): what would have to grow for the prediction to become the class."""
        return self.mi_deltas(activations, classes) > 0

    def to_bytes(self) -> bytes:
        payload: dict[str, Any] = {
            "format": BANK_FORMAT,
            "num_classes": self.num_classes,
            "num_filters": self.num_filters,
            "class_names": list(self.class_names or []),
            "threshold": THRESHOLD,
        }
        for name in ("mc_weight", "mc_bias", "head_weight", "head_bias", "mi_weight", "mi_bias"):
            value = getattr(self, name)
            if value is not None:
                payload[name] = value.detach().cpu().contiguous()
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()


def _select(values: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """Pick classes out of B×C×K: ``classes`` B → B×K, B×T → B×T×K, None → all."""
    if classes is None:
        return values
    classes = torch.as_tensor(classes, device=values.device, dtype=torch.long)
    index = classes.reshape(len(values), -1)
    picked = values.gather(1, index[:, :, None].expand(-1, -1, values.shape[2]))
    return picked[:, 0] if classes.dim() == 1 else picked


def parse_bank(data: bytes, source: str = "bank") -> CfeBank:
    """Decode ``bank.pt`` bytes (``weights_only=True``: loading never runs code)."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise UserError(f"{source}: not a loadable raycf CFE bank ({str(error).strip()[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != BANK_FORMAT:
        raise UserError(f"{source}: not a raycf CFE bank (expected format {BANK_FORMAT})")
    return CfeBank(
        mc_weight=payload["mc_weight"],
        mc_bias=payload["mc_bias"],
        head_weight=payload["head_weight"],
        head_bias=payload["head_bias"],
        mi_weight=payload.get("mi_weight"),
        mi_bias=payload.get("mi_bias"),
        class_names=list(payload.get("class_names") or []) or None,
    )



def bank_from_model(model: CfeModel, head_weight: torch.Tensor, head_bias: torch.Tensor, class_names: list[str] | None = None) -> CfeBank:
    """Freeze a trained :class:`CfeModel` into a :class:`CfeBank` (CPU tensors)."""
    return CfeBank(
        mc_weight=model.mc.weight.detach().cpu().clone(),
        mc_bias=model.mc.bias.detach().cpu().clone(),
        head_weight=head_weight.detach().cpu().clone(),
        head_bias=head_bias.detach().cpu().clone(),
        mi_weight=model.mi.weight.detach().cpu().clone() if model.mi is not None else None,
        mi_bias=model.mi.bias.detach().cpu().clone() if model.mi is not None else None,
        class_names=class_names,
    )


@torch.no_grad()
def class_statistics(bank: CfeBank, activations: torch.Tensor) -> dict[str, np.ndarray]:
    """Per generator c, over the given vectors (all with target c), C values each.

    ``mc_agreement``: share whose binary-masked prediction is c;
    ``mc_size``: mean MC set size; with MI, ``mi_agreement`` (the prediction
    of ``a + δ`` is c) and ``mi_size`` (mean number of δ_k > 0).
    """
    keys = ("mc_agreement", "mc_size", "mi_agreement", "mi_size") if bank.has_mi else ("mc_agreement", "mc_size")
    sums = {key: torch.zeros(bank.num_classes, dtype=torch.float64, device=activations.device) for key in keys}
    classes = torch.arange(bank.num_classes, device=activations.device)
    for start in range(0, len(activations), EVAL_CHUNK):
        chunk = activations[start : start + EVAL_CHUNK]
        masks = bank.mc_masks(chunk)
        sums["mc_agreement"] += (bank.masked_logits(chunk, masks).argmax(dim=2) == classes).sum(dim=0)
        sums["mc_size"] += masks.sum(dim=(0, 2))
        if bank.has_mi:
            deltas = bank.mi_deltas(chunk)
            sums["mi_agreement"] += (bank.logits(chunk[:, None, :] + deltas).argmax(dim=2) == classes).sum(dim=0)
            sums["mi_size"] += (deltas > 0).sum(dim=(0, 2))
    count = max(len(activations), 1)
    return {key: (value / count).cpu().numpy() for key, value in sums.items()}


def summarise_statistics(statistics: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over classes of :func:`class_statistics` (and the worst class's MC agreement)."""
    summary = {
        "mc_agreement": float(statistics["mc_agreement"].mean()),
        "mc_agreement_min": float(statistics["mc_agreement"].min()),
        "mc_size": float(statistics["mc_size"].mean()),
    }
    if "mi_agreement" in statistics:
        summary.update(mi_agreement=float(statistics["mi_agreement"].mean()), mi_size=float(statistics["mi_size"].mean()))
    return summary
