"""Stage ``report`` and ``raycf report RESULTS``: the study's tables and figures in one HTML file.

Everything comes from the results folder alone: ``config.yaml``,
``manifest.json``, the Parquet tables (the final stage's per-image
predictions among them), the ``model.pt`` checkpoints (the base model and
the best trial's, for the gallery's Grad-CAM) and ``optuna.db``.  Nothing is
trained and no split is scored again: the gallery's few images are read
only to draw them.  Output, ``<results>/report/``:

* ``index.html``: one self-contained page (tables as HTML, figures as
  base64 PNG data URIs, no external resource);
* every figure as a PNG file beside it (``auroc.png``, ``class_recall.png``,
  ``pareto.png``, ``param_importances.png``, ``parallel_coordinate.png``,
  ``global_mc.png``, ``gallery_fixed.png``, ``gallery_broken.png``,
  ``gallery_confidence.png``);
* ``search_noise.json``: the search's spread against validation noise and
  Optuna's parameter importances, as numbers (:func:`search_noise_section`).

Contents: the study (manifest, stages, config); Table 1 (detection) with the
threshold-free AUROC of every agreement score against max softmax (bootstrap
intervals); the learned detector (confidence alone vs confidence + CFE
signals); Tables 2 and 3 and the per-class recall change; with ``final.seeds`` > 1, debug retraining
against the control over seeds (paired t intervals, the class group); the leaderboard's
top 10 and its Pareto front; Optuna's parameter importances and parallel
coordinates; whether the trials differ by more than validation noise (also
``search_noise.json``, with the importances as numbers); the global MC
filters of every class (class × filter counts); and a gallery in the manner of
the paper's Figure 2: test images the debugged model fixed, broke, or became
more confident on, each with Grad-CAM before and after and its MC filters.
A section whose inputs are missing (a study not run to the end) says so
instead of failing.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from raycf.results import storage
from raycf.results.artefacts import PREDICTIONS_FILE, read_final_frame, read_frame
from raycf.config import StudyConfig
from raycf.runtime.console import log, progress
from raycf.errors import UserError
from raycf.outputs.atlas import atlas_section  # the filter atlas (issue 24 item 4): raycf/outputs/atlas.py

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

REPORT_FOLDER = "report"
INDEX_FILE = "index.html"
LEADERBOARD_TOP = 10
# Leaderboard columns shown after the parameters and the objective.
LEADERBOARD_METRICS = ("val_loss", "val_acc_gain", "det_auroc", "maxsoftmax_auroc", "g_size", "best_epoch", "epochs", "time_total_s")
GALLERY_PER_GROUP = 4
MC_FILTERS_SHOWN = 8  # MC filters listed per gallery image (largest activations first)
DPI = 100
GALLERY_GROUPS = {
    "fixed": "Fixed: the base model was wrong, the debugged model is right",
    "broken": "Broken: the base model was right, the debugged model is wrong",
    "confidence": "Confidence rose: both right, the debugged model is more confident",
}


# ------------------------------------------------------------------ building blocks


@dataclass
class Figure:
    """A figure of the report: written as ``<name>.png`` and embedded in the page."""

    name: str
    caption: str
    png: bytes


@dataclass
class Section:
    """A titled part of the page: HTML snippets and figures, in order."""

    anchor: str
    title: str
    blocks: list[str | Figure] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # data files written beside the page: name -> text

    def add(self, block: str | Figure) -> None:
        self.blocks.append(block)

    def note(self, text: str) -> None:
        """A line saying what is missing or why a part is empty."""
        self.blocks.append(f'<p class="note">{html.escape(text)}</p>')

    def paragraph(self, text: str) -> None:
        self.blocks.append(f"<p>{html.escape(text)}</p>")

    def table(self, frame: pd.DataFrame, caption: str, index: bool = False) -> None:
        self.blocks.append(table_html(frame, caption, index=index))

    @property
    def figures(self) -> list[Figure]:
        return [block for block in self.blocks if isinstance(block, Figure)]


def png_bytes(figure: "MplFigure") -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def new_figure(width: float, height: float) -> "MplFigure":
    """A figure not attached to any interactive window (Agg canvas)."""
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), layout="constrained")


def table_html(frame: pd.DataFrame, caption: str, index: bool = False) -> str:
    """A DataFrame as an escaped HTML table with a caption."""
    body = frame.to_html(index=index, border=0, na_rep="–", escape=True, float_format=lambda v: f"{v:.4g}")
    table = re.sub(r"<table[^>]*>", lambda _: f'<table class="data"><caption>{html.escape(caption)}</caption>', body, count=1)
    return f'<div class="table">{table}</div>'


def _percent(values: pd.Series) -> list[str]:
    return ["–" if pd.isna(v) else f"{100 * v:.2f}" for v in values]


# ------------------------------------------------------------------ figures (pure: frames in, PNG out)


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
    from raycf.method.detection import error_quality_frame

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


# ------------------------------------------------------------------ sections


@dataclass
class ReportContext:
    """What every section reads: the results folder and its study."""

    results: str
    study: StudyConfig

    def frame(self, *parts: str) -> pd.DataFrame | None:
        return read_frame(self.results, *parts)

    def final_frame(self, name: str) -> pd.DataFrame | None:
        """``final/final.parquet`` or ``final/class_recall.parquet`` (older results: at the root)."""
        return read_final_frame(self.results, name)


def study_section(context: ReportContext) -> Section:
    """Manifest, versions, stage timings and the resolved study file."""
    from raycf.pipeline import FOLDERS, read_marker

    section = Section("study", f"Study {context.study.name}")
    manifest_location = storage.join_uri(context.results, "manifest.json")
    manifest = json.loads(storage.read_text(manifest_location)) if storage.exists(manifest_location) else {}
    facts = pd.DataFrame(
        [
            ("results", context.results),
            ("config hash", manifest.get("config_hash", context.study.config_hash())),
            ("git commit", manifest.get("git_commit") or "unknown"),
            ("command", manifest.get("command", "")),
            ("host", manifest.get("host", "")),
            ("started", manifest.get("started_at", "")),
            ("finished", manifest.get("finished_at") or "still running (the report is written as its last stage)"),
        ],
        columns=["", "value"],
    )
    section.table(facts, "Manifest (manifest.json)")
    versions = manifest.get("versions", {})
    if versions:
        section.table(pd.DataFrame(sorted(versions.items()), columns=["package", "version"]), "Versions that produced the results")
    rows = []
    for name in FOLDERS:
        if name != "report" and (marker := read_marker(context.results, name)) is not None:
            rows.append({"stage": name, "hash": marker.get("hash"), "finished": marker.get("finished_at"), "duration (s)": marker.get("duration_s")})
    if rows:
        section.table(pd.DataFrame(rows).sort_values("finished", kind="stable"), "Stages (their _stage.json markers)")
    config_location = storage.join_uri(context.results, "config.yaml")
    section.add(f"<details><summary>The resolved study file (config.yaml)</summary><pre>{html.escape(storage.read_text(config_location))}</pre></details>")
    return section


def detection_section(context: ReportContext) -> Section:
    """Paper Table 1 and the threshold-free comparison with max softmax."""
    from raycf.method.detection import error_interval_frame, error_quality_frame, table1_frame

    section = Section("detection", "Misclassification detection (paper Table 1)")
    detection = context.frame("analysis", "detection.parquet")
    error_scores = context.frame("analysis", "error_scores.parquet")
    if detection is None or error_scores is None:
        section.note("analysis/detection.parquet or analysis/error_scores.parquet is missing: run `raycf analyze STUDY`.")
        return section
    analysis = context.study.analysis
    section.paragraph(
        f"An image is flagged as a possible misclassification when its MC filters agree too little with its inferred class's "
        f"global MC filters (τ = {analysis.tau:g}); flagged images are re-ranked among their top-k classes (altered accuracy)."
    )
    section.table(
        table1_frame(detection),
        "Table 1: errors detected and new errors per setting; the 'control:' rows flag without the filters "
        "(every image the skip gate lets through; the least confident images, as many as a CFE rule flags)",
    )
    flagged = context.frame("analysis", "flagged.parquet")
    if flagged is not None:
        add_flagged(section, flagged, context.results)
    if "auroc_lo" in error_scores:
        for split in (name for name in ("test", "val") if name in set(error_scores["split"])):
            first = error_scores[error_scores["split"] == split].iloc[0]
            section.table(
                error_interval_frame(error_scores, split).reset_index(),
                f"{split}: error detection without thresholds (errors as positives; higher = better detector), with bootstrap 95 % "
                f"intervals ({int(first['bootstrap'])} resamples of the {int(first['images'])} images; the difference with max softmax paired)",
            )
    else:
        quality = error_quality_frame(error_scores).reset_index()
        section.table(quality, "Error detection without thresholds: AUROC and AUPR (errors as positives; higher = better detector)")
    scores = error_scores.set_index(["split", "score"])
    for split in ("test", "val"):
        if (split, "f1") in scores.index and (split, "max_softmax") in scores.index:
            section.paragraph(agreement_verdict(split, scores.loc[(split, "f1")], scores.loc[(split, "max_softmax")]))
        if (split, "f1_centred") in scores.index and "auroc_within" in scores:
            section.paragraph(class_aware_sentence(split, scores.loc[(split, "f1")], scores.loc[(split, "f1_centred")], scores.loc[(split, "max_softmax")]))
    section.add(Figure("auroc", "AUROC of each score; max softmax is the baseline (hatched).", auroc_figure(error_scores)))
    return section


def class_aware_sentence(split: str, f1: pd.Series, centred: pd.Series, softmax: pd.Series) -> str:
    """The F1 agreement read per predicted class, as the paper's rule thresholds it: centred AUROC and within-class AUROC beside max softmax's."""
    from raycf.method.detection import with_interval

    return (
        f"{split}, class-aware: F1 agreement centred on its predicted class's accepted training images has AUROC "
        f"{with_interval(centred['auroc'], centred['auroc_lo'], centred['auroc_hi'])} (pooled raw {with_interval(f1['auroc'], f1['auroc_lo'], f1['auroc_hi'])}); "
        f"within each predicted class, weighted by its errors, {with_interval(f1['auroc_within'], f1['auroc_within_lo'], f1['auroc_within_hi'])} "
        f"against max softmax's {with_interval(softmax['auroc_within'], softmax['auroc_within_lo'], softmax['auroc_within_hi'])}."
    )


def add_flagged(section: Section, flagged: pd.DataFrame, results: str, shown: int = 10) -> None:
    """Link ``analysis/flagged.parquet`` and the command that explains its first images; show its first rows."""
    own = [column for column in flagged.columns if column.startswith("flag: study:")]
    count = int(flagged[own[0]].sum()) if own else 0
    section.blocks.append(
        f'<p>Every test image, most suspicious first: <a href="../analysis/flagged.parquet">analysis/flagged.parquet</a> '
        f"({len(flagged)} images, {count} flagged by the study's own setting; columns: scores, one flag per setting, the predicted "
        f"class's global filters each MC set lacks and the extra ones it has). Bundles for the most suspicious: "
        f"<code>{html.escape(f'raycf explain {results} --flagged {min(shown, max(count, 1))}')}</code>.</p>"
    )
    columns = [c for c in ("rank", "image_id", "label_name", "pred_name", "confidence", "f1", *own) if c in flagged.columns]
    section.table(flagged[columns].head(shown), f"The {min(shown, len(flagged))} most suspicious test images")


def agreement_verdict(split: str, f1: pd.Series, softmax: pd.Series) -> str:
    """A sentence: is the F1 agreement a better error detector than max softmax on ``split`` (by the paired interval when there is one)?"""
    from raycf.method.detection import with_interval

    low, high = f1.get("auroc_diff_lo", float("nan")), f1.get("auroc_diff_hi", float("nan"))
    if pd.isna(low) or pd.isna(high):
        verdict = "better than" if f1["auroc"] > softmax["auroc"] else "not better than"
    else:
        verdict = "better than" if low > 0 else "worse than" if high < 0 else "not distinguishable from"
    difference = with_interval(f1["auroc"] - softmax["auroc"], low, high, signed=True)
    return (
        f"{split}: AUROC of the F1 agreement {f1['auroc']:.3f} vs max softmax {softmax['auroc']:.3f} (difference {difference}): the "
        f"agreement score is {verdict} the classifier's own confidence ({int(f1['errors'])} errors in {int(f1['images'])} images)."
    )


def learned_detector_section(context: ReportContext) -> Section:
    """Do the CFE signals add to confidence?  Two logistic regressions fitted on validation, scored on test."""
    from raycf.method.detection import with_interval
    from raycf.method.learned_detector import coefficient_frame, detector_summary

    section = Section("learned-detector", "Learned detector: do the CFE signals add to confidence?")
    learned = context.frame("analysis", "learned_detector.parquet")
    if learned is None:
        section.note("analysis/learned_detector.parquet is missing: run `raycf analyze STUDY`.")
        return section
    section.paragraph(
        "Logistic regressions (standardised features, class-balanced, L2) predict 'the prediction is wrong', fitted on the "
        "validation split and scored on the test split: one on the softmax alone (max softmax, margin of the top two, entropy), "
        "one on those plus the CFE signals (agreement scores, MC-set size, masked confidence, MI-set size)."
    )
    reason = str(learned["reason"].iloc[0])
    if reason:
        section.note(f"No learned detector: {reason}.")
        return section
    shown = pd.DataFrame(
        {
            "detector": learned["detector"],
            "features": learned["features"].str.replace(",", ", "),
            "AUROC [95 % CI]": [with_interval(*v) for v in zip(learned["auroc"], learned["auroc_lo"], learned["auroc_hi"])],
            "AUPR [95 % CI]": [with_interval(*v) for v in zip(learned["aupr"], learned["aupr_lo"], learned["aupr_hi"])],
            f"AUROC − {learned['baseline'].iloc[0]} [95 % CI]": [
                with_interval(*v, signed=True) for v in zip(learned["auroc_diff"], learned["auroc_diff_lo"], learned["auroc_diff_hi"])
            ],
        }
    )
    first = learned.iloc[0]
    section.table(
        shown,
        f"Test AUROC and AUPR ({int(first['errors'])} errors in {int(first['images'])} images; fitted on {int(first['fit_errors'])} errors in "
        f"{int(first['fit_images'])} validation images); bootstrap 95 % intervals, {int(first['bootstrap'])} resamples, the difference paired; "
        "conditional on the fitted coefficients (the resamples are of the test images, the fit is not redone)",
    )
    missing = [name for name in learned["missing_features"].iloc[-1].split(",") if name]
    if missing:
        section.note(f"Signals this study does not have, left out: {', '.join(missing)}.")
    section.paragraph(detector_summary(learned) + ".")
    section.table(coefficient_frame(learned).reset_index(names="feature"), "Fitted coefficients: log-odds of an error per standard deviation of each feature")
    return section


def final_section(context: ReportContext) -> Section:
    """Paper Tables 2 and 3 and the per-class recall change."""
    section = Section("final", "Debug retraining (paper Tables 2 and 3)")
    table2 = context.frame("final", "table2.parquet")
    table3 = context.frame("final", "table3.parquet")
    class_recall = context.final_frame("class_recall.parquet")
    if table2 is None:
        section.note("final/table2.parquet is missing: the study's final stage has not run (`raycf study STUDY`).")
        return section
    shown = pd.DataFrame(
        {
            "model": table2["model"],
            "lambda1": table2["lambda1"],
            "lambda2": table2["lambda2"],
            "best epoch": ["–" if pd.isna(v) else str(int(v)) for v in table2["best_epoch"]],
            "train %": _percent(table2["train_acc"]),
            "val %": _percent(table2["val_acc"]),
            "test %": _percent(table2["test_acc"]),
        }
    )
    section.table(shown, "Table 2: accuracy of the base model, plain fine-tuning (control) and debug retraining (best trial)")
    rows = table2.set_index("model")
    if {"debugged", "control"} <= set(rows.index):
        change = 100 * (rows.loc["debugged", "test_acc"] - rows.loc["control", "test_acc"])
        section.paragraph(f"Debugged − control test accuracy: {change:+.2f} points.")
    final = context.final_frame("final.parquet")
    if final is not None and "verdict" in final and str(final["verdict"].iloc[0]):
        section.paragraph(str(final["verdict"].iloc[0]))
    if table3 is not None:
        if table3.empty:
            section.note("Table 3 is empty: no class changed its test recall.")
        else:
            section.table(table3.drop(columns=["class_index"], errors="ignore"), "Table 3: classes whose test recall changed most (debugged vs base)")
    if class_recall is not None and len(class_recall):
        section.add(Figure("class_recall", "Per-class test recall change from the base model.", recall_change_figure(class_recall)))
    add_seed_comparison(section, context)
    return section


def add_seed_comparison(section: Section, context: ReportContext) -> None:
    """With ``final.seeds`` > 1: the control, the study's λ and the best trial over retraining seeds (paired intervals, the class group)."""
    from raycf.method.replication import format_interval

    summary = context.frame("final", "seed_summary.parquet")
    seeds = context.frame("final", "seeds.parquet")
    if summary is None or seeds is None:
        return  # final.seeds is 1: Tables 2 and 3 are the whole comparison
    section.add("<h3>Over retraining seeds (final.seeds)</h3>")
    count = int(seeds["seed"].nunique())
    section.paragraph(
        f"The control (λ1 = λ2 = 0), the study's own λ (reference) and the best searched trial's parameters (best) were each retrained "
        f"{count} times from the base model; a seed changes the data order, the view drawn per epoch and dropout, the same for the three. "
        f"Each run keeps its best validation epoch and is run once over every split. Seed 0 is the search's own draw: the best trial "
        f"was chosen on its seed-0 validation accuracy, so that one value is optimistic; the other seeds and the test split are not."
    )
    per_model = seeds.groupby("model", sort=False).agg(
        runs=("seed", "size"), test_mean=("test_acc", "mean"), test_sd=("test_acc", "std"), val_mean=("val_acc", "mean"), val_sd=("val_acc", "std"), best_epoch=("best_epoch", "mean")
    ).reset_index()
    for column in ("test_mean", "test_sd", "val_mean", "val_sd"):
        per_model[column] = _percent(per_model[column])
    section.table(per_model.rename(columns={"test_mean": "test %", "test_sd": "test sd", "val_mean": "val %", "val_sd": "val sd", "best_epoch": "mean best epoch"}), "Accuracy over the seeds (mean and sample sd, %)")
    level = int(round(100 * float(summary["confidence"].iloc[0])))
    shown = pd.DataFrame(
        {
            "comparison": summary["comparison"],
            "seeds": summary["seeds"],
            f"test difference [{level} % t interval], points": [format_interval(r.test_diff_mean, r.test_diff_ci_low, r.test_diff_ci_high) for r in summary.itertuples()],
            "test sd": [f"{100 * v:.2f}" for v in summary["test_diff_sd"]],
            "seeds better": summary["test_wins"],
            f"val difference [{level} % t interval], points": [format_interval(r.val_diff_mean, r.val_diff_ci_low, r.val_diff_ci_high) for r in summary.itertuples()],
        }
    )
    if "worst_group_diff_mean" in summary:  # the study's images have groups (planted studies)
        shown[f"worst-group test difference [{level} % t interval], points"] = [format_interval(r.worst_group_diff_mean, r.worst_group_diff_ci_low, r.worst_group_diff_ci_high) for r in summary.itertuples()]
    section.table(shown, "Accuracy difference from the control of the same seed (paired t interval; an interval holding 0 is no evidence of a difference)")
    group = context.frame("final", "group_recall.parquet")
    if group is not None and len(group):
        rows = pd.DataFrame(
            {
                "comparison": group["comparison"],
                "class": group["class"],
                "images": group["support"],
                "base %": _percent(group["recall_base"]),
                "control %": _percent(group["recall_control_mean"]),
                "model %": _percent(group["recall_mean"]),
                f"change [{level} % t interval], points": [format_interval(r.change_mean, r.change_ci_low, r.change_ci_high) for r in group.itertuples()],
            }
        )
        section.table(rows, "Test recall of the class group (final.class_group) over the seeds; (group): all its images together")


