"""The decoded images of a study: each split decoded and resized once, kept as one uint8 array.

The ``images`` stage decodes every image (JPEG, PNG, IDX, the digits array)
once, on CPUs, resizes it to the stored side (``data.stored_side``) and
writes, under ``<results>/images/``:

* ``<split>.npy``: N×S×S×3 uint8 (RGB), row ``i`` the split's image ``i``;
* ``<split>.parquet``: ``image_index``, ``image_id``, ``label``, ``planted``
  (the image carries ``data.plant``'s feature) and ``group`` (class × planted,
  the user's ``data.groups``, or the class name when neither is set).

A planted study's feature is added here, once, after decoding
(:mod:`raycf.method.plant`): every later stage reads the same images.

Training, inference and the report read these memory-mapped (one copy per
node, :mod:`raycf.results.node_cache`) and crop, augment and normalise whole batches
on their own device (:mod:`raycf.data.augment`, :mod:`raycf.data.views`).  Size: N × S²
× 3 bytes, e.g. CUB's 11,788 images at 256² are 2.3 GB; digits' 1,797 at 32²
are 5.5 MB.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from raycf.results import storage
from raycf.config import DataConfig
from raycf.data.datasets import SPLITS, DataSplits, load_splits, log_read
from raycf.results.node_cache import local_folder
from raycf.runtime.ray_data import actor_pool
from raycf.data.groups import read_groups_table
from raycf.method.groups import planted_group_names, user_group_names
from raycf.method.plant import class_index_of, plant_images

DECODE_BATCH = 64  # images per decoding task


@dataclass(frozen=True)
class StoreRef:
    """Where a study's image store is: the images stage's folder and the address of that write (its stage hash and finish time)."""

    location: str
    key: str


class ImageStore:
    """A written store, read memory-mapped from a local folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._images: dict[str, np.ndarray] = {}
        self._index: dict[str, pd.DataFrame] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._ids: dict[str, list[str]] = {}

    def images(self, split: str) -> np.ndarray:
        """The split's N×S×S×3 uint8 images (memory-mapped, read-only)."""
        if split not in self._images:
            self._images[split] = np.load(self.folder / f"{split}.npy", mmap_mode="r")
        return self._images[split]

    def index(self, split: str) -> pd.DataFrame:
        """The split's ``image_index``, ``image_id`` and ``label``."""
        if split not in self._index:
            self._index[split] = pq.read_table(self.folder / f"{split}.parquet").to_pandas()
        return self._index[split]

    def labels(self, split: str) -> np.ndarray:
        """The split's labels, in image order (built once: callers look rows up per record)."""
        if split not in self._labels:
            self._labels[split] = self.index(split)["label"].to_numpy(dtype=np.int64)
        return self._labels[split]

    def ids(self, split: str) -> list[str]:
        """The split's image ids, in image order (built once, like :meth:`labels`)."""
        if split not in self._ids:
            self._ids[split] = [str(image_id) for image_id in self.index(split)["image_id"]]
        return self._ids[split]


def open_store(ref: StoreRef) -> ImageStore:
    """The store of ``ref``, downloaded once to this node when it lives in a remote results folder."""
    return ImageStore(local_folder(ref.location, ref.key))


