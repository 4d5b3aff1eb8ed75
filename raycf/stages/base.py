"""Stage ``base``: train (or adopt) the classifier on Ray Train, data-parallel.

Output ``<results>/base/``: ``model.pt`` (the best validation epoch, raycf's
classifier format), ``epochs.parquet`` (one row per epoch) and
``summary.json`` (best epoch, train and val accuracy; the test split is not
read here: the base model's one pass over it is the features stage's).  A
study with groups (``data.plant``, ``data.groups``) adds ``groups.parquet``
(accuracy per split and group) and the worst-group and mean-group accuracy
to the summary.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pandas as pd

from raycf.results import storage
from raycf.results.artefacts import store_ref
from raycf.models.checkpoint import CHECKPOINT_FILE
from raycf.runtime.cluster import ensure_ray
from raycf.runtime.console import log
from raycf.data.datasets import load_splits
from raycf.method.selection import best_epoch
from raycf.method.groups import predictions_group_table, split_group_metrics
from raycf.data.image_store import open_store, read_groups
from raycf.models.build import adopted_model_bytes
from raycf.outputs.predict import predict_splits
from raycf.training.base import BaseJob, base_train_loop
from raycf.training.trainer import fit

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun


def run(run: "StageRun") -> dict:
    """Train (or adopt) the base classifier; write ``model.pt``, ``epochs.parquet``, ``summary.json``."""
    import ray

    study = run.study
    ensure_ray()
    if study.base.train:
        class_names = load_splits(study.data, study.seed).class_names
        outcome = fit(
            base_train_loop,
            BaseJob(study, store_ref(run.results), class_names),
            name=f"base-{run.stage_hash}",
            storage_path=run.ray_storage(),
            workers=study.base.workers,
            use_gpu=study.base.use_gpu,
            max_failures=study.base.max_failures,
        )
        model_bytes, history = outcome.best_files[CHECKPOINT_FILE], list(outcome.return_value)
    else:
        model_bytes = adopted_model_bytes(study, load_splits(study.data, study.seed).class_names)
        history = []
    storage.write_bytes(run.path(CHECKPOINT_FILE), model_bytes)
    if history:
        storage.write_frame(pd.DataFrame(history), run.path("epochs.parquet"))
    predict = ray.remote(predict_splits).options(num_cpus=1, num_gpus=1 if study.base.use_gpu else 0)
    predictions = ray.get(predict.remote(study, store_ref(run.results), model_bytes, "base", ("train", "val"), study.base.use_gpu))
    accuracies = {f"{split}_acc": float((rows["pred"] == rows["label"]).mean()) for split, rows in predictions.groupby("split")}
    best = best_epoch(history)
    summary = {"best_epoch": int(best.get("epoch", 0)), "epochs": len(history), **{key: round(value, 6) for key, value in sorted(accuracies.items())}}
    store = open_store(store_ref(run.results))
    groups_of = {split: groups for split in ("train", "val") if (groups := read_groups(store, split)) is not None}
    if groups_of:  # a study with groups: per-group accuracy beside accuracy
        table = predictions_group_table(predictions, groups_of)
        storage.write_frame(table, run.path("groups.parquet"))
        summary.update({key: round(value, 6) for key, value in split_group_metrics(table).items()})
        log("base model groups: " + "  ".join(f"{split} worst {summary[f'{split}_worst_group_acc']:.4f} mean {summary[f'{split}_mean_group_acc']:.4f}" for split in groups_of))
    storage.write_text(run.path("summary.json"), json.dumps(summary, indent=2))
    log(
        f"base model: train_acc {summary['train_acc']:.4f}  val_acc {summary['val_acc']:.4f}"
        + (f"  (best epoch {summary['best_epoch']} of {summary['epochs']})" if history else "  (adopted from model.weights)")
    )
    return summary
