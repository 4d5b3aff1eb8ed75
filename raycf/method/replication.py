"""Debug retraining against its control over several retraining seeds: paired differences and their t intervals.

The final stage (``final.seeds`` > 1) retrains three models per seed from
the same base model on the same frozen-prefix cache: the control (λ1 = λ2 =
0), the study's own λ (``reference``) and the search's best trial
(``best``); a seed changes the data order, the view drawn per epoch and
dropout, the same for the three.  Each model is run once over every split.
From those runs (``final/seeds.parquet``, one row per model and seed, and
``final/seed_class_recall.parquet``, one per model, seed and class) this
module computes, per comparison (a model minus the control of the same
seed), the mean and sample standard deviation of the difference over seeds
and its two-sided Student t interval (paired by seed), for accuracies and
for the test recall of a group of classes.  numpy, pandas and scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from raycf.errors import UserError

CONTROL, REFERENCE, BEST = "control", "reference", "best"
SEED_MODELS = (CONTROL, REFERENCE, BEST)
COMPARED = (REFERENCE, BEST)  # each against the control
WORST_GROUP = "test_worst_group_acc"  # seeds.parquet's column when the study's images have groups (planted studies)


def compared_models(frame: pd.DataFrame) -> list[str]:
    """The models compared with the control: reference and best, then any treatment (``final.treatments``) in the frame's order."""
    present = list(dict.fromkeys(frame["model"]))
    return [model for model in COMPARED if model in present] + [model for model in present if model not in (CONTROL, *COMPARED)]
CONFIDENCE = 0.95
GROUP_ROW = "(group)"  # group_recall.parquet's row of the whole group: every image of its classes


@dataclass(frozen=True)
class PairedInterval:
    """Mean and sample standard deviation of paired differences, and the t interval of their mean."""

    seeds: int
    mean: float
    sd: float  # NaN with one difference
    low: float  # NaN with one difference
    high: float


def paired_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> PairedInterval:
    """Mean ± t·sd/√n of ``differences`` (one per seed): the two-sided paired t interval at ``confidence``.

    With one difference the spread and the interval are NaN; with no spread
    the interval is the mean itself.
    """
    from scipy.stats import t

    values = np.asarray(differences, dtype=float)
    if values.size == 0 or np.isnan(values).any():
        return PairedInterval(int(values.size), math.nan, math.nan, math.nan, math.nan)
    mean = float(values.mean())
    if values.size == 1:
        return PairedInterval(1, mean, math.nan, math.nan, math.nan)
    sd = float(values.std(ddof=1))
    half = float(t.ppf((1 + confidence) / 2, values.size - 1)) * sd / math.sqrt(values.size)
    return PairedInterval(int(values.size), mean, sd, mean - half, mean + half)


def check_class_group(group: Sequence[str], class_names: Sequence[str]) -> None:
    """Refuse a ``final.class_group`` name the dataset does not have, in one line naming it and the known ones."""
    known = list(class_names)
    for name in group:
        if name not in known:
            raise UserError(f"final.class_group: unknown class {name!r} (the dataset's classes: {', '.join(known)})")


def paired_differences(frame: pd.DataFrame, column: str, model: str, baseline: str = CONTROL) -> pd.Series:
    """``column`` of ``model`` minus that of ``baseline``, per seed (the seeds both have), in seed order."""
    by_seed = frame.pivot_table(index="seed", columns="model", values=column, aggfunc="first")
    return (by_seed[model] - by_seed[baseline]).dropna().sort_index()


def seed_summary(seeds: pd.DataFrame, splits: Sequence[str] = ("test", "val"), confidence: float = CONFIDENCE) -> pd.DataFrame:
    """``final/seed_summary.parquet``: per comparison (reference − control, best − control), accuracy differences over seeds.

    Columns: ``comparison``, ``model``, ``baseline``, ``seeds``,
    ``confidence``, then per split ``{split}_acc_mean`` (the model),
    ``{split}_baseline_acc_mean``, ``{split}_diff_mean``, ``{split}_diff_sd``,
    ``{split}_diff_ci_low``, ``{split}_diff_ci_high`` (fractions, not points)
    and ``{split}_wins`` (seeds where the model is strictly better).  With a
    ``test_worst_group_acc`` column (groups exist), the same for it:
    ``worst_group_acc_mean``, ``worst_group_baseline_acc_mean``,
    ``worst_group_diff_mean``, ``_sd``, ``_ci_low``, ``_ci_high``.
    """
    rows = []
    for model in compared_models(seeds):
        paired_seeds = len(paired_differences(seeds, f"{splits[0]}_acc", model))
        row: dict = {"comparison": f"{model} - {CONTROL}", "model": model, "baseline": CONTROL, "seeds": paired_seeds, "confidence": confidence}
        for split in splits:
            row.update(_paired_columns(seeds, f"{split}_acc", split, model, confidence, wins=True))
        if WORST_GROUP in seeds:
            row.update(_paired_columns(seeds, WORST_GROUP, "worst_group", model, confidence, wins=False))
        rows.append(row)
    return pd.DataFrame(rows)


