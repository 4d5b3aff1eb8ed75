"""Debug retraining with L_d (METHOD §5) and its fine-tuning control.

The debugged model and the control are the same loop (:func:`debug_train_loop`)
with different λ: starting from the base model, the ``debug.trainable`` layers
are retrained with SGD for ``debug.epochs`` epochs.  Every epoch each training
image is seen in one of its ``debug.views`` views (:mod:`raycf.data.views`); the
data order, the views and the dropout draws depend only on (seed, epoch), so
the control and the debugged run see the same batches.  ``DebugJob.order_seed``
replaces the study's seed in those draws (the final stage's retraining
seeds); the views' augmentations stay those of the study's seed.

Two paths compute the same thing: on the frozen-prefix cache
(:mod:`raycf.data.prefix_cache`: only the trainable layers run) when the scope
leaves layers frozen, or through the whole network from the image store
(``trainable: all``, or ``prefix.enabled: false``).  The best epoch is chosen
on the validation split by :mod:`raycf.method.selection`; the test split is
never read here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from raycf.models.checkpoint import CHECKPOINT_FILE, complete, model_hash, parse_classifier_checkpoint
from raycf.config import StudyConfig
from raycf.data.image_store import StoredImages, StoreRef, open_store, read_groups
from raycf.config import GROUP_METRICS
from raycf.method.groups import group_metrics
from raycf.method.debug_loss import DebugLoss, FilterStats, global_filters_tensor
from raycf.method.selection import best_epoch
from raycf.models.contract import FilterClassifier
from raycf.models.prefix import TrainableTail
from raycf.models.build import classifier_from_checkpoint
from raycf.models.precision import Precision, prepare_device, prepare_model
from raycf.data.prefix_cache import CachedSplit, PrefixRef, check_cache_matches, open_cache
from raycf.training.base import print_epoch, report_epoch, restore_classifier
from raycf.training.loops import FlopCount, device_batches, epoch_seed, eval_loader, evaluate, logits_and_features, seed_everything, train_loader, train_one_epoch
from raycf.training.session import Session, TrainState
from raycf.training.trainer import fit, run_local
from raycf.data.views import epoch_views, model_inputs, view_seeds

PHASE = "debug"
VAL_PREDICTIONS_FILE = "val_pred.npy"  # beside model.pt: the epoch's predicted class of each validation image, in split order


def predictions_bytes(batches: list[torch.Tensor]) -> bytes:
    """Predicted classes (one tensor per batch) as a compact ``.npy`` (uint16): what McNemar's test of two trials needs."""
    import io

    predicted = torch.cat(batches).cpu().numpy() if batches else np.zeros(0)
    buffer = io.BytesIO()
    np.save(buffer, predicted.astype(np.uint16), allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class FailOnce:
    """Testing aid: raise in the training loop at the start of ``epoch`` (0-based), once.

    The first failure creates ``marker``; a restarted run sees it and carries
    on, so recovery from the checkpoint can be exercised.
    """

    epoch: int
    marker: str

    def maybe_fail(self, epoch: int, rank: int) -> None:
        if epoch == self.epoch and rank == 0 and not Path(self.marker).exists():
            Path(self.marker).write_text(f"failed at the start of epoch {epoch + 1}\n")
            raise RuntimeError(f"injected failure at the start of epoch {epoch + 1}")


@dataclass(frozen=True)
class DebugJob:
    """One debug (or control) run: the study, G, the base model, the λ values, and where its inputs come from."""

    study: StudyConfig
    global_filters: np.ndarray  # C×K bool
    base_model: bytes  # model.pt
    lambda1: float
    lambda2: float
    images: StoreRef
    prefix: PrefixRef | None = None  # the frozen-prefix cache to train on; None: the whole network from the images
    extra_metrics: dict[str, float] = field(default_factory=dict)  # constants added to every report (a trial's detection quality)
    print_epochs: bool = True
    fail_once: FailOnce | None = None
    # Seed of the data order, of the view each image is seen in per epoch and of dropout; None: the study's seed.
    # The views themselves (their augmentations) always follow the study's seed: the prefix cache holds them.
    order_seed: int | None = None
    suppress: np.ndarray | None = None  # C×K bool: filters penalised per true class (debug.suppress at debug.suppress_weight); None: no suppression

    @property
    def label(self) -> str:
        if self.lambda1 == self.lambda2 == 0:
            return "control" if self.suppress is None else "suppress"  # plain fine-tuning, or it plus the suppression penalty alone
        return "debug"

    @property
    def run_seed(self) -> int:
        """The seed of this run's data order, epoch views and dropout (:attr:`order_seed`, else the study's)."""
        return self.study.seed if self.order_seed is None else self.order_seed


@torch.no_grad()
def filter_statistics(model: FilterClassifier, batches: Iterable, device: torch.device) -> FilterStats:
    """Per-filter mean and std of the pooled vector over ``batches`` of ``(inputs, labels)``, summed across ranks."""
    model.eval()
    total = torch.zeros(model.num_filters, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for inputs, _labels in batches:
        activations = model.features(inputs).double()
        total += activations.sum(0)
        squares += activations.square().sum(0)
        count += len(activations)
    sums = torch.cat([total, squares, count])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    k = model.num_filters
    return FilterStats.from_sums(sums[:k].cpu(), sums[k : 2 * k].cpu(), float(sums[-1]))


@dataclass
class Inputs:
    """Where a debug run's batches come from: the datasets, how a batch becomes inputs, and the forward pass."""

    train: Dataset
    val: Dataset
    train_inputs: Callable[[Any, torch.Tensor, int], Any]  # (data on device, indices, epoch) -> model inputs
    val_inputs: Callable[[Any, torch.Tensor], Any]
    trainable: torch.nn.Module  # the module trained (and wrapped in DDP): the classifier, or its trainable tail
    forward: Callable  # (trainable, inputs) -> (logits, pooled vectors)


def cached_inputs(job: DebugJob, model: FilterClassifier, store, device: torch.device) -> Inputs:
    """Batches of frozen-prefix activations: only the trainable tail runs."""
    study, cache = job.study, open_cache(job.prefix)
    check_cache_matches(cache.meta, study, job.prefix.location)
    num_train = len(store.labels("train"))

    def train_inputs(_data, indices, epoch):
        return cache.batch("train", indices, epoch_views(job.run_seed, epoch, num_train, study.debug.views)[indices], device)

    return Inputs(
        train=CachedSplit(store.labels("train")),
        val=CachedSplit(store.labels("val")),
        train_inputs=train_inputs,
        val_inputs=lambda _data, indices: cache.batch("val", indices, None, device),
        trainable=TrainableTail(model, study.debug.trainable),
        forward=lambda tail, cached: tail(*cached),
    )


def image_inputs(job: DebugJob, model: FilterClassifier, store, device: torch.device) -> Inputs:
    """Batches of images from the store, each training image in its view of the epoch: the whole network runs."""
    study, data = job.study, job.study.data
    num_train = len(store.labels("train"))

    def train_inputs(images, indices, epoch):
        views = epoch_views(job.run_seed, epoch, num_train, study.debug.views)[indices]
        return model_inputs(images, data.image_size, data.augment, view_seeds(study.seed, "train", indices, views), plain=views == 0, preprocess=data.preprocess)

    return Inputs(
        train=StoredImages(store, "train"),
        val=StoredImages(store, "val"),
        train_inputs=train_inputs,
        val_inputs=lambda images, _indices: model_inputs(images, data.image_size, preprocess=data.preprocess),
        trainable=model,
        forward=logits_and_features,
    )


def debug_train_loop(job: DebugJob, session: Session) -> list[dict[str, Any]]:
    """Retrain the base model with L_d (λ = 0: the control); returns every epoch's metrics.

    Reports per epoch: epoch, val_acc, val_loss, train_loss, train_ce,
    train_mc, train_nonmc, train_acc, images_per_s, lr, active_mc,
    active_nonmc, epoch_s, time (unix seconds at the end of the epoch),
    setup_s and report_s (the run's start-up, the previous epoch's report),
    the job's extra metrics and the selection score; rank 0 attaches a checkpoint
    to each epoch that improves the objective (the best so far).
    """
    entered = time.time()
    study, config, data = job.study, job.study.debug, job.study.data
    rank, world_size, device = session.rank, session.world_size, session.device
    prepare_device(device)
    precision = Precision.of(study.model.precision, device)
    store = open_store(job.images)
    base = parse_classifier_checkpoint(job.base_model, "base model", study.model.arch)
    base_hash, class_names = model_hash(job.base_model), base.class_names
    model = prepare_model(classifier_from_checkpoint(study.model, base), device)
    stats = None
    if config.indicator == "centred":  # from the base model's plain training images, before any restored weights
        plain = eval_loader(StoredImages(store, "train"), config.eval_batch_size, rank, world_size, data.loader_workers)
        stats = filter_statistics(model, device_batches(plain, device, lambda images, _indices: model_inputs(images, data.image_size, preprocess=data.preprocess)), device)
    global_filters = global_filters_tensor(job.global_filters, model.num_classes, model.num_filters)
    suppress = None if job.suppress is None else torch.as_tensor(np.asarray(job.suppress), dtype=torch.float32)
    loss_fn = DebugLoss(global_filters, job.lambda1, job.lambda2, config.indicator, stats, suppress, config.suppress_weight).to(device)

    state = restore_classifier(session, model) or TrainState(phase=PHASE)
    parameters = model.set_trainable(config.trainable)
    inputs = (cached_inputs if job.prefix is not None else image_inputs)(job, model, store, device)
    wrapped = session.prepare_model(inputs.trainable)
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum)
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)

    train_data, sampler = train_loader(inputs.train, config.batch_size, job.run_seed, rank, world_size, data.loader_workers)
    val_data = eval_loader(inputs.val, config.eval_batch_size, rank, world_size, data.loader_workers)
    flops = FlopCount()
    val_groups, val_labels = read_groups(store, "val"), store.labels("val")  # groups: the worst-group metrics, from rank 0's whole-split predictions
    setup_s, report_s = None, 0.0  # where a run's time outside its epochs goes (benchmarks/bench_search.py)
    for epoch in range(state.next_epoch, config.epochs):
        if job.fail_once is not None:
            job.fail_once.maybe_fail(epoch, rank)
        started = time.time()
        setup_s = started - entered if setup_s is None else setup_s
        seed_everything(epoch_seed(job.run_seed, epoch, rank))
        sampler.set_epoch(epoch)
        batches = device_batches(train_data, device, lambda data_, indices, epoch=epoch: inputs.train_inputs(data_, indices, epoch))
        train_metrics = train_one_epoch(wrapped, batches, optimizer, loss_fn, precision=precision, freeze_frozen_norms=True, forward=inputs.forward, flops=flops)
        val_batches = device_batches(val_data, device, inputs.val_inputs)
        val_predictions: list[torch.Tensor] | None = [] if world_size == 1 else None  # one rank holds the whole split in order
        val_metrics = evaluate(wrapped, val_batches, precision=precision, forward=lambda module, batch: inputs.forward(module, batch)[0], predictions=val_predictions)
        # Tune's status table shows the first metrics: keep the objective among them.
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
            "setup_s": setup_s,  # from the loop's start to its first epoch's (opening the store, the cache, the model)
            "report_s": report_s,  # the previous epoch's report and checkpoint
            **job.extra_metrics,
            **run_conditions(device, precision),
        }
        if val_groups is not None:  # NaN when the split is spread over ranks (no rank holds every prediction)
            metrics.update(group_metrics(val_groups, val_labels, torch.cat(val_predictions).cpu().numpy(), "val_") if val_predictions else dict.fromkeys(GROUP_METRICS, float("nan")))
        state = TrainState(next_epoch=epoch + 1, history=[*state.history, metrics], phase=PHASE, optimizer=optimizer.state_dict())
        reporting = time.time()
        extra = {VAL_PREDICTIONS_FILE: predictions_bytes(val_predictions)} if val_predictions is not None else None
        report_epoch(session, metrics, model, state, class_names, study, (study.search.metric, study.search.mode), base_hash, extra, only_improving=True)
        report_s = time.time() - reporting
        if job.print_epochs:
            print_epoch(session, job.label, metrics, config.epochs)
    return state.history


