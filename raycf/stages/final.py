"""Stage ``final``: the best searched trial and the control, each run once over every split (paper Tables 2 and 3).

The debugged model is the best *searched* trial under the search's
objective and tie rule (:mod:`raycf.method.selection`); the control (plain
fine-tuning, λ1 = λ2 = 0) is never the debugged model.  When the control
ranks above every searched trial, ``final.parquet`` (column ``verdict``),
the report and the printed summary say so.  The control must have run its
whole schedule; one stopped early by ASHA (or failed) is retrained here.

Each retrained model is run once over train, val and test
(``final/predictions.parquet``); the base model's rows come from the
features stage.  Tables 2 and 3 and ``class_recall.parquet`` are computed
from those rows: the test split is read once per model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from raycf import storage
from raycf.artefacts import PREDICTIONS_FILE, base_model_bytes, base_predictions, class_names, global_mc_sets, prefix_ref, store_ref, trial_model_bytes
from raycf.cluster import ensure_ray
from raycf.config import StudyConfig
from raycf.console import log
from raycf.leaderboard import read_leaderboard, sort_by_objective
from raycf.method.selection import selection_key
from raycf.method.treatment import format_table2, format_table3, treatment_tables
from raycf.predict import predict_on_ray
from raycf.searcher import control_point, parameter_names, trial_study
from raycf.training.debug import DebugJob, run_debug_training

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun


def best_searched_trial(board: pd.DataFrame, study: StudyConfig) -> pd.Series:
    """The best finished trial that is not the control."""
    searched = board[(board["status"] != "error") & ~board["is_control"]]
    ranked = sort_by_objective(searched, study.search.metric, study.search.mode)
    if ranked.empty:
        raise RuntimeError("the search finished no searched trial: nothing to evaluate (see the error column of leaderboard.parquet)")
    return ranked.iloc[0]


def control_verdict(board: pd.DataFrame, best: pd.Series, study: StudyConfig) -> str:
    """One sentence when the control ranks strictly above every searched trial on validation, else ``""``.

    Strictly: a better objective, or the same objective and a lower validation
    loss (the tie rule); a control tied on both has not beaten anything.
    """
    controls = board[board["is_control"] & (board["status"] != "error")]
    if controls.empty:
        return ""
    control, metric, mode = controls.iloc[0], study.search.metric, study.search.mode
    if not selection_key(control, metric, mode) < selection_key(best, metric, mode):
        return ""
    how = "a better" if control[metric] != best[metric] else "the same"
    return (
        f"The control (plain fine-tuning, lambda1 = lambda2 = 0) beat every searched trial on validation: "
        f"{how} {metric} ({control[metric]:.4f} against {best[metric]:.4f}) and a validation loss of {control['val_loss']:.4f} "
        f"against {best['val_loss']:.4f}; the debugged row is the best searched trial, {best['trial_id']}."
    )


def full_control(board: pd.DataFrame, base_bytes: bytes) -> tuple[pd.Series | None, bytes | None]:
    """The control's row and its model, when it ran its whole schedule."""
    controls = board[board["is_control"]]
    if controls.empty:
        return None, None
    control = controls.iloc[0]
    if control["status"] != "completed":
        return control, None
    return control, trial_model_bytes(control, base_bytes)


def run(run: "StageRun") -> dict:
    """Write ``final.parquet``, ``class_recall.parquet`` and ``final/`` (predictions, Tables 2 and 3)."""
    study, results = run.study, run.results
    ensure_ray()
    board = read_leaderboard(results)
    best = best_searched_trial(board, study)
    base_bytes = base_model_bytes(results)
    best_bytes = trial_model_bytes(best, base_bytes)
    if best_bytes is None:
        raise RuntimeError(f"best trial {best['trial_id']}: its checkpoint {best['checkpoint_path']!r} is gone")
    control, control_bytes = full_control(board, base_bytes)
    if control_bytes is None:
        # Stopped early by ASHA, failed, or not searched: the comparison needs the full schedule.
        log("final: training the control (lambda1 = lambda2 = 0) for the full schedule")
        control_study = trial_study(study, control_point(study))
        filters = global_mc_sets(results, control_study.analysis.tau, control_study.debug.freq_threshold)
        job = DebugJob(
            study=control_study, global_filters=filters, base_model=base_bytes, lambda1=0.0, lambda2=0.0, images=store_ref(results), prefix=prefix_ref(results, control_study)
        )
        control_run = run_debug_training(job, name=f"final-{run.stage_hash}-control", storage_path=run.ray_storage())
        control_bytes, control_epoch = control_run.best_model_bytes, control_run.best_epoch
    else:
        control_epoch = int(control["best_epoch"])
    names = parameter_names(study)
    retrained = predict_on_ray(study, store_ref(results), {"control": control_bytes, "debugged": best_bytes})
    predictions = pd.concat([base_predictions(results), retrained], ignore_index=True)
    tables = treatment_tables(
        predictions,
        class_names(results),
        debugged_config=trial_study(study, {name: best[name] for name in names}).debug,
        control_best_epoch=control_epoch,
        debugged_best_epoch=int(best["best_epoch"]),
    )
    verdict = control_verdict(board, best, study)
    final = final_frame(tables.table2, names, control_point(study) if control is None else control, best, verdict)
    final.insert(1, "trial_id", ["", "" if control is None else str(control["trial_id"]), str(best["trial_id"])])
    storage.write_frame(predictions, run.path(PREDICTIONS_FILE))
    storage.write_frame(tables.table2, run.path("table2.parquet"))
    storage.write_frame(tables.table3, run.path("table3.parquet"))
    storage.write_frame(final, storage.join_uri(results, "final.parquet"))
    storage.write_frame(tables.class_recall, storage.join_uri(results, "class_recall.parquet"))
    print(summary_text(tables.table2, tables.table3, verdict), flush=True)
    rows = tables.table2.set_index("model")
    return {
        "best_trial": str(best["trial_id"]),
        "control_beats_searched": bool(verdict),
        **{f"{model}_{split}_acc": round(float(rows.loc[model, f"{split}_acc"]), 6) for model in rows.index for split in ("train", "val", "test")},
    }


def final_frame(table2: pd.DataFrame, names: list[str], control, best: pd.Series, verdict: str) -> pd.DataFrame:
    """``final.parquet``: Table 2's rows with every searched parameter's value and the verdict on the control."""
    parameters = pd.DataFrame(
        [{name: np.nan for name in names}, {name: float(control[name]) for name in names}, {name: float(best[name]) for name in names}]
    )
    final = pd.concat([table2.drop(columns=["lambda1", "lambda2"]), parameters], axis=1)
    final["control_beats_searched"] = bool(verdict)
    final["verdict"] = verdict
    return final


def summary_text(table2: pd.DataFrame, table3: pd.DataFrame, verdict: str) -> str:
    """Tables 2 and 3 as printed at the end of a study, with the verdict on the control when there is one."""
    text = f"{format_table2(table2)}\n\n{format_table3(table3)}"
    return f"{text}\n\n{verdict}" if verdict else text


def describe(results: str) -> str:
    """Tables 2 and 3 of the study's best searched trial."""
    folder = storage.join_uri(results, "final")
    table2 = storage.read_table(storage.join_uri(folder, "table2.parquet")).to_pandas()
    table3 = storage.read_table(storage.join_uri(folder, "table3.parquet")).to_pandas()
    final = storage.read_table(storage.join_uri(results, "final.parquet")).to_pandas()
    return summary_text(table2, table3, str(final["verdict"].iloc[0]) if "verdict" in final else "")
