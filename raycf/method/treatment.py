"""Paper Tables 2 and 3 (METHOD §5) from per-image predictions: numpy and pandas only.

The base model, the control (plain fine-tuning, λ1 = λ2 = 0) and the
debugged model are each run once over every split; their per-image
predictions (``predictions.parquet``: ``split``, ``image_index``,
``image_id``, ``label``, ``model``, ``pred``, ``confidence``) are all these
tables need, so the test split is read once per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycf.config import DebugConfig

TABLE3_TOP = 3
MODELS = ("base", "control", "debugged")
SPLITS = ("train", "val", "test")


@dataclass
class ModelEvaluation:
    """Accuracy and per-class recall of one model on named splits."""

    accuracy: dict[str, float]  # split -> accuracy
    recall: dict[str, np.ndarray]  # split -> C recalls (NaN for a class with no image)
    support: dict[str, np.ndarray]  # split -> C image counts


def evaluation_of(predictions: pd.DataFrame, num_classes: int) -> ModelEvaluation:
    """Accuracy, per-class recall and support of one model's predictions on each split they hold."""
    evaluation = ModelEvaluation(accuracy={}, recall={}, support={})
    for split, rows in predictions.groupby("split", sort=False):
        truth, predicted = rows["label"].to_numpy(), rows["pred"].to_numpy()
        support = np.bincount(truth, minlength=num_classes)
        hits = np.bincount(truth[predicted == truth], minlength=num_classes)
        evaluation.recall[split] = np.divide(hits, support, out=np.full(num_classes, np.nan), where=support > 0)
        evaluation.support[split] = support
        evaluation.accuracy[split] = float((predicted == truth).mean()) if len(truth) else math.nan
    return evaluation


def build_table2(
    base: ModelEvaluation,
    control: ModelEvaluation,
    debugged: ModelEvaluation,
    *,
    lambda1: float,
    lambda2: float,
    indicator: str,
    control_best_epoch: int | None = None,
    debugged_best_epoch: int | None = None,
) -> pd.DataFrame:
    """Paper Table 2: base, control (λ = 0) and debugged × train/val/test accuracy."""
    rows = [
        ("base", math.nan, math.nan, None, base),
        ("control", 0.0, 0.0, control_best_epoch, control),
        ("debugged", float(lambda1), float(lambda2), debugged_best_epoch, debugged),
    ]
    frame = pd.DataFrame(
        [
            {
                "model": model,
                "lambda1": l1,
                "lambda2": l2,
                "indicator": None if model == "base" else indicator,
                "best_epoch": epoch,
                **{f"{split}_acc": evaluation.accuracy.get(split, math.nan) for split in SPLITS},
            }
            for model, l1, l2, epoch, evaluation in rows
        ]
    )
    frame["best_epoch"] = frame["best_epoch"].astype("Int64")
    return frame


def build_class_recall(class_names: list[str], base: ModelEvaluation, control: ModelEvaluation, debugged: ModelEvaluation, split: str = "test") -> pd.DataFrame:
    """Every class's recall on ``split`` under the three models."""
    return pd.DataFrame(
        {
            "class": list(class_names),
            "class_index": np.arange(len(class_names), dtype=np.int64),
            "support": base.support[split].astype(np.int64),
            "recall_base": base.recall[split],
            "recall_control": control.recall[split],
            "recall_debugged": debugged.recall[split],
        }
    )


