"""Debug retraining costs, measured side by side.

Both measurements take the path the debug stage takes for the digits study
file's own settings (vgg_tiny, 32 px, batch 16, last conv + head trainable,
4 views): on the frozen-prefix cache (:mod:`raycf.data.prefix_cache`; only the
trainable tail runs), or through the whole network from the uint8 image store
when the study turns the cache off.  The cache (and the image store) are built
in this process beforehand, outside every timing.

* ``debug_step_over_control_step``: one training step with L_d ÷ one step of
  the control (the same loss with λ1 = λ2 = 0), same batch, same model.
  Target ≤ 1.10.  ``debug_step_over_plain_ce_step`` compares with a bare
  cross-entropy step.
* ``ray_epoch_over_bare_loop``: one epoch of
  :func:`raycf.training.debug.debug_train_loop` run on Ray with one worker
  (one Tune trial; training + validation, its per-epoch ``epoch_s``) ÷ the
  same epoch as a bare PyTorch loop in this process (same model, inputs,
  loss, evaluation; no session, reports or checkpoints), both on one thread.
  Target ≤ 1.15.  Start-up and tear-down, and the report and checkpoint
  between epochs, are excluded from the ratio and printed on their own line.
* ``trial_start_over_trainer_start``: the same run's start-up and tear-down
  (its seconds outside its epochs) in one Tune trial, as ``fit`` runs a
  one-worker job, ÷ on a one-worker TorchTrainer, as it ran before.
  Target ≤ 0.5.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import Ratio

STEPS = 20
REPEATS = 9
EPOCHS = 8


def _study(storage: str):
    from raycf.config import load_study

    root = Path(__file__).resolve().parent.parent
    return load_study(root / "studies" / "digits.yaml", [f"storage_path={storage}", f"debug.epochs={EPOCHS}", "debug.workers=1"])


def _setup(study, folder: Path):
    """The image store, an untrained base model, its frozen-prefix cache (when the study uses one) and a random G."""
    from raycf.models.checkpoint import ClassifierCheckpoint
    from raycf.data.datasets import load_splits
    from raycf.data.image_store import StoreRef, write_store_here
    from raycf.models.build import build_model
    from raycf.data.prefix_cache import PrefixRef, uses_cache
    from raycf.stages.prefix import write_cache_here

    splits = load_splits(study.data, study.seed)
    write_store_here(splits, str(folder / "images"))
    images = StoreRef(str(folder / "images"), "bench-debug-images")
    torch.manual_seed(0)
    model = build_model(study.model, splits.num_classes)
    checkpoint = ClassifierCheckpoint(
        arch=model.arch, num_filters=model.num_filters, num_classes=splits.num_classes, class_names=splits.class_names,
        image_size=study.data.image_size, config_hash=study.config_hash(), state_dict=model.state_dict(),
    )  # fmt: skip
    (folder / "model.pt").write_bytes(checkpoint.to_bytes())
    prefix = None
    if uses_cache(study):
        write_cache_here(study, str(folder / "model.pt"), images, str(folder / "prefix"))
        prefix = PrefixRef(str(folder / "prefix"), "bench-debug-prefix")
    global_filters = np.random.default_rng(0).random((splits.num_classes, model.num_filters)) < 0.5
    return images, prefix, global_filters


def _job(study, images, prefix, global_filters, base_bytes: bytes, lambda1: float, lambda2: float):
    from raycf.training.debug import DebugJob

    return DebugJob(
        study=study, global_filters=global_filters, base_model=base_bytes, lambda1=lambda1, lambda2=lambda2,
        images=images, prefix=prefix, print_epochs=False,
    )  # fmt: skip


def _model_and_inputs(job):
    """A fresh base model with the debug scope trainable, and the loop's own inputs (cache or images) for it."""
    from raycf.models.checkpoint import parse_classifier_checkpoint
    from raycf.data.image_store import open_store
    from raycf.models.build import classifier_from_checkpoint
    from raycf.training.debug import cached_inputs, image_inputs

    model = classifier_from_checkpoint(job.study.model, parse_classifier_checkpoint(job.base_model, "base model"))
    parameters = model.set_trainable(job.study.debug.trainable)
    inputs = (cached_inputs if job.prefix is not None else image_inputs)(job, model, open_store(job.images), torch.device("cpu"))
    return model, parameters, inputs


def _time_steps(trainable, parameters, forward, batches, loss_fn) -> float:
    from raycf.training.loops import train_one_epoch

    optimizer = torch.optim.SGD(parameters, lr=1e-4, momentum=0.9)
    started = time.perf_counter()
    train_one_epoch(trainable, batches, optimizer, loss_fn, freeze_frozen_norms=True, forward=forward)
    return (time.perf_counter() - started) / len(batches)


