"""Groups of images and accuracy per group: per-group, worst-group and mean-over-groups accuracy.

A planted study (``data.plant``) groups every image by class × planted
(``Coat | planted``, ``Coat | clean``); a study with ``data.groups`` uses the
user's table (images it leaves out are grouped by their class).  Worst-group
accuracy is the lowest accuracy over the groups that have images; the mean
is the unweighted mean over those groups.  pandas and numpy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

PLANTED, CLEAN = "planted", "clean"


def planted_group_names(labels: np.ndarray, planted: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """``<class> | planted`` or ``<class> | clean`` for each image."""
    names = np.asarray(class_names, dtype=object)[np.asarray(labels, dtype=np.int64)]
    return np.array([f"{name} | {PLANTED if flag else CLEAN}" for name, flag in zip(names, np.asarray(planted, dtype=bool))], dtype=object)


def user_group_names(image_ids: Sequence[str], labels: np.ndarray, class_names: Sequence[str], table: dict[str, str]) -> np.ndarray:
    """Each image's group from the user's ``image_id -> group`` table; an image it leaves out is grouped by its class name."""
    return np.array([table.get(str(image_id), str(class_names[int(label)])) for image_id, label in zip(image_ids, labels)], dtype=object)


def group_accuracy(groups: np.ndarray, labels: np.ndarray, preds: np.ndarray) -> pd.DataFrame:
    """One row per group with images: ``group``, ``images``, ``correct``, ``acc`` (sorted by group name)."""
    frame = pd.DataFrame({"group": np.asarray(groups, dtype=object).astype(str), "correct": np.asarray(preds) == np.asarray(labels)})
    table = frame.groupby("group", sort=True)["correct"].agg(images="size", correct="sum").reset_index()
    table["correct"] = table["correct"].astype(np.int64)
    table["acc"] = table["correct"] / table["images"]
    return table


def group_summary(table: pd.DataFrame) -> dict[str, float | str]:
    """``worst_group_acc``, ``mean_group_acc`` and ``worst_group`` of a :func:`group_accuracy` table (NaN and '' when empty)."""
    if table.empty:
        return {"worst_group_acc": float("nan"), "mean_group_acc": float("nan"), "worst_group": ""}
    worst = int(np.argmin(table["acc"].to_numpy()))
    return {"worst_group_acc": float(table["acc"].iloc[worst]), "mean_group_acc": float(table["acc"].mean()), "worst_group": str(table["group"].iloc[worst])}


def group_metrics(groups: np.ndarray, labels: np.ndarray, preds: np.ndarray, prefix: str = "") -> dict[str, float]:
    """``<prefix>worst_group_acc`` and ``<prefix>mean_group_acc`` of one set of predictions (the per-epoch metrics)."""
    summary = group_summary(group_accuracy(groups, labels, preds))
    return {f"{prefix}worst_group_acc": float(summary["worst_group_acc"]), f"{prefix}mean_group_acc": float(summary["mean_group_acc"])}