def build_table3(class_recall: pd.DataFrame, top: int = TABLE3_TOP) -> pd.DataFrame:
    """Paper Table 3: the ``top`` most improved and most worsened classes, debugged vs base.

    Only classes whose recall changed are listed (a class with no change is
    neither improved nor worsened), so the table can have fewer rows.
    """
    frame = class_recall.assign(
        recall_before=class_recall["recall_base"],
        recall_after=class_recall["recall_debugged"],
        change=class_recall["recall_debugged"] - class_recall["recall_base"],
        recall_control=class_recall["recall_control"],
    )
    improved = frame[frame["change"] > 0].sort_values(["change", "class_index"], ascending=[False, True]).head(top).assign(group="improved")
    worsened = frame[frame["change"] < 0].sort_values(["change", "class_index"], ascending=[True, True]).head(top).assign(group="worsened")
    columns = ["class", "class_index", "group", "recall_before", "recall_after", "change", "recall_control", "support"]
    return pd.concat([improved, worsened], ignore_index=True)[columns]


def format_table2(table: pd.DataFrame) -> str:
    """Table 2 as text, accuracies in percent."""
    lines = ["Table 2: accuracy (%) of the base model, plain fine-tuning (control) and debug retraining"]
    lines.append(f"  {'model':<9} {'lambda1':>9} {'lambda2':>9} {'epoch':>5} {'train':>7} {'val':>7} {'test':>7}")
    for row in table.itertuples(index=False):
        lam1 = "-" if pd.isna(row.lambda1) else f"{row.lambda1:.3g}"
        lam2 = "-" if pd.isna(row.lambda2) else f"{row.lambda2:.3g}"
        epoch = "-" if pd.isna(row.best_epoch) else str(int(row.best_epoch))
        lines.append(
            f"  {row.model:<9} {lam1:>9} {lam2:>9} {epoch:>5} {100 * row.train_acc:>7.2f} {100 * row.val_acc:>7.2f} {100 * row.test_acc:>7.2f}"
        )
    by_model = table.set_index("model")
    change = 100 * (by_model.loc["debugged", "test_acc"] - by_model.loc["control", "test_acc"])
    lines.append(f"  debugged - control test accuracy: {change:+.2f} points")
    return "\n".join(lines)


def format_table3(table: pd.DataFrame) -> str:
    """Table 3 as text."""
    lines = ["Table 3: classes whose test recall changed most (debugged vs base)"]
    if table.empty:
        lines.append("  no class changed its test recall")
        return "\n".join(lines)
    width = max(5, *(len(str(name)) for name in table["class"]))
    lines.append(f"  {'class':<{width}} {'group':<9} {'before':>7} {'after':>7} {'change':>7} {'control':>8} {'images':>6}")
    for row in table.to_dict("records"):
        lines.append(
            f"  {row['class']:<{width}} {row['group']:<9} {row['recall_before']:>7.3f} {row['recall_after']:>7.3f} "
            f"{row['change']:>+7.3f} {row['recall_control']:>8.3f} {int(row['support']):>6d}"
        )
    return "\n".join(lines)


@dataclass
class TreatmentTables:
    """Paper Tables 2 and 3 and every class's recall, from one evaluation of each model."""

    table2: pd.DataFrame
    class_recall: pd.DataFrame
    table3: pd.DataFrame


def treatment_tables(
    predictions: pd.DataFrame,
    class_names: list[str],
    *,
    debugged_config: DebugConfig,
    control_best_epoch: int,
    debugged_best_epoch: int,
) -> TreatmentTables:
    """Tables 2 and 3 and every class's recall from the three models' predictions (column ``model``).

    ``debugged_config`` is the debug section the debugged model was trained
    with (its λ values and indicator go into Table 2).
    """
    base_eval, control_eval, debugged_eval = (evaluation_of(predictions[predictions["model"] == model], len(class_names)) for model in MODELS)
    table2 = build_table2(
        base_eval,
        control_eval,
        debugged_eval,
        lambda1=debugged_config.lambda1,
        lambda2=debugged_config.lambda2,
        indicator=debugged_config.indicator,
        control_best_epoch=control_best_epoch,
        debugged_best_epoch=debugged_best_epoch,
    )
    class_recall = build_class_recall(class_names, base_eval, control_eval, debugged_eval)
    return TreatmentTables(table2=table2, class_recall=class_recall, table3=build_table3(class_recall))