def with_group_rows(class_recall: pd.DataFrame, group: Sequence[str]) -> pd.DataFrame:
    """The rows of ``group``'s classes, plus one ``(group)`` row per model and seed: the recall over all their images."""
    members = class_recall[class_recall["class"].isin(group)]
    hits = (members["recall"] * members["support"]).groupby([members["model"], members["seed"]]).sum()
    support = members.groupby(["model", "seed"])["support"].sum()
    pooled = (hits / support).rename("recall").reset_index().assign(**{"class": GROUP_ROW, "class_index": -1})
    pooled["support"] = support.to_numpy()
    return pd.concat([members, pooled[members.columns]], ignore_index=True)



def _paired_columns(seeds: pd.DataFrame, column: str, prefix: str, model: str, confidence: float, wins: bool) -> dict:
    """``model`` against the control on ``column``, paired by seed: ``<prefix>_acc_mean``, ``_baseline_acc_mean``, ``_diff_mean|sd|ci_low|ci_high`` (and ``_wins``)."""
    differences = paired_differences(seeds, column, model)
    interval = paired_interval(differences, confidence)
    accuracy = seeds.set_index(["model", "seed"])[column]
    columns = {
        f"{prefix}_acc_mean": float(accuracy.loc[model].loc[differences.index].mean()),
        f"{prefix}_baseline_acc_mean": float(accuracy.loc[CONTROL].loc[differences.index].mean()),
        f"{prefix}_diff_mean": interval.mean,
        f"{prefix}_diff_sd": interval.sd,
        f"{prefix}_diff_ci_low": interval.low,
        f"{prefix}_diff_ci_high": interval.high,
    }
    if wins:
        columns[f"{prefix}_wins"] = int((differences > 0).sum())
    return columns

