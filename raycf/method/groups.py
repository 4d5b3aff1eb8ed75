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


def predictions_group_table(predictions: pd.DataFrame, groups_of: dict[str, np.ndarray]) -> pd.DataFrame:
    """Group accuracy of per-image predictions (columns ``split``, ``image_index``, ``label``, ``pred``; optionally ``model`` and ``seed``).

    ``groups_of`` maps a split to its images' groups, in image order.  One row
    per (model, seed, split, group): ``images``, ``correct``, ``acc``, and the
    split's ``worst_group_acc`` and ``mean_group_acc`` repeated on its rows.
    """
    frames = []
    keys = [key for key in ("model", "seed", "split") if key in predictions.columns]
    for key, rows in predictions.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        split = key[-1]
        if split not in groups_of:
            continue
        groups = np.asarray(groups_of[split], dtype=object)[rows["image_index"].to_numpy(dtype=np.int64)]
        table = group_accuracy(groups, rows["label"].to_numpy(), rows["pred"].to_numpy())
        summary = group_summary(table)
        for name, value in zip(keys, key):
            table.insert(keys.index(name), name, value)
        table["worst_group_acc"], table["mean_group_acc"] = summary["worst_group_acc"], summary["mean_group_acc"]
        frames.append(table)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*keys, "group", "images", "correct", "acc", "worst_group_acc", "mean_group_acc"])


def split_group_metrics(table: pd.DataFrame) -> dict[str, float]:
    """``<split>_worst_group_acc`` and ``<split>_mean_group_acc`` of a one-model :func:`predictions_group_table`."""
    metrics = {}
    for split, rows in table.groupby("split", sort=False):
        metrics[f"{split}_worst_group_acc"] = float(rows["worst_group_acc"].iloc[0])
        metrics[f"{split}_mean_group_acc"] = float(rows["mean_group_acc"].iloc[0])
    return metrics


def wide_group_metrics(table: pd.DataFrame, splits: Sequence[str] = ("val", "test")) -> pd.DataFrame:
    """One row per model (and seed) of a :func:`predictions_group_table`: ``<split>_worst_group_acc``, ``<split>_mean_group_acc``."""
    keys = [key for key in ("model", "seed") if key in table.columns]
    per_split = table[table["split"].isin(list(splits))].drop_duplicates([*keys, "split"])
    wide = per_split.pivot_table(index=keys, columns="split", values=["worst_group_acc", "mean_group_acc"], aggfunc="first")
    wide.columns = [f"{split}_{name}" for name, split in wide.columns]
    return wide.reset_index()
