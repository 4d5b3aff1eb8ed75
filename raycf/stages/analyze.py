"""Stage ``analyze``: global MC filters, misclassification detection (paper Table 1), error scores.

pandas and numpy over the ``masks/<split>/`` Parquet (no Ray): the method is
:mod:`raycf.method.global_mc` and :mod:`raycf.method.detection`.  Outputs
under ``<results>/analysis/``: ``global_mc.parquet``, ``detection.parquet``,
``error_scores.parquet`` (with bootstrap intervals), ``learned_detector.parquet``
(:mod:`raycf.method.learned_detector`; columns in docs/results-folder.md), ``flagged.parquet`` (one row
per test image, most suspicious first: :mod:`raycf.method.flagged`) and ``summary.json``;
a planted study adds ``plant.parquet`` and ``plant_effect.parquet`` (:mod:`raycf.stages.plant_analysis`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from raycf.results import storage
from raycf.results.artefacts import load_masks, load_study_data, read_frame
from raycf.runtime.console import log
from raycf.method.detection import EVALUATED_SPLITS, analyse
from raycf.method.detection_tables import format_tables
from raycf.method.flagged import flagged_frame
from raycf.method.learned_detector import coefficient_frame, detector_summary, learned_detector_frame

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun


def describe(results: str) -> str:
    """The analysis tables of a results folder, as printed by ``raycf analyze``."""
    folder = storage.join_uri(results, "analysis")
    detection = storage.read_table(storage.join_uri(folder, "detection.parquet")).to_pandas()
    error_scores = storage.read_table(storage.join_uri(folder, "error_scores.parquet")).to_pandas()
    text = format_tables(detection, error_scores)
    learned = read_frame(results, "analysis", "learned_detector.parquet")
    if learned is not None:
        coefficients = coefficient_frame(learned).to_string(float_format=lambda v: f"{v:+.3f}")
        text += f"\n\n{detector_summary(learned)}\nCoefficients (log-odds per standard deviation)\n{coefficients}"
    return text


def run(run: "StageRun") -> dict:
    """Write ``global_mc.parquet``, ``detection.parquet``, ``error_scores.parquet``, ``learned_detector.parquet``, ``summary.json``."""
    analysis, seed = run.study.analysis, run.study.seed
    data = load_study_data(run.results, detector_signals=True)
    tables = analyse(data, analysis, seed)
    tables["learned_detector"] = learned_detector_frame(data, analysis.tau, analysis.freq_threshold, analysis.bootstrap, seed)
    test_ids = [str(image_id) for image_id in load_masks(run.results, "test", ["image_id"])["image_id"]]
    tables["flagged"] = flagged_frame(data, analysis, test_ids)
    for name, frame in tables.items():
        storage.write_frame(frame, run.path(f"{name}.parquet"))
    scores = tables["error_scores"].set_index(["split", "score"])
    summary: dict[str, float] = {}
    for split in EVALUATED_SPLITS:
        summary[f"{split}_errors"] = int(scores.loc[(split, "f1"), "errors"])
        for name, key in (("f1", "det"), ("max_softmax", "maxsoftmax"), ("max_softmax_x_f1", "combined")):
            summary[f"{split}_{key}_auroc"] = _rounded(scores.loc[(split, name), "auroc"])
            summary[f"{split}_{key}_aupr"] = _rounded(scores.loc[(split, name), "aupr"])
            for bound in ("lo", "hi"):
                summary[f"{split}_{key}_auroc_{bound}"] = _rounded(scores.loc[(split, name), f"auroc_{bound}"])
        for bound in ("", "_lo", "_hi"):  # the F1 agreement minus max softmax, paired
            summary[f"{split}_det_auroc_diff{bound}"] = _rounded(scores.loc[(split, "f1"), f"auroc_diff{bound}"])
        for name, key in (("f1_centred", "det_centred"), ("mc_size", "mcsize")):  # the class-aware F1 and the set size alone
            for bound in ("", "_lo", "_hi"):
                summary[f"{split}_{key}_auroc{bound}"] = _rounded(scores.loc[(split, name), f"auroc{bound}"])
        summary[f"{split}_det_auroc_within"] = _rounded(scores.loc[(split, "f1"), "auroc_within"])
    log(
        "analyze: AUROC of 'the prediction is wrong': "
        + "; ".join(
            f"{split} ({summary[f'{split}_errors']} errors) F1 agreement {_shown(summary[f'{split}_det_auroc'])}, "
            f"max softmax {_shown(summary[f'{split}_maxsoftmax_auroc'])}, combined {_shown(summary[f'{split}_combined_auroc'])}"
            for split in EVALUATED_SPLITS
        )
    )
    summary.update(_learned_summary(tables["learned_detector"]))
    log(f"analyze: {detector_summary(tables['learned_detector'])}")
    global_mc = tables["global_mc"]
    summary["global_set_size"] = _rounded(global_mc.groupby("class")["in_global"].sum().mean())
    if run.study.data.plant is not None:  # a planted study: does the base model use the bug, does the method point at it
        from raycf.stages.plant_analysis import write_plant_analysis

        summary.update(write_plant_analysis(run, global_mc))
    storage.write_text(run.path("summary.json"), json.dumps(summary, indent=2))
    return summary


def _learned_summary(learned: pd.DataFrame) -> dict:
    """The learned detectors' test AUROC and the paired difference, for summary.json."""
    rows = learned.set_index("detector")
    summary = {f"test_learned_{name.replace('+', '_')}_auroc": _rounded(rows.loc[name, "auroc"]) for name in rows.index}
    last = rows.iloc[-1]
    summary.update({f"test_learned_auroc_diff{bound}": _rounded(last[f"auroc_diff{bound}"]) for bound in ("", "_lo", "_hi")})
    summary["learned_detector_reason"] = str(last["reason"])
    return summary


def _shown(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def _rounded(value: float) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 6)
