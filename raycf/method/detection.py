"""Misclassification detection (METHOD §4, paper Table 1) from MC masks: numpy and pandas only.

**Agreement scores** of an image with inferred class ĉ, local MC set L (its
``mc_mask``) and G = G_ĉ:

* ``recall`` = |L∩G| / |G|, ``precision`` = |L∩G| / |L|, ``f1`` = 2|L∩G| / (|L| + |G|);
* ``magnitude`` (a distance; lower agrees more) = Σ_k |a_k·L_k − ḡ_k·G_k| with ḡ
  the class's normalised magnitude (the reference's "magnitude similarity");
* ``head_weight`` = Σ_{k∈L} W_ĉk a_k / Σ_{k∈G} W_ĉk ḡ_k: the share of the
  class's typical global-MC logit that this image's MC filters produce
  (the reference divides by the filter counts instead of ḡ; we keep units).

A score whose denominator is empty (|G| = 0, |L| = 0, or a non-positive
head-weight denominator) is 0: no agreement shown.  Nothing divides by zero.

**Detection** (paper Table 1, METHOD §4).  A setting has a metric, a
threshold (``avg``: the mean score of the class's accepted training images;
or an absolute value), a skip threshold and a frequency threshold f.  An
image is *flagged* as a possible misclassification when its score is on the
disagreeing side of the threshold (below it; above it for ``magnitude``) —
unless it is *skipped*: with skip s > 0, a prediction with confidence > s is
accepted and never flagged; s = 0 skips nothing.  A class without accepted
training images has no ``avg`` threshold: its images are not flagged by
``avg`` rows.  Counted: total errors (prediction ≠ label), errors detected
(flagged and wrong) and new errors (flagged but right).  A flagged image is
also re-ranked: each of its top-k classes is scored with its own MC mask
against its own global set, and the best-agreeing class (ties: the more
probable one) replaces the prediction ("altered accuracy"; the reference's
version always kept the top-1 class).

**Table 1's controls** (:func:`control_rows`): the skip gate alone (every
image with confidence ≤ s flagged) and max softmax flagging as many images
as each CFE rule (the least confident): what a rule catches beyond them is
what its filters add.

**Error scores**: each agreement score, its class-centred form
(``<metric>_centred``, :mod:`raycf.method.class_centred`), the MC-set size
and the max-softmax baseline as threshold-free detectors of "is an error"
(AUROC, AUPR with errors as positives), every score oriented so that higher
means more suspicious, plus ``max_softmax_x_f1`` = 1 − confidence · f1; with
percentile-bootstrap 95 % intervals over images, the within-class AUROC on
the same resamples and, for each score, the paired interval of its AUROC
minus max softmax's with a Holm-adjusted p-value (:mod:`raycf.method.bootstrap`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycf.config import AnalysisConfig, DetectionSetting
from raycf.method.bootstrap import interval_frame, within_class_interval_frame
from raycf.method.class_centred import centre_by_class, class_statistics
from raycf.method.global_mc import GlobalMC, accepted_images, global_mc_frame, global_mc_of, global_sets

METRICS = ("recall", "precision", "f1", "magnitude", "head_weight")
LOWER_AGREES = frozenset({"magnitude"})  # distances: a lower value means more agreement
METRIC_NAMES = {"recall": "Recall", "precision": "Precision", "f1": "F1", "magnitude": "Magnitude distance", "head_weight": "Head weight"}
CENTRED = "_centred"  # suffix of an agreement score's class-centred form
SCORE_ORDER = (*METRICS, *(f"{metric}{CENTRED}" for metric in METRICS), "mc_size", "max_softmax", "max_softmax_x_f1")
EVALUATED_SPLITS = ("test", "val")
SPLIT_COLUMNS = ["label", "pred", "confidence", "mc_mask", "a", "topk_classes", "topk_mc_masks"]

# ------------------------------------------------------------ agreement


@dataclass
class Reference:
    """What images are compared with: the global sets and magnitudes, and the head's weights."""

    sets: np.ndarray  # C×K bool
    magnitude: np.ndarray  # C×K normalised magnitude
    head_weight: np.ndarray | None = None  # C×K (W); needed for the head_weight metric only


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def agreement_scores(masks: np.ndarray, activations: np.ndarray, classes: np.ndarray, reference: Reference, metrics=METRICS) -> dict[str, np.ndarray]:
    """Scores of local MC sets against the global sets of ``classes``.

    ``masks`` …×K booleans with ``classes`` of the leading shape (N, or N×k
    for top-k candidates); ``activations`` N×K (broadcast over candidates).
    Returns one array of the leading shape per metric.
    """
    local = np.asarray(masks, dtype=bool)
    classes = np.asarray(classes)
    expanded = activations if local.ndim == 2 else activations[:, None, :]
    globals_ = reference.sets[classes]
    intersection = (local & globals_).sum(axis=-1)
    local_size, global_size = local.sum(axis=-1), globals_.sum(axis=-1)
    scores: dict[str, np.ndarray] = {}
    if "recall" in metrics:
        scores["recall"] = _safe_divide(intersection, global_size)
    if "precision" in metrics:
        scores["precision"] = _safe_divide(intersection, local_size)
    if "f1" in metrics:
        scores["f1"] = _safe_divide(2 * intersection, local_size + global_size)
    typical = reference.magnitude[classes] * globals_
    if "magnitude" in metrics:
        scores["magnitude"] = np.abs(expanded * local - typical).sum(axis=-1)
    if "head_weight" in metrics:
        if reference.head_weight is None:
            raise ValueError("the head_weight metric needs the classifier's head weights")
        weights = reference.head_weight[classes]
        scores["head_weight"] = _safe_divide((weights * expanded * local).sum(axis=-1), (weights * typical).sum(axis=-1))
    return scores