def step_ratios(study, job) -> list[Ratio]:
    from raycf.method.debug_loss import DebugLoss, global_filters_tensor
    from raycf.training.loops import cross_entropy_loss, device_batches, train_loader

    config = study.debug
    _, _, inputs = _model_and_inputs(job)
    loader, sampler = train_loader(inputs.train, config.batch_size, study.seed, 0, 1)
    sampler.set_epoch(0)
    batch = next(device_batches(loader, torch.device("cpu"), lambda data, indices: inputs.train_inputs(data, indices, 0)))
    batches = [batch] * STEPS
    g = global_filters_tensor(job.global_filters, *job.global_filters.shape)
    losses = {
        "debug": DebugLoss(g, config.lambda1, config.lambda2, config.indicator),
        "control": DebugLoss(g, 0.0, 0.0, config.indicator),
        "plain": cross_entropy_loss,
    }
    runs = {}
    for name in losses:  # one model each, so that every loss trains its own copy
        _, parameters, own = _model_and_inputs(job)
        runs[name] = (own.trainable, parameters, own.forward)
    times: dict[str, list[float]] = {name: [] for name in losses}
    for name in losses:  # warm-up
        _time_steps(*runs[name], batches[:2], losses[name])
    for _ in range(REPEATS):  # interleaved, so drifts in machine load hit all three alike
        for name, loss_fn in losses.items():
            times[name].append(_time_steps(*runs[name], batches, loss_fn))
    # The fastest repeat is the least disturbed by other load on the machine.
    best = {name: min(values) for name, values in times.items()}
    where = "frozen-prefix cache" if job.prefix is not None else "whole network"
    print(
        f"debug: one step ({where}, batch {config.batch_size}): L_d {1e3 * best['debug']:.2f} ms, control {1e3 * best['control']:.2f} ms, "
        f"plain cross-entropy {1e3 * best['plain']:.2f} ms",
        flush=True,
    )
    return [
        Ratio("debug_step_over_control_step", best["debug"] / best["control"], "<=", 1.10),
        Ratio("debug_step_over_plain_ce_step", best["debug"] / best["plain"], "<=", 1.10),
    ]


def bare_epoch_seconds(job) -> list[float]:
    """The debug epoch as a plain PyTorch loop: same model, inputs, loss and evaluation as the loop's."""
    from raycf.method.debug_loss import DebugLoss, global_filters_tensor
    from raycf.training.loops import device_batches, epoch_seed, eval_loader, evaluate, seed_everything, train_loader, train_one_epoch

    study, config, device = job.study, job.study.debug, torch.device("cpu")
    model, parameters, inputs = _model_and_inputs(job)
    loss_fn = DebugLoss(global_filters_tensor(job.global_filters, model.num_classes, model.num_filters), job.lambda1, job.lambda2, config.indicator)
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum)
    train, sampler = train_loader(inputs.train, config.batch_size, study.seed, 0, 1)
    val = eval_loader(inputs.val, config.eval_batch_size)
    seconds = []
    for epoch in range(EPOCHS):
        started = time.perf_counter()
        seed_everything(epoch_seed(study.seed, epoch, 0))
        sampler.set_epoch(epoch)
        batches = device_batches(train, device, lambda data, indices, epoch=epoch: inputs.train_inputs(data, indices, epoch))
        train_one_epoch(inputs.trainable, batches, optimizer, loss_fn, freeze_frozen_norms=True, forward=inputs.forward)
        evaluate(inputs.trainable, device_batches(val, device, inputs.val_inputs), forward=lambda module, batch: inputs.forward(module, batch)[0])
        seconds.append(time.perf_counter() - started)
    return seconds


def _outside_epochs(run, job, storage: str) -> tuple[float, list[dict]]:
    """A debug run's seconds outside its epochs (start-up, tear-down: all but the first epoch's end to the last's, and the first epoch), and its history."""
    started = time.perf_counter()
    history = list(run(job, storage).history)
    total = time.perf_counter() - started
    ends = [row["time"] for row in history]
    return total - (ends[-1] - ends[0]) - history[0]["epoch_s"], history


def ray_ratios(job, storage: str) -> list[Ratio]:
    from raycf.runtime.cluster import ensure_ray
    from raycf.training import debug
    from raycf.training.trainer import fit_on_trainer

    ensure_ray()
    trial_outside, history = _outside_epochs(lambda job, folder: debug.run_debug_training(job, name="bench-trial", storage_path=folder, workers=1), job, storage)
    original, debug.fit = debug.fit, fit_on_trainer
    try:  # the same run as it ran before one-worker runs became a Tune trial
        trainer_outside, _ = _outside_epochs(lambda job, folder: debug.run_debug_training(job, name="bench-trainer", storage_path=folder, workers=1), job, storage)
    finally:
        debug.fit = original
    ray_epochs = [row["epoch_s"] for row in history]
    ends = [row["time"] for row in history]
    between = [later - earlier - row["epoch_s"] for earlier, later, row in zip(ends, ends[1:], history[1:])]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a one-worker run gets one CPU, so one torch thread
    try:
        bare_epochs = bare_epoch_seconds(job)
    finally:
        torch.set_num_threads(previous_threads)
    # First epochs include one-off warm-up; compare the steady state.
    ray_epoch, bare_epoch = statistics.median(ray_epochs[1:]), statistics.median(bare_epochs[1:])
    print(
        f"debug: one-worker run on Ray: epoch {ray_epoch:.3f} s, bare loop epoch {bare_epoch:.3f} s ({'frozen-prefix cache' if job.prefix is not None else 'whole network'}); "
        f"report and checkpoint between epochs {statistics.median(between):.3f} s; "
        f"start-up and tear-down {trial_outside:.1f} s in one Tune trial, {trainer_outside:.1f} s on a one-worker TorchTrainer (1 worker, {EPOCHS} epochs; excluded from the epoch ratio)",
        flush=True,
    )
    return [
        Ratio("ray_epoch_over_bare_loop", ray_epoch / bare_epoch, "<=", 1.15),
        Ratio("trial_start_over_trainer_start", trial_outside / trainer_outside, "<=", 0.5),
    ]


def measure() -> list[Ratio]:
    with tempfile.TemporaryDirectory(prefix="raycf-bench-debug-") as scratch:
        folder = Path(scratch)
        study = _study(str(folder / "results"))
        images, prefix, global_filters = _setup(study, folder)
        base_bytes = (folder / "model.pt").read_bytes()
        job = _job(study, images, prefix, global_filters, base_bytes, study.debug.lambda1, study.debug.lambda2)
        ratios = step_ratios(study, job)
        ratios += ray_ratios(job, str(folder / "runs"))
    return ratios
