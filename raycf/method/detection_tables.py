"""Table 1 and the error-score tables as people read them: pandas frames and text with intervals (from :mod:`raycf.method.detection`'s rows)."""

from __future__ import annotations

import pandas as pd

from raycf.method.detection import EVALUATED_SPLITS, SCORE_ORDER

def table1_frame(detection: pd.DataFrame) -> pd.DataFrame:
    """``detection.parquet`` with the paper's Table 1 columns, formatted for reading."""
    return pd.DataFrame(
        {
            "split": detection["split"],
            "total errors": detection["total_errors"],
            "skip thr.": [f"{100 * v:g}%" for v in detection["skip_threshold"]],
            "freq. thr.": ["–" if pd.isna(v) else f"{100 * v:g}%" for v in detection["freq_threshold"]],
            "metric": detection["setting"],
            "errors detected": [f"{n} ({p:.0f}%)" for n, p in zip(detection["errors_detected"], detection["errors_detected_pct"])],
            "new errors": detection["new_errors"],
            "accuracy": [f"{100 * v:.2f}%" for v in detection["accuracy"]],
            "altered acc.": [f"{100 * v:.2f}%" for v in detection["altered_accuracy"]],
        }
    )


def error_quality_frame(error_scores: pd.DataFrame) -> pd.DataFrame:
    """AUROC and AUPR per score (rows, the agreement scores first, then max softmax) and split (columns)."""
    quality = error_scores.pivot(index="score", columns="split", values=["auroc", "aupr"])
    quality.columns = [f"{metric} {split}" for metric, split in quality.columns]
    order = [name for name in SCORE_ORDER if name in quality.index]
    return quality.loc[order]


def with_interval(value: float, low: float = float("nan"), high: float = float("nan"), signed: bool = False) -> str:
    """``0.912 [0.901, 0.923]`` (``+`` signs with ``signed``); the value alone without an interval; ``–`` without a value."""
    if pd.isna(value):
        return "–"
    shown = "{:+.3f}" if signed else "{:.3f}"
    if pd.isna(low) or pd.isna(high):
        return shown.format(value)
    return f"{shown.format(value)} [{shown.format(low)}, {shown.format(high)}]"


def error_interval_frame(error_scores: pd.DataFrame, split: str) -> pd.DataFrame:
    """One split's AUROC, AUPR and AUROC minus max softmax per score, each with its bootstrap 95 % interval, as text."""
    rows = error_scores[error_scores["split"] == split].set_index("score")
    order = [name for name in SCORE_ORDER if name in rows.index]
    rows = rows.loc[order]
    missing = pd.Series(float("nan"), index=rows.index)
    softmax_auroc = rows.loc["max_softmax", "auroc"] if "max_softmax" in rows.index else float("nan")
    difference = rows["auroc_diff"] if "auroc_diff" in rows else rows["auroc"] - softmax_auroc
    return pd.DataFrame(
        {
            "AUROC [95 % CI]": [with_interval(*v) for v in zip(rows["auroc"], rows.get("auroc_lo", missing), rows.get("auroc_hi", missing))],
            "AUPR [95 % CI]": [with_interval(*v) for v in zip(rows["aupr"], rows.get("aupr_lo", missing), rows.get("aupr_hi", missing))],
            "AUROC − max softmax [95 % CI]": [
                with_interval(*v, signed=True) for v in zip(difference, rows.get("auroc_diff_lo", missing), rows.get("auroc_diff_hi", missing))
            ],
            **_within_class_columns(rows),
        },
        index=rows.index,
    )


def _within_class_columns(rows: pd.DataFrame) -> dict[str, list[str]]:
    """The Holm-adjusted p of the difference, and the within-class AUROC with its difference, where the frame has them."""
    columns: dict[str, list[str]] = {}
    if "auroc_diff_p_holm" in rows:
        columns["Holm p"] = ["–" if pd.isna(v) else f"{v:.3g}" for v in rows["auroc_diff_p_holm"]]
    if "auroc_within" in rows:
        columns["within-class AUROC [95 % CI]"] = [with_interval(*v) for v in zip(rows["auroc_within"], rows["auroc_within_lo"], rows["auroc_within_hi"])]
        columns["within-class − max softmax [95 % CI]"] = [
            with_interval(*v, signed=True) for v in zip(rows["auroc_within_diff"], rows["auroc_within_diff_lo"], rows["auroc_within_diff_hi"])
        ]
    return columns


def format_tables(detection: pd.DataFrame, error_scores: pd.DataFrame) -> str:
    """Table 1 (paper columns) and the AUROC tables, as text."""
    tau = error_scores["tau"].iloc[0] if len(error_scores) else float("nan")
    freq = error_scores["freq_threshold"].iloc[0] if len(error_scores) else float("nan")
    text = (
        "Misclassification detection (paper Table 1)\n"
        + table1_frame(detection).to_string(index=False)
        + f"\n\nError detection without thresholds (errors as positives; τ = {tau:g}, f = {freq:g})\n"
        + error_quality_frame(error_scores).to_string(float_format=lambda v: f"{v:.3f}")
    )
    if "auroc_lo" not in error_scores:
        return text
    for split in (name for name in EVALUATED_SPLITS if name in set(error_scores["split"])):
        resamples = int(error_scores.loc[error_scores["split"] == split, "bootstrap"].iloc[0])
        text += f"\n\n{split}: bootstrap 95 % intervals ({resamples} resamples of the images; the difference paired)\n"
        text += error_interval_frame(error_scores, split).to_string()
    return text
