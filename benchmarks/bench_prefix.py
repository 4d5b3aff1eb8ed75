"""Debug retraining on the frozen-prefix cache vs through the whole network, side by side.

* ``debug_epoch_cached_vs_full``: the time of one debug epoch (training and
  validation) through the whole network divided by the same epoch on the
  cache: digits, vgg_tiny at 32 px, the study file's own settings (batch 16,
  last conv + head, 4 views).  Target ≥ 5.
* ``debug_epoch_cached_vs_full_vgg16``: the same for VGG-16 (random weights)
  at 112 px on 200 digits images upscaled (a size a CPU can run).  Target ≥ 12.

Both paths run the same loop (:func:`raycf.training.debug.debug_train_loop`)
in this process on one thread, for the same epochs, views and seeds; the
cache is built beforehand (its one-off cost is printed, not in the ratio).
The median epoch after the first counts.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import Ratio

EPOCHS = 3


def _setup(folder: Path, overrides: list[str]):
    from raycf.models.checkpoint import ClassifierCheckpoint
    from raycf.config import load_study
    from raycf.data.datasets import load_splits
    from raycf.data.image_store import StoreRef, write_store_here
    from raycf.models.build import build_model

    root = Path(__file__).resolve().parent.parent
    study = load_study(root / "studies" / "digits.yaml", [f"storage_path={folder}", f"debug.epochs={EPOCHS}", *overrides])
    splits = load_splits(study.data, study.seed)
    write_store_here(splits, str(folder / "images"))
    torch.manual_seed(0)
    model = build_model(study.model, splits.num_classes)
    checkpoint = ClassifierCheckpoint(model.arch, model.num_filters, splits.num_classes, splits.class_names, study.data.image_size, "bench", model.state_dict())
    (folder / "model.pt").write_bytes(checkpoint.to_bytes())
    return study, StoreRef(str(folder / "images"), "bench-images"), np.random.default_rng(0).random((splits.num_classes, model.num_filters)) < 0.3


def epoch_seconds(study, images, global_filters, folder: Path, prefix) -> list[float]:
    from raycf.training.debug import DebugJob, run_debug_training

    job = DebugJob(
        study=study, global_filters=global_filters, base_model=(folder / "model.pt").read_bytes(), lambda1=study.debug.lambda1, lambda2=study.debug.lambda2,
        images=images, prefix=prefix, print_epochs=False,
    )  # fmt: skip
    result = run_debug_training(job, name=f"bench-{'cached' if prefix else 'full'}", storage_path=str(folder / "runs"), workers=0)
    return [row["epoch_s"] for row in result.history]


def cached_vs_full(name: str, overrides: list[str], target: float) -> Ratio:
    from raycf.data.prefix_cache import PrefixRef
    from raycf.stages.prefix import write_cache_here

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        study, images, global_filters = _setup(folder, overrides)
        started = time.perf_counter()
        write_cache_here(study, str(folder / "model.pt"), images, str(folder / "prefix"))
        building = time.perf_counter() - started
        prefix = PrefixRef(str(folder / "prefix"), "bench-prefix")
        full = statistics.median(epoch_seconds(study, images, global_filters, folder, None)[1:])
        cached = statistics.median(epoch_seconds(study, images, global_filters, folder, prefix)[1:])
    print(f"{name}: full-network epoch {full:.2f} s, cached epoch {cached:.3f} s; building the cache once took {building:.1f} s", flush=True)
    return Ratio(name, full / cached, ">=", target)


def measure() -> list[Ratio]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a one-CPU trial
    try:
        return [
            cached_vs_full("debug_epoch_cached_vs_full", [], 5.0),
            cached_vs_full(
                "debug_epoch_cached_vs_full_vgg16",
                ["model.arch=vgg16", "data.image_size=112", "data.test_fraction=0.8", "data.val_fraction=0.45", "debug.views=2"],
                12.0,
            ),
        ]
    finally:
        torch.set_num_threads(previous)
