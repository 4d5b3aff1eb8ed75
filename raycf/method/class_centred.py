"""Class-aware forms of an error score: centred on the predicted class, and ranked within it.  numpy only.

The paper's rule thresholds each class at its own training mean (``avg``); an
AUROC over raw scores pools the classes instead, so a score that ranks errors
well *within* each class can still rank them badly overall when the classes'
score levels differ (Fashion-MNIST's errors sit in a few classes).  Two
class-aware readings answer the rule's question:

* the **class-centred score**: (score − μ_ĉ) / σ_ĉ, with μ_ĉ and σ_ĉ the mean
  and (population) standard deviation of the score over the accepted training
  images of the predicted class ĉ.  A class without accepted training images
  has no statistics: its images score 0 (no evidence either way).  A class
  whose accepted scores do not vary (σ = 0) is centred but not scaled;
* the **within-class AUROC**: the AUROC of the score among the images
  predicted as each class (classes with both an error and a right
  prediction), averaged over those classes weighted by their errors.  It is
  unchanged by centring (a per-class increasing map), so it reads the same for
  the raw and the centred score.
"""

from __future__ import annotations

import numpy as np

from raycf.method.bootstrap import curves_of, score_levels


def class_statistics(scores: np.ndarray, classes: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: the mean and population standard deviation of ``scores`` (NaN for a class with no score)."""
    scores, classes = np.asarray(scores, dtype=np.float64), np.asarray(classes)
    counts = np.bincount(classes, minlength=num_classes).astype(np.float64)
    totals = np.bincount(classes, weights=scores, minlength=num_classes)
    means = np.divide(totals, counts, out=np.full(num_classes, np.nan), where=counts > 0)
    squares = np.bincount(classes, weights=(scores - np.nan_to_num(means)[classes]) ** 2, minlength=num_classes)
    sds = np.sqrt(np.divide(squares, counts, out=np.full(num_classes, np.nan), where=counts > 0))
    return means, sds


def centre_by_class(scores: np.ndarray, classes: np.ndarray, means: np.ndarray, sds: np.ndarray) -> np.ndarray:
    """(score − mean of its class) / sd of its class; 0 where the class has no mean, undivided where its sd is 0."""
    scores, classes = np.asarray(scores, dtype=np.float64), np.asarray(classes)
    mean, sd = means[classes], sds[classes]
    known = ~np.isnan(mean)
    centred = np.where(known, scores - np.nan_to_num(mean), 0.0)
    scale = np.where(known & (sd > 0), sd, 1.0)
    return centred / scale


def within_class_auroc(is_positive: np.ndarray, scores: np.ndarray, classes: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The error-weighted mean over classes of each class's AUROC, under each row of ``weights`` (R×N counts; default: every image once).

    A class enters a row when that row weighs both an error and a right
    prediction of it; its weight is its errors' total weight.  A row with no
    such class is NaN.  Returns R values.
    """
    is_positive, scores, classes = np.asarray(is_positive, dtype=bool), np.asarray(scores, dtype=np.float64), np.asarray(classes)
    weights = np.ones((1, len(scores))) if weights is None else np.asarray(weights, dtype=np.float64)
    weighted_sum = np.zeros(len(weights))
    total_weight = np.zeros(len(weights))
    for label in np.unique(classes):
        members = classes == label
        if not is_positive[members].any() or is_positive[members].all():
            continue
        class_weights = weights[:, members]
        aurocs, _ = curves_of(score_levels(is_positive[members], scores[members]), class_weights)
        errors = class_weights[:, is_positive[members]].sum(axis=1)
        defined = ~np.isnan(aurocs)
        weighted_sum[defined] += errors[defined] * aurocs[defined]
        total_weight[defined] += errors[defined]
    return np.divide(weighted_sum, total_weight, out=np.full(len(weights), np.nan), where=total_weight > 0)
