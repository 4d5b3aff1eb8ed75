"""Debug retraining with L_d on Ray Train, its fine-tuning control, and paper Tables 2 and 3.

The debugged model and the control are the same Ray Train function
(:func:`debug_train_loop`) with different λ: starting from the base model, the
``debug.trainable`` layers are retrained with SGD for ``debug.epochs`` epochs,
with the same data order, augmentation and dropout draws for the same seed.
The best epoch is selected on the validation split; the test split is read
once per model, by :func:`evaluate_classifier`, for the final tables.

The ``debug`` stage writes, under ``<results>/debug/``:

==========================  ====================================================
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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import ray.train
import ray.train.torch

from raycf.checkpoint import CHECKPOINT_FILE, parse_classifier_checkpoint
from raycf.config import DebugConfig, StudyConfig
from raycf.data import DataSplits, load_splits
from raycf.losses import DebugLoss, FilterStats, global_filters_tensor
from raycf.models import FilterClassifier, classifier_from_checkpoint, device_for
from raycf.training import (
    TrainState,
    best_checkpoint,
    classifier_info,
    eval_loader,
    evaluate,
    fit,
    history_of,
    print_epoch,
    quiet_worker_logs,
    report_epoch,
    restore_from_ray_checkpoint,
    seed_everything,
    train_loader,
    train_one_epoch,
    world,
    wrap_for_training,
)

PHASE = "debug"
TABLE3_TOP = 3

if TYPE_CHECKING:
    from raycf.pipeline import StageRun


# ------------------------------------------------------------ the training loop


@dataclass(frozen=True)
class FailOnce:
    """Testing aid: raise in the training loop at the start of ``epoch`` (0-based), once.

    The first failure creates ``marker``; a restarted worker group sees it
    and carries on, so recovery from the checkpoint can be exercised.
    """

    epoch: int
    marker: str

    def maybe_fail(self, epoch: int) -> None:
        if epoch == self.epoch and world()[0] == 0 and not Path(self.marker).exists():
            Path(self.marker).write_text(f"failed at the start of epoch {epoch + 1}\n")
            raise RuntimeError(f"injected failure at the start of epoch {epoch + 1}")


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of augmentation and dropout draws for one (seed, epoch, rank), as in base training."""
    return seed * 7919 + epoch * 104729 + rank


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def filter_statistics(model: FilterClassifier, loader: Iterable) -> FilterStats:
    """Per-filter mean and std of the pooled vector over ``loader``, summed across ranks."""
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(model.num_filters, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for images, _labels in loader:
        activations = model.features(images.to(device)).double()
        total += activations.sum(0)
        squares += activations.square().sum(0)
        count += len(activations)
    sums = _all_reduce_sum(torch.cat([total, squares, count]))
    k = model.num_filters
    return FilterStats.from_sums(sums[:k].cpu(), sums[k : 2 * k].cpu(), float(sums[-1]))


def debug_train_loop(loop_config: dict[str, Any]) -> list[dict[str, float]]:
    """Ray Train function: retrain the base model with L_d (λ = 0: the control).

    ``loop_config``: ``study`` (StudyConfig), ``global_filters`` (C×K bool),
    ``base_model`` (``model.pt`` bytes), ``lambda1``, ``lambda2``; optionally
    ``extra_metrics`` (constant numbers added to every report, e.g. a search
    trial's detection quality), ``print_epochs`` (default true) and
    ``fail_once`` (:class:`FailOnce`, tests only).

    Reports per epoch: epoch, lr, train_loss, train_ce, train_mc,
    train_nonmc, train_acc, val_loss, val_acc, active_mc, active_nonmc,
    epoch_s and time (unix seconds at the end of the epoch); rank 0 attaches a
    checkpoint.  Returns every epoch's metrics, those restored after a
    restart included.
    """
    study: StudyConfig = loop_config["study"]
    config = study.debug
    lambda1, lambda2 = float(loop_config["lambda1"]), float(loop_config["lambda2"])
    fail_once: FailOnce | None = loop_config.get("fail_once")
    label = "control" if lambda1 == lambda2 == 0 else "debug"
    quiet_worker_logs()
    rank, _ = world()
    device = ray.train.torch.get_device()

    splits = load_splits(study.data, study.seed)
    base = parse_classifier_checkpoint(loop_config["base_model"], "base model", study.model.arch, splits.num_classes)
    model = classifier_from_checkpoint(study.model, base).to(device)
    info = classifier_info(study, splits, model)
    stats = None
    if config.indicator == "centred":  # from the base model, before any restored weights
        stats = filter_statistics(model, eval_loader(splits.split("train"), study.features.batch_size, study.data.loader_workers))
    global_filters = global_filters_tensor(loop_config["global_filters"], model.num_classes, model.num_filters)
    loss_fn = DebugLoss(global_filters, lambda1, lambda2, config.indicator, stats).to(device)

    state = restore_from_ray_checkpoint(model) or TrainState(next_epoch=0, optimizer={}, history=[], phase=PHASE)
    wrapped, parameters = wrap_for_training(model, config.trainable)
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum)
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)

    train_data, sampler = train_loader(splits.train, config.batch_size, study.seed, study.data.loader_workers)
    val_data = eval_loader(splits.val, study.features.batch_size, study.data.loader_workers)
    for epoch in range(state.next_epoch, config.epochs):
        if fail_once is not None:
            fail_once.maybe_fail(epoch)
        started = time.time()
        seed_everything(epoch_seed(study.seed, epoch, rank))
        sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(wrapped, train_data, optimizer, loss_fn, freeze_frozen_norms=True)
        val_metrics = evaluate(wrapped, val_data)
        # Tune's status table shows the first four metrics: keep the objective among them.
        metrics = {
            "epoch": epoch + 1,
            "val_acc": val_metrics["acc"],
            "val_loss": val_metrics["loss"],
            **{key: value for key, value in train_metrics.items() if not key.startswith("train_active_")},
            "lr": config.lr,
            "active_mc": train_metrics["train_active_mc"],
            "active_nonmc": train_metrics["train_active_nonmc"],
            "epoch_s": time.time() - started,
            "time": time.time(),
            **loop_config.get("extra_metrics", {}),
        }
        state = TrainState(next_epoch=epoch + 1, optimizer={}, history=[*state.history, metrics], phase=PHASE)
        report_epoch(metrics, wrapped, optimizer, state, info)
        if loop_config.get("print_epochs", True):
            print_epoch(label, metrics, config.epochs)
    return state.history