def suspicion(metric: str, scores: np.ndarray) -> np.ndarray:
    """Scores turned so that higher means "more likely a misclassification"."""
    return np.asarray(scores, dtype=np.float64) if metric in LOWER_AGREES else -np.asarray(scores, dtype=np.float64)


def class_means(scores: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean score per class (NaN for a class with no images)."""
    totals = np.bincount(classes, weights=scores, minlength=num_classes)
    counts = np.bincount(classes, minlength=num_classes)
    return np.divide(totals, counts, out=np.full(num_classes, np.nan), where=counts > 0)


# ------------------------------------------------------------ detection


def flag_images(
    metric: str, scores: np.ndarray, thresholds: np.ndarray, confidences: np.ndarray, skip_threshold: float
) -> np.ndarray:
    """Possible misclassifications: the score disagrees beyond its threshold and the image is not skipped.

    Skip: with ``skip_threshold`` s > 0, confidence > s means accepted, never
    flagged; s = 0 skips nothing.  A NaN threshold flags nothing.
    """
    considered = np.ones(len(scores), dtype=bool) if skip_threshold == 0 else confidences <= skip_threshold
    with np.errstate(invalid="ignore"):
        disagrees = scores > thresholds if metric in LOWER_AGREES else scores < thresholds
    return considered & disagrees


def table1_counts(flags: np.ndarray, errors: np.ndarray) -> dict[str, int | float]:
    """Paper Table 1's counts: total errors, errors detected (flagged ∧ wrong, n and %), new errors (flagged ∧ right)."""
    total = int(errors.sum())
    detected = int((flags & errors).sum())
    return {
        "total_errors": total,
        "flagged": int(flags.sum()),
        "errors_detected": detected,
        "errors_detected_pct": 100.0 * detected / total if total else 0.0,
        "new_errors": int((flags & ~errors).sum()),
    }


def rerank(flags: np.ndarray, candidates: np.ndarray, candidate_scores: np.ndarray, metric: str) -> np.ndarray:
    """New predictions: for flagged images the best-agreeing top-k class (ties: the more probable), else top-1."""
    best = np.argmax(-suspicion(metric, candidate_scores), axis=1)  # argmax keeps the first of ties
    chosen = np.take_along_axis(candidates, best[:, None], axis=1)[:, 0]
    return np.where(flags, chosen, candidates[:, 0])


def setting_label(setting: DetectionSetting) -> str:
    """The paper's name of a detection row: ``Avg. Recall``, ``Recall < 0.3``."""
    name = METRIC_NAMES[setting.metric]
    if setting.threshold == "avg":
        return f"Avg. {name}"
    return f"{name} {'>' if setting.metric in LOWER_AGREES else '<'} {setting.threshold:g}"


@dataclass
class StudyData:
    """The arrays an analysis needs: masks of the training split and of the evaluated splits, and the head's weights."""

    train: dict[str, np.ndarray]
    splits: dict[str, dict[str, np.ndarray]]
    class_names: list[str]
    head_weight: np.ndarray | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def global_filters(self, tau: float, freq_threshold: float) -> np.ndarray:
        """G (C×K booleans) at ``tau`` and ``freq_threshold``, from the training masks."""
        return global_sets(global_mc_of(self.train, self.num_classes, tau).counts, freq_threshold)


def reference_for(data: StudyData, tau: float, freq_threshold: float) -> tuple[Reference, GlobalMC]:
    """The global sets (τ, f), magnitudes and head weights images are compared with, and the accumulation behind them."""
    global_mc = global_mc_of(data.train, data.num_classes, tau)
    return Reference(global_sets(global_mc.counts, freq_threshold), global_mc.normalised_magnitude(), data.head_weight), global_mc


def class_thresholds(data: StudyData, reference: Reference, setting: DetectionSetting, tau: float) -> np.ndarray:
    """The flagging threshold of each inferred class (C values).

    ``avg``: the mean score of the class's accepted training images (NaN for
    a class without any); otherwise the setting's absolute value.
    """
    if setting.threshold != "avg":
        return np.full(data.num_classes, float(setting.threshold))
    classes, scores = accepted_training_scores(data, reference, tau, (setting.metric,))
    return class_means(scores[setting.metric], classes, data.num_classes)


def accepted_training_scores(data: StudyData, reference: Reference, tau: float, metrics=METRICS) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The classes of the accepted training images (at ``tau``) and their agreement scores against their own class."""
    train = data.train
    accepted = accepted_images(train["label"], train["pred"], train["confidence"], train["masked_pred"], tau)
    classes = train["label"][accepted]
    return classes, agreement_scores(train["mc_mask"][accepted], train["a"][accepted], classes, reference, metrics)


def setting_flags(data: StudyData, split: str, setting: DetectionSetting, tau: float, reference: Reference | None = None) -> np.ndarray:
    """The images of ``split`` a Table 1 setting flags (``reference``: its global sets, when the caller has them)."""
    reference = reference if reference is not None else reference_for(data, tau, setting.freq_threshold)[0]
    images = data.splits[split]
    scores = agreement_scores(images["mc_mask"], images["a"], images["pred"], reference, (setting.metric,))[setting.metric]
    thresholds = class_thresholds(data, reference, setting, tau)[images["pred"]]
    return flag_images(setting.metric, scores, thresholds, images["confidence"], setting.skip_threshold)


def detection_row(data: StudyData, split: str, setting: DetectionSetting, tau: float, label: str | None = None) -> dict:
    """One row of Table 1 for ``split``: the setting, its counts and the altered accuracy."""
    reference, _ = reference_for(data, tau, setting.freq_threshold)
    images = data.splits[split]
    metric = setting.metric
    errors = images["pred"] != images["label"]
    flags = setting_flags(data, split, setting, tau, reference)
    candidate_scores = agreement_scores(images["topk_mc_masks"], images["a"], images["topk_classes"], reference, (metric,))[metric]
    altered = rerank(flags, images["topk_classes"], candidate_scores, metric)
    skipped = int((images["confidence"] > setting.skip_threshold).sum()) if setting.skip_threshold > 0 else 0
    return {
        "split": split,
        "setting": label or setting_label(setting),
        "metric": metric,
        "threshold_kind": "avg" if setting.threshold == "avg" else "absolute",
        "threshold": float("nan") if setting.threshold == "avg" else float(setting.threshold),
        "skip_threshold": setting.skip_threshold,
        "freq_threshold": setting.freq_threshold,
        "tau": tau,
        "images": len(errors),
        "skipped": skipped,
        **table1_counts(flags, errors),
        "accuracy": float((~errors).mean()) if len(errors) else 0.0,
        "altered_accuracy": float((altered == images["label"]).mean()) if len(errors) else 0.0,
        "relabelled": int((altered != images["pred"]).sum()),
        "fixed": int(((altered == images["label"]) & errors).sum()),
        "broken": int(((altered != images["label"]) & ~errors).sum()),
    }


# --------------------------------------------------- threshold-free quality


def auroc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn; ties count half); NaN without both classes."""
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        return float("nan")
    from sklearn.metrics import roc_auc_score  # imported when used: every process that reads a results folder imports this module

    return float(roc_auc_score(is_positive, np.asarray(scores, dtype=np.float64)))


def average_precision(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """AUPR as scikit-learn's average precision; NaN without a positive."""
    is_positive = np.asarray(is_positive, dtype=bool)
    if not is_positive.any():
        return float("nan")
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(is_positive, np.asarray(scores, dtype=np.float64)))


def error_suspicions(data: StudyData, split: str, tau: float, freq_threshold: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """"Is the prediction wrong" for each image of ``split``, and every error score oriented so that higher is more suspicious.

    The scores: each agreement metric (``head_weight`` only with the head's
    weights), then each one's class-centred form ``<metric>_centred``
    (:mod:`raycf.method.class_centred`: centred on the predicted class's
    accepted training images at ``tau``), ``mc_size`` (|L|: a larger MC set
    is more suspicious), ``max_softmax`` (1 − confidence) and
    ``max_softmax_x_f1`` (1 − confidence · F1).
    """
    reference, _ = reference_for(data, tau, freq_threshold)
    images = data.splits[split]
    metrics = METRICS if data.head_weight is not None else tuple(m for m in METRICS if m != "head_weight")
    scores = agreement_scores(images["mc_mask"], images["a"], images["pred"], reference, metrics)
    errors = images["pred"] != images["label"]
    suspicions = {metric: suspicion(metric, values) for metric, values in scores.items()}
    train_classes, train_scores = accepted_training_scores(data, reference, tau, metrics)
    for metric, values in scores.items():
        means, sds = class_statistics(train_scores[metric], train_classes, data.num_classes)
        suspicions[f"{metric}{CENTRED}"] = suspicion(metric, centre_by_class(values, images["pred"], means, sds))
    suspicions["mc_size"] = np.asarray(images["mc_mask"], dtype=bool).sum(axis=1).astype(np.float64)
    suspicions["max_softmax"] = 1.0 - images["confidence"].astype(np.float64)
    suspicions["max_softmax_x_f1"] = 1.0 - images["confidence"].astype(np.float64) * scores["f1"]
    return errors, suspicions


def error_score_rows(data: StudyData, split: str, tau: float, freq_threshold: float) -> list[dict]:
    """AUROC and AUPR of "is an error" for each agreement score, max softmax and their combination."""
    errors, suspicions = error_suspicions(data, split, tau, freq_threshold)
    return _score_rows(split, errors, suspicions, tau, freq_threshold)


def _score_rows(split: str, errors: np.ndarray, suspicions: dict[str, np.ndarray], tau: float, freq_threshold: float) -> list[dict]:
    return [
        {
            "split": split,
            "score": name,
            "auroc": auroc(errors, values),
            "aupr": average_precision(errors, values),
            "images": len(errors),
            "errors": int(errors.sum()),
            "error_rate": float(errors.mean()) if len(errors) else 0.0,
            "tau": tau,
            "freq_threshold": freq_threshold,
        }
        for name, values in suspicions.items()
    ]


def error_score_frame(data: StudyData, split: str, tau: float, freq_threshold: float, resamples: int, seed: int) -> pd.DataFrame:
    """:func:`error_score_rows` with bootstrap 95 % intervals (``resamples`` over the split's images, seeded by ``seed``).

    Added columns: ``auroc_lo``, ``auroc_hi``, ``aupr_lo``, ``aupr_hi``, and
    the paired interval of each score's AUROC minus max softmax's
    (``baseline``, ``auroc_diff``, ``auroc_diff_lo``, ``auroc_diff_hi``,
    ``auroc_diff_p``), ``bootstrap``, ``bootstrap_defined`` (see
    :mod:`raycf.method.bootstrap`); the within-class AUROC on the same
    resamples (``auroc_within``, ``auroc_within_lo``, ``auroc_within_hi``,
    ``auroc_within_diff``, ``auroc_within_diff_lo``, ``auroc_within_diff_hi``,
    ``auroc_within_diff_p``: images grouped by predicted class); and
    ``auroc_diff_p_holm``, ``auroc_within_diff_p_holm``: the p-values
    Holm-adjusted over the split's scores other than max softmax.
    """
    from raycf.method.multiple import holm

    errors, suspicions = error_suspicions(data, split, tau, freq_threshold)
    rows = pd.DataFrame(_score_rows(split, errors, suspicions, tau, freq_threshold))
    intervals = interval_frame(errors, suspicions, "max_softmax", resamples, seed)
    within = within_class_interval_frame(errors, suspicions, data.splits[split]["pred"], "max_softmax", resamples, seed)
    frame = rows.merge(intervals, on="score", how="left", validate="one_to_one").merge(within, on="score", how="left", validate="one_to_one")
    compared = frame["score"] != "max_softmax"
    for column in ("auroc_diff_p", "auroc_within_diff_p"):
        frame[f"{column}_holm"] = np.nan
        frame.loc[compared, f"{column}_holm"] = holm(frame.loc[compared, column].to_numpy())
    return frame


def detection_quality(data: StudyData, tau: float, freq_threshold: float, split: str = "val") -> dict[str, float]:
    """Threshold-free detection quality of the F1 agreement on ``split`` (errors as positives).

    Keys: ``det_auroc``, ``det_aupr`` (F1 agreement), ``maxsoftmax_auroc``,
    ``maxsoftmax_aupr``, ``combined_auroc``, ``combined_aupr``
    (``max_softmax_x_f1``), ``errors``, ``images``.
    """
    rows = {row["score"]: row for row in error_score_rows(data, split, tau, freq_threshold)}
    return {
        "det_auroc": rows["f1"]["auroc"],
        "det_aupr": rows["f1"]["aupr"],
        "maxsoftmax_auroc": rows["max_softmax"]["auroc"],
        "maxsoftmax_aupr": rows["max_softmax"]["aupr"],
        "combined_auroc": rows["max_softmax_x_f1"]["auroc"],
        "combined_aupr": rows["max_softmax_x_f1"]["aupr"],
        "errors": float(rows["f1"]["errors"]),
        "images": float(rows["f1"]["images"]),
    }


# ------------------------------------------------------------ tables


def detection_settings(analysis: AnalysisConfig) -> list[tuple[DetectionSetting, str | None]]:
    """The configured rows, then the study's own row (Avg. F1 at the study's skip threshold and f)."""
    own = DetectionSetting(metric="f1", threshold="avg", skip_threshold=analysis.skip_threshold, freq_threshold=analysis.freq_threshold)
    return [(setting, None) for setting in analysis.settings] + [(own, f"study: {setting_label(own)}")]


def control_row(data: StudyData, split: str, flags: np.ndarray, label: str, control: str, tau: float, skip_threshold: float = 0.0) -> dict:
    """A Table 1 row of a control that flags ``flags`` without the filters: the counts; no re-ranking (altered = accuracy)."""
    images = data.splits[split]
    errors = images["pred"] != images["label"]
    accuracy = float((~errors).mean()) if len(errors) else 0.0
    return {
        "split": split,
        "setting": label,
        "metric": "max_softmax",
        "threshold_kind": control,
        "threshold": float("nan"),
        "skip_threshold": skip_threshold,
        "freq_threshold": float("nan"),
        "tau": tau,
        "images": len(errors),
        "skipped": int((images["confidence"] > skip_threshold).sum()) if skip_threshold > 0 else 0,
        **table1_counts(flags, errors),
        "accuracy": accuracy,
        "altered_accuracy": accuracy,
        "relabelled": 0,
        "fixed": 0,
        "broken": 0,
        "control": control,
    }


def skip_gate_flags(confidences: np.ndarray, skip_threshold: float) -> np.ndarray:
    """Every image the skip gate lets through (confidence ≤ s), as a rule that flags them all."""
    return np.asarray(confidences) <= skip_threshold


def least_confident_flags(confidences: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` least confident images (ties: the earlier image), as flags."""
    flags = np.zeros(len(confidences), dtype=bool)
    flags[np.argsort(np.asarray(confidences), kind="stable")[: max(0, int(count))]] = True
    return flags


def control_rows(data: StudyData, split: str, rules: list[dict], tau: float) -> list[dict]:
    """Table 1's controls on ``split``: the skip gate alone (per distinct skip threshold > 0 of ``rules``), and max softmax
    flagging as many images as each CFE rule of ``rules`` (its rows, as :func:`detection_row` wrote them)."""
    confidences = data.splits[split]["confidence"]
    gates = sorted({float(rule["skip_threshold"]) for rule in rules if rule["skip_threshold"] > 0})
    rows = [control_row(data, split, skip_gate_flags(confidences, gate), f"control: skip gate alone (confidence ≤ {gate:g})", "skip gate", tau, gate) for gate in gates]
    for rule in rules:
        flags = least_confident_flags(confidences, rule["flagged"])
        rows.append(control_row(data, split, flags, f"control: max softmax, as many as {rule['setting']}", "max softmax", tau))
    return rows


def analyse(data: StudyData, analysis: AnalysisConfig, seed: int = 0) -> dict[str, pd.DataFrame]:
    """The three tables of the analysis (``global_mc``, ``detection``, ``error_scores``); ``seed`` seeds the bootstrap.

    ``detection`` holds the configured rules (``control`` empty), then per
    split Table 1's controls (:func:`control_rows`; ``control`` names them).
    """
    _, global_mc = reference_for(data, analysis.tau, analysis.freq_threshold)
    detection = []
    for split in EVALUATED_SPLITS:
        rules = [{**detection_row(data, split, setting, analysis.tau, label), "control": ""} for setting, label in detection_settings(analysis)]
        detection += rules + control_rows(data, split, rules, analysis.tau)
    scores = [error_score_frame(data, split, analysis.tau, analysis.freq_threshold, analysis.bootstrap, seed) for split in EVALUATED_SPLITS]
    return {
        "global_mc": global_mc_frame(global_mc, analysis.freq_threshold, analysis.tau, data.class_names),
        "detection": pd.DataFrame(detection),
        "error_scores": pd.concat(scores, ignore_index=True),
    }