def run_conditions(device: torch.device, precision: Precision) -> dict[str, str]:
    """What a run computed on and with (reported with every epoch): ``raycf rerun`` reads them back."""
    return {"device": device.type, "precision": precision.name, "torch": str(torch.__version__)}  # a plain str: torch.load(weights_only=True) refuses TorchVersion


@dataclass
class DebugResult:
    """A finished debug (or control) run: its best-validation model (whole: completed with the base) and every epoch's metrics."""

    best_model_bytes: bytes
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_acc: float


def run_debug_training(
    job: DebugJob,
    *,
    name: str,
    storage_path: str,
    workers: int | None = None,
    callbacks: list | None = None,
) -> DebugResult:
    """Run :func:`debug_train_loop` and return the best-validation model.

    ``workers`` defaults to ``debug.workers``: that many Ray Train workers
    (``name`` and ``storage_path`` name the run, which resumes from its latest
    checkpoint); ``workers=0`` runs in this process, without Ray, with
    checkpoints in ``storage_path``.
    """
    study = job.study
    workers = study.debug.workers if workers is None else workers
    if workers == 0:
        outcome = run_local(debug_train_loop, job, Path(storage_path, name), use_gpu=study.debug.use_gpu)
    else:
        outcome = fit(
            debug_train_loop,
            job,
            name=name,
            storage_path=storage_path,
            workers=workers,
            use_gpu=study.debug.use_gpu,
            max_failures=study.debug.max_failures,
            callbacks=callbacks,
        )
    history = list(outcome.return_value)
    saved = complete(parse_classifier_checkpoint(outcome.best_files[CHECKPOINT_FILE], "debug checkpoint"), job.base_model)
    model_bytes = saved.to_bytes()
    best = next(row for row in history if row["epoch"] == int(saved.metrics["epoch"]))
    expected = best_epoch(history, study.search.metric, study.search.mode)
    if best["epoch"] != expected.get("epoch"):
        raise RuntimeError(f"the kept checkpoint is epoch {best['epoch']}, but the best epoch is {expected.get('epoch')}")
    return DebugResult(best_model_bytes=model_bytes, history=history, best_epoch=int(best["epoch"]), best_val_acc=float(best["val_acc"]))