# ------------------------------------------------------------------ the runner


@dataclass
class DebugResult:
    """One debug (or control) run: its best-validation model and its history."""

    best_model_bytes: bytes | None  # None in Ray Train local mode (no checkpoint survives)
    history: list[dict[str, float]]
    best_epoch: int
    best_val_acc: float


def run_debug_training(
    study: StudyConfig,
    global_filters: np.ndarray,
    base_model_bytes: bytes,
    *,
    lambda1: float,
    lambda2: float,
    name: str,
    storage_path: str,
    workers: int | None = None,
    callbacks: list | None = None,
    extra_metrics: dict[str, float] | None = None,
    print_epochs: bool = True,
    fail_once: FailOnce | None = None,
) -> DebugResult:
    """Fit :func:`debug_train_loop` on a TorchTrainer and return the best-validation model.

    ``workers`` defaults to ``study.debug.workers``; ``workers=0`` runs in Ray
    Train's local mode (in-process; no checkpoint is kept, so
    ``best_model_bytes`` is None but the history is complete).  ``callbacks``
    go to the RunConfig; ``extra_metrics`` are added to every epoch's report;
    ``print_epochs=False`` leaves progress to the caller (Tune's table).  A run with the same ``name`` and ``storage_path``
    resumes from its latest checkpoint.
    """
    loop_config = {
        "study": study,
        "global_filters": np.asarray(global_filters, dtype=bool),
        "base_model": base_model_bytes,
        "lambda1": float(lambda1),
        "lambda2": float(lambda2),
    }
    if fail_once is not None:
        loop_config["fail_once"] = fail_once
    if extra_metrics:
        loop_config["extra_metrics"] = dict(extra_metrics)
    loop_config["print_epochs"] = print_epochs
    workers = study.debug.workers if workers is None else workers
    result = fit(
        debug_train_loop,
        loop_config,
        name=name,
        storage_path=storage_path,
        workers=workers,
        use_gpu=study.debug.use_gpu,
        max_failures=study.debug.max_failures,
        callbacks=callbacks,
    )
    history = history_of(result)
    best = best_epoch_of(history)
    model_bytes = None
    if workers > 0:  # local mode reports checkpoints from temporary folders already gone
        with best_checkpoint(result).as_directory() as folder:
            model_bytes = Path(folder, CHECKPOINT_FILE).read_bytes()
        saved = parse_classifier_checkpoint(model_bytes, "debug checkpoint")
        best = next(row for row in history if row["epoch"] == int(saved.metrics["epoch"]))
    return DebugResult(best_model_bytes=model_bytes, history=history, best_epoch=int(best["epoch"]), best_val_acc=float(best["val_acc"]))


