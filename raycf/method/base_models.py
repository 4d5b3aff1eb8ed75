"""The control-vs-best comparison over several base models: per base model, then between base models.

With ``final.base_seeds`` = n > 1 the final stage retrains the control
(λ1 = λ2 = 0) and the best searched trial's parameters on n base models
(base seed 0 is the study's own; each other one has its own base training,
CFE bank, masks, global sets and prefix cache), each over the same
retraining seeds.  ``final/base_seeds.parquet`` holds one row per base seed,
model and retraining seed.  This module reduces it: per base model, the
difference best − control paired by retraining seed (its mean, sd and t
interval over the retraining seeds); then, between base models, the mean of
those per-base-model means, their sample sd (the between-base-model spread)
and the Student t interval with n − 1 degrees of freedom.  The retraining
seeds are averaged inside a base model first, so each base model counts
once: the interval over base models is the one a claim about "the method on
this dataset" rests on, not the one over retraining seeds of one base model.
numpy and pandas only (scipy for t).
"""

from __future__ import annotations

import math

import pandas as pd

from raycf.method.replication import BEST, CONFIDENCE, CONTROL, paired_interval

PER_BASE_MODEL, BETWEEN = "base model", "between base models"


def per_base_model_differences(frame: pd.DataFrame, column: str = "test_acc", model: str = BEST, baseline: str = CONTROL) -> pd.DataFrame:
    """Per base seed and retraining seed: ``column`` of ``model`` minus that of ``baseline`` (rows both have), in seed order.

    ``frame``: ``final/base_seeds.parquet`` (``base_seed``, ``model``, ``seed``, ``column``).
    """
    wide = frame.pivot_table(index=["base_seed", "seed"], columns="model", values=column, aggfunc="first")
    paired = wide[[model, baseline]].dropna()
    return pd.DataFrame({"model_value": paired[model], "baseline_value": paired[baseline], "difference": paired[model] - paired[baseline]}).sort_index().reset_index()


def base_seed_summary(frame: pd.DataFrame, column: str = "test_acc", model: str = BEST, baseline: str = CONTROL, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """``final/base_seed_summary.parquet``: one row per base model, then the row between base models.

    Columns: ``level`` (``base model`` or ``between base models``),
    ``base_seed`` (none on the last row), ``comparison``, ``model``,
    ``baseline``, ``base_seeds`` (base models in the row), ``seeds``
    (retraining seeds per base model), ``confidence``, then for ``column``
    (``test_acc``: ``test``): ``test_acc_mean``, ``test_baseline_acc_mean``,
    ``test_diff_mean``, ``test_diff_sd``, ``test_diff_ci_low``,
    ``test_diff_ci_high`` (fractions) and ``test_wins``.  A base model's row
    takes its sd, interval and wins over its retraining seeds (NaN with
    one seed); the last row over the base models' mean differences: the
    between-base-model sd, the t interval with n − 1 degrees of freedom and
    the base models where the model is better on average.
    """
    split = column.removesuffix("_acc")
    differences = per_base_model_differences(frame, column, model, baseline)
    rows = []
    for base_seed, group in differences.groupby("base_seed", sort=True):
        interval = paired_interval(group["difference"], confidence)
        rows.append(
            row_of(PER_BASE_MODEL, int(base_seed), model, baseline, 1, len(group), confidence, split,
                   group["model_value"].mean(), group["baseline_value"].mean(), interval, int((group["difference"] > 0).sum()))
        )  # fmt: skip
    means = pd.DataFrame(rows)
    between = paired_interval(means[f"{split}_diff_mean"], confidence) if rows else paired_interval([], confidence)
    seeds = sorted(set(means["seeds"])) if rows else [0]
    rows.append(
        row_of(BETWEEN, None, model, baseline, len(means), seeds[0] if len(seeds) == 1 else -1, confidence, split,
               means[f"{split}_acc_mean"].mean() if rows else math.nan, means[f"{split}_baseline_acc_mean"].mean() if rows else math.nan,
               between, int((means[f"{split}_diff_mean"] > 0).sum()) if rows else 0)
    )  # fmt: skip
    summary = pd.DataFrame(rows)
    summary["base_seed"] = summary["base_seed"].astype("Int64")
    return summary


def row_of(level: str, base_seed: int | None, model: str, baseline: str, base_seeds: int, seeds: int, confidence: float, split: str,
           model_mean: float, baseline_mean: float, interval, wins: int) -> dict:  # fmt: skip
    """One row of the summary (see :func:`base_seed_summary`); ``seeds`` −1: the base models differ in retraining seeds."""
    return {
        "level": level,
        "base_seed": base_seed,
        "comparison": f"{model} - {baseline}",
        "model": model,
        "baseline": baseline,
        "base_seeds": base_seeds,
        "seeds": seeds,
        "confidence": confidence,
        f"{split}_acc_mean": float(model_mean),
        f"{split}_baseline_acc_mean": float(baseline_mean),
        f"{split}_diff_mean": interval.mean,
        f"{split}_diff_sd": interval.sd,
        f"{split}_diff_ci_low": interval.low,
        f"{split}_diff_ci_high": interval.high,
        f"{split}_wins": wins,
    }


def format_base_seed_summary(summary: pd.DataFrame, split: str = "test") -> str:
    """The summary as printed at the end of the final stage: one line per base model, then the line between them (points)."""
    lines = [f"Over base models (best - control, {split} accuracy, points; each base model's retraining seeds averaged first)"]
    for row in summary.to_dict("records"):
        if row["level"] == PER_BASE_MODEL:
            spread = "" if math.isnan(row[f"{split}_diff_sd"]) else f" ± {100 * row[f'{split}_diff_sd']:.2f} sd over {row['seeds']} retraining seeds"
            lines.append(
                f"  base seed {row['base_seed']}: control {100 * row[f'{split}_baseline_acc_mean']:.2f} %, best {100 * row[f'{split}_acc_mean']:.2f} %, "
                f"difference {100 * row[f'{split}_diff_mean']:+.2f}{spread}"
            )
        else:
            lines.append(
                f"  over {row['base_seeds']} base models: mean {100 * row[f'{split}_diff_mean']:+.2f}, between-base-model sd {100 * row[f'{split}_diff_sd']:.2f}, "
                f"{100 * row['confidence']:.0f} % t interval [{100 * row[f'{split}_diff_ci_low']:+.2f}, {100 * row[f'{split}_diff_ci_high']:+.2f}] "
                f"({row['base_seeds'] - 1} df); best better on {row[f'{split}_wins']} of {row['base_seeds']}"
            )
    return "\n".join(lines)
