"""Debug retraining costs, measured side by side.

* ``debug_step_over_control_step``: one training step with L_d ÷ one step of
  the control (the same loss with λ1 = λ2 = 0), same batch, same model
  (vgg_tiny, 32 px, batch 16, last conv + head trainable).  Target ≤ 1.10.
  ``debug_step_over_plain_ce_step`` compares with a bare cross-entropy step.
* ``ray_train_epoch_over_bare_loop``: one epoch of :func:`debug_train_loop` on a
  1-worker TorchTrainer (train + validation + checkpoint, from the per-epoch
  ``epoch_s``) ÷ the same epoch as a bare PyTorch loop in this process, both
  on one thread.  Target ≤ 1.15.  Ray Train's start-up and tear-down are
  excluded from the ratio and printed on their own line.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks import Ratio

STEPS = 20
REPEATS = 9
EPOCHS = 5


def _study(storage: str):
    from raycf.config import load_study

    root = Path(__file__).resolve().parent.parent
    return load_study(root / "studies" / "digits.yaml", [f"storage_path={storage}", f"debug.epochs={EPOCHS}", "debug.workers=1"])


def _base_model(study, num_classes: int) -> tuple[torch.nn.Module, bytes]:
    from raycf.checkpoint import ClassifierCheckpoint
    from raycf.models import build_model

    torch.manual_seed(0)
    model = build_model(study.model, num_classes)
    checkpoint = ClassifierCheckpoint(
        arch=model.arch,
        num_filters=model.num_filters,
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        image_size=study.data.image_size,
        config_hash=study.config_hash(),
        state_dict=model.state_dict(),
    )
    return model, checkpoint.to_bytes()


def _time_steps(model, batches, loss_fn) -> float:
    from raycf.training import train_one_epoch

    optimizer = torch.optim.SGD(model.set_trainable("last_conv_and_head"), lr=1e-4, momentum=0.9)
    started = time.perf_counter()
    train_one_epoch(model, batches, optimizer, loss_fn, freeze_frozen_norms=True)
    return (time.perf_counter() - started) / len(batches)


def step_ratios(study, splits, global_filters) -> list[Ratio]:
    import copy

    from raycf.losses import DebugLoss
    from raycf.training import cross_entropy_loss

    model, _ = _base_model(study, splits.num_classes)
    images, labels = next(iter(DataLoader(splits.train, batch_size=study.debug.batch_size, shuffle=False)))
    batches = [(images, labels)] * STEPS
    g = torch.as_tensor(global_filters, dtype=torch.float32)
    losses = {
        "debug": DebugLoss(g, study.debug.lambda1, study.debug.lambda2),
        "control": DebugLoss(g, 0.0, 0.0),
        "plain": cross_entropy_loss,
    }
    models = {name: copy.deepcopy(model) for name in losses}
    times: dict[str, list[float]] = {name: [] for name in losses}
    for name in losses:  # warm-up
        _time_steps(models[name], batches[:2], losses[name])
    for _ in range(REPEATS):  # interleaved, so drifts in machine load hit all three alike
        for name, loss_fn in losses.items():
            times[name].append(_time_steps(models[name], batches, loss_fn))
    # The fastest repeat is the least disturbed by other load on the machine.
    debug = min(times["debug"])
    return [
        Ratio("debug_step_over_control_step", debug / min(times["control"]), "<=", 1.10),
        Ratio("debug_step_over_plain_ce_step", debug / min(times["plain"]), "<=", 1.10),
    ]


def bare_epoch_seconds(study, splits, global_filters, base_bytes: bytes) -> list[float]:
    """The debug epoch as a plain PyTorch loop: same model, data, loss, evaluation."""
    from raycf.checkpoint import parse_classifier_checkpoint
    from raycf.losses import DebugLoss
    from raycf.models import classifier_from_checkpoint
    from raycf.training import evaluate, seed_everything, train_one_epoch

    model = classifier_from_checkpoint(study.model, parse_classifier_checkpoint(base_bytes))
    optimizer = torch.optim.SGD(model.set_trainable(study.debug.trainable), lr=study.debug.lr, momentum=study.debug.momentum)
    loss_fn = DebugLoss(torch.as_tensor(global_filters, dtype=torch.float32), study.debug.lambda1, study.debug.lambda2)
    generator = torch.Generator()
    train = DataLoader(splits.train, batch_size=study.debug.batch_size, shuffle=True, generator=generator)
    val = DataLoader(splits.val, batch_size=study.features.batch_size)
    seconds = []
    for epoch in range(EPOCHS):
        started = time.perf_counter()
        seed_everything(epoch)
        generator.manual_seed(epoch)
        train_one_epoch(model, train, optimizer, loss_fn, freeze_frozen_norms=True)
        evaluate(model, val)
        seconds.append(time.perf_counter() - started)
    return seconds


def ray_train_ratio(study, splits, global_filters, base_bytes: bytes) -> list[Ratio]:
    from raycf.debug import run_debug_training
    from raycf.pipeline import ensure_ray

    ensure_ray()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = run_debug_training(
            study,
            global_filters,
            base_bytes,
            lambda1=study.debug.lambda1,
            lambda2=study.debug.lambda2,
            name="bench-debug",
            storage_path=folder,
            workers=1,
        )
        total = time.perf_counter() - started
    ray_epochs = [row["epoch_s"] for row in result.history]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a Ray Train worker gets one CPU, so one torch thread
    try:
        bare_epochs = bare_epoch_seconds(study, splits, global_filters, base_bytes)
    finally:
        torch.set_num_threads(previous_threads)
    # First epochs include one-off warm-up; compare the steady state.
    ray_epoch, bare_epoch = statistics.median(ray_epochs[1:]), statistics.median(bare_epochs[1:])
    print(
        f"debug: Ray Train epoch {ray_epoch:.2f} s, bare loop epoch {bare_epoch:.2f} s; "
        f"Ray Train start-up and tear-down {total - sum(ray_epochs):.1f} s per run (1 worker, {EPOCHS} epochs; excluded from the ratio)",
        flush=True,
    )
    return [Ratio("ray_train_epoch_over_bare_loop", ray_epoch / bare_epoch, "<=", 1.15)]


def measure() -> list[Ratio]:
    from raycf.data import load_splits

    with tempfile.TemporaryDirectory() as storage:
        study = _study(storage)
        splits = load_splits(study.data, study.seed)
        global_filters = np.random.default_rng(0).random((splits.num_classes, 64)) < 0.5
        _, base_bytes = _base_model(study, splits.num_classes)
        ratios = step_ratios(study, splits, global_filters)
        ratios += ray_train_ratio(study, splits, global_filters, base_bytes)
    return ratios