def search_section(context: ReportContext) -> Section:
    """The leaderboard's top trials, its Pareto front, and Optuna's views of the search."""
    from raycf.search.leaderboard import pareto_front, read_leaderboard, sort_by_objective

    section = Section("search", "Search (Ray Tune + Optuna)")
    if not storage.exists(storage.join_uri(context.results, "leaderboard.parquet")):
        section.note("leaderboard.parquet is missing: the search has not run (`raycf study STUDY`).")
        return section
    search = context.study.search
    board = read_leaderboard(context.results)
    parameters = board.attrs.get("parameters", [])
    ranked = sort_by_objective(board, search.metric, search.mode)
    wanted = ("trial_id", "status", "is_control", *parameters, search.metric, *LEADERBOARD_METRICS)
    columns = [c for c in dict.fromkeys(wanted) if c in ranked.columns]
    section.table(ranked[columns].head(LEADERBOARD_TOP), f"Leaderboard: top {min(LEADERBOARD_TOP, len(ranked))} of {len(ranked)} trials by {search.metric} ({search.mode})")
    x, y = search.pareto
    if x in board.columns and y in board.columns:
        front = pareto_front(board, x, y)
        section.table(front[[c for c in columns if c in front.columns]], f"Pareto front of {x} vs {y} (both maximised)")
        section.add(Figure("pareto", f"Every trial in ({x}, {y}); the Pareto front joined.", pareto_figure(board, front, x, y)))
    for figure in optuna_figures(context, section):
        section.add(figure)
    return section


