"""The report's building blocks: figures, sections, tables, and the context every section reads."""

from __future__ import annotations

import html
import io
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from raycf.config import StudyConfig
from raycf.results.artefacts import read_final_frame, read_frame

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


def percent(values: pd.Series) -> list[str]:
    return ["–" if pd.isna(v) else f"{100 * v:.2f}" for v in values]



@dataclass
class ReportContext:
    """What every section reads: the results folder and its study."""

    results: str
    study: StudyConfig

    def frame(self, *parts: str) -> pd.DataFrame | None:
        return read_frame(self.results, *parts)

    def required(self, section: Section, *paths: str, remedy: str) -> list[pd.DataFrame] | None:
        """The tables at ``paths`` (``"analysis/detection.parquet"``); None, after a note in ``section`` naming the missing ones and ``remedy``, if any is missing."""
        frames = [read_frame(self.results, *path.split("/")) for path in paths]
        missing = [path for path, frame in zip(paths, frames) if frame is None]
        if missing:
            section.note(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: {remedy}.")
            return None
        return frames

    def final_frame(self, name: str) -> pd.DataFrame | None:
        """``final/final.parquet`` or ``final/class_recall.parquet`` (older results: at the root)."""
        return read_final_frame(self.results, name)
