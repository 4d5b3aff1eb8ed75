"""Stage ``features``: the pooled vector ``a`` and the logits of every image, on Ray Data.

One Ray Data pipeline over per-image records (split, image index, view):
an actor pool whose actors each hold the classifier (and the dataset) runs
the images through it in batches of ``features.batch_size``.  Output, under
``<results>/features/``:

* ``<split>/`` for ``train``, ``val`` and ``test``: one row per image, view 0
  (the plain, unaugmented image);
* ``train_augmented/``: views 1 … ``cfe.views``-1 of every training image,
  each augmented with a seed derived from (study seed, split, image, view),
  so the same study gives the same vectors whatever worker computes them.

Columns (plain ``fixed_size_list`` vectors, no Ray extension types):
``image_index`` (position in its split), ``image_id``, ``split``, ``label``,
``view``, ``pred``, ``confidence`` (max softmax), ``logits``
(``fixed_size_list<float32>[C]``) and ``a`` (``fixed_size_list<float32>[K]``).
Read them with :func:`raycf.results.artefacts.load_features`, which never needs Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from raycf.results.arrow import vector_column
from raycf.results.artefacts import AUGMENTED_FOLDER, store_ref
from raycf.models.checkpoint import CHECKPOINT_FILE, load_classifier_checkpoint
from raycf.runtime.cluster import ensure_ray
from raycf.config import StudyConfig
from raycf.runtime.console import log
from raycf.data.datasets import SPLITS, log_read
from raycf.data.image_store import StoreRef, open_store
from raycf.outputs.predict import inference_model
from raycf.runtime.ray_data import actor_pool, data_context, write_folders
from raycf.data.views import model_inputs, view_seed

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun

FEATURE_FOLDERS = (*SPLITS, AUGMENTED_FOLDER)


class FeatureExtractor:
    """Ray Data actor: holds the classifier (read from ``model_location``) and opens the image store; records in, vectors out.

    Input batches are pyarrow tables of records (``folder``, ``split``,
    ``image_index``, ``view``); view 0 is the plain image, other views are
    augmented with their seeds (:mod:`raycf.data.views`), on the actor's device.
    """

    def __init__(self, study: StudyConfig, model_location: str, images: StoreRef, use_gpu: bool):
        self.study = study
        self.model, self.device, self.precision = inference_model(study, load_classifier_checkpoint(model_location, study.model.arch), use_gpu)
        self.store = open_store(images)

    def inputs(self, splits: list[str], indices: list[int], views: list[int]) -> torch.Tensor:
        """The model inputs of (split, image, view) records."""
        for split, index in zip(splits, indices):
            log_read(split, index)
        pixels = np.stack([self.store.images(split)[index] for split, index in zip(splits, indices)])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device, non_blocking=True)
        seeds = torch.tensor([view_seed(self.study.seed, split, index, view) for split, index, view in zip(splits, indices, views)], dtype=torch.int64)
        data = self.study.data
        return model_inputs(images, data.image_size, data.augment, seeds, plain=torch.tensor(views) == 0, preprocess=data.preprocess)

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        records = batch.to_pydict()
        splits, indices, views = records["split"], records["image_index"], records["view"]
        with self.precision.autocast():
            logits, activations = self.model.forward_with_features(self.inputs(splits, indices, views))
        probabilities = torch.softmax(logits.float(), dim=1)
        confidence, pred = probabilities.max(dim=1)
        labels = [int(self.store.labels(split)[index]) for split, index in zip(splits, indices)]
        ids = [self.store.ids(split)[index] for split, index in zip(splits, indices)]
        return pa.table(
            {
                "folder": pa.array(records["folder"], pa.string()),
                "image_index": pa.array(indices, pa.int64()),
                "image_id": pa.array(ids, pa.string()),
                "split": pa.array(splits, pa.string()),
                "label": pa.array(labels, pa.int64()),
                "view": pa.array(views, pa.int32()),
                "pred": pa.array(pred.cpu().numpy(), pa.int64()),
                "confidence": pa.array(confidence.cpu().numpy(), pa.float32()),
                "logits": vector_column(logits.float().cpu().numpy(), pa.float32()),
                "a": vector_column(activations.float().cpu().numpy(), pa.float32()),
            }
        )


def feature_records(sizes: dict[str, int], views: int) -> list[dict[str, Any]]:
    """One record per (split, image, view): view 0 of every image, views 1… of training images."""
    records = []
    for split in SPLITS:
        for index in range(sizes[split]):
            records.append({"folder": split, "split": split, "image_index": index, "view": 0})
    for index in range(sizes["train"]):
        for view in range(1, views):
            records.append({"folder": AUGMENTED_FOLDER, "split": "train", "image_index": index, "view": view})
    return records


def run(run: "StageRun") -> dict:
    """Compute and write the features of every image (see the module docstring)."""
    import ray

    study = run.study
    ensure_ray()
    data_context()
    images = store_ref(run.results)
    store = open_store(images)
    sizes = {name: len(store.labels(name)) for name in SPLITS}
    records = feature_records(sizes, study.cfe.views)
    counts = {folder: sum(record["folder"] == folder for record in records) for folder in FEATURE_FOLDERS}
    settings = study.features
    arguments = {"study": study, "model_location": run.upstream("base", CHECKPOINT_FILE), "images": images, "use_gpu": settings.use_gpu}
    dataset = actor_pool(
        ray.data.from_items(records), FeatureExtractor, arguments, actors=settings.actors, batch_size=settings.batch_size, batch_format="pyarrow", use_gpu=settings.use_gpu
    )
    write_folders(dataset, counts, run.output)
    log(
        "features: "
        + ", ".join(f"{folder} {counts[folder]}" for folder in FEATURE_FOLDERS)
        + f" vectors of {study.cfe.views} view(s) per training image"
    )
    return {f"{folder}_rows": count for folder, count in counts.items()}
