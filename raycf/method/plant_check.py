"""Does the method point at the bug?  The planted-feature sensitivity of the filters each ranking puts first.

For a planted study (``data.plant``) the bug is known: the feature drives
some filters.  The *sensitivity* of filter k on an image is its pooled
activation with the feature added minus without it (the same clean image of
the planted class, the feature planted on the fly).  Each ranking of the
planted class's filters is judged by the mean sensitivity of its top k:

* ``cfe_frequency``: CFE's global-MC count of the class (how often k is in
  the MC set of its accepted training images, METHOD §3);
* ``cfe_specificity``: that count as a share of the class's accepted images
  minus the mean share over the other classes (filters MC for this class only);
* ``attribution``: plain a·W, the mean over the class's training images of
  ``a_k · W[c, k]`` (the head's evidence, no CFE);
* ``random``: a random k filters, whose expected mean is the mean over all
  filters (reported exactly, not drawn);
* ``oracle``: the k filters the feature drives most on these same images
  (the ceiling; in-sample, so optimistic).

Intervals: percentile bootstrap over images (the rankings fixed; the oracle's
top k re-chosen in each resample).  numpy and pandas only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

RANKINGS = ("cfe_frequency", "cfe_specificity", "attribution", "random", "oracle")
TOP_K = (1, 3, 5, 10)


def filter_scores(counts: np.ndarray, images: np.ndarray, class_index: int, activations: np.ndarray, head_weight: np.ndarray) -> dict[str, np.ndarray]:
    """Each ranking's score per filter for the planted class (higher: ranked first).

    ``counts`` C×K global-MC counts, ``images`` C accepted images per class,
    ``activations`` N×K pooled vectors of the class's training images,
    ``head_weight`` the head's C×K weight matrix.
    """
    counts = np.asarray(counts, dtype=np.float64)
    share = np.divide(counts, np.asarray(images, dtype=np.float64)[:, None], out=np.zeros_like(counts), where=np.asarray(images)[:, None] > 0)
    others = np.delete(share, class_index, axis=0)
    specificity = share[class_index] - (others.mean(axis=0) if len(others) else 0.0)
    attribution = (np.asarray(activations, dtype=np.float64) * np.asarray(head_weight, dtype=np.float64)[class_index]).mean(axis=0) if len(activations) else np.zeros(counts.shape[1])
    return {"cfe_frequency": counts[class_index], "cfe_specificity": specificity, "attribution": attribution}


def top_filters(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` filters of highest score, ties by lower filter index (stable)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]


def sensitivity_table(
    sensitivity: np.ndarray, scores: dict[str, np.ndarray], ks: Sequence[int] = TOP_K, bootstrap: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """One row per (ranking, k): ``sensitivity`` (mean over images and the top k), ``lo``, ``hi`` (95 %), ``filters``, ``images``.

    ``sensitivity`` is N×K (per image, per filter: with minus without the feature).
    """
    sensitivity = np.asarray(sensitivity, dtype=np.float64)
    n, num_filters = sensitivity.shape
    mean = sensitivity.mean(axis=0) if n else np.zeros(num_filters)
    resampled = _resampled_means(sensitivity, bootstrap, seed)  # B×K
    rows = []
    for k in sorted({min(k, num_filters) for k in ks}):
        for ranking in RANKINGS:
            if ranking == "random":
                point, draws, chosen = mean.mean(), resampled.mean(axis=1), np.arange(0)
            elif ranking == "oracle":
                chosen = top_filters(mean, k)
                point = mean[chosen].mean()
                draws = -np.sort(-resampled, axis=1)[:, :k].mean(axis=1) if len(resampled) else resampled
            else:
                chosen = top_filters(scores[ranking], k)
                point, draws = mean[chosen].mean(), resampled[:, chosen].mean(axis=1)
            lo, hi = (np.percentile(draws, [2.5, 97.5]) if len(draws) else (np.nan, np.nan))
            rows.append({"ranking": ranking, "k": int(k), "sensitivity": float(point), "lo": float(lo), "hi": float(hi), "filters": ",".join(map(str, chosen.tolist())), "images": int(n)})
    return pd.DataFrame(rows)


def _resampled_means(sensitivity: np.ndarray, bootstrap: int, seed: int) -> np.ndarray:
    """B×K means of bootstrap resamples of the images (0×K without resamples or images)."""
    n = len(sensitivity)
    if bootstrap == 0 or n == 0:
        return np.zeros((0, sensitivity.shape[1]))
    rng = np.random.default_rng([seed, 24])
    draws = []
    for start in range(0, bootstrap, 200):  # bounded memory: 200 resamples × N counts at a time
        size = min(200, bootstrap - start)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(size)]).astype(np.float64)
        draws.append(counts @ sensitivity / n)
    return np.concatenate(draws)