def best_epoch_of(history: list[dict[str, float]]) -> dict[str, float]:
    """The epoch with the highest val_acc (the earliest on ties), as :func:`best_checkpoint` picks."""
    return max(history, key=lambda row: (row["val_acc"], -row["epoch"]))


# --------------------------------------------------------------- evaluation


@dataclass
class ModelEvaluation:
    """Accuracy and per-class recall of one model on named splits."""

    accuracy: dict[str, float]  # split -> accuracy
    recall: dict[str, np.ndarray]  # split -> C recalls (NaN for a class with no image)
    support: dict[str, np.ndarray]  # split -> C image counts


@torch.no_grad()
def evaluate_classifier(
    study: StudyConfig,
    model_bytes: bytes,
    split_names: Iterable[str] = ("train", "val", "test"),
    device: torch.device | str | None = None,
    splits: DataSplits | None = None,
) -> ModelEvaluation:
    """Accuracy and per-class recall of a ``model.pt`` (bytes) on unaugmented splits.

    ``device`` defaults to a GPU of this process when ``debug.use_gpu``, else the CPU.
    """
    device = device or device_for(study.debug.use_gpu)
    splits = splits or load_splits(study.data, study.seed)
    checkpoint = parse_classifier_checkpoint(model_bytes, "model", study.model.arch, splits.num_classes)
    model = classifier_from_checkpoint(study.model, checkpoint).to(device)
    evaluation = ModelEvaluation(accuracy={}, recall={}, support={})
    for name in split_names:
        predictions, labels = [], []
        for images, batch_labels in DataLoader(splits.split(name), batch_size=study.features.batch_size):
            predictions.append(model(images.to(device)).argmax(1).cpu())
            labels.append(batch_labels)
        predicted, truth = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
        support = np.bincount(truth, minlength=splits.num_classes)
        hits = np.bincount(truth[predicted == truth], minlength=splits.num_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            evaluation.recall[name] = np.where(support > 0, hits / np.maximum(support, 1), np.nan)
        evaluation.support[name] = support
        evaluation.accuracy[name] = float((predicted == truth).mean()) if len(truth) else math.nan
    return evaluation


# ------------------------------------------------------------------- tables


def build_table2(
    base: ModelEvaluation,
    control: ModelEvaluation,
    debugged: ModelEvaluation,
    *,
    lambda1: float,
    lambda2: float,
    indicator: str,
    control_best_epoch: int | None = None,
    debugged_best_epoch: int | None = None,
) -> pd.DataFrame:
    """Paper Table 2: base, control (λ = 0) and debugged × train/val/test accuracy."""
    rows = [
        ("base", math.nan, math.nan, None, base),
        ("control", 0.0, 0.0, control_best_epoch, control),
        ("debugged", float(lambda1), float(lambda2), debugged_best_epoch, debugged),
    ]
    frame = pd.DataFrame(
        [
            {
                "model": model,
                "lambda1": l1,
                "lambda2": l2,
                "indicator": None if model == "base" else indicator,
                "best_epoch": epoch,
                **{f"{split}_acc": evaluation.accuracy.get(split, math.nan) for split in ("train", "val", "test")},
            }
            for model, l1, l2, epoch, evaluation in rows
        ]
    )
    frame["best_epoch"] = frame["best_epoch"].astype("Int64")
    return frame


def build_class_recall(class_names: list[str], base: ModelEvaluation, control: ModelEvaluation, debugged: ModelEvaluation, split: str = "test") -> pd.DataFrame:
    """Every class's recall on ``split`` under the three models."""
    return pd.DataFrame(
        {
            "class": list(class_names),
            "class_index": np.arange(len(class_names), dtype=np.int64),
            "support": base.support[split].astype(np.int64),
            "recall_base": base.recall[split],
            "recall_control": control.recall[split],
            "recall_debugged": debugged.recall[split],
        }
    )


def build_table3(class_recall: pd.DataFrame, top: int = TABLE3_TOP) -> pd.DataFrame:
    """Paper Table 3: the ``top`` most improved and most worsened classes, debugged vs base.

    Only classes whose recall changed are listed (a class with no change is
    neither improved nor worsened), so the table can have fewer rows.
    """
    frame = class_recall.assign(
        recall_before=class_recall["recall_base"],
        recall_after=class_recall["recall_debugged"],
        change=class_recall["recall_debugged"] - class_recall["recall_base"],
        recall_control=class_recall["recall_control"],
    )
    improved = frame[frame["change"] > 0].sort_values(["change", "class_index"], ascending=[False, True]).head(top).assign(group="improved")
    worsened = frame[frame["change"] < 0].sort_values(["change", "class_index"], ascending=[True, True]).head(top).assign(group="worsened")
    columns = ["class", "class_index", "group", "recall_before", "recall_after", "change", "recall_control", "support"]
    return pd.concat([improved, worsened], ignore_index=True)[columns]


def format_table2(table: pd.DataFrame) -> str:
    """Table 2 as text, accuracies in percent."""
    lines = ["Table 2: accuracy (%) of the base model, plain fine-tuning (control) and debug retraining"]
    lines.append(f"  {'model':<9} {'lambda1':>9} {'lambda2':>9} {'epoch':>5} {'train':>7} {'val':>7} {'test':>7}")
    for row in table.itertuples(index=False):
        lam1 = "-" if pd.isna(row.lambda1) else f"{row.lambda1:.3g}"
        lam2 = "-" if pd.isna(row.lambda2) else f"{row.lambda2:.3g}"
        epoch = "-" if pd.isna(row.best_epoch) else str(int(row.best_epoch))
        lines.append(
            f"  {row.model:<9} {lam1:>9} {lam2:>9} {epoch:>5} {100 * row.train_acc:>7.2f} {100 * row.val_acc:>7.2f} {100 * row.test_acc:>7.2f}"
        )
    by_model = table.set_index("model")
    change = 100 * (by_model.loc["debugged", "test_acc"] - by_model.loc["control", "test_acc"])
    lines.append(f"  debugged - control test accuracy: {change:+.2f} points")
    return "\n".join(lines)


def format_table3(table: pd.DataFrame) -> str:
    """Table 3 as text."""
    lines = ["Table 3: classes whose test recall changed most (debugged vs base)"]
    if table.empty:
        lines.append("  no class changed its test recall")
        return "\n".join(lines)
    width = max(5, *(len(str(name)) for name in table["class"]))
    lines.append(f"  {'class':<{width}} {'group':<9} {'before':>7} {'after':>7} {'change':>7} {'control':>8} {'images':>6}")
    for row in table.to_dict("records"):
        lines.append(
            f"  {row['class']:<{width}} {row['group']:<9} {row['recall_before']:>7.3f} {row['recall_after']:>7.3f} "
            f"{row['change']:>+7.3f} {row['recall_control']:>8.3f} {int(row['support']):>6d}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ the stage


def run_debug_stage(run: StageRun) -> dict:
    """Debug retraining and its control from the base model; Tables 2 and 3."""

    from raycf import storage
    from raycf.analysis import global_mc_sets
    from raycf.pipeline import ensure_ray, log

    study = run.study
    config = study.debug
    ensure_ray()
    global_filters = np.asarray(global_mc_sets(run.results, study.analysis.tau, study.analysis.freq_threshold), dtype=bool)
    base_bytes = storage.read_bytes(run.upstream("base", CHECKPOINT_FILE))
    log(f"debug: global MC filters: {global_filters.sum(1).mean():.1f} of {global_filters.shape[1]} per class (tau {study.analysis.tau}, f {study.analysis.freq_threshold})")

    log(f"debug: control (lambda1 = lambda2 = 0), {config.epochs} epochs, {config.workers} worker(s)")
    control = run_debug_training(
        study, global_filters, base_bytes, lambda1=0.0, lambda2=0.0, name=f"debug-control-{run.stage_hash}", storage_path=run.ray_storage()
    )
    if config.lambda1 == config.lambda2 == 0:
        debugged = control
    else:
        log(f"debug: debugged (lambda1 {config.lambda1:g}, lambda2 {config.lambda2:g}, indicator {config.indicator})")
        debugged = run_debug_training(
            study, global_filters, base_bytes, lambda1=config.lambda1, lambda2=config.lambda2, name=f"debug-{run.stage_hash}", storage_path=run.ray_storage()
        )

    tables = treatment_tables(
        study,
        base_bytes,
        control.best_model_bytes,
        debugged.best_model_bytes,
        debugged_config=config,
        control_best_epoch=control.best_epoch,
        debugged_best_epoch=debugged.best_epoch,
    )
    table2 = tables.table2
    epochs = pd.concat(
        [pd.DataFrame(control.history).assign(model="control"), pd.DataFrame(debugged.history).assign(model="debugged")], ignore_index=True
    )
    for frame, file_name in ((table2, "table2.parquet"), (tables.table3, "table3.parquet"), (tables.class_recall, "class_recall.parquet"), (epochs, "epochs.parquet")):
        storage.write_frame(frame, run.path(file_name))
    storage.write_bytes(run.path(CHECKPOINT_FILE), debugged.best_model_bytes)
    storage.write_bytes(run.path("control.pt"), control.best_model_bytes)
    summary = {
        "lambda1": config.lambda1,
        "lambda2": config.lambda2,
        "indicator": config.indicator,
        "global_filters_per_class": round(float(global_filters.sum(1).mean()), 3),
        **{f"{row.model}_{split}_acc": round(float(getattr(row, f"{split}_acc")), 6) for row in table2.itertuples() for split in ("train", "val", "test")},
        "control_best_epoch": control.best_epoch,
        "debugged_best_epoch": debugged.best_epoch,
    }
    summary["test_acc_change_vs_control"] = round(summary["debugged_test_acc"] - summary["control_test_acc"], 6)
    storage.write_text(run.path("summary.json"), json.dumps(summary, indent=2))
    return summary


def evaluate_on_ray(study: StudyConfig, models: Iterable[bytes]) -> list[ModelEvaluation]:
    """:func:`evaluate_classifier` for each ``model.pt`` (bytes), as parallel Ray tasks (on GPUs with ``debug.use_gpu``)."""
    import ray

    evaluate = ray.remote(evaluate_classifier).options(num_cpus=1, num_gpus=1 if study.debug.use_gpu else 0)
    return ray.get([evaluate.remote(study, model) for model in models])


@dataclass
class TreatmentTables:
    """Paper Tables 2 and 3 and every class's recall, from one evaluation of each model."""

    table2: pd.DataFrame
    class_recall: pd.DataFrame
    table3: pd.DataFrame


def treatment_tables(
    study: StudyConfig,
    base_bytes: bytes,
    control_bytes: bytes,
    debugged_bytes: bytes,
    *,
    debugged_config: DebugConfig,
    control_best_epoch: int,
    debugged_best_epoch: int,
) -> TreatmentTables:
    """Evaluate the base, control and debugged ``model.pt`` (bytes) once each (train/val/test) and tabulate them.

    ``debugged_config`` is the debug section the debugged model was trained
    with (its λ values and indicator go into Table 2).
    """
    base_eval, control_eval, debugged_eval = evaluate_on_ray(study, (base_bytes, control_bytes, debugged_bytes))
    table2 = build_table2(
        base_eval,
        control_eval,
        debugged_eval,
        lambda1=debugged_config.lambda1,
        lambda2=debugged_config.lambda2,
        indicator=debugged_config.indicator,
        control_best_epoch=control_best_epoch,
        debugged_best_epoch=debugged_best_epoch,
    )
    class_names = parse_classifier_checkpoint(base_bytes, "base model").class_names
    class_recall = build_class_recall(class_names, base_eval, control_eval, debugged_eval)
    return TreatmentTables(table2=table2, class_recall=class_recall, table3=build_table3(class_recall))


def describe_debug(results: str) -> str:
    """Tables 2 and 3 of a finished debug stage, as printed by ``raycf debug``."""
    from raycf import storage

    folder = storage.join_uri(results, "debug")
    table2 = storage.read_table(storage.join_uri(folder, "table2.parquet")).to_pandas()
    table3 = storage.read_table(storage.join_uri(folder, "table3.parquet")).to_pandas()
    return f"{format_table2(table2)}\n\n{format_table3(table3)}"


def _register() -> None:
    from raycf.pipeline import Stage, register

    register(
        Stage(
            name="debug",
            sections=("debug",),
            upstream=("masks",),
            run=run_debug_stage,
            describe=describe_debug,
            extra_hash=lambda study: (study.analysis.tau, study.analysis.freq_threshold),
        )
    )


_register()