def optuna_figures(context: ReportContext, section: Section) -> list[Figure]:
    """Parameter importances and parallel coordinates from the study's Optuna storage."""
    import warnings

    import matplotlib.pyplot as plt
    import optuna

    study = load_optuna_study(context)
    if study is None:
        section.note("No Optuna study found (optuna.db or search.storage): no parameter importances.")
        return []
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    section.paragraph(f"Optuna study {study.study_name}: {len(finished)} finished trials told to the sampler (the control is run apart from it).")
    figures = []
    plots: list[tuple[str, str, Callable]] = [
        ("param_importances", "Optuna's parameter importances (fANOVA) for the objective.", functools.partial(optuna.visualization.matplotlib.plot_param_importances, evaluator=importance_evaluator(context))),
        ("parallel_coordinate", "Optuna's parallel coordinates: each line a trial, coloured by the objective.", optuna.visualization.matplotlib.plot_parallel_coordinate),
    ]
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for name, caption, plot in plots:
        if len(finished) < 2:
            section.note(f"{name.replace('_', ' ')}: needs at least 2 finished Optuna trials (this study has {len(finished)}).")
            continue
        # Optuna's plots switch pyplot to its ggplot style: keep that inside this context.
        with warnings.catch_warnings(), plt.style.context("default"), plt.rc_context({"figure.figsize": (9.0, 5.0)}):
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib module experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as error:  # e.g. importances of parameters that never varied
                section.note(f"{name.replace('_', ' ')}: Optuna could not draw it ({str(error).splitlines()[0]}).")
                continue
            figure = np.ravel(axes)[0].figure
            figures.append(Figure(name, caption, png_bytes(figure)))
    return figures


