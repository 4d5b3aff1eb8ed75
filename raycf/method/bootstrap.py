"""Percentile bootstrap over images of AUROC and AUPR, vectorised: numpy, pandas and scipy.sparse (scikit-learn's own dependency).

A resample draws the split's N images with replacement.  It is held as
counts (how often each image was drawn), and every score of a split is
evaluated on the same resamples, so a difference of two scores' AUROC has a
*paired* interval.  On a resample, AUROC is the Mann–Whitney statistic with
the counts as weights (ties count half) and AUPR scikit-learn's average
precision with the counts as sample weights: both equal scikit-learn's values
on the resampled images (tested).  A resample without an error or without a
right prediction has no AUROC or AUPR (NaN) and is left out of the
percentiles; an interval is NaN when every resample is.  Errors are the
positives and every score is oriented so that higher means more suspicious.
Each score is ranked once against its errors' distinct scores
(:class:`Levels`); a block of resamples is then a few sparse products and
cumulative sums over those levels.

The resamples come from ``numpy.random.default_rng(seed)`` alone: the same
seed, number of images and number of resamples give the same intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import pandas as pd
from scipy import sparse

LEVEL = 0.95
BLOCK_VALUES = 4_000_000  # counts held at once (resamples × images): bounds memory at a few tens of MB


def resample_counts(num_images: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of resamples as counts (rows: resamples, columns: images), ``resamples`` rows in all."""
    generator = np.random.default_rng(seed)
    rows = max(1, BLOCK_VALUES // max(num_images, 1))
    for start in range(0, resamples, rows):
        size = min(rows, resamples - start)
        drawn = generator.integers(0, num_images, size=(size, num_images))
        offsets = np.arange(size)[:, None] * num_images
        yield np.bincount((drawn + offsets).ravel(), minlength=size * num_images).reshape(size, num_images)


@dataclass
class Levels:
    """How a score ranks a split's images, as far as AUROC and AUPR need: against the errors' distinct scores.

    The *levels* are the distinct scores of the errors (the positives), J of
    them, highest first; only there does recall move, and only there do the
    pairs AUROC counts need a tally.  Sparse J×N indicators then sum any
    weights of the images per level: ``positives`` (the errors at level j),
    ``negatives_from`` (right predictions whose score is at least level j's
    and below level j − 1's: a cumulative sum over levels gives those
    scoring ≥ level j) and ``negatives_tied`` (right predictions scoring
    exactly level j's score).  ``negatives`` is the N-vector of right
    predictions.  A block of resamples is then three sparse products and two
    cumulative sums over J ≤ N levels, without sorting again.
    """

    positives: sparse.csr_matrix
    negatives_from: sparse.csr_matrix
    negatives_tied: sparse.csr_matrix
    negatives: np.ndarray


def score_levels(is_positive: np.ndarray, scores: np.ndarray) -> Levels:
    """The :class:`Levels` of ``scores`` (N values) with ``is_positive`` (N booleans)."""
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    ascending = np.unique(scores[is_positive])
    count = len(ascending)
    level = count - np.searchsorted(ascending, scores, side="right")  # how many levels lie above: an error's own level
    tied = level < count
    tied[tied] = ascending[count - 1 - level[tied]] == scores[tied]
    negative = ~is_positive

    def indicator(selected: np.ndarray) -> sparse.csr_matrix:
        return sparse.csr_matrix((np.ones(int(selected.sum())), (level[selected], np.flatnonzero(selected))), shape=(count, len(scores)))

    return Levels(
        positives=indicator(is_positive),
        negatives_from=indicator(negative & (level < count)),
        negatives_tied=indicator(negative & tied),
        negatives=negative.astype(np.float64),
    )


def curves_of(levels: Levels, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision under each row of ``weights`` (R×N counts): two arrays of R values.

    Ties count half in AUROC and form one threshold in AUPR, as in
    scikit-learn; a row without positive or without negative weight is NaN.
    """
    return _curves(levels, _as_columns(weights))


def _as_columns(weights: np.ndarray) -> np.ndarray:
    """R×N counts as the contiguous N×R float array a sparse product takes."""
    return np.ascontiguousarray(np.asarray(weights, dtype=np.float64).T)


def _curves(levels: Levels, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    positives = levels.positives @ columns  # J×R: weight of the errors at each level
    true_positives = np.cumsum(positives, axis=0)
    negatives_at_or_above = np.cumsum(levels.negatives_from @ columns, axis=0)
    total_positive, total_negative = positives.sum(axis=0), levels.negatives @ columns
    pairs = total_positive * total_negative
    with np.errstate(invalid="ignore", divide="ignore"):
        beaten = total_negative - negatives_at_or_above + 0.5 * (levels.negatives_tied @ columns)
        auroc = (positives * beaten).sum(axis=0) / pairs
        flagged = true_positives + negatives_at_or_above
        precision = np.divide(true_positives, flagged, out=np.zeros_like(flagged), where=flagged > 0)
        aupr = (positives * precision).sum(axis=0) / total_positive
    undefined = pairs == 0
    auroc[undefined], aupr[undefined] = np.nan, np.nan
    return auroc, aupr


def weighted_auroc_aupr(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of ``scores`` under each row of ``weights`` (see :func:`curves_of`)."""
    return curves_of(score_levels(is_positive, scores), weights)


def bootstrap_metrics(is_positive: np.ndarray, scores: Mapping[str, np.ndarray], resamples: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Each score's AUROC and AUPR on every resample (``{score: {"auroc": R values, "aupr": R values}}``), the same resamples for all."""
    ranked = {name: score_levels(is_positive, values) for name, values in scores.items()}
    blocks: dict[str, dict[str, list[np.ndarray]]] = {name: {"auroc": [], "aupr": []} for name in scores}
    for counts in resample_counts(len(is_positive), resamples, seed):
        columns = _as_columns(counts)
        for name, levels in ranked.items():
            auroc, aupr = _curves(levels, columns)
            blocks[name]["auroc"].append(auroc)
            blocks[name]["aupr"].append(aupr)
    return {name: {metric: np.concatenate(parts) if parts else np.empty(0) for metric, parts in metrics.items()} for name, metrics in blocks.items()}


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of the defined (non-NaN) values; NaNs when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def interval_frame(is_positive: np.ndarray, scores: Mapping[str, np.ndarray], baseline: str, resamples: int, seed: int) -> pd.DataFrame:
    """One row per score: 95 % intervals of AUROC and AUPR and the paired interval of AUROC minus the ``baseline`` score's.

    Columns: ``score``, ``auroc_lo``, ``auroc_hi``, ``aupr_lo``, ``aupr_hi``,
    ``baseline``, ``auroc_diff`` (this score's AUROC minus the baseline's on
    the split itself), ``auroc_diff_lo``, ``auroc_diff_hi`` (the baseline's
    own row: 0 and [0, 0]), ``auroc_diff_p`` (the two-sided bootstrap p-value
    of "no difference", :func:`bootstrap_p_value`; the baseline's own row: 1),
    ``bootstrap`` (resamples drawn), ``bootstrap_defined`` (resamples with
    both an error and a right prediction).
    """
    if baseline not in scores:
        raise ValueError(f"the baseline {baseline!r} is not one of the scores ({', '.join(scores)})")
    samples = bootstrap_metrics(is_positive, scores, resamples, seed)
    everyone = np.ones((1, len(is_positive)))
    points = {name: weighted_auroc_aupr(is_positive, values, everyone)[0][0] for name, values in scores.items()}
    reference = samples[baseline]["auroc"]
    rows = []
    for name, metrics in samples.items():
        auroc_lo, auroc_hi = percentile_interval(metrics["auroc"])
        aupr_lo, aupr_hi = percentile_interval(metrics["aupr"])
        diff_lo, diff_hi = percentile_interval(metrics["auroc"] - reference)
        rows.append(
            {
                "score": name,
                "auroc_lo": auroc_lo,
                "auroc_hi": auroc_hi,
                "aupr_lo": aupr_lo,
                "aupr_hi": aupr_hi,
                "baseline": baseline,
                "auroc_diff": float(points[name] - points[baseline]),
                "auroc_diff_lo": diff_lo,
                "auroc_diff_hi": diff_hi,
                "auroc_diff_p": bootstrap_p_value(metrics["auroc"] - reference),
                "bootstrap": int(resamples),
                "bootstrap_defined": int((~np.isnan(metrics["auroc"])).sum()),
            }
        )
    return pd.DataFrame(rows)


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of "the difference is 0" from its resampled values: twice the smaller share on either side of 0, at most 1.

    The percentile interval at level 1 − α excludes 0 about when this is
    below α; the defined (non-NaN) values count; NaN when there are none.
    A difference that is 0 on every resample (a score against itself) has p = 1.
    """
    values = np.asarray(differences, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan")
    return float(min(1.0, 2 * min(np.mean(values <= 0), np.mean(values >= 0))))


def within_class_interval_frame(
    is_positive: np.ndarray, scores: Mapping[str, np.ndarray], classes: np.ndarray, baseline: str, resamples: int, seed: int
) -> pd.DataFrame:
    """Each score's within-class AUROC (:func:`raycf.method.class_centred.within_class_auroc`) with the resamples of :func:`interval_frame`.

    The same ``seed`` draws the same resamples as :func:`interval_frame`, so
    these intervals sit beside its pooled ones.  Columns: ``score``,
    ``auroc_within``, ``auroc_within_lo``, ``auroc_within_hi``,
    ``auroc_within_diff`` (minus the ``baseline`` score's), its paired
    ``auroc_within_diff_lo``, ``auroc_within_diff_hi`` and ``auroc_within_diff_p``.
    """
    from raycf.method.class_centred import within_class_auroc

    samples: dict[str, list[np.ndarray]] = {name: [] for name in scores}
    for counts in resample_counts(len(is_positive), resamples, seed):
        for name, values in scores.items():
            samples[name].append(within_class_auroc(is_positive, values, classes, counts))
    drawn = {name: np.concatenate(parts) if parts else np.empty(0) for name, parts in samples.items()}
    points = {name: float(within_class_auroc(is_positive, values, classes)[0]) for name, values in scores.items()}
    rows = []
    for name, values in drawn.items():
        low, high = percentile_interval(values)
        differences = values - drawn[baseline]
        diff_low, diff_high = percentile_interval(differences)
        rows.append(
            {
                "score": name,
                "auroc_within": points[name],
                "auroc_within_lo": low,
                "auroc_within_hi": high,
                "auroc_within_diff": points[name] - points[baseline],
                "auroc_within_diff_lo": diff_low,
                "auroc_within_diff_hi": diff_high,
                "auroc_within_diff_p": bootstrap_p_value(differences),
            }
        )
    return pd.DataFrame(rows)
