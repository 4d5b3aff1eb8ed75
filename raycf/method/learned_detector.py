"""Do the CFE signals add anything to confidence?  A learned misclassification detector: torch, numpy, pandas, scikit-learn.

Two logistic regressions predict "the prediction is wrong" from per-image
features, fitted on the validation split and evaluated on the test split:

* ``confidence``: :data:`CONFIDENCE_FEATURES`, from the classifier's softmax
  alone: max softmax, the margin between the two largest probabilities, and
  the entropy of the softmax (nats);
* ``confidence+cfe``: those plus :data:`CFE_FEATURES`: the agreement scores
  of :mod:`raycf.method.detection` (recall, precision, F1, magnitude
  distance, head weight; raw, at the analysis' τ and f), the MC-set size,
  the masked confidence (probability of the prediction under its MC mask,
  stored by the masks stage) and the MI-set size (the filters the MI
  generator of the runner-up class would grow, computed from the bank here:
  the masks stage does not store it).  A signal the study lacks (no head
  weights, a bank without MI generators, top-k of 1) is left out and named.

Each is a scikit-learn pipeline of a StandardScaler and an L2 logistic
regression (C = 1) with ``class_weight="balanced"``: errors are a few per cent
of the images (a handful on digits' validation split), and unweighted, the
log loss is dominated by the many confident right predictions, so the fit
spends little on ranking errors against right predictions, which is all
AUROC and AUPR measure (the scores are ranked, never read as probabilities).
Detectors are scored by their decision function (log-odds: no ties from
saturated probabilities).  The difference of their test AUROC gets a paired
bootstrap interval (:mod:`raycf.method.bootstrap`).  A split without both an
error and a right prediction cannot fit or score a detector: its row holds
NaN and says why in ``reason``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from raycf.method.bank import CfeBank
from raycf.method.bootstrap import interval_frame
from raycf.method.detection import METRICS, Reference, StudyData, agreement_scores, auroc, average_precision, reference_for
from raycf.method.detection_tables import with_interval

if TYPE_CHECKING:  # scikit-learn is imported when a detector is fitted: every process that reads a results folder imports this module
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

CONFIDENCE_FEATURES = ("max_softmax", "margin", "entropy")
CFE_FEATURES = (*METRICS, "mc_size", "masked_confidence", "mi_size")
DETECTORS = {"confidence": CONFIDENCE_FEATURES, "confidence+cfe": CONFIDENCE_FEATURES + CFE_FEATURES}
CLASS_WEIGHT = "balanced"
REGULARISATION_C = 1.0
FIT_SPLIT, EVALUATION_SPLIT = "val", "test"
MI_BLOCK_VALUES = 1 << 24  # bank outputs (images × C × K) computed at once


# ------------------------------------------------------------ features


def confidence_features(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Max softmax, margin between the two largest probabilities, and entropy (nats) of each row of logits."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    normaliser = np.exp(shifted).sum(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / normaliser
    log_probabilities = shifted - np.log(normaliser)
    ordered = np.sort(probabilities, axis=1)
    runner_up = ordered[:, -2] if logits.shape[1] > 1 else np.zeros(len(logits))
    return {
        "max_softmax": ordered[:, -1],
        "margin": ordered[:, -1] - runner_up,
        "entropy": -(probabilities * log_probabilities).sum(axis=1),
    }


@torch.no_grad()
def runner_up_mi_sizes(bank: CfeBank, activations: np.ndarray, runner_up: np.ndarray) -> np.ndarray:
    """|MI set| of each image towards its runner-up class: the filters that would have to grow for the prediction to become it."""
    rows = max(1, MI_BLOCK_VALUES // (bank.num_classes * bank.num_filters))
    sizes = [
        bank.mi_filters(torch.as_tensor(activations[start : start + rows], dtype=torch.float32), torch.as_tensor(runner_up[start : start + rows])).sum(dim=1).numpy()
        for start in range(0, len(activations), rows)
    ]
    return np.concatenate(sizes).astype(np.int64) if sizes else np.zeros(0, dtype=np.int64)


def detector_features(data: StudyData, split: str, tau: float, freq_threshold: float, reference: Reference | None = None) -> pd.DataFrame:
    """Per-image features of ``split`` and its ``is_error`` label (columns: the available features, then ``is_error``).

    The split's arrays need ``logits``; ``masked_confidence`` and ``mi_size``
    are used when present, ``head_weight`` when the study has the head's
    weights.  ``reference``: the global sets at (τ, f) when the caller has them.
    """
    images = data.splits[split]
    reference = reference or reference_for(data, tau, freq_threshold)[0]
    metrics = METRICS if data.head_weight is not None else tuple(m for m in METRICS if m != "head_weight")
    columns: dict[str, np.ndarray] = dict(confidence_features(images["logits"]))
    columns.update(agreement_scores(images["mc_mask"], images["a"], images["pred"], reference, metrics))
    columns["mc_size"] = np.asarray(images["mc_mask"], dtype=bool).sum(axis=1)
    for optional in ("masked_confidence", "mi_size"):
        if optional in images:
            columns[optional] = images[optional]
    frame = pd.DataFrame({name: np.asarray(values, dtype=np.float64) for name, values in columns.items()})
    frame["is_error"] = np.asarray(images["pred"]) != np.asarray(images["label"])
    return frame


# ------------------------------------------------------------ detectors


def fit_detector(features: pd.DataFrame, names: tuple[str, ...]) -> Pipeline:
    """A standardised, class-balanced logistic regression of ``is_error`` on the ``names`` columns."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=REGULARISATION_C, class_weight=CLASS_WEIGHT, max_iter=5000))
    return model.fit(features[list(names)].to_numpy(), features["is_error"].to_numpy())