def search_noise_section(context: ReportContext) -> Section:
    """Do the trials differ by more than validation noise?  The spread of val_acc, its binomial standard error, Optuna's importances.

    Also writes the numbers as ``search_noise.json`` beside the page
    (validation data only: the leaderboard, the validation split's size and
    the Optuna storage).
    """
    from raycf.search.leaderboard import read_leaderboard
    from raycf.method.search_noise import search_noise, seed_spread

    section = Section("search-noise", "Search: do trials differ by more than validation noise?")
    images = validation_images(context)
    if not storage.exists(storage.join_uri(context.results, "leaderboard.parquet")) or images is None:
        section.note("leaderboard.parquet or the validation split's size (analysis/error_scores.parquet) is missing: the search has not run.")
        return section
    board = read_leaderboard(context.results)
    comparison, best = trial_comparison(context, board)
    seeds = context.frame("final", "seeds.parquet")
    noise = search_noise(board, images, comparison=comparison, best=best, seeds=seed_spread(seeds) if seeds is not None else None)
    section.paragraph(noise["verdict"])
    section.paragraph(scheduler_note(context.study))
    shown = {key: value for key, value in noise.items() if key not in ("verdict", "metric", "seed_sd")}
    values = ["–" if value is None or value != value else f"{value:.4g}" if isinstance(value, float) else str(value) for value in shown.values()]
    section.table(pd.DataFrame({"": list(shown), noise["metric"]: values}), "The searched trials' objective (control excluded) and McNemar's comparison with the best trial")
    if comparison is not None and len(comparison):
        section.table(comparison, f"McNemar's exact test of each trial against the best ({best}) on the validation images they disagree on")
        noise["comparisons"] = comparison.to_dict("records")
    importances, why = param_importances(context)
    if importances:
        frame = pd.DataFrame({"parameter": list(importances), "importance": list(importances.values())})
        section.table(frame, f"Optuna's parameter importances (fANOVA, seed {context.study.seed}) for the objective")
    else:
        section.note(f"No parameter importances: {why}.")
    record = {**noise, "importances": importances, "importance_evaluator": "fanova", "importance_seed": context.study.seed}
    section.files["search_noise.json"] = json.dumps({key: _plain(value) for key, value in record.items()}, indent=2)
    return section


