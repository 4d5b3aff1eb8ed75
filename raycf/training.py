"""Training on Ray Train: the base classifier, and the pieces debug retraining reuses.

The training functions are plain functions of a ``loop_config`` dict holding
typed objects (``{"study": StudyConfig, ...}``).  They run unchanged

* on Ray Train workers (``TorchTrainer``, DDP through ``prepare_model``), and
* in Ray Train's local mode (``ScalingConfig(num_workers=0)``: the function
  runs in the calling process, no Ray cluster), which the unit tests use.

Each epoch every rank calls ``ray.train.report``; rank 0 attaches a checkpoint
folder holding ``model.pt`` (the classifier format of
:mod:`raycf.checkpoint`) and ``train_state.pt`` (epoch, optimiser state and
the metric history), so a restarted worker group resumes where it stopped.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from raycf.checkpoint import CHECKPOINT_FILE, ClassifierCheckpoint, load_classifier_checkpoint, unwrap_state_dict
from raycf.config import StudyConfig
from raycf.data import DataSplits, load_splits
from raycf.models import FilterClassifier, build_model, classifier_from_checkpoint, device_for

if TYPE_CHECKING:
    from raycf.pipeline import StageRun

TRAIN_STATE_FILE = "train_state.pt"


# ----------------------------------------------------------------- utilities


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def quiet_worker_logs() -> None:
    """Inside a training worker: Ray Train's per-report INFO lines off (our epoch line says it)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Ray 2.60 logs each report on a logger named after the module's file path.
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def world() -> tuple[int, int]:
    """(rank, world size) of this training worker."""
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def train_loader(dataset: Dataset, global_batch_size: int, seed: int, loader_workers: int = 0) -> tuple[DataLoader, DistributedSampler]:
    """A shuffled loader over this rank's shard; data order depends only on (seed, epoch).

    The sampler is built explicitly (rather than by ``prepare_data_loader``)
    so the order is reproducible: the control and the debugged run see the
    same batches, and a resumed run sees what it would have seen.
    """
    rank, size = world()
    sampler = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    loader = DataLoader(
        dataset,
        batch_size=max(1, global_batch_size // size),
        sampler=sampler,
        num_workers=loader_workers,
        persistent_workers=loader_workers > 0,
    )
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False), sampler


def eval_loader(dataset: Dataset, batch_size: int, loader_workers: int = 0) -> DataLoader:
    """A loader over this rank's contiguous-stride shard, with no padding duplicates."""
    rank, size = world()
    shard = Subset(dataset, list(range(rank, len(dataset), size)))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=loader_workers)
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)


def all_reduce_sums(sums: dict[str, float]) -> dict[str, float]:
    """Sum a dict of numbers over all ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(sums)
    keys = sorted(sums)
    tensor = torch.tensor([float(sums[key]) for key in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.cpu().tolist()))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | None = None) -> dict[str, float]:
    """Loss and accuracy of ``model`` over ``loader``, summed over all ranks."""
    model.eval()
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for images, labels in loader:
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        logits = model(images)
        sums["loss"] += float(F.cross_entropy(logits, labels, reduction="sum"))
        sums["correct"] += float((logits.argmax(1) == labels).sum())
        sums["count"] += len(labels)
    totals = all_reduce_sums(sums)
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss"] / count, "acc": totals["correct"] / count, "count": totals["count"]}


def wrap_for_training(model: FilterClassifier, scope: str) -> tuple[nn.Module, list[nn.Parameter]]:
    """Freeze all but ``scope`` and wrap in DDP (only the trainable parameters sync)."""
    parameters = model.set_trainable(scope)
    return ray.train.torch.prepare_model(model), parameters


def inner(model: nn.Module) -> FilterClassifier:
    """The classifier inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


# ------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    """What a training run needs to resume: next epoch, optimiser state, history."""

    next_epoch: int
    optimizer: dict[str, Any]
    history: list[dict[str, float]]
    phase: str