def _both_classes_missing(labels: np.ndarray, split: str) -> str:
    """Why ``split`` cannot fit or score a detector ('' when it can)."""
    errors = int(np.sum(labels))
    if errors == 0 or errors == len(labels):
        kind = "no error" if errors == 0 else "no right prediction"
        return f"the {split} split has {kind} ({errors} errors in {len(labels)} images)"
    return ""


def compare_detectors(fit: pd.DataFrame, evaluate: pd.DataFrame, resamples: int, seed: int, detectors: dict[str, tuple[str, ...]] | None = None) -> pd.DataFrame:
    """Fit each detector on ``fit``, score it on ``evaluate``: one row per detector (columns in docs/results-folder.md).

    ``fit`` and ``evaluate`` are :func:`detector_features` frames; a
    detector uses those of its features both frames hold.  The first
    detector is the baseline of the paired AUROC difference.
    """
    detectors = detectors or DETECTORS
    available = {name: tuple(f for f in names if f in fit.columns and f in evaluate.columns) for name, names in detectors.items()}
    every_feature = list(dict.fromkeys(f for names in detectors.values() for f in names))
    baseline = next(iter(detectors))
    reason = _both_classes_missing(fit["is_error"].to_numpy(), FIT_SPLIT) or _both_classes_missing(evaluate["is_error"].to_numpy(), EVALUATION_SPLIT)
    rows = [_unscored_row(name, names, detectors[name], baseline, fit, evaluate, every_feature, resamples) for name, names in available.items()]
    if reason:
        return pd.DataFrame([{**row, "reason": reason} for row in rows])
    models = {name: fit_detector(fit, names) for name, names in available.items()}
    scores = {name: model.decision_function(evaluate[list(available[name])].to_numpy()) for name, model in models.items()}
    errors = evaluate["is_error"].to_numpy()
    intervals = interval_frame(errors, scores, baseline, resamples, seed).set_index("score")
    for row in rows:
        name = row["detector"]
        row.update(auroc=auroc(errors, scores[name]), aupr=average_precision(errors, scores[name]), **intervals.loc[name].to_dict())
        row.update(_coefficients(models[name], available[name]))
    return pd.DataFrame(rows)


def _unscored_row(
    name: str, used: tuple[str, ...], wanted: tuple[str, ...], baseline: str, fit: pd.DataFrame, evaluate: pd.DataFrame, every_feature: list[str], resamples: int
) -> dict:
    """A detector's row before fitting: what it is, what it was fitted and scored on; NaN results."""
    nan = float("nan")
    return {
        "detector": name,
        "features": ",".join(used),
        "missing_features": ",".join(f for f in wanted if f not in used),
        "fit_split": FIT_SPLIT,
        "fit_images": len(fit),
        "fit_errors": int(fit["is_error"].sum()),
        "split": EVALUATION_SPLIT,
        "images": len(evaluate),
        "errors": int(evaluate["is_error"].sum()),
        "auroc": nan,
        "auroc_lo": nan,
        "auroc_hi": nan,
        "aupr": nan,
        "aupr_lo": nan,
        "aupr_hi": nan,
        "baseline": baseline,
        "auroc_diff": nan,
        "auroc_diff_lo": nan,
        "auroc_diff_hi": nan,
        "bootstrap": int(resamples),
        "bootstrap_defined": 0,
        "class_weight": CLASS_WEIGHT,
        "regularisation_c": REGULARISATION_C,
        "intercept": nan,
        **{f"coef_{feature}": nan for feature in every_feature},
        "reason": "",
    }


def _coefficients(model: Pipeline, names: tuple[str, ...]) -> dict[str, float]:
    """The fitted intercept and coefficients (log-odds per standard deviation of each feature)."""
    regression: LogisticRegression = model[-1]
    return {"intercept": float(regression.intercept_[0]), **{f"coef_{name}": float(value) for name, value in zip(names, regression.coef_[0])}}


def learned_detector_frame(data: StudyData, tau: float, freq_threshold: float, resamples: int, seed: int) -> pd.DataFrame:
    """``analysis/learned_detector.parquet``: both detectors fitted on validation and scored on test (needs both splits' ``logits``)."""
    reference, _ = reference_for(data, tau, freq_threshold)
    fit = detector_features(data, FIT_SPLIT, tau, freq_threshold, reference)
    evaluate = detector_features(data, EVALUATION_SPLIT, tau, freq_threshold, reference)
    return compare_detectors(fit, evaluate, resamples, seed)


# ------------------------------------------------------------ reading


def detector_summary(frame: pd.DataFrame) -> str:
    """One line: each detector's test AUROC with its interval, and the paired difference (or why there is none)."""
    if frame.empty:
        return "learned detector: no rows"
    first = frame.iloc[0]
    where = f"fitted on {first['fit_split']} ({first['fit_errors']} errors in {first['fit_images']}), scored on {first['split']} ({first['errors']} errors in {first['images']})"
    if first["reason"]:
        return f"learned detector {where}: undefined, {first['reason']}"
    parts = [f"{row['detector']} AUROC {with_interval(row['auroc'], row['auroc_lo'], row['auroc_hi'])}" for _, row in frame.iterrows()]
    last = frame.iloc[-1]
    difference = with_interval(last["auroc_diff"], last["auroc_diff_lo"], last["auroc_diff_hi"], signed=True)
    return f"learned detector {where}: " + ", ".join(parts) + f"; {last['detector']} − {last['baseline']} {difference}"


def coefficient_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The fitted coefficients as a table: one row per feature (the intercept first), one column per detector."""
    columns = ["intercept", *(column for column in frame.columns if column.startswith("coef_"))]
    table = frame.set_index("detector")[columns].T
    table.index = [name.removeprefix("coef_") for name in table.index]
    table.columns.name = None
    return table
