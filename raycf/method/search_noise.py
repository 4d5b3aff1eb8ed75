"""Do the search's trials differ by more than validation noise?  numpy, pandas and scipy.stats.

Every trial's objective, ``val_acc``, is an accuracy on the *same* n
validation images, so two trials' accuracies are paired: what separates
them is only the images on which one is right and the other wrong.  The
test is therefore **McNemar's exact test** of each trial against the best
one on those discordant images (:func:`mcnemar_p_value`;
:func:`compare_with_best`): b images only the best gets right, c only the
trial; under "equally accurate" b is Binomial(b + c, ½).  The count of
trials *not distinguishable from the best* (p > α, and after Holm's
adjustment over the comparisons, :mod:`raycf.method.multiple`) says how many
points of the search the validation split cannot rank below its winner.
Trials that kept no validation predictions (multi-worker trials, results of
an older version) are left out and counted.

The spread of the searched trials' ``val_acc`` and the binomial standard
error of one accuracy, sqrt(p(1 − p) / n), are kept as descriptions only:
the SE is the uncertainty of one accuracy, not of a difference of two on
the same images, and is no test.  Where the final stage ran several seeds of
the same configuration, the seed-to-seed standard deviation of its
``val_acc`` (:func:`seed_spread`) is the noise that actually separates
trials: a retrained point moves by that much with nothing changed but the
seed.  ``val_acc`` is each trial's best epoch (a maximum over epochs, biased
upwards alike for all).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from raycf.method.multiple import ALPHA, holm


def binomial_standard_error(accuracy: float, images: int) -> float:
    """sqrt(p(1 − p) / n): the standard error of an accuracy p measured on n images."""
    if images <= 0:
        raise ValueError(f"the number of validation images must be positive (got {images})")
    return math.sqrt(accuracy * (1 - accuracy) / images)


def mcnemar_p_value(only_first: int, only_second: int) -> float:
    """McNemar's exact two-sided p-value from the discordant counts b and c (scipy's binomial test of b in b + c at ½); 1 when b + c = 0."""
    from scipy.stats import binomtest

    discordant = int(only_first) + int(only_second)
    if discordant == 0:
        return 1.0
    return float(binomtest(int(only_first), discordant, 0.5).pvalue)


def compare_with_best(predictions: Mapping[str, np.ndarray], labels: np.ndarray, best: str, alpha: float = ALPHA) -> pd.DataFrame:
    """McNemar's test of every trial in ``predictions`` (trial id → predicted classes of the validation images) against ``best``.

    One row per other trial: ``trial_id``, ``both_right``, ``best_only``
    (b: right by the best only), ``trial_only`` (c), ``both_wrong``,
    ``accuracy_diff`` ((c − b) / n: the trial minus the best), ``p``,
    ``p_holm`` (Holm over these rows), ``distinguishable`` (p ≤ α) and
    ``distinguishable_holm``.
    """
    labels = np.asarray(labels)
    if np.shape(predictions[best]) != labels.shape:
        raise ValueError(f"the best trial {best} has {np.size(predictions[best])} validation predictions for {labels.size} validation images")
    best_right = np.asarray(predictions[best]) == labels
    rows = []
    for trial_id, predicted in predictions.items():
        if trial_id == best:
            continue
        predicted = np.asarray(predicted)
        if predicted.shape != labels.shape:
            raise ValueError(f"trial {trial_id} has {predicted.size} validation predictions for {labels.size} validation images")
        right = predicted == labels
        b, c = int((best_right & ~right).sum()), int((~best_right & right).sum())
        rows.append(
            {
                "trial_id": trial_id,
                "both_right": int((best_right & right).sum()),
                "best_only": b,
                "trial_only": c,
                "both_wrong": int((~best_right & ~right).sum()),
                "accuracy_diff": (c - b) / len(labels) if len(labels) else math.nan,
                "p": mcnemar_p_value(b, c),
            }
        )
    frame = pd.DataFrame(rows, columns=["trial_id", "both_right", "best_only", "trial_only", "both_wrong", "accuracy_diff", "p"])
    frame["p_holm"] = holm(frame["p"].to_numpy()) if len(frame) else []
    frame["distinguishable"] = frame["p"] <= alpha
    frame["distinguishable_holm"] = frame["p_holm"] <= alpha
    return frame


def seed_spread(seeds: pd.DataFrame, metric: str = "val_acc") -> dict[str, dict[str, float]]:
    """Per model of ``final/seeds.parquet`` (one row per model and seed): the seeds, mean and sample sd of ``metric`` over seeds."""
    spread = {}
    for model, rows in seeds.groupby("model", sort=False):
        values = pd.to_numeric(rows[metric], errors="coerce").dropna()
        spread[str(model)] = {"seeds": int(len(values)), "mean": float(values.mean()) if len(values) else math.nan, "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan}
    return spread


def search_noise(
    board: pd.DataFrame,
    validation_images: int,
    metric: str = "val_acc",
    comparison: pd.DataFrame | None = None,
    best: str = "",
    seeds: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The searched trials' spread of ``metric`` (an accuracy on ``validation_images`` images), and McNemar's comparison with the best.

    ``comparison``: :func:`compare_with_best`'s frame (None: no trial kept
    its validation predictions); ``best``: its best trial; ``seeds``:
    :func:`seed_spread` of the final stage's seed grid, if any.  Keys:
    ``metric``, ``validation_images``, ``trials`` (searched trials with a
    value), ``trials_stopped``, ``control`` (its value, or None), ``mean``,
    ``sd``, ``min``, ``max``, ``range``, ``range_images``, ``binomial_se``
    (of one accuracy at the mean: a scale, not a test), ``best_trial``,
    ``compared`` (trials tested against the best), ``without_predictions``,
    ``indistinguishable``, ``indistinguishable_holm`` (of the searched
    trials compared), ``control_p`` (the control against the best, or None),
    ``seed_sd`` (model → sd of ``metric`` over seeds), ``seeds`` and
    ``verdict`` (sentences).
    """
    is_control = board["is_control"].astype(bool) if "is_control" in board else pd.Series(False, index=board.index)
    values = pd.to_numeric(board[metric], errors="coerce")
    searched = board[~is_control & values.notna()]
    accuracies = values[searched.index].to_numpy(dtype=np.float64)
    controls = values[is_control].dropna()
    count = len(accuracies)
    mean = float(accuracies.mean()) if count else math.nan
    spread = float(accuracies.max() - accuracies.min()) if count else math.nan
    compared = comparison if comparison is not None else pd.DataFrame(columns=["trial_id", "p", "distinguishable", "distinguishable_holm"])
    control_ids = set(board.loc[is_control, "trial_id"].astype(str)) if "trial_id" in board else set()
    searched_rows = compared[~compared["trial_id"].astype(str).isin(control_ids)]
    control_rows = compared[compared["trial_id"].astype(str).isin(control_ids)]
    seeds = seeds or {}
    record = {
        "metric": metric,
        "validation_images": int(validation_images),
        "trials": count,
        "trials_stopped": int((searched["status"] == "stopped").sum()) if "status" in searched else 0,
        "control": float(controls.iloc[0]) if len(controls) else None,
        "mean": mean,
        "sd": float(accuracies.std(ddof=1)) if count > 1 else math.nan,
        "min": float(accuracies.min()) if count else math.nan,
        "max": float(accuracies.max()) if count else math.nan,
        "range": spread,
        "range_images": round(spread * validation_images, 3) if count else math.nan,
        "binomial_se": binomial_standard_error(mean, validation_images) if count else math.nan,
        "best_trial": best,
        "compared": int(len(searched_rows)),
        "without_predictions": max(0, count - 1 - int(len(searched_rows))) if best else count,
        "indistinguishable": int((~searched_rows["distinguishable"].astype(bool)).sum()),
        "indistinguishable_holm": int((~searched_rows["distinguishable_holm"].astype(bool)).sum()),
        "control_p": float(control_rows["p"].iloc[0]) if len(control_rows) else None,
        "seed_sd": {model: values["sd"] for model, values in seeds.items()},
        "seeds": max((values["seeds"] for values in seeds.values()), default=0),
    }
    record["verdict"] = _verdict(record)
    return record