def trial_comparison(context: ReportContext, board: pd.DataFrame) -> tuple[pd.DataFrame | None, str]:
    """McNemar's test of every trial that kept its validation predictions against the best such searched trial, and that trial's id."""
    from raycf.results.artefacts import trial_val_predictions
    from raycf.search.leaderboard import sort_by_objective
    from raycf.method.search_noise import compare_with_best

    labels = context.frame("images", "val.parquet")
    predictions = trial_val_predictions(board)
    ranked = sort_by_objective(board, context.study.search.metric, context.study.search.mode)
    candidates = [str(row["trial_id"]) for row in ranked.to_dict("records") if not row.get("is_control") and str(row["trial_id"]) in predictions]
    if labels is None or not candidates:
        return None, ""
    return compare_with_best(predictions, labels["label"].to_numpy(), candidates[0]), candidates[0]


def scheduler_note(study: StudyConfig) -> str:
    """Whether the search's stop decisions can be reproduced: ASHA's asynchronous ones depend on timing."""
    search = study.search
    if search.scheduler.asha is None:
        return "No early stopping: every trial ran its whole schedule."
    if search.deterministic:
        return "Deterministic search (search.deterministic): one trial at a time, so ASHA's stop decisions and TPE's proposals follow trial order and a rerun reproduces them."
    return (
        f"ASHA stops trials asynchronously, {search.max_concurrent} at a time: which trials it stops depends on the order results arrive in, "
        "so on timing and machine load, and a rerun may stop others (search.deterministic: true runs one trial at a time and reproduces them)."
    )