def report_epoch(
    metrics: dict[str, float],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    classifier_info: dict[str, Any],
) -> None:
    """``ray.train.report`` on every rank; rank 0 attaches the checkpoint folder."""
    rank, _ = world()
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = ClassifierCheckpoint(state_dict=unwrap_state_dict(model), metrics=metrics, **classifier_info)
        Path(folder, CHECKPOINT_FILE).write_bytes(checkpoint.to_bytes())
        buffer = io.BytesIO()
        torch.save(
            {"next_epoch": state.next_epoch, "optimizer": optimizer.state_dict(), "history": state.history, "phase": state.phase},
            buffer,
        )
        Path(folder, TRAIN_STATE_FILE).write_bytes(buffer.getvalue())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def print_epoch(run: str, metrics: dict[str, float], total_epochs: int) -> None:
    """One progress line per epoch, from rank 0 only."""
    if world()[0] != 0:
        return
    shown = "  ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key.endswith(("loss", "acc")))
    print(f"[raycf] {run} epoch {metrics['epoch']}/{total_epochs}  {shown}", flush=True)


def read_train_state(folder: str | Path) -> TrainState:
    """The ``train_state.pt`` of a checkpoint folder (weights-only load)."""
    payload = torch.load(Path(folder, TRAIN_STATE_FILE), map_location="cpu", weights_only=True)
    return TrainState(next_epoch=payload["next_epoch"], optimizer=payload["optimizer"], history=list(payload["history"]), phase=payload["phase"])


def restore_from_ray_checkpoint(model: FilterClassifier) -> TrainState | None:
    """Load the latest checkpoint Ray Train hands a (re)started worker, if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        saved = load_classifier_checkpoint(str(Path(folder, CHECKPOINT_FILE)), expected_arch=model.arch, expected_classes=model.num_classes)
        model.load_state_dict(saved.state_dict)
        return read_train_state(folder)


def classifier_info(study: StudyConfig, splits: DataSplits, model: FilterClassifier) -> dict[str, Any]:
    """The checkpoint header fields of :class:`ClassifierCheckpoint`."""
    return {
        "arch": model.arch,
        "num_filters": model.num_filters,
        "num_classes": model.num_classes,
        "class_names": list(splits.class_names),
        "image_size": study.data.image_size,
        "config_hash": study.config_hash(),
    }


# ------------------------------------------------------------ base training


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs with one trainable scope and learning rate."""

    name: str
    scope: str
    lr: float
    epochs: int


def base_phases(study: StudyConfig) -> list[Phase]:
    """Head-only warm-up (if any), then all layers (METHOD §1's recipe)."""
    phases = []
    if study.base.head_epochs:
        phases.append(Phase("head", "head", study.base.head_lr, study.base.head_epochs))
    phases.append(Phase("all", "all", study.base.lr, study.base.epochs))
    return phases


def phase_at(phases: list[Phase], epoch: int) -> tuple[Phase, int]:
    """The phase an epoch belongs to, and the epoch's index within it."""
    start = 0
    for phase in phases:
        if epoch < start + phase.epochs:
            return phase, epoch - start
        start += phase.epochs
    raise ValueError(f"epoch {epoch} is past the last phase")


