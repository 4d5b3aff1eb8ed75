"""Stage ``prefix``: the frozen-prefix cache, computed once per base model on a Ray Data actor pool.

Each actor holds the base model's :class:`~raycf.models.prefix.FrozenPrefix` for
``debug.trainable`` and turns (split, image, view) records into the
activations that enter the first retrained layer: every view of every
training image (``debug.views``), the plain validation images.  The driver
writes them into the cache's arrays (:mod:`raycf.data.prefix_cache`).  With
``trainable: all`` (or ``prefix.enabled: false``) there is nothing to cache:
the stage says so and writes only ``meta.json``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch

from raycf.results import storage
from raycf.results.artefacts import store_ref
from raycf.models.checkpoint import CHECKPOINT_FILE, load_classifier_checkpoint
from raycf.runtime.cluster import ensure_ray
from raycf.config import StudyConfig
from raycf.runtime.console import log
from raycf.data.image_store import StoreRef, open_store
from raycf.models.prefix import FrozenPrefix
from raycf.outputs.predict import inference_model
from raycf.data.prefix_cache import DTYPES, META_FILE, cache_bytes, cache_identity, cached_shapes, human_size, uses_cache
from raycf.runtime.ray_data import actor_pool, data_context
from raycf.data.views import model_inputs, view_seeds

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun


class PrefixComputer:
    """Ray Data actor: the base model's frozen prefix; (split, image, view) records in, cached activations out."""

    def __init__(self, study: StudyConfig, model_location: str, images: StoreRef, use_gpu: bool):
        self.study = study
        model, self.device, self.precision = inference_model(study, load_classifier_checkpoint(model_location, study.model.arch), use_gpu)
        self.store = open_store(images)
        self.prefix = FrozenPrefix(model, study.debug.trainable).eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        study = self.study
        indices, views = batch["image_index"].astype(np.int64), batch["view"].astype(np.int64)
        pixels = np.stack([self.store.images(str(split))[index] for split, index in zip(batch["split"], indices)])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device)
        seeds = view_seeds(study.seed, "train", indices, views)
        inputs = model_inputs(images, study.data.image_size, study.data.augment, seeds, plain=torch.from_numpy(views == 0), preprocess=study.data.preprocess)
        with self.precision.autocast():
            outputs = self.prefix(inputs)
        dtype = DTYPES[study.prefix.dtype]
        return {"split": batch["split"], "image_index": indices, "view": views, **{f"t{k}": output.float().cpu().numpy().astype(dtype) for k, output in enumerate(outputs)}}


def prefix_records(num_train: int, num_val: int, views: int) -> list[dict[str, Any]]:
    """Every view of every training image, then the plain validation images."""
    train = [{"split": "train", "image_index": index, "view": view} for index in range(num_train) for view in range(views)]
    return train + [{"split": "val", "image_index": index, "view": 0} for index in range(num_val)]


def write_cache(batches: Iterable[dict[str, np.ndarray]], study: StudyConfig, shapes: list[tuple[int, ...]], num_train: int, num_val: int, output: str) -> None:
    """Write the batches of :class:`PrefixComputer` into the cache's arrays and ``meta.json`` under ``output``."""
    dtype = DTYPES[study.prefix.dtype]
    with tempfile.TemporaryDirectory() as folder:
        arrays = {
            (split, k): np.lib.format.open_memmap(Path(folder, f"{split}_{k}.npy"), mode="w+", dtype=dtype, shape=leading + shape)
            for k, shape in enumerate(shapes)
            for split, leading in (("train", (num_train, study.debug.views)), ("val", (num_val,)))
        }
        for batch in batches:
            for split in ("train", "val"):
                rows = batch["split"] == split
                where = (batch["image_index"][rows], batch["view"][rows]) if split == "train" else batch["image_index"][rows]
                for k in range(len(shapes)):
                    arrays[(split, k)][where] = batch[f"t{k}"][rows]
        for array in arrays.values():
            array.flush()
        del arrays
        meta = {"enabled": True, "scope": study.debug.trainable, "views": study.debug.views, "dtype": study.prefix.dtype, **cache_identity(study), "shapes": [list(s) for s in shapes], "train": num_train, "val": num_val}
        Path(folder, META_FILE).write_text(json.dumps(meta, indent=2))
        for path in sorted(Path(folder).iterdir()):
            storage.upload_file(path, storage.join_uri(output, path.name))


def write_cache_here(study: StudyConfig, model_location: str, images: StoreRef, output: str, batch_size: int = 64) -> None:
    """The whole cache computed in this process (no Ray): tests and benchmarks."""
    store = open_store(images)
    num_train, num_val = len(store.labels("train")), len(store.labels("val"))
    computer = PrefixComputer(study, model_location, images, use_gpu=False)
    records = prefix_records(num_train, num_val, study.debug.views)
    columns = {key: np.array([record[key] for record in records]) for key in ("split", "image_index", "view")}
    batches = ({key: values[start : start + batch_size] for key, values in columns.items()} for start in range(0, len(records), batch_size))
    classes = len(load_classifier_checkpoint(model_location).class_names)
    write_cache((computer(batch) for batch in batches), study, cached_shapes(study, classes), num_train, num_val, output)


def run(run: "StageRun") -> dict:
    """Write the cache's arrays and ``meta.json`` (or only ``meta.json`` when retraining cannot use a cache)."""
    import ray

    study = run.study
    if not uses_cache(study):
        reason = "prefix.enabled is false" if not study.prefix.enabled else f"debug.trainable: {study.debug.trainable} trains every layer"
        log(f"prefix: no cache ({reason}); retraining runs the whole network from the image store")
        storage.write_text(run.path(META_FILE), json.dumps({"enabled": False, "reason": reason}))
        return {"enabled": False}
    ensure_ray()
    data_context()
    images = store_ref(run.results)
    store = open_store(images)
    num_train, num_val = len(store.labels("train")), len(store.labels("val"))
    classes = len(load_classifier_checkpoint(run.upstream("base", CHECKPOINT_FILE)).class_names)
    shapes = cached_shapes(study, classes)
    settings = study.prefix
    arguments = {"study": study, "model_location": run.upstream("base", CHECKPOINT_FILE), "images": images, "use_gpu": settings.use_gpu}
    records = ray.data.from_items(prefix_records(num_train, num_val, study.debug.views))
    computed = actor_pool(records, PrefixComputer, arguments, actors=settings.actors, batch_size=settings.batch_size, batch_format="numpy", use_gpu=settings.use_gpu)
    write_cache(computed.iter_batches(batch_format="numpy", batch_size=None), study, shapes, num_train, num_val, run.output)
    size = cache_bytes(study, classes, num_train, num_val)
    log(f"prefix: {num_train} training images × {study.debug.views} views and {num_val} validation images cached at {' + '.join('×'.join(map(str, s)) for s in shapes)} ({settings.dtype}, {human_size(size)})")
    return {"enabled": True, "bytes": size, "shapes": [list(s) for s in shapes]}