def validation_images(context: ReportContext) -> int | None:
    """The validation split's size, from the analysis (or the masks), or None."""
    error_scores = context.frame("analysis", "error_scores.parquet")
    if error_scores is not None and (error_scores["split"] == "val").any():
        return int(error_scores.loc[error_scores["split"] == "val", "images"].iloc[0])
    location = storage.join_uri(context.results, "masks", "val")
    return storage.read_table(location, columns=["image_index"]).num_rows if storage.exists(location) else None


def param_importances(context: ReportContext) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importances of the searched parameters (seeded by the study seed), or ``{}`` and why not."""
    import optuna

    study = load_optuna_study(context)
    if study is None:
        return {}, "no Optuna study found (optuna.db or search.storage)"
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(finished) < 2:
        return {}, f"needs at least 2 finished Optuna trials (this study has {len(finished)})"
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=importance_evaluator(context))
    except (ValueError, RuntimeError) as error:  # e.g. parameters that never varied
        return {}, f"Optuna could not compute them ({str(error).splitlines()[0]})"
    return {name: float(value) for name, value in importances.items()}, ""


def importance_evaluator(context: ReportContext):
    """fANOVA seeded by the study seed: the figure and search_noise.json give the same numbers on every rebuild."""
    from optuna.importance import FanovaImportanceEvaluator

    return FanovaImportanceEvaluator(seed=context.study.seed)


def _plain(value):
    """A JSON-ready value: NaN as None, numpy scalars as Python numbers, dicts element-wise."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def load_optuna_study(context: ReportContext):
    """The search's Optuna study (``<study name>-<search stage hash>``), or None."""
    import optuna

    from raycf.pipeline import stage_hash

    url = context.study.search.storage
    local_copy = None
    if not url:
        location = storage.join_uri(context.results, "optuna.db")
        if not storage.exists(location):
            return None
        if storage.is_uri(location):  # SQLite needs a local file
            local_copy = Path(tempfile.mkdtemp(prefix="raycf-report-")) / "optuna.db"
            local_copy.write_bytes(storage.read_bytes(location))
            location = str(local_copy)
        url = f"sqlite:///{location}"
    names = optuna.study.get_all_study_names(storage=url)
    expected = f"{context.study.name}-{stage_hash(context.study, 'search')}"
    name = expected if expected in names else (names[0] if len(names) == 1 else None)
    if name is None:
        return None
    return optuna.load_study(study_name=name, storage=url)


