"""Per-image MC masks from pooled vectors and the CFE bank (METHOD §2 at inference): torch only.

For each vector, the binary MC mask of the inferred class and of each of the
top-k classes, and the predictions with those masks applied.  Column
meanings are those of ``masks/<split>/`` (see :mod:`raycf.stages.masks`).
"""

from __future__ import annotations

import numpy as np
import torch

from raycf.method.bank import CfeBank


@torch.no_grad()
def compute_masks(bank: CfeBank, activations: torch.Tensor, logits: torch.Tensor, topk: int) -> dict[str, np.ndarray]:
    """The per-image mask columns (see the module docstring) for B vectors and their logits."""
    probabilities = torch.softmax(logits.float(), dim=1)
    k = min(topk, bank.num_classes)
    topk_probs, topk_classes = probabilities.topk(k, dim=1)
    masks = bank.mc_masks(activations, topk_classes)  # B×k×K
    masked = torch.softmax(bank.masked_logits(activations, masks), dim=2)  # B×k×C
    masked_preds = masked.argmax(dim=2)
    pred = topk_classes[:, 0]
    return {
        "pred": pred.cpu().numpy(),
        "confidence": topk_probs[:, 0].cpu().numpy(),
        "topk_classes": topk_classes.cpu().numpy(),
        "topk_probs": topk_probs.cpu().numpy(),
        "mc_mask": masks[:, 0].cpu().numpy(),
        "mc_size": masks[:, 0].sum(dim=1).cpu().numpy(),
        "masked_pred": masked_preds[:, 0].cpu().numpy(),
        "masked_confidence": masked[:, 0].gather(1, pred[:, None])[:, 0].cpu().numpy(),
        "topk_mc_masks": masks.cpu().numpy(),
        "topk_mc_sizes": masks.sum(dim=2).cpu().numpy(),
        "topk_masked_preds": masked_preds.cpu().numpy(),
        "empty_pred": np.full(len(activations), bank.empty_mask_prediction(), dtype=np.int64),
    }
