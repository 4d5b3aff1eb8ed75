"""Global MC filters of each class (METHOD §3, paper Eq. 2): numpy only.

A training image of class c is *accepted* when it passes three gates: the
base prediction is correct, its confidence is at least τ, and the
prediction with its binary MC mask applied is still c.  Over accepted
images, ``count[c, k]`` counts how often filter k is in the MC set and
``magnitude[c, k]`` sums ``a_k`` over those images.  The global set at
frequency threshold f is ``G_c = {k : count[c, k] > f · max_k count[c, k]}``
(f = 0: seen once).  The normalised magnitude is ``magnitude / max_k count``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# Columns of the training split's masks that the accumulation reads.
TRAIN_COLUMNS = ["label", "pred", "confidence", "masked_pred", "mc_mask", "a"]


@dataclass
class GlobalMC:
    """Accumulated MC statistics of every class over its accepted training images."""

    counts: np.ndarray  # C×K: images whose MC set holds filter k
    magnitude: np.ndarray  # C×K: Σ a_k over those images
    images: np.ndarray  # C: accepted images

    def normalised_magnitude(self) -> np.ndarray:
        """``magnitude / max_k count`` per class (0 for a class without accepted images)."""
        peak = self.counts.max(axis=1, keepdims=True).astype(np.float64)
        return np.divide(self.magnitude, peak, out=np.zeros_like(self.magnitude, dtype=np.float64), where=peak > 0)


def accepted_images(labels: np.ndarray, preds: np.ndarray, confidences: np.ndarray, masked_preds: np.ndarray, tau: float) -> np.ndarray:
    """The three gates: correct, confidence ≥ τ, and the MC-masked prediction still the class."""
    return (preds == labels) & (confidences >= tau) & (masked_preds == labels)


def accumulate_global_mc(
    labels: np.ndarray,
    preds: np.ndarray,
    confidences: np.ndarray,
    masked_preds: np.ndarray,
    masks: np.ndarray,
    activations: np.ndarray,
    num_classes: int,
    tau: float,
) -> GlobalMC:
    """Count MC filters and their magnitudes per class over the accepted training images.

    ``masks`` N×K booleans (each image's MC mask of its inferred class),
    ``activations`` N×K.  Pure function.
    """
    accepted = accepted_images(labels, preds, confidences, masked_preds, tau)
    one_hot = np.zeros((num_classes, len(labels)), dtype=np.float64)
    one_hot[labels[accepted], np.flatnonzero(accepted)] = 1.0
    binary = np.asarray(masks, dtype=np.float64)
    return GlobalMC(
        counts=np.rint(one_hot @ binary).astype(np.int64),
        magnitude=one_hot @ (binary * activations),
        images=one_hot.sum(axis=1).astype(np.int64),
    )


def global_sets(hist: np.ndarray, freq_threshold: float) -> np.ndarray:
    """``G_c = {k : hist[c, k] > f · max_k hist[c, k]}`` as a C×K boolean array (a class never seen: empty)."""
    hist = np.asarray(hist)
    return hist > freq_threshold * hist.max(axis=1, keepdims=True)


def global_mc_of(train: dict[str, np.ndarray], num_classes: int, tau: float) -> GlobalMC:
    """:func:`accumulate_global_mc` over the :data:`TRAIN_COLUMNS` arrays of the training masks."""
    return accumulate_global_mc(
        train["label"], train["pred"], train["confidence"], train["masked_pred"], train["mc_mask"], train["a"], num_classes, tau
    )


def global_mc_frame(global_mc: GlobalMC, freq_threshold: float, tau: float, class_names: list[str]) -> pd.DataFrame:
    """One row per (class, filter): count, normalised magnitude, in G at ``freq_threshold``."""
    num_classes, num_filters = global_mc.counts.shape
    return pd.DataFrame(
        {
            "class": np.repeat(np.arange(num_classes), num_filters),
            "class_name": np.repeat(np.asarray(class_names, dtype=object), num_filters),
            "filter": np.tile(np.arange(num_filters), num_classes),
            "count": global_mc.counts.reshape(-1),
            "magnitude": global_mc.normalised_magnitude().reshape(-1),
            "in_global": global_sets(global_mc.counts, freq_threshold).reshape(-1),
            "images": np.repeat(global_mc.images, num_filters),
            "tau": tau,
            "freq_threshold": freq_threshold,
        }
    )