def global_mc_section(context: ReportContext) -> Section:
    """The global MC filters of every class: a class × filter heat map and the set sizes."""
    section = Section("global-mc", "Global MC filters per class")
    global_mc = context.frame("analysis", "global_mc.parquet")
    if global_mc is None:
        section.note("analysis/global_mc.parquet is missing: run `raycf analyze STUDY`.")
        return section
    sizes = global_mc.groupby(["class", "class_name"], sort=True).agg(accepted_images=("images", "first"), global_filters=("in_global", "sum")).reset_index()
    empty = int((sizes["global_filters"] == 0).sum())
    if empty:
        section.note(f"{empty} of {len(sizes)} classes have an empty global set (no training image passed the τ gate): their images cannot be checked.")
    section.add(Figure("global_mc", "Counts of each filter in the MC sets of a class's accepted training images; dots: the filters in G.", global_mc_figure(global_mc)))
    section.table(sizes, "Accepted training images and global MC filters per class")
    return section


def gallery_section(context: ReportContext) -> Section:
    """Test images fixed, broken, or made more confident by the debugged model, with Grad-CAM before and after."""
    section = Section("gallery", "Gallery (as the paper's Figure 2)")
    final = context.final_frame("final.parquet")
    if final is None:
        section.note("final/final.parquet is missing: no debugged model to compare with.")
        return section
    try:
        groups = gallery_images(context)
    except UserError as error:  # e.g. the dataset's folder is not on this machine
        section.note(f"No gallery: {error}")
        return section
    section.paragraph(
        "Grad-CAM (captum, last conv layer) of each model's own prediction; the MC filters are the base model's, from masks/test."
    )
    for group, title in GALLERY_GROUPS.items():
        if groups[group]:
            section.add(Figure(f"gallery_{group}", title, gallery_figure(groups[group], title)))
        else:
            section.note(f"{title}: no such test image.")
    return section


def gallery_images(context: ReportContext) -> dict[str, list[GalleryImage]]:
    """The gallery's images per group, with their Grad-CAM maps before and after."""
    import torch

    from raycf.results.artefacts import base_model_bytes, class_names, debugged_model_bytes, load_masks, store_ref
    from raycf.models.checkpoint import parse_classifier_checkpoint
    from raycf.outputs.gradcam import display_image, grad_cam
    from raycf.data.image_store import StoredImages, open_store
    from raycf.models.build import classifier_from_checkpoint
    from raycf.data.views import model_inputs

    study, results = context.study, context.results
    base_bytes = base_model_bytes(results)
    debugged = debugged_model_bytes(results, base_bytes)
    predictions = context.frame("final", PREDICTIONS_FILE)
    if debugged is None or predictions is None:
        raise UserError("the best trial's checkpoint or final/predictions.parquet is not in the results folder any more")
    test = {model: rows.sort_values("image_index") for model, rows in predictions[predictions["split"] == "test"].groupby("model")}
    before_rows, after_rows = test["base"], test["debugged"]
    store = open_store(store_ref(results))
    dataset = StoredImages(store, "test")
    if len(dataset) != len(before_rows):
        raise UserError(f"the test split has {len(dataset)} images but the study's predictions {len(before_rows)}: the dataset changed since the study ran")
    before = classifier_from_checkpoint(study.model, parse_classifier_checkpoint(base_bytes, "base model"))
    after = classifier_from_checkpoint(study.model, parse_classifier_checkpoint(debugged[1], "debugged model"))
    masks = load_masks(results, "test", ["mc_mask", "a"])
    global_mc = context.frame("analysis", "global_mc.parquet")
    sets = None if global_mc is None else global_mc.pivot(index="class", columns="filter", values="in_global").sort_index().sort_index(axis=1).to_numpy(dtype=bool)
    labels = before_rows["label"].to_numpy()
    pred_before, confidence_before = before_rows["pred"].to_numpy(), before_rows["confidence"].to_numpy()
    pred_after, confidence_after = after_rows["pred"].to_numpy(), after_rows["confidence"].to_numpy()
    names = class_names(results)
    ids = store.ids("test")
    groups: dict[str, list[GalleryImage]] = {}
    for group, indices in pick_gallery(labels, pred_before, confidence_before, pred_after, confidence_after).items():
        if len(indices) == 0:
            groups[group] = []
            continue
        images = model_inputs(torch.stack([dataset[int(i)][0] for i in indices]), study.data.image_size, preprocess=study.data.preprocess)  # read only to draw them
        cams_before = grad_cam(before, images, pred_before[indices].tolist()).numpy()
        cams_after = grad_cam(after, images, pred_after[indices].tolist()).numpy()
        groups[group] = []
        for position, index in enumerate(indices):
            mask, activations = masks["mc_mask"][index], masks["a"][index]
            filters = [int(k) for k in np.flatnonzero(mask)[np.argsort(-activations[mask], kind="stable")]]
            groups[group].append(
                GalleryImage(
                    image_id=ids[index],
                    label=names[int(labels[index])],
                    image=display_image(images[position]),
                    cam_before=cams_before[position],
                    cam_after=cams_after[position],
                    pred_before=names[int(pred_before[index])],
                    confidence_before=float(confidence_before[index]),
                    pred_after=names[int(pred_after[index])],
                    confidence_after=float(confidence_after[index]),
                    mc_filters=filters,
                    mc_size=len(filters),
                    in_global=None if sets is None else int((sets[int(pred_before[index])] & mask).sum()),
                    global_size=None if sets is None else int(sets[int(pred_before[index])].sum()),
                )
            )
    return groups


