"""Stage ``debug`` (``raycf debug``): retrain with L_d at the study file's own λ, beside plain fine-tuning.

The control (λ1 = λ2 = 0) and the debugged model start from the base model
and see the same batches (:mod:`raycf.training.debug`); G is the global MC
set at ``debug.tau`` and ``debug.freq_threshold``.  Each retrained model
is then run once over every split; the base model's predictions are those
of the features stage.  Output, ``<results>/debug/``:

==========================  ====================================================
``predictions.parquet``     one row per (model, split, image): split,
                            image_index, image_id, label, model, pred, confidence
``table2.parquet``          paper Table 2: model (base, control, debugged),
                            lambda1, lambda2, indicator, best_epoch, train_acc,
                            val_acc, test_acc
``table3.parquet``          paper Table 3: the top improved and worsened classes
                            by test recall (debugged vs base): class,
                            class_index, group, recall_before, recall_after,
                            change, recall_control, support
``class_recall.parquet``    every class: class, class_index, support,
                            recall_base, recall_control, recall_debugged
``epochs.parquet``          per-epoch metrics of both runs (column ``model``)
``model.pt``, ``control.pt``  the best-validation checkpoints (raycf format)
``summary.json``            the accuracies and the debugged − control change
==========================  ====================================================
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING

import pandas as pd

from raycf.results import storage
from raycf.results.artefacts import PREDICTIONS_FILE, base_model_bytes, base_predictions, class_names
from raycf.models.checkpoint import CHECKPOINT_FILE
from raycf.runtime.cluster import ensure_ray
from raycf.runtime.console import log
from raycf.method.treatment import format_table2, format_table3, treatment_tables
from raycf.outputs.predict import predict_on_ray
from raycf.stages.jobs import debug_job, suppression_of
from raycf.training.debug import run_debug_training

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun


def run(run: "StageRun") -> dict:
    """Debug retraining and its control from the base model; Tables 2 and 3."""
    study, config = run.study, run.study.debug
    ensure_ray()
    base_bytes = base_model_bytes(run.results)
    control_job = debug_job(study, run.results, base_bytes, lambdas=(0.0, 0.0))
    global_filters = control_job.global_filters
    log(f"debug: global MC filters: {global_filters.sum(1).mean():.1f} of {global_filters.shape[1]} per class (tau {config.tau}, f {config.freq_threshold})")

    log(f"debug: control (lambda1 = lambda2 = 0), {config.epochs} epochs, {config.workers} worker(s)")
    control = run_debug_training(control_job, name=f"debug-control-{run.stage_hash}", storage_path=run.ray_storage())
    debugged_job = replace(control_job, lambda1=config.lambda1, lambda2=config.lambda2, suppress=suppression_of(study, run.results, global_filters.shape[1]))
    if config.lambda1 == config.lambda2 == 0 and debugged_job.suppress is None:
        debugged = control
    else:
        log(f"debug: debugged (lambda1 {config.lambda1:g}, lambda2 {config.lambda2:g}, indicator {config.indicator})")
        debugged = run_debug_training(debugged_job, name=f"debug-{run.stage_hash}", storage_path=run.ray_storage())

    retrained = predict_on_ray(study, control_job.images, {"control": control.best_model_bytes, "debugged": debugged.best_model_bytes})
    predictions = pd.concat([base_predictions(run.results), retrained], ignore_index=True)
    tables = treatment_tables(
        predictions, class_names(run.results), debugged_config=config, control_best_epoch=control.best_epoch, debugged_best_epoch=debugged.best_epoch
    )
    epochs = pd.concat(
        [pd.DataFrame(control.history).assign(model="control"), pd.DataFrame(debugged.history).assign(model="debugged")], ignore_index=True
    )
    files = {PREDICTIONS_FILE: predictions, "table2.parquet": tables.table2, "table3.parquet": tables.table3, "class_recall.parquet": tables.class_recall, "epochs.parquet": epochs}
    for file_name, frame in files.items():
        storage.write_frame(frame, run.path(file_name))
    storage.write_bytes(run.path(CHECKPOINT_FILE), debugged.best_model_bytes)
    storage.write_bytes(run.path("control.pt"), control.best_model_bytes)
    table2 = tables.table2.set_index("model")
    summary = {
        "lambda1": config.lambda1,
        "lambda2": config.lambda2,
        "indicator": config.indicator,
        "global_filters_per_class": round(float(global_filters.sum(1).mean()), 3),
        **{f"{model}_{split}_acc": round(float(table2.loc[model, f"{split}_acc"]), 6) for model in table2.index for split in ("train", "val", "test")},
        "control_best_epoch": control.best_epoch,
        "debugged_best_epoch": debugged.best_epoch,
    }
    summary["test_acc_change_vs_control"] = round(summary["debugged_test_acc"] - summary["control_test_acc"], 6)
    storage.write_text(run.path("summary.json"), json.dumps(summary, indent=2))
    return summary


def describe(results: str) -> str:
    """Tables 2 and 3 of a finished debug stage, as printed by ``raycf debug``."""
    folder = storage.join_uri(results, "debug")
    table2 = storage.read_table(storage.join_uri(folder, "table2.parquet")).to_pandas()
    table3 = storage.read_table(storage.join_uri(folder, "table3.parquet")).to_pandas()
    return f"{format_table2(table2)}\n\n{format_table3(table3)}"
