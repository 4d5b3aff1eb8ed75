"""Sections on the study and its analysis: manifest, Table 1 and AUROC, the learned detector, the global MC filters."""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING

import pandas as pd

from raycf.outputs.report.blocks import Figure, ReportContext, Section
from raycf.outputs.report.figures import auroc_figure, global_mc_figure
from raycf.results import storage

if TYPE_CHECKING:
    pass

RUN_ANALYZE = "run `raycf analyze STUDY`"


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
    from raycf.method.detection_tables import error_interval_frame, error_quality_frame, table1_frame

    section = Section("detection", "Misclassification detection (paper Table 1)")
    frames = context.required(section, "analysis/detection.parquet", "analysis/error_scores.parquet", remedy=RUN_ANALYZE)
    if frames is None:
        return section
    detection, error_scores = frames
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
    from raycf.method.detection_tables import with_interval

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
    from raycf.method.detection_tables import with_interval

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
    from raycf.method.detection_tables import with_interval
    from raycf.method.learned_detector import coefficient_frame, detector_summary

    section = Section("learned-detector", "Learned detector: do the CFE signals add to confidence?")
    frames = context.required(section, "analysis/learned_detector.parquet", remedy=RUN_ANALYZE)
    if frames is None:
        return section
    (learned,) = frames
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




def global_mc_section(context: ReportContext) -> Section:
    """The global MC filters of every class: a class × filter heat map and the set sizes."""
    section = Section("global-mc", "Global MC filters per class")
    frames = context.required(section, "analysis/global_mc.parquet", remedy=RUN_ANALYZE)
    if frames is None:
        return section
    (global_mc,) = frames
    sizes = global_mc.groupby(["class", "class_name"], sort=True).agg(accepted_images=("images", "first"), global_filters=("in_global", "sum")).reset_index()
    empty = int((sizes["global_filters"] == 0).sum())
    if empty:
        section.note(f"{empty} of {len(sizes)} classes have an empty global set (no training image passed the τ gate): their images cannot be checked.")
    section.add(Figure("global_mc", "Counts of each filter in the MC sets of a class's accepted training images; dots: the filters in G.", global_mc_figure(global_mc)))
    section.table(sizes, "Accepted training images and global MC filters per class")
    return section
