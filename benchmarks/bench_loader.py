"""The training data path: decoding every image every epoch vs the uint8 store with augmentation on the device.

``loader_cached_vs_decode``: the time of one training epoch's data path (no
model) over 1,024 generated JPEGs at CUB-like sizes (500×375 and 375×500,
photographic noise so they compress like photos), 224-pixel inputs, batches
of 32:

* decode: what raycf did before the image store, and what most PyTorch
  loaders do: PIL decodes each JPEG, torchvision's v2 transforms resize,
  affine-augment (the reference's ranges), convert and normalise it, per
  image, in the loading process;
* stored: the images stage's uint8 store (decoded once, at 256 px, not
  timed), sliced by a DataLoader and augmented and normalised a whole batch at
  a time by :func:`raycf.data.views.model_inputs` (here on the CPU; on a GPU it is
  one ``grid_sample``).

Both on one thread, in one process; the faster of two runs each counts.  Target ≥ 3.

``loader_host_cached_vs_decode`` (no target): the same decode epoch ÷ the
stored path's host side alone (slicing the store into batches, what a GPU
machine's CPU still does when the augmentation runs on the GPU).  On a CPU
machine the augmentation itself runs on the CPU, and bilinear resampling of
float images costs about as much per image as PIL's uint8 decode and affine:
the first ratio measures that; the second, what the GPU takes off the host.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from benchmarks import Ratio

IMAGES = 1024
BATCH = 32
SIZE = 224
STORED = 256


def write_jpegs(folder: Path) -> list[Path]:
    """Smooth colour fields plus noise: JPEGs of photo-like size and entropy."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(IMAGES):
        width, height = (500, 375) if index % 2 else (375, 500)
        base = rng.integers(0, 256, size=(height // 25, width // 25, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, size=(height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        path = folder / f"{index:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


class DecodedEachEpoch(Dataset):
    """JPEG → PIL → resize → RandomAffine → tensor → normalise, per image."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize((SIZE, SIZE), antialias=True),
                v2.RandomAffine(degrees=15, translate=(0.2, 0.2), scale=(0.8, 1.2), shear=0.2),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), 0


def decode_epoch(paths: list[Path]) -> float:
    started = time.perf_counter()
    for batch, _ in DataLoader(DecodedEachEpoch(paths), batch_size=BATCH):
        batch.sum()  # consume it
    return time.perf_counter() - started


def stored_epoch(store, augment) -> float:
    from raycf.data.image_store import StoredImages
    from raycf.training.loops import batched_collate
    from raycf.data.views import model_inputs

    dataset = StoredImages(store, "train")
    started = time.perf_counter()
    for images, _labels, indices in DataLoader(dataset, batch_size=BATCH, collate_fn=batched_collate(dataset)):
        model_inputs(images, SIZE, augment, indices.to(torch.int64) + 1, plain=None).sum()
    return time.perf_counter() - started


def stored_host_epoch(store) -> float:
    """The host side of the stored path: the loader's batches of uint8 images, nothing computed on them."""
    from raycf.data.image_store import StoredImages
    from raycf.training.loops import batched_collate

    dataset = StoredImages(store, "train")
    started = time.perf_counter()
    for images, _labels, _indices in DataLoader(dataset, batch_size=BATCH, collate_fn=batched_collate(dataset)):
        images.contiguous()
    return time.perf_counter() - started


def build_store(paths: list[Path], folder: Path):
    from raycf.data.datasets import DataSplits, SplitImages, open_image
    from raycf.data.image_store import ImageStore, write_store_here

    def split(name: str, chosen: list[Path]) -> SplitImages:
        return SplitImages(name, [path.name for path in chosen], [0] * len(chosen), lambda i: open_image(chosen[i]), STORED)

    write_store_here(DataSplits(train=split("train", paths), val=split("val", paths[:1]), test=split("test", paths[:1]), class_names=["x"]), str(folder / "store"))
    return ImageStore(folder / "store")


def measure() -> list[Ratio]:
    from raycf.config import AugmentConfig

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            paths = write_jpegs(folder)
            store = build_store(paths, folder)
            augment = AugmentConfig(rotation=15, shift=0.2, shear=0.2, zoom=0.2)
            decode = min(decode_epoch(paths) for _ in range(2))
            stored = min(stored_epoch(store, augment) for _ in range(2))
            host = min(stored_host_epoch(store) for _ in range(2))
    finally:
        torch.set_num_threads(previous)
    print(
        f"loader: decode each epoch {IMAGES / decode:.0f} images/s, uint8 store + batch augmentation {IMAGES / stored:.0f} images/s, "
        f"the store's host side alone {IMAGES / host:.0f} images/s (CPU, one thread)",
        flush=True,
    )
    return [Ratio("loader_cached_vs_decode", decode / stored, ">=", 3.0), Ratio("loader_host_cached_vs_decode", decode / host, ">=", 0.0)]