def group_recall(class_recall: pd.DataFrame, group: Sequence[str], base_recall: dict[str, float] | None = None, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """``final/group_recall.parquet``: each group class's test recall change (model − control) over seeds, and the group's.

    ``class_recall`` is ``final/seed_class_recall.parquet`` (``model``,
    ``seed``, ``class``, ``class_index``, ``support``, ``recall``);
    ``base_recall`` the base model's recall per class name (the paper's
    "before"), shown beside.  One row per comparison and class in the group's
    order, then the ``(group)`` row (class_index −1: every image of the
    group's classes).  Columns: ``comparison``, ``model``, ``class``,
    ``class_index``, ``support``, ``seeds``, ``recall_base``,
    ``recall_control_mean``, ``recall_mean``, ``change_mean``, ``change_sd``,
    ``change_ci_low``, ``change_ci_high``, ``change_p`` (the paired t test's
    two-sided p-value, :func:`paired_p_value`) and ``change_p_holm`` (Holm
    over the class rows of the same comparison; the ``(group)`` row is its
    own question and keeps its p unadjusted).
    """
    rows = with_group_rows(class_recall, group)
    order = [*group, GROUP_ROW]
    records = []
    for model in compared_models(class_recall):
        for name in order:
            frame = rows[rows["class"] == name]
            differences = paired_differences(frame, "recall", model)
            interval = paired_interval(differences, confidence)
            recall = frame.set_index(["model", "seed"])["recall"]
            records.append(
                {
                    "comparison": f"{model} - {CONTROL}",
                    "model": model,
                    "class": name,
                    "class_index": int(frame["class_index"].iloc[0]),
                    "support": int(frame["support"].iloc[0]),
                    "seeds": interval.seeds,
                    "recall_base": (base_recall or {}).get(name, math.nan),
                    "recall_control_mean": float(recall.loc[CONTROL].loc[differences.index].mean()),
                    "recall_mean": float(recall.loc[model].loc[differences.index].mean()),
                    "change_mean": interval.mean,
                    "change_sd": interval.sd,
                    "change_ci_low": interval.low,
                    "change_ci_high": interval.high,
                    "change_p": paired_p_value(differences),
                }
            )
    frame = pd.DataFrame(records)
    return with_holm_by_comparison(frame)


def paired_p_value(differences: Sequence[float]) -> float:
    """Two-sided p-value of the paired t test "the mean difference is 0" (scipy's one-sample t test); NaN with fewer than two
    differences; 1 when every difference is 0 (no spread and no change), 0 when they are equal and not 0."""
    from scipy.stats import ttest_1samp

    values = np.asarray(differences, dtype=float)
    if values.size < 2 or np.isnan(values).any():
        return math.nan
    if np.all(values == values[0]):
        return 1.0 if values[0] == 0 else 0.0
    return float(ttest_1samp(values, 0.0).pvalue)


def with_holm_by_comparison(frame: pd.DataFrame) -> pd.DataFrame:
    """``change_p_holm``: ``change_p`` Holm-adjusted over each comparison's class rows; the ``(group)`` row keeps its own p."""
    from raycf.method.multiple import holm

    frame = frame.copy()
    frame["change_p_holm"] = frame["change_p"]
    for _comparison, rows in frame[frame["class"] != GROUP_ROW].groupby("comparison", sort=False):
        frame.loc[rows.index, "change_p_holm"] = holm(rows["change_p"].to_numpy())
    return frame


def pooled_base_recall(class_recall: pd.DataFrame, group: Sequence[str]) -> dict[str, float]:
    """The base model's recall per class name (``class_recall.parquet``: ``class``, ``support``, ``recall_base``), the group's pooled too."""
    recall = dict(zip(class_recall["class"].astype(str), class_recall["recall_base"].astype(float)))
    members = class_recall[class_recall["class"].isin(group)]
    if len(members) and members["support"].sum() > 0:
        recall[GROUP_ROW] = float((members["recall_base"] * members["support"]).sum() / members["support"].sum())
    return recall


def format_interval(mean: float, low: float, high: float, scale: float = 100.0) -> str:
    """``+0.44 [−0.10, +0.98]`` in points (``scale`` 100), or just the mean when there is no interval."""
    if math.isnan(low):
        return f"{scale * mean:+.2f}"
    return f"{scale * mean:+.2f} [{scale * low:+.2f}, {scale * high:+.2f}]"


def format_seed_summary(summary: pd.DataFrame, group: pd.DataFrame | None = None) -> str:
    """The seed comparison as printed at the end of the final stage: accuracy differences, then the group's recall changes."""
    seeds = int(summary["seeds"].max()) if len(summary) else 0
    level = int(round(100 * float(summary["confidence"].iloc[0]))) if len(summary) else int(100 * CONFIDENCE)
    lines = [f"Retraining over {seeds} seeds: accuracy difference from the control, mean [paired {level} % t interval], points"]
    name_width = max([19, *(len(str(name)) for name in summary["comparison"])])  # a treatment's name is longer than best's
    lines.append(f"  {'comparison':<{name_width}} {'test':>24} {'sd':>6} {'wins':>5} {'val':>24} {'sd':>6}")
    for row in summary.to_dict("records"):
        lines.append(
            f"  {row['comparison']:<{name_width}} {format_interval(row['test_diff_mean'], row['test_diff_ci_low'], row['test_diff_ci_high']):>24} "
            f"{100 * row['test_diff_sd']:>6.2f} {row['test_wins']:>2d}/{row['seeds']:<2d} "
            f"{format_interval(row['val_diff_mean'], row['val_diff_ci_low'], row['val_diff_ci_high']):>24} {100 * row['val_diff_sd']:>6.2f}"
        )
    if group is not None and len(group):
        width = max(7, *(len(str(name)) for name in group["class"]))
        lines.append(f"Test recall change from the control in the class group, mean [paired {level} % t interval], points")
        lines.append(f"  {'comparison':<19} {'class':<{width}} {'base':>6} {'control':>8} {'model':>6} {'change':>24}")
        for row in group.to_dict("records"):
            base = "-" if math.isnan(row["recall_base"]) else f"{100 * row['recall_base']:.1f}"
            lines.append(
                f"  {row['comparison']:<19} {row['class']:<{width}} {base:>6} {100 * row['recall_control_mean']:>8.1f} "
                f"{100 * row['recall_mean']:>6.1f} {format_interval(row['change_mean'], row['change_ci_low'], row['change_ci_high']):>24}"
            )
    return "\n".join(lines)
