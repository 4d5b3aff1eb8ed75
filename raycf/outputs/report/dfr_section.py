"""The report's DFR section (``final.dfr``): the DFR baseline against the base model and the final models on the test split.

Reads ``final/dfr.parquet`` (:mod:`raycf.stages.dfr`); None when it is
absent (a study without ``final.dfr``, or one not run to the end).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from raycf.outputs.report.blocks import ReportContext, Section

METRIC_NAMES = {"acc": "test accuracy", "worst_group_acc": "worst-group accuracy", "mean_group_acc": "mean-group accuracy"}


def _percent(value: float) -> str:
    return "–" if pd.isna(value) else f"{100 * value:.1f} %"


def _points(value: float, low: float, high: float) -> str:
    return "–" if pd.isna(value) else f"{100 * value:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def dfr_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model: each metric in percent and its difference from the base model in points with the 95 % interval."""
    shown = pd.DataFrame({"model": frame["model"]})
    for name, title in METRIC_NAMES.items():
        shown[title] = [_percent(value) for value in frame[f"test_{name}"]]
        shown[f"{title} − base (points)"] = [_points(*values) for values in zip(frame[f"{name}_minus_base"], frame[f"{name}_minus_base_lo"], frame[f"{name}_minus_base_hi"])]
    shown["worst group"] = frame["worst_group"]
    return shown


def dfr_section(context: "ReportContext") -> "Section | None":
    """DFR (deep feature reweighting) against the base model and the final models: test, worst-group and mean-group accuracy."""
    from raycf.outputs.report.blocks import Section

    frame = context.final_frame("dfr.parquet")
    if frame is None:
        return None
    dfr = frame.set_index("model").loc["dfr"]
    section = Section("dfr", "DFR baseline: the base model's head refit on group-balanced validation images")
    section.paragraph(
        f"Deep feature reweighting (Kirichenko et al. 2022) keeps the base model's features and refits its linear head: an L2 logistic "
        f"regression on {int(dfr['fit_images'])} validation images of one half of the split, every group subsampled to the smallest group's "
        f"size; C = {dfr['c']:g} was chosen by worst-group accuracy on the other half ({int(dfr['tune_images'])} images). Every model is scored "
        "on the same test images; differences from the base model carry paired bootstrap 95 % intervals over those images."
    )
    section.table(dfr_table(frame), "Test accuracy, worst-group and mean-group accuracy of each model, and its difference from the base model")
    return section