SECTIONS: tuple[Callable[[ReportContext], Section], ...] = (
    study_section,
    detection_section,
    learned_detector_section,
    final_section,
    search_section,
    search_noise_section,
    global_mc_section,
    atlas_section,
    gallery_section,
)


# ------------------------------------------------------------------ the page


STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 24px 48px; color: #1d232b; }
header { border-bottom: 1px solid #d8dde3; margin-bottom: 8px; }
nav a { margin-right: 14px; }
h2 { margin-top: 36px; border-bottom: 1px solid #eef0f3; }
table.data { border-collapse: collapse; margin: 12px 0; font-variant-numeric: tabular-nums; }
table.data caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
table.data th, table.data td { border: 1px solid #d8dde3; padding: 3px 8px; text-align: left; }
table.data th { background: #f3f5f7; }
figure { margin: 16px 0; }
figure img { max-width: 100%; border: 1px solid #eef0f3; }
div.table { overflow-x: auto; }
figcaption { color: #4a5563; font-size: 13px; }
p.note { color: #8a5300; background: #fff7e6; padding: 4px 8px; }
pre { background: #f6f8fa; padding: 8px; overflow-x: auto; }
"""

# Records, once the page has loaded, how many figures decoded; a figure that
# did not decode is a console error (the report's browser test looks for both).
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (image) { return !(image.complete && image.naturalWidth > 0); });
  document.body.setAttribute("data-figures", String(images.length));
  document.body.setAttribute("data-broken-figures", String(broken.length));
  if (broken.length) { console.error("raycf report: " + broken.length + " figure(s) did not decode"); }
});
"""


def figure_html(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    caption = html.escape(figure.caption)
    return f'<figure id="fig-{figure.name}"><img src="data:image/png;base64,{data}" alt="{caption}"><figcaption>{caption} ({figure.name}.png)</figcaption></figure>'


def render_page(title: str, subtitle: str, sections: list[Section]) -> str:
    """The self-contained HTML page."""
    navigation = " ".join(f'<a href="#{section.anchor}">{html.escape(section.title)}</a>' for section in sections)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>",
        '<body data-figures="pending">',
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>{navigation}</nav></header>",
    ]
    for section in sections:
        parts.append(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>')
        parts.extend(figure_html(block) if isinstance(block, Figure) else block for block in section.blocks)
        parts.append("</section>")
    parts.append(f"<script>{CHECK_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def build_report(results: str, output: str, study: StudyConfig) -> dict:
    """Write ``index.html`` and the figures' PNG files into ``output``; return a summary."""
    context = ReportContext(results=results, study=study)
    sections = []
    for build in progress(SECTIONS, "report: sections"):
        sections.append(build(context))
    figures = [figure for section in sections for figure in section.figures]
    for figure in figures:
        storage.write_bytes(storage.join_uri(output, f"{figure.name}.png"), figure.png)
    for name, text in (item for section in sections for item in section.files.items()):
        storage.write_text(storage.join_uri(output, name), text)
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    page = render_page(f"raycf study report: {study.name}", f"Results {results} · config hash {study.config_hash()} · generated {generated}", sections)
    storage.write_text(storage.join_uri(output, INDEX_FILE), page)
    notes = sum(1 for section in sections for block in section.blocks if isinstance(block, str) and block.startswith('<p class="note">'))
    log(f"report: {len(figures)} figures, {len(sections)} sections, {notes} notes on missing parts")
    return {"figures": [figure.name for figure in figures], "sections": [section.anchor for section in sections], "notes": notes}


# ------------------------------------------------------------------ stage and command


def write_report(results: str) -> str:
    """``raycf report RESULTS``: (re)build ``<results>/report/`` from the results folder alone; return index.html's location.

    The folder is written elsewhere and moved into place (atomic), with the
    stage's marker, exactly as when ``raycf study`` runs the report stage.
    """
    from raycf.results.artefacts import load_results_study
    from raycf.pipeline import run_stage

    results = storage.normalise_root(results)
    study = load_results_study(results)
    run_stage(study, "report", results=results)
    return storage.join_uri(results, REPORT_FOLDER, INDEX_FILE)