def _verdict(record: dict[str, Any]) -> str:
    images = f"{record['validation_images']:,} validation images"
    if not record["best_trial"]:
        text = f"{record['trials']} searched trial(s); none kept validation predictions, so McNemar's test cannot compare trials with the best."
    elif not record["compared"]:
        text = f"The best trial ({record['best_trial']}) is the only searched trial with validation predictions: no other searched trial to compare it with."
        if record["control_p"] is not None:
            text += f" The control against it, McNemar's exact test on the {images} where they disagree: p = {record['control_p']:.3g}."
    else:
        text = (
            f"McNemar's exact test against the best trial ({record['best_trial']}) on the {images} where they disagree: "
            f"{record['indistinguishable']} of the {record['compared']} other searched trials compared are not distinguishable from it at α = {ALPHA:g} "
            f"({record['indistinguishable_holm']} after Holm's adjustment over the {record['compared'] + (record['control_p'] is not None)} comparisons)."
        )
        if record["control_p"] is not None:
            text += f" The control against the best: p = {record['control_p']:.3g} (unadjusted)."
        if record["without_predictions"]:
            text += f" {record['without_predictions']} trial(s) kept no validation predictions and are left out."
    if record["seeds"] > 1:
        spreads = ", ".join(f"{model} {sd:.4f}" for model, sd in record["seed_sd"].items() if not math.isnan(sd))
        text += f" The same configuration retrained over {record['seeds']} seeds moves {record['metric']} by an sd of {spreads}: the noise that separates trials."
    return text