def scheduled_lr(phase: Phase, index: int, schedule: str) -> float:
    """Learning rate of the ``index``-th epoch of ``phase``: constant or cosine decay to 0."""
    if schedule == "cosine":
        return 0.5 * phase.lr * (1 + math.cos(math.pi * index / phase.epochs))
    return phase.lr


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    freeze_frozen_norms: bool = False,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss parts and accuracy over all ranks.

    ``loss_fn(logits, activations, labels)`` returns the loss and a dict of
    its parts (per-batch means) to report.  ``freeze_frozen_norms``: see
    :func:`set_train_mode`.
    """
    set_train_mode(model, freeze_frozen_norms)
    sums: dict[str, float] = {"correct": 0.0, "count": 0.0}
    for images, labels in loader:
        logits, activations = _logits_and_features(model, images)
        loss, parts = loss_fn(logits, activations, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch = len(labels)
        sums["correct"] += float((logits.argmax(1) == labels).sum())
        sums["count"] += batch
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value) * batch
    totals = all_reduce_sums(sums)
    count = max(totals.pop("count"), 1.0)
    correct = totals.pop("correct")
    return {"train_acc": correct / count, **{f"train_{key}": value / count for key, value in totals.items()}}


def set_train_mode(model: nn.Module, freeze_frozen_norms: bool = False) -> None:
    """``model.train()``; with ``freeze_frozen_norms``, BatchNorm layers whose
    parameters are all frozen stay in eval mode, so a frozen part of the network
    keeps its running statistics too (Keras' behaviour for non-trainable BatchNorm).
    """
    model.train()
    if freeze_frozen_norms:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
                module.eval()


def _logits_and_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # DDP only syncs gradients through its own forward(); call it, and get the
    # pooled vector from a forward hook on the classifier's pooling block.
    captured: list[torch.Tensor] = []
    handle = inner(model).pool.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return logits, captured[-1]


def cross_entropy_loss(logits: torch.Tensor, _activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    loss = F.cross_entropy(logits, labels)
    return loss, {"loss": float(loss.detach())}


def base_train_loop(loop_config: dict[str, Any]) -> list[dict[str, float]]:
    """Ray Train function: train the classifier of ``loop_config["study"]``.

    Reports per epoch: epoch, phase, lr, train_loss, train_acc, val_loss,
    val_acc; checkpoints every epoch (rank 0).  Returns every epoch's metrics
    (``Result.return_value``), including those restored after a restart.
    """
    study: StudyConfig = loop_config["study"]
    quiet_worker_logs()
    rank, _ = world()
    seed_everything(study.seed)  # identical initial weights on every rank
    splits = load_splits(study.data, study.seed)
    model = build_model(study.model, splits.num_classes)
    info = classifier_info(study, splits, model)
    phases = base_phases(study)
    total_epochs = sum(phase.epochs for phase in phases)
    state = restore_from_ray_checkpoint(model) or TrainState(next_epoch=0, optimizer={}, history=[], phase="")

    train_data, sampler = train_loader(splits.train, study.base.batch_size, study.seed, study.data.loader_workers)
    val_data = eval_loader(splits.val, study.base.batch_size, study.data.loader_workers)

    wrapped, optimizer, current = None, None, None
    for epoch in range(state.next_epoch, total_epochs):
        phase, index = phase_at(phases, epoch)
        if phase != current:
            wrapped, parameters = wrap_for_training(inner(wrapped) if wrapped is not None else model, phase.scope)
            optimizer = torch.optim.SGD(parameters, lr=phase.lr, momentum=study.base.momentum, weight_decay=study.base.weight_decay)
            if state.phase == phase.name and state.optimizer:
                optimizer.load_state_dict(state.optimizer)
            current = phase
        lr = scheduled_lr(phase, index, study.base.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        seed_everything(study.seed * 7919 + epoch * 104729 + rank)  # augmentation and dropout per (epoch, rank)
        sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(wrapped, train_data, optimizer, cross_entropy_loss)
        val_metrics = evaluate(wrapped, val_data)
        metrics = {"epoch": epoch + 1, "phase": phase.name, "lr": lr, **train_metrics, "val_loss": val_metrics["loss"], "val_acc": val_metrics["acc"]}
        state = TrainState(next_epoch=epoch + 1, optimizer={}, history=[*state.history, metrics], phase=phase.name)
        report_epoch(metrics, wrapped, optimizer, state, info)
        print_epoch("base", metrics, total_epochs)
    return state.history


# ------------------------------------------------------------ the trainer


def fit(
    train_fn: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    name: str,
    storage_path: str,
    workers: int,
    use_gpu: bool,
    max_failures: int,
    metric: str = "val_acc",
    callbacks: list | None = None,
) -> ray.train.Result:
    """Run ``train_fn`` on a TorchTrainer with ``workers`` DDP workers.

    Keeps the best checkpoint by ``metric`` (and always the latest, for
    resuming); ``workers=0`` runs in Ray Train's local mode.
    """
    from ray.train.torch import TorchTrainer

    configure_ray_train()
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order="max"
            ),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()


def configure_ray_train() -> None:
    """Ray Train settings raycf relies on, set once in the driver (environment defaults).

    Ray Train propagates these variables from the driver to its controller and
    workers: plain ``print`` (not re-logged through Train's logger, which
    doubles every line), no preemption watcher (a cloud-spot feature whose
    start-up logs an error line on every run), a patient worker start and a
    prompt controller.  A user's own setting of any of them wins.
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Worker start-up imports torch; on a loaded laptop or CI box it can take
    # longer than Ray's 60 s default, which Ray would count as a failure.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    # A worker's report waits for the controller's next poll (2 s by default):
    # with epochs of a second or two that doubled every run on small studies.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def best_checkpoint(result: ray.train.Result, metric: str = "val_acc") -> ray.train.Checkpoint:
    """The reported checkpoint with the highest ``metric`` (the earliest on ties)."""
    candidates = result.best_checkpoints or ([(result.checkpoint, result.metrics)] if result.checkpoint else [])
    if not candidates:
        raise RuntimeError("training reported no checkpoint")
    return max(candidates, key=lambda item: (item[1][metric], -item[1].get("epoch", 0)))[0]


def history_of(result: ray.train.Result) -> list[dict[str, float]]:
    """Every epoch's metrics: what the training function returned (rank 0)."""
    if result.return_value is not None:
        return list(result.return_value)
    with result.checkpoint.as_directory() as folder:  # a resumed run that had nothing left to do
        return read_train_state(folder).history


@torch.no_grad()
def accuracy_on_splits(model: FilterClassifier, splits: DataSplits, names: Iterable[str], batch_size: int = 256, device: str = "cpu") -> dict[str, float]:
    """Plain (unaugmented, unsharded) accuracy of ``model`` on named splits."""
    model = model.to(device).eval()
    accuracies = {}
    for name in names:
        loader = DataLoader(splits.split(name), batch_size=batch_size)
        correct = count = 0
        for images, labels in loader:
            correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
            count += len(labels)
        accuracies[f"{name}_acc"] = correct / max(count, 1)
    return accuracies


# ------------------------------------------------------------ the base stage


def load_base_model(results: str, study: StudyConfig, num_classes: int | None = None) -> tuple[FilterClassifier, ClassifierCheckpoint]:
    """The base stage's classifier (``<results>/base/model.pt``), in eval mode on the CPU."""
    from raycf import storage

    location = storage.join_uri(results, "base", CHECKPOINT_FILE)
    checkpoint = load_classifier_checkpoint(location, expected_arch=study.model.arch, expected_classes=num_classes)
    return classifier_from_checkpoint(study.model, checkpoint), checkpoint


def _evaluate_base(study: StudyConfig, model_bytes: bytes, use_gpu: bool) -> dict[str, float]:
    from raycf.checkpoint import parse_classifier_checkpoint

    splits = load_splits(study.data, study.seed)
    checkpoint = parse_classifier_checkpoint(model_bytes, "base model", study.model.arch, splits.num_classes)
    model = classifier_from_checkpoint(study.model, checkpoint)
    return accuracy_on_splits(model, splits, ("train", "val", "test"), batch_size=study.features.batch_size, device=device_for(use_gpu))


def run_base_stage(run: StageRun) -> dict:
    """Train (or adopt) the base classifier; write ``model.pt``, ``epochs.parquet``, ``summary.json``."""
    import json

    import pandas as pd
    import ray

    from raycf import storage
    from raycf.pipeline import ensure_ray, log

    study = run.study
    ensure_ray()
    if study.base.train:
        result = fit(
            base_train_loop,
            {"study": study},
            name=f"base-{run.stage_hash}",
            storage_path=run.ray_storage(),
            workers=study.base.workers,
            use_gpu=study.base.use_gpu,
            max_failures=study.base.max_failures,
        )
        with best_checkpoint(result).as_directory() as folder:
            model_bytes = Path(folder, CHECKPOINT_FILE).read_bytes()
        history = history_of(result)
    else:
        splits = load_splits(study.data, study.seed)
        model_bytes = load_classifier_checkpoint(study.model.weights, study.model.arch, splits.num_classes).to_bytes()
        history = []
    storage.write_bytes(run.path(CHECKPOINT_FILE), model_bytes)
    if history:
        storage.write_frame(pd.DataFrame(history), run.path("epochs.parquet"))
    evaluate_remote = ray.remote(_evaluate_base).options(num_cpus=1, num_gpus=1 if study.base.use_gpu else 0)
    accuracies = ray.get(evaluate_remote.remote(study, model_bytes, study.base.use_gpu))
    best = max(history, key=lambda row: (row["val_acc"], -row["epoch"])) if history else {}
    summary = {
        "best_epoch": int(best.get("epoch", 0)),
        "epochs": len(history),
        **{key: round(value, 6) for key, value in accuracies.items()},
    }
    storage.write_text(run.path("summary.json"), json.dumps(summary, indent=2))
    log(
        f"base model: train_acc {summary['train_acc']:.4f}  val_acc {summary['val_acc']:.4f}  test_acc {summary['test_acc']:.4f}"
        + (f"  (best epoch {summary['best_epoch']} of {summary['epochs']})" if history else "  (adopted from model.weights)")
    )
    return summary


def _register() -> None:
    from raycf.pipeline import Stage, register

    register(Stage(name="base", sections=("data", "model", "base"), upstream=(), run=run_base_stage))


_register()
