"""The frozen-prefix cache: what retraining's frozen layers compute, once per base model (METHOD §5).

Debug retraining trains only ``debug.trainable`` (the reference: the last
conv layer and the head); the layers below it are frozen, so what they
compute for an image never changes.  The ``prefix`` stage runs them once for
every view of every training image (``debug.views``: view 0 plain, views 1…
augmented with their seeds, :mod:`raycf.data.views`) and for the plain validation
images, and every trial then trains on these activations
(:class:`~raycf.models.prefix.FrozenPrefix` / :class:`~raycf.models.prefix.TrainableTail`).

Files, under ``<results>/prefix/``:

* ``train_<k>.npy``: N × V × (shape k), ``val_<k>.npy``: N_val × (shape k),
  one pair per cached tensor k (one for VGG and ``head``; two for ResNets:
  the last block's input and its last conv's input);
* ``meta.json``: scope, views, dtype, the shapes, the image counts.

They are read memory-mapped, one copy per node (:mod:`raycf.results.node_cache`).
The dtype is ``prefix.dtype``: float16 halves the size at a relative error
of 2⁻¹¹ ≈ 5e-4 per value.  The stated tolerance, checked by
tests/test_prefix.py on digits: after an epoch, losses within 1e-3 of
training on a float32 cache and validation logits within 1e-2 (both
absolute: the debug loss rewards activity, so it can sit near zero or
below), the same predictions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from raycf.config import StudyConfig
from raycf.errors import UserError
from raycf.models.prefix import CACHEABLE_SCOPES, FrozenPrefix
from raycf.models.build import build_model
from raycf.results.node_cache import local_folder

META_FILE = "meta.json"
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class PrefixRef:
    """Where a study's prefix cache is: the prefix stage's folder and the address of that write (its stage hash and finish time)."""

    location: str
    key: str


def uses_cache(study: StudyConfig) -> bool:
    """Whether retraining runs on the prefix cache: enabled, and a scope with frozen layers below it."""
    return study.prefix.enabled and study.debug.trainable in CACHEABLE_SCOPES


@torch.no_grad()
def cached_shapes(study: StudyConfig, num_classes: int) -> list[tuple[int, ...]]:
    """The shape of each tensor the cache keeps per image, for the study's model, input size and scope."""
    model = build_model(study.model, num_classes, load_weights=False).to("meta").eval()
    size = study.data.image_size
    outputs = FrozenPrefix(model, study.debug.trainable)(torch.empty(1, 3, size, size, device="meta"))
    return [tuple(output.shape[1:]) for output in outputs]


def cache_bytes(study: StudyConfig, num_classes: int, num_train: int, num_val: int) -> int:
    """Bytes of the cache: (N_train × V + N_val) × Σ_k prod(shape k) × dtype size."""
    values = sum(math.prod(shape) for shape in cached_shapes(study, num_classes))
    return (num_train * study.debug.views + num_val) * values * np.dtype(DTYPES[study.prefix.dtype]).itemsize


def check_budget(study: StudyConfig, num_classes: int, num_train: int, num_val: int) -> None:
    """Refuse, before anything runs, a cache larger than ``prefix.max_gb``, with the number and how it adds up."""
    if not uses_cache(study):
        return
    size = cache_bytes(study, num_classes, num_train, num_val)
    if size > study.prefix.max_gb * 1e9:
        shapes = " + ".join("×".join(str(n) for n in shape) for shape in cached_shapes(study, num_classes))
        raise UserError(
            f"prefix.max_gb={study.prefix.max_gb:g}: the frozen-prefix cache would take {human_size(size)} "
            f"(({num_train} training images × {study.debug.views} views + {num_val} validation images) × ({shapes}) values × "
            f"{np.dtype(DTYPES[study.prefix.dtype]).itemsize} bytes); expected at most the budget: raise prefix.max_gb, "
            f"lower debug.views, use prefix.dtype: float16, or turn the cache off with prefix.enabled: false"
        )


def cache_identity(study: StudyConfig) -> dict:
    """What the cached views depend on besides the base model: the scope, the views, their augmentation and seed (recorded in ``meta.json``)."""
    return {"scope": study.debug.trainable, "views": study.debug.views, "augment": study.data.augment.model_dump(mode="json"), "seed": study.seed}


def check_cache_matches(meta: dict, study: StudyConfig, where: str) -> None:
    """Refuse a cache built for other views, scope, augmentation or seed than ``study`` retrains with (keys an older cache lacks are not checked)."""
    wanted = cache_identity(study)
    for key, value in wanted.items():
        if key in meta and meta[key] != value:
            raise UserError(
                f"{where}: the frozen-prefix cache was built with {key} {meta[key]!r}, this retraining needs {value!r} "
                "(expected the study's own value; rerun the prefix stage with --force prefix)"
            )


def human_size(size: int) -> str:
    """Bytes as MB below a gigabyte, else GB."""
    return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


class PrefixCache:
    """A written cache, read memory-mapped from a local folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text())
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, split: str, k: int) -> np.ndarray:
        name = f"{split}_{k}"
        if name not in self._arrays:
            self._arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    @property
    def tensors(self) -> int:
        return len(self.meta["shapes"])

    def batch(self, split: str, indices: torch.Tensor, views: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The cached tensors of ``indices`` (training: in their ``views``) as float32 on ``device``."""
        rows = np.asarray(indices)
        batch = []
        for k in range(self.tensors):
            array = self.array(split, k)
            values = array[rows, np.asarray(views)] if views is not None else array[rows]
            tensor = torch.from_numpy(np.ascontiguousarray(values))
            if device.type == "cuda":
                tensor = tensor.pin_memory()
            batch.append(tensor.to(device, non_blocking=True).float())
        return tuple(batch)


def open_cache(ref: PrefixRef) -> PrefixCache:
    """The cache of ``ref``, downloaded once to this node when it lives in a remote results folder."""
    return PrefixCache(local_folder(ref.location, ref.key))


class CachedSplit(Dataset):
    """Indices and labels of a split, for a loader whose batches are gathered from the cache (:meth:`PrefixCache.batch`)."""

    def __init__(self, labels: np.ndarray):
        self.labels = np.asarray(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[int, int, int]:
        return index, int(self.labels[index]), index

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.int64)
        return rows, torch.from_numpy(self.labels[rows.numpy()]), rows
