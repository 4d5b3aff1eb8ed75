"""Base training of the classifier (METHOD §1): a head-only warm-up, then all layers.

:func:`base_train_loop` runs unchanged on Ray Train workers (DDP) and in this
process; each epoch every rank reports, and rank 0 attaches a checkpoint
(``model.pt`` and ``train_state.pt``) so a restarted worker group resumes
where it stopped.  Images come from the uint8 image store and are augmented
afresh every epoch on the device; the data order, the augmentation and the
dropout draws depend only on (seed, epoch, image, rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raycf.models.checkpoint import CHECKPOINT_FILE, checkpoint_of, load_classifier_checkpoint
from raycf.config import StudyConfig
from raycf.runtime.console import log, shown_epochs
from raycf.data.image_store import StoredImages, StoreRef, open_store
from raycf.method.selection import SCORE_KEY, checkpoint_scores
from raycf.models.contract import FilterClassifier
from raycf.models.build import build_model
from raycf.models.precision import Precision, prepare_device, prepare_model
from raycf.training.loops import FlopCount, cross_entropy_loss, device_batches, epoch_seed, eval_loader, evaluate, seed_everything, train_loader, train_one_epoch
from raycf.training.session import TRAIN_STATE_FILE, Session, TrainState
from raycf.data.views import epoch_seeds, model_inputs


@dataclass(frozen=True)
class BaseJob:
    """What base training needs: the study (data, model, base sections), its image store and class names."""

    study: StudyConfig
    images: StoreRef
    class_names: list[str]


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


def restore_classifier(session: Session, model: FilterClassifier) -> TrainState | None:
    """Load the checkpoint the session hands a (re)started run into ``model``; its train state, or None."""
    with session.checkpoint() as folder:
        if folder is None:
            return None
        saved = load_classifier_checkpoint(str(Path(folder, CHECKPOINT_FILE)), expected_arch=model.arch, expected_classes=model.num_classes)
        model.load_state_dict(saved.state_dict, strict=not saved.partial)  # a partial one: the model holds its base already
        return TrainState.read(folder)


def report_epoch(
    session: Session,
    metrics: dict[str, Any],
    model: nn.Module,
    state: TrainState,
    class_names: list[str],
    study: StudyConfig,
    objective: tuple[str, str] = ("val_acc", "max"),
    base_hash: str = "",
    extra_files: dict[str, bytes] | None = None,
    only_improving: bool = False,
) -> None:
    """Report an epoch with its selection score under ``objective`` (metric, mode); rank 0 attaches ``model.pt`` and ``train_state.pt``.

    With ``base_hash``, ``model.pt`` is partial: the trainable layers only (:func:`raycf.models.checkpoint.checkpoint_of`).
    ``extra_files``: more files of rank 0's checkpoint folder (the validation predictions).
    ``only_improving``: attach them only to an epoch that is the best so far
    (the only checkpoint a run keeps; a restarted run resumes from it and
    redraws the later epochs, which depend only on (seed, epoch)).
    """
    score = checkpoint_scores(state.history, *objective)[-1]
    metrics = {**metrics, SCORE_KEY: score}
    if session.rank != 0 or (only_improving and not float(score).is_integer()):
        session.report(metrics)
        return
    checkpoint = checkpoint_of(model, class_names, study.data.image_size, study.config_hash(), metrics, base_hash)
    session.report(metrics, {CHECKPOINT_FILE: checkpoint.to_bytes(), TRAIN_STATE_FILE: state.to_bytes(), **(extra_files or {})})


def print_epoch(session: Session, run: str, metrics: dict[str, Any], total_epochs: int) -> None:
    """A progress line for about five epochs of a run (every epoch in verbose mode), from rank 0 only."""
    if session.rank != 0 or int(metrics["epoch"]) not in shown_epochs(total_epochs):
        return
    shown = "  ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key.endswith(("loss", "acc")))
    log(f"{run} epoch {metrics['epoch']}/{total_epochs}  {shown}  {metrics.get('images_per_s', 0):.0f} images/s")


def base_train_loop(job: BaseJob, session: Session) -> list[dict[str, Any]]:
    """Train the classifier of ``job.study``; returns every epoch's metrics (restored ones included).

    Reports per epoch: epoch, phase, lr, train_loss, train_acc, val_loss,
    val_acc, images_per_s (and the selection score).
    """
    study, data = job.study, job.study.data
    rank, world_size, device = session.rank, session.world_size, session.device
    prepare_device(device)
    precision = Precision.of(study.model.precision, device)
    seed_everything(study.seed)  # identical initial weights on every rank
    model = prepare_model(build_model(study.model, len(job.class_names), dataset_classes=job.class_names), device)
    phases = base_phases(study)
    total_epochs = sum(phase.epochs for phase in phases)
    state = restore_classifier(session, model) or TrainState()
    store = open_store(job.images)
    train_data, sampler = train_loader(StoredImages(store, "train"), study.base.batch_size, study.seed, rank, world_size, data.loader_workers)
    val_data = eval_loader(StoredImages(store, "val"), study.base.eval_batch_size, rank, world_size, data.loader_workers)
    plain = lambda images, _indices: model_inputs(images, data.image_size, preprocess=data.preprocess)  # noqa: E731 - the evaluation transform

    wrapped, optimizer, current = model, None, None
    for epoch in range(state.next_epoch, total_epochs):
        phase, index = phase_at(phases, epoch)
        if phase != current:
            parameters = model.set_trainable(phase.scope)
            wrapped, flops = session.prepare_model(model), FlopCount()
            optimizer = torch.optim.SGD(parameters, lr=phase.lr, momentum=study.base.momentum, weight_decay=study.base.weight_decay)
            if state.phase == phase.name and state.optimizer:
                optimizer.load_state_dict(state.optimizer)
            current = phase
        lr = scheduled_lr(phase, index, study.base.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        seed_everything(epoch_seed(study.seed, epoch, rank))
        sampler.set_epoch(epoch)

        def augmented(images, indices, epoch=epoch):
            return model_inputs(images, data.image_size, data.augment, epoch_seeds(study.seed, epoch, indices), preprocess=data.preprocess)

        train_metrics = train_one_epoch(wrapped, device_batches(train_data, device, augmented), optimizer, cross_entropy_loss, precision=precision, flops=flops)
        val_metrics = evaluate(wrapped, device_batches(val_data, device, plain), precision=precision)
        metrics = {"epoch": epoch + 1, "phase": phase.name, "lr": lr, **train_metrics, "val_loss": val_metrics["loss"], "val_acc": val_metrics["acc"]}
        state = TrainState(next_epoch=epoch + 1, history=[*state.history, metrics], phase=phase.name, optimizer=optimizer.state_dict())
        report_epoch(session, metrics, wrapped, state, job.class_names, study)
        print_epoch(session, "base", metrics, total_epochs)
    return state.history
