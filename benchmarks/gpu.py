"""``make bench-gpu``: VGG-16 on a CUB-size synthetic set at the GPU's speed, measured side by side.

Without CUDA it prints ``bench-gpu: no GPU`` and exits 0.  With CUDA (one
GPU), on VGG-16 at 224 px (random weights: speed does not depend on them) and
a synthetic set of CUB's shape (uint8 images at 256 px, 200 classes), it
prints one line per ratio (``<name>: <value> (target <op> <value>)``):

* ``vgg16_train_step_images_per_s`` and ``vgg16_train_step_mfu``: the bare
  training step (bf16 autocast, channels_last, all layers trainable, SGD) on
  tensors already on the GPU, batch 64; MFU against the GPU's bf16 peak
  (:mod:`raycf.training.throughput`);
* ``base_epoch_vs_bare_step_rate``: images/s of a whole base-training epoch
  (:func:`raycf.training.base.base_train_loop`: the uint8 store, pinned
  non-blocking copies, augmentation on the GPU, bf16) ÷ the bare step rate.  Target ≥ 0.8;
* ``debug_epoch_vs_bare_step_rate``: a debug-trial epoch on the frozen-prefix
  cache ÷ the bare step of the same computation (block5_conv3 and the head
  on cached activations already on the GPU).  Target ≥ 0.8;
* ``features_vs_bf16_inference``: the features stage's actor (images from
  the store, views augmented on the GPU) ÷ bare bf16 inference.  Target ≥ 0.8;
* ``masks_from_images_vs_bf16_inference``: classifier and CFE bank from
  images ÷ bare bf16 inference.  Target ≥ 0.5.

Every rate is the median of timed repetitions after a warm-up, with a CUDA
synchronisation at each end of the timed span.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np
import torch

if TYPE_CHECKING:
    import pyarrow as pa

from benchmarks import Ratio

IMAGES = 1024  # training images of the synthetic set (and 256 validation images)
CLASSES = 200
SIZE, STORED = 224, 256
BATCH, DEBUG_BATCH = 64, 16
REPEATS = 5


def cuda_rate(step, images_per_call: int, calls: int = 10) -> float:
    """Images per second of ``step()``: median over repeats of ``calls`` calls, synchronised at both ends."""
    step()
    torch.cuda.synchronize()
    rates = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
        rates.append(images_per_call * calls / (time.perf_counter() - started))
    return statistics.median(rates)


def synthetic_study(folder: Path):
    """A CUB-shaped study on a synthetic image folder, and its uint8 store (random images: speed only)."""
    from raycf.config import study_from_mapping
    from raycf.data.datasets import DataSplits, SplitImages
    from raycf.data.image_store import StoreRef, write_store_here

    rng = np.random.default_rng(0)

    def split(name: str, count: int) -> SplitImages:
        labels = np.arange(count) % CLASSES
        return SplitImages(name, [f"{name}-{i}" for i in range(count)], labels, lambda i: torch.from_numpy(rng.random((3, STORED, STORED), dtype=np.float32)), STORED)

    write_store_here(DataSplits(split("train", IMAGES), split("val", 256), split("test", 64), [f"c{i}" for i in range(CLASSES)]), str(folder / "images"))
    study = study_from_mapping(
        {
            "name": "bench-gpu",
            "storage_path": str(folder / "results"),
            "data": {"kind": "imagefolder", "root": str(folder), "image_size": SIZE, "stored_side": STORED, "loader_workers": 4},
            "model": {"arch": "vgg16", "precision": "bf16"},
            "base": {"epochs": 2, "batch_size": BATCH, "workers": 1, "use_gpu": True},
            "debug": {"epochs": 2, "batch_size": DEBUG_BATCH, "views": 2, "use_gpu": True, "trainable": "last_conv_and_head"},
            "prefix": {"use_gpu": True, "batch_size": 128},
        }
    )
    return study, StoreRef(str(folder / "images"), "bench-gpu-images")


def bare_train_rate(model, batch: int) -> float:
    from raycf.models.precision import Precision

    precision = Precision.of("bf16", torch.device("cuda"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    inputs = torch.randn(batch, 3, SIZE, SIZE, device="cuda").to(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (batch,), device="cuda")

    def step() -> None:
        with precision.autocast():
            loss = torch.nn.functional.cross_entropy(model(inputs).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return cuda_rate(step, batch)


def bare_step_flops_per_image(model) -> float:
    """FLOPs per image of the bare training step, counted as the training loops count theirs."""
    from raycf.models.precision import Precision
    from raycf.training.loops import cross_entropy_loss, logits_and_features, step_flops_per_image

    inputs = torch.randn(2, 3, SIZE, SIZE, device="cuda").to(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (2,), device="cuda")
    return step_flops_per_image(model, inputs, labels, cross_entropy_loss, logits_and_features, Precision.of("bf16", torch.device("cuda")))


@torch.no_grad()
def bare_inference_rate(model) -> float:
    from raycf.models.precision import Precision

    precision = Precision.of("bf16", torch.device("cuda"))
    inputs = torch.randn(256, 3, SIZE, SIZE, device="cuda").to(memory_format=torch.channels_last)

    def step() -> None:
        with precision.autocast():
            model.forward_with_features(inputs)

    return cuda_rate(step, len(inputs))


def measure() -> list[Ratio]:
    from raycf.models.checkpoint import checkpoint_of
    from raycf.models.build import build_model
    from raycf.models.precision import prepare_device, prepare_model
    from raycf.training.throughput import mfu, peak_flops
    from raycf.training.base import BaseJob, base_train_loop
    from raycf.training.trainer import run_local

    device = torch.device("cuda")
    prepare_device(device)
    ratios = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        study, images = synthetic_study(folder)
        model = prepare_model(build_model(study.model, CLASSES), device)
        model.set_trainable("all")
        step_rate = bare_train_rate(model, BATCH)
        peak = peak_flops(torch.cuda.get_device_name(device), "bf16")
        print(f"bench-gpu: {torch.cuda.get_device_name(device)}, bf16 peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s", flush=True)
        ratios.append(Ratio("vgg16_train_step_images_per_s", step_rate, ">=", 0.0))
        utilisation = mfu(bare_step_flops_per_image(model), step_rate, peak)
        ratios.append(Ratio("vgg16_train_step_mfu", float("nan") if utilisation is None else utilisation, ">=", 0.0))

        history = run_local(base_train_loop, BaseJob(study, images, [f"c{i}" for i in range(CLASSES)]), folder / "base", use_gpu=True).return_value
        ratios.append(Ratio("base_epoch_vs_bare_step_rate", history[-1]["images_per_s"] / step_rate, ">=", 0.8))

        model_location = folder / "model.pt"
        model_location.write_bytes(checkpoint_of(model, [f"c{i}" for i in range(CLASSES)], SIZE, "bench").to_bytes())
        ratios.append(debug_ratio(study, images, folder, model_location))
        inference = bare_inference_rate(model.eval())
        ratios.append(Ratio("features_vs_bf16_inference", features_rate(study, images, model_location) / inference, ">=", 0.8))
        ratios.append(Ratio("masks_from_images_vs_bf16_inference", masks_from_images_rate(study, images, model_location) / inference, ">=", 0.5))
    return ratios


def debug_ratio(study, images, folder: Path, model_location: Path) -> Ratio:
    """A debug epoch on the prefix cache ÷ the bare step of block5_conv3 and the head on cached activations."""
    from raycf.models.prefix import TrainableTail
    from raycf.models.build import build_model
    from raycf.models.precision import Precision, prepare_model
    from raycf.data.prefix_cache import PrefixRef
    from raycf.stages.prefix import write_cache_here
    from raycf.training.debug import DebugJob, run_debug_training

    write_cache_here(study, str(model_location), images, str(folder / "prefix"), batch_size=128)
    job = DebugJob(
        study=study, global_filters=np.ones((CLASSES, 512), dtype=bool), base_model=model_location.read_bytes(), lambda1=study.debug.lambda1,
        lambda2=study.debug.lambda2, images=images, prefix=PrefixRef(str(folder / "prefix"), "bench-gpu-prefix"), print_epochs=False,
    )  # fmt: skip
    history = run_debug_training(job, name="bench-debug", storage_path=str(folder / "runs"), workers=0).history
    model = prepare_model(build_model(study.model, CLASSES, load_weights=False), torch.device("cuda"))
    model.set_trainable("last_conv_and_head")
    tail = TrainableTail(model, "last_conv_and_head").train()
    cached = torch.randn(DEBUG_BATCH, 512, 14, 14, device="cuda")
    labels = torch.randint(0, CLASSES, (DEBUG_BATCH,), device="cuda")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    precision = Precision.of("bf16", torch.device("cuda"))

    def step() -> None:
        with precision.autocast():
            logits, _ = tail(cached)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Ratio("debug_epoch_vs_bare_step_rate", history[-1]["images_per_s"] / cuda_rate(step, DEBUG_BATCH), ">=", 0.8)


def _records(store, views: int = 2) -> "pa.Table":
    import pyarrow as pa

    count = len(store.labels("train"))
    rows = [(index, view) for index in range(count) for view in range(views)]
    return pa.table({"folder": ["train"] * len(rows), "split": ["train"] * len(rows), "image_index": [r[0] for r in rows], "view": [r[1] for r in rows]})


def features_rate(study, images, model_location: Path) -> float:
    """The features stage's actor, called on batches as Ray Data would (images from the store, views on the GPU)."""
    from raycf.data.image_store import open_store
    from raycf.stages.features import FeatureExtractor

    actor = FeatureExtractor(study, str(model_location), images, use_gpu=True)
    table = _records(open_store(images))
    batches = [table.slice(start, 256) for start in range(0, table.num_rows, 256)]
    return cuda_rate(lambda: [actor(batch) for batch in batches], table.num_rows, calls=1)


def masks_from_images_rate(study, images, model_location: Path) -> float:
    """Classifier and bank in one step, from images: pooled vectors, then every class's MC mask of the top classes."""
    from raycf.method.bank import CfeModel, bank_from_model
    from raycf.method.masks import compute_masks
    from raycf.stages.features import FeatureExtractor

    actor = FeatureExtractor(study, str(model_location), images, use_gpu=True)
    head = actor.model.fc
    bank = bank_from_model(CfeModel(CLASSES, 512, False, 0), head.weight, head.bias).to("cuda")
    count = len(actor.store.labels("train"))

    @torch.no_grad()
    def step(start: int) -> None:
        indices = list(range(start, min(start + 256, count)))
        inputs = actor.inputs(["train"] * len(indices), indices, [0] * len(indices))
        with actor.precision.autocast():
            logits, activations = actor.model.forward_with_features(inputs)
        compute_masks(bank, activations.float(), logits.float(), study.masks.topk)

    return cuda_rate(lambda: [step(start) for start in range(0, count, 256)], count, calls=1)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench-gpu: no GPU", flush=True)
        return 0
    for ratio in measure():
        print(ratio.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
