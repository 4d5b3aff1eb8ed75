"""The report's figures, pure: frames in, PNG bytes out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from raycf.outputs.report.blocks import (
    GALLERY_PER_GROUP,
    MC_FILTERS_SHOWN,
    new_figure,
    png_bytes,
)

if TYPE_CHECKING:
    pass

def global_mc_figure(global_mc: pd.DataFrame) -> bytes:
    """Heat map of ``global_mc.parquet``: class × filter counts; dots mark the filters in G."""
    counts = global_mc.pivot(index="class", columns="filter", values="count").sort_index().sort_index(axis=1)
    in_global = global_mc.pivot(index="class", columns="filter", values="in_global").reindex_like(counts).fillna(False).astype(bool)
    names = global_mc.drop_duplicates("class").set_index("class")["class_name"].reindex(counts.index)
    num_classes, num_filters = counts.shape
    figure = new_figure(min(16.0, 3.0 + 0.12 * num_filters), min(14.0, 1.5 + 0.3 * num_classes))
    axes = figure.add_subplot()
    image = axes.imshow(counts.to_numpy(dtype=float), aspect="auto", cmap="viridis", interpolation="nearest")
    rows, columns = np.nonzero(in_global.to_numpy())
    axes.scatter(columns, rows, s=7, c="red", marker="o", linewidths=0, label="in G (global MC set)")
    axes.set_xlabel("filter")
    axes.set_ylabel("class")
    if num_classes <= 40:
        axes.set_yticks(range(num_classes), [str(name) for name in names])
    figure.colorbar(image, ax=axes, label="accepted training images whose MC set holds the filter")
    if len(rows):
        axes.legend(loc="upper right", fontsize="small", framealpha=0.8)
    axes.set_title(f"Global MC filters per class (τ = {global_mc['tau'].iloc[0]:g}, f = {global_mc['freq_threshold'].iloc[0]:g})")
    return png_bytes(figure)


def recall_change_figure(class_recall: pd.DataFrame) -> bytes:
    """Per-class test recall change from the base model: debugged (bars) and control (dots), sorted."""
    frame = class_recall.assign(
        debugged=class_recall["recall_debugged"] - class_recall["recall_base"],
        control=class_recall["recall_control"] - class_recall["recall_base"],
    ).sort_values("debugged", kind="stable")
    count = len(frame)
    figure = new_figure(9.0, min(14.0, 1.5 + 0.25 * count) if count <= 40 else 4.5)
    axes = figure.add_subplot()
    positions = np.arange(count)
    colours = np.where(frame["debugged"] >= 0, "#2a7f62", "#b23a48")
    if count <= 40:
        axes.barh(positions, 100 * frame["debugged"], color=colours, label="debugged − base")
        axes.scatter(100 * frame["control"], positions, color="black", s=14, zorder=3, label="control − base")
        axes.set_yticks(positions, [str(name) for name in frame["class"]])
        axes.axvline(0, color="grey", linewidth=0.8)
        axes.set_xlabel("change in test recall (points)")
        axes.set_ylabel("class")
    else:
        axes.bar(positions, 100 * frame["debugged"], color=colours, width=1.0, label="debugged − base")
        axes.scatter(positions, 100 * frame["control"], color="black", s=4, zorder=3, label="control − base")
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.set_xlabel("classes, sorted by change")
        axes.set_ylabel("change in test recall (points)")
    axes.legend(fontsize="small")
    axes.set_title("Per-class test recall change from the base model")
    return png_bytes(figure)


def auroc_figure(error_scores: pd.DataFrame) -> bytes:
    """AUROC of each error score (errors as positives) per split, with its bootstrap interval when there is one; the max-softmax baseline hatched."""
    from raycf.method.detection_tables import error_quality_frame

    quality = error_quality_frame(error_scores)
    splits = [split for split in ("test", "val") if f"auroc {split}" in quality.columns]
    figure = new_figure(8.0, 1.2 + 0.45 * len(quality))
    axes = figure.add_subplot()
    height = 0.8 / max(len(splits), 1)
    positions = np.arange(len(quality))
    for offset, split in enumerate(splits):
        values = quality[f"auroc {split}"].to_numpy(dtype=float)
        bars = axes.barh(positions + offset * height, values, height=height, label=split, xerr=_interval_bars(error_scores, split, quality.index, values))
        for bar, name in zip(bars, quality.index):
            if name == "max_softmax":
                bar.set_hatch("//")
    axes.set_yticks(positions + height * (len(splits) - 1) / 2, list(quality.index))
    axes.invert_yaxis()
    axes.axvline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    axes.set_xlim(0, 1)
    axes.set_xlabel("AUROC for 'the prediction is wrong'")
    axes.legend(fontsize="small", loc="lower right")
    axes.set_title("Error detection without thresholds: agreement scores vs max softmax (hatched)")
    return png_bytes(figure)


def _interval_bars(error_scores: pd.DataFrame, split: str, scores: pd.Index, values: np.ndarray) -> np.ndarray | None:
    """Error bars (2×n distances below and above each value) of the bootstrap AUROC intervals, or None without them."""
    if "auroc_lo" not in error_scores:
        return None
    rows = error_scores[error_scores["split"] == split].set_index("score").reindex(scores)
    below = values - rows["auroc_lo"].to_numpy(dtype=float)
    above = rows["auroc_hi"].to_numpy(dtype=float) - values
    return np.clip(np.nan_to_num(np.vstack([below, above])), 0, None)  # a percentile interval may sit beside its estimate


def pareto_figure(board: pd.DataFrame, front: pd.DataFrame, x: str, y: str) -> bytes:
    """Every trial in (x, y); the Pareto front joined; the control starred."""
    figure = new_figure(6.5, 4.5)
    axes = figure.add_subplot()
    valid = board.dropna(subset=[x, y])
    axes.scatter(valid[x], valid[y], color="#7a869a", s=24, label="trials")
    ordered = front.sort_values(x)
    axes.plot(ordered[x], ordered[y], color="#b23a48", marker="o", label="Pareto front")
    control = valid[valid["is_control"]] if "is_control" in valid else valid.iloc[0:0]
    if len(control):
        axes.scatter(control[x], control[y], marker="*", s=160, color="#e0a100", zorder=3, label="control (λ1 = λ2 = 0)")
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    axes.legend(fontsize="small")
    axes.set_title(f"Search trials: {x} vs {y}")
    return png_bytes(figure)


@dataclass
class GalleryImage:
    """One test image of the gallery, before (base model) and after (debugged model)."""

    image_id: str
    label: str
    image: np.ndarray  # H×W×3 in [0, 1]
    cam_before: np.ndarray  # H×W in [0, 1]: Grad-CAM of the base model's prediction
    cam_after: np.ndarray  # of the debugged model's prediction
    pred_before: str
    confidence_before: float
    pred_after: str
    confidence_after: float
    mc_filters: list[int]  # the base model's MC filters of its prediction, largest activation first
    mc_size: int
    in_global: int | None = None  # how many of them are in G of the base prediction
    global_size: int | None = None  # |G| of the base prediction


def gallery_figure(images: list[GalleryImage], title: str) -> bytes:
    """Rows of (image, Grad-CAM before, Grad-CAM after, what changed), like the paper's Figure 2."""
    figure = new_figure(11.0, 0.6 + 2.3 * len(images))
    grid = figure.subplots(len(images), 4, squeeze=False, gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
    for row, item in zip(grid, images):
        row[0].imshow(item.image)
        row[0].set_title(f"{item.image_id} (true: {item.label})", fontsize="small")
        for axes, cam, name, pred, confidence in (
            (row[1], item.cam_before, "base", item.pred_before, item.confidence_before),
            (row[2], item.cam_after, "debugged", item.pred_after, item.confidence_after),
        ):
            axes.imshow(item.image)
            axes.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            axes.set_title(f"{name}: {pred} ({100 * confidence:.1f} %)", fontsize="small")
        shown = ", ".join(str(k) for k in item.mc_filters[:MC_FILTERS_SHOWN])
        more = f" (+{item.mc_size - MC_FILTERS_SHOWN} more)" if item.mc_size > MC_FILTERS_SHOWN else ""
        text = (
            f"true class: {item.label}\n"
            f"base: {item.pred_before} at {100 * item.confidence_before:.1f} %\n"
            f"debugged: {item.pred_after} at {100 * item.confidence_after:.1f} %\n"
            f"base MC filters ({item.mc_size}):\n{shown or 'none'}{more}"
        )
        if item.global_size is not None:
            text += f"\nin G({item.pred_before}): {item.in_global} of {item.global_size}"
        row[3].text(0.0, 0.5, text, va="center", ha="left", fontsize="small", family="monospace", wrap=True)
        for axes in row:
            axes.set_axis_off()
    figure.suptitle(title)
    return png_bytes(figure)


def pick_gallery(
    labels: np.ndarray, pred_before: np.ndarray, confidence_before: np.ndarray, pred_after: np.ndarray, confidence_after: np.ndarray, per_group: int = GALLERY_PER_GROUP
) -> dict[str, np.ndarray]:
    """Indices of the gallery's images per group (see :data:`GALLERY_GROUPS`), most telling first.

    From each model's prediction and its probability: ``fixed``: wrong
    before, right after, most confident fix first; ``broken``: right before,
    wrong after, most confident new mistake first; ``confidence``: right both
    times, by the rise of the (true) class's probability (rises only).
    """
    right_before, right_after = pred_before == labels, pred_after == labels
    candidates = {
        "fixed": (~right_before & right_after, -confidence_after),
        "broken": (right_before & ~right_after, -confidence_after),
        "confidence": (right_before & right_after & (confidence_after > confidence_before), confidence_before - confidence_after),
    }
    chosen = {}
    for group, (selected, order_key) in candidates.items():
        indices = np.flatnonzero(selected)
        chosen[group] = indices[np.argsort(order_key[indices], kind="stable")][:per_group]
    return chosen
