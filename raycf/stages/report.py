"""Stage ``report`` (and ``raycf report RESULTS``): the study's tables and figures in one HTML page (see :mod:`raycf.outputs.report`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raycf.results import storage
from raycf.outputs.report.blocks import INDEX_FILE, REPORT_FOLDER
from raycf.outputs.report.page import build_report

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun


def run(run: "StageRun") -> dict:
    """The report of the study being run."""
    return build_report(run.results, run.output, run.study)


def describe(results: str) -> str:
    """Where the report is."""
    return f"report: {storage.join_uri(results, REPORT_FOLDER, INDEX_FILE)}"