class StoredImages(Dataset):
    """One split of a store as a torch dataset of ``(uint8 3×S×S image, label, index)``: a model's read of the split."""

    def __init__(self, store: ImageStore, split: str, indices: np.ndarray | None = None):
        self.store, self.split = store, split
        self.labels = store.labels(split)
        self.indices = np.arange(len(self.labels)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, int]:
        index = int(self.indices[position])
        log_read(self.split, index)
        image = torch.from_numpy(np.array(self.store.images(self.split)[index])).permute(2, 0, 1)  # a copy: the store is read-only
        return image, int(self.labels[index]), index

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole batch in one read of the memory-mapped array (the DataLoader calls this: see :func:`raycf.training.loops.batched_collate`)."""
        indices = self.indices[np.asarray(positions, dtype=np.int64)]
        for index in indices:
            log_read(self.split, int(index))
        images = torch.from_numpy(self.store.images(self.split)[np.sort(indices)][np.argsort(np.argsort(indices))]).permute(0, 3, 1, 2)
        return images, torch.from_numpy(self.labels[indices]), torch.from_numpy(indices)


# ------------------------------------------------------------------ building


class Decoder:
    """Ray Data actor (CPU): decodes and resizes the images of (split, index) records."""

    def __init__(self, data: DataConfig, seed: int):
        self.splits = load_splits(data, seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        pixels = [self.splits.split(str(split)).decode(int(index)) for split, index in zip(batch["split"], batch["image_index"])]
        return {"split": batch["split"], "image_index": batch["image_index"], "pixels": np.stack(pixels)}


def write_store(data: DataConfig, seed: int, output: str, actors: int) -> tuple[dict[str, int], dict[str, int]]:
    """Decode every split on a pool of CPU actors (Ray Data) and write the store into ``output``; images and planted images per split."""
    import ray.data

    splits = load_splits(data, seed)
    records = [{"split": name, "image_index": index} for name in SPLITS for index in range(len(splits.split(name)))]
    decoded = actor_pool(ray.data.from_items(records), Decoder, {"data": data, "seed": seed}, actors=actors, batch_size=DECODE_BATCH, batch_format="numpy")
    with tempfile.TemporaryDirectory() as folder:
        arrays = _open_arrays(splits, Path(folder))
        for batch in decoded.iter_batches(batch_format="numpy", batch_size=None):
            for split, index, pixels in zip(batch["split"], batch["image_index"], batch["pixels"]):
                arrays[str(split)][int(index)] = pixels
        planted = _finish(splits, arrays, Path(folder), output, data, seed)
    return {name: len(splits.split(name)) for name in SPLITS}, planted


def write_store_here(splits: DataSplits, output: str, data: DataConfig | None = None, seed: int = 0) -> None:
    """Decode every split in this process and write the store (tests, small datasets); ``data`` brings its plant and groups."""
    with tempfile.TemporaryDirectory() as folder:
        arrays = _open_arrays(splits, Path(folder))
        for name, array in arrays.items():
            for index in range(len(array)):
                array[index] = splits.split(name).decode(index)
        _finish(splits, arrays, Path(folder), output, data, seed)


def _open_arrays(splits: DataSplits, folder: Path) -> dict[str, np.memmap]:
    side = splits.train.side
    return {
        name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.uint8, shape=(len(splits.split(name)), side, side, 3))
        for name in SPLITS
    }


def _finish(splits: DataSplits, arrays: dict[str, np.memmap], folder: Path, output: str, data: DataConfig | None = None, seed: int = 0) -> dict[str, int]:
    """Plant the study's feature, flush and close the written arrays, write each split's index beside them, and publish the folder; planted images per split."""
    planted = {name: _plant(splits, name, arrays[name], data, seed) for name in SPLITS}
    for array in arrays.values():
        array.flush()
    arrays.clear()  # closes the memory maps before the files move
    table = read_groups_table(data.groups) if data is not None and data.groups else None
    for name in SPLITS:
        _write_index(splits, name, folder, planted[name], table, data)
    _publish(folder, output)
    return {name: int(flags.sum()) for name, flags in planted.items()}


def _plant(splits: DataSplits, name: str, array: np.ndarray, data: DataConfig | None, seed: int) -> np.ndarray:
    split = splits.split(name)
    if data is None or data.plant is None:
        return np.zeros(len(split), dtype=bool)
    class_index = class_index_of(data.plant, splits.class_names)
    return plant_images(array, np.asarray(split.labels), name, data.plant, seed, class_index)[1]


def _write_index(splits: DataSplits, name: str, folder: Path, planted: np.ndarray, table: dict[str, str] | None, data: DataConfig | None = None) -> None:
    split = splits.split(name)
    labels = np.asarray(split.labels)
    if table is not None:
        groups = user_group_names(split.ids, labels, splits.class_names, table)
    elif data is not None and data.plant is not None:
        groups = planted_group_names(labels, planted, splits.class_names)
    else:  # no groups: group metrics are not reported
        groups = np.full(len(split), "", dtype=object)
    columns = {"image_index": np.arange(len(split), dtype=np.int64), "image_id": split.ids, "label": split.labels, "planted": planted, "group": groups.astype(str)}
    pq.write_table(pa.table(columns), folder / f"{name}.parquet")


def read_groups(store: "ImageStore", split: str) -> np.ndarray | None:
    """The split's group per image, in image order; None for a study without groups (neither data.plant nor data.groups) or an older store."""
    index = store.index(split)
    if "group" not in index.columns:
        return None
    groups = index["group"].to_numpy(dtype=object)
    return groups if len(groups) and (groups != "").any() else None


def read_planted(store: "ImageStore", split: str) -> np.ndarray:
    """The split's ``planted`` flag per image, in image order (all False without data.plant)."""
    index = store.index(split)
    if "planted" not in index.columns:
        return np.zeros(len(index), dtype=bool)
    return index["planted"].to_numpy(dtype=bool)


def _publish(folder: Path, output: str) -> None:
    """Move the written files into the stage's output (local) or upload them (URI)."""
    for path in sorted(folder.iterdir()):
        storage.upload_file(path, storage.join_uri(output, path.name))
