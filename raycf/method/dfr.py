"""Deep feature reweighting (DFR, Kirichenko et al. 2022): the base model's linear head refit on group-balanced validation features.

The base model's penultimate features (the K pooled last-conv filter
activations its head reads) are kept; only the head is refit.  The
validation split is cut in two halves by a seeded permutation stratified by
group; on the first half every group is subsampled to the smallest group's
size and an L2 logistic regression is fit on standardised features, for each
C of a small grid; the second half picks C by worst-group accuracy (then
mean accuracy, then the smaller C).  The head maps features to logits.

:func:`paired_group_bootstrap` gives paired percentile intervals of one
model's accuracy, worst-group and mean-group accuracy minus another's over
the same images.  numpy and scikit-learn only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raycf.method.bootstrap import percentile_interval, resample_counts
from raycf.method.groups import group_metrics

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
ABSENT_LOGIT = -1e4  # a class the balanced subset has no image of is never predicted


@dataclass(frozen=True)
class DfrHead:
    """A linear head on standardised features: ``logits = ((x − mean) / scale) · coefᵀ + intercept`` (C × K coefficients)."""

    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        """N × C logits of N × K features."""
        standard = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return standard @ self.coef.T + self.intercept

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The class each feature vector's logits rank first."""
        return np.argmax(self.logits(features), axis=1)


@dataclass(frozen=True)
class DfrFit:
    """A fitted DFR head and how it was chosen: the C, each C's worst-group and mean accuracy on the second half, the halves' sizes."""

    head: DfrHead
    c: float
    tuning: list[dict[str, float]]
    fit_images: int  # the balanced subset of the first half
    tune_images: int  # the second half


def split_halves(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image positions of the two halves, each group's images permuted and cut in two (the first half takes the odd one)."""
    generator = np.random.default_rng(seed)
    groups = np.asarray(groups, dtype=object).astype(str)
    first, second = [], []
    for group in sorted(set(groups)):
        members = generator.permutation(np.flatnonzero(groups == group))
        cut = (len(members) + 1) // 2
        first.append(members[:cut])
        second.append(members[cut:])
    return np.sort(np.concatenate(first)).astype(np.int64), np.sort(np.concatenate(second)).astype(np.int64)


def balanced_subset(positions: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """A subset of ``positions`` with every group (of ``groups[positions]``) subsampled to the smallest group's size, drawn without replacement."""
    generator = np.random.default_rng(seed)
    positions = np.asarray(positions, dtype=np.int64)
    of = np.asarray(groups, dtype=object).astype(str)[positions]
    names = sorted(set(of))
    smallest = min(int((of == name).sum()) for name in names)
    chosen = [generator.choice(positions[of == name], size=smallest, replace=False) for name in names]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def fit_head(features: np.ndarray, labels: np.ndarray, num_classes: int, c: float, seed: int) -> DfrHead:
    """An L2 logistic regression on standardised ``features`` (standardised with their own mean and deviation)."""
    from sklearn.linear_model import LogisticRegression

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)  # a constant filter stays constant (0 after centring)
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit((features - mean) / scale, labels)
    coef = np.zeros((num_classes, features.shape[1]))
    intercept = np.full(num_classes, ABSENT_LOGIT)
    classes = model.classes_.astype(np.int64)
    if len(classes) == 1:  # one class: it is always predicted
        intercept[classes[0]] = 0.0
    elif len(classes) == 2:  # scikit-learn's one row is class 1's logit over class 0's
        coef[classes[1]], intercept[classes[1]], intercept[classes[0]] = model.coef_[0], model.intercept_[0], 0.0
    else:
        coef[classes], intercept[classes] = model.coef_, model.intercept_
    return DfrHead(coef=coef, intercept=intercept, mean=mean, scale=scale)


def fit_dfr(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, num_classes: int, seed: int, c_grid: tuple[float, ...] = C_GRID) -> DfrFit:
    """DFR on the validation split's features, labels and groups (see the module docstring); deterministic per ``seed``."""
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=object).astype(str)
    if not (len(features) == len(labels) == len(groups)):
        raise ValueError(f"features, labels and groups differ in length ({len(features)}, {len(labels)}, {len(groups)})")
    first, second = split_halves(groups, seed)
    if not len(second):
        raise ValueError("DFR needs at least two validation images per group (one to fit, one to choose C)")
    fit = balanced_subset(first, groups, seed + 1)
    tuning, heads = [], []
    for c in c_grid:
        head = fit_head(features[fit], labels[fit], num_classes, c, seed)
        metrics = group_metrics(groups[second], labels[second], head.predict(features[second]))
        accuracy = float((head.predict(features[second]) == labels[second]).mean())
        tuning.append({"c": float(c), "worst_group_acc": metrics["worst_group_acc"], "acc": accuracy})
        heads.append(head)
    best = max(range(len(c_grid)), key=lambda i: (tuning[i]["worst_group_acc"], tuning[i]["acc"], -tuning[i]["c"]))
    return DfrFit(head=heads[best], c=float(c_grid[best]), tuning=tuning, fit_images=len(fit), tune_images=len(second))


def group_accuracies(correct: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """``acc``, ``worst_group_acc`` and ``mean_group_acc`` of per-image correctness."""
    correct = np.asarray(correct, dtype=bool)
    names, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    per_group = np.bincount(codes, weights=correct, minlength=len(names)) / np.bincount(codes, minlength=len(names))
    return {"acc": float(correct.mean()), "worst_group_acc": float(per_group.min()), "mean_group_acc": float(per_group.mean())}


def paired_group_bootstrap(correct: np.ndarray, baseline: np.ndarray, groups: np.ndarray, resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """Paired 95 % percentile intervals of ``acc``, ``worst_group_acc`` and ``mean_group_acc`` of ``correct`` minus ``baseline``'s.

    Both are per-image correctness over the same images; each resample draws
    the images with replacement once for both.  A group a resample misses is
    left out of that resample's worst and mean.
    """
    correct, baseline = np.asarray(correct, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    names, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    onehot = np.zeros((len(codes), len(names)))
    onehot[np.arange(len(codes)), codes] = 1.0
    differences: dict[str, list[np.ndarray]] = {"acc": [], "worst_group_acc": [], "mean_group_acc": []}
    for counts in resample_counts(len(codes), resamples, seed):
        counts = counts.astype(np.float64)
        images = counts @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            ours, theirs = ((counts @ (onehot * c[:, None])) / images for c in (correct, baseline))
        total = counts.sum(axis=1)
        differences["acc"].append((counts @ correct - counts @ baseline) / total)
        differences["worst_group_acc"].append(np.nanmin(ours, axis=1) - np.nanmin(theirs, axis=1))
        differences["mean_group_acc"].append(np.nanmean(ours, axis=1) - np.nanmean(theirs, axis=1))
    return {name: percentile_interval(np.concatenate(values)) for name, values in differences.items()}
