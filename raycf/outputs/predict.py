"""Per-image predictions of a classifier on the study's splits: the one pass each model makes over them.

The final stage (and ``raycf debug``) runs each retrained model once over
train, val and test and keeps its predictions
(``predictions.parquet``: ``split``, ``image_index``, ``image_id``,
``label``, ``model``, ``pred``, ``confidence``); Tables 2 and 3 and the
report's gallery are computed from those rows, so the test split is read
once per model.  Where retraining runs on the frozen-prefix cache, train
and val are scored from it (view 0 is the plain image): only the trainable
layers run.  The base model's rows come from the features stage.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from raycf.models.checkpoint import ClassifierCheckpoint, parse_classifier_checkpoint
from raycf.config import StudyConfig
from raycf.data.datasets import SPLITS
from raycf.data.image_store import StoredImages, StoreRef, open_store
from raycf.models.contract import FilterClassifier
from raycf.models.prefix import TrainableTail
from raycf.models.build import classifier_from_checkpoint
from raycf.models.device import device_for
from raycf.models.precision import Precision, prepare_device, prepare_model
from raycf.data.prefix_cache import PrefixCache, PrefixRef, open_cache
from raycf.training.loops import batched_collate, device_batches
from raycf.data.views import model_inputs

CACHED_SPLITS = ("train", "val")  # what the frozen-prefix cache holds (test never: it is never trained on)


def inference_model(study: StudyConfig, checkpoint: ClassifierCheckpoint, use_gpu: bool) -> tuple[FilterClassifier, torch.device, Precision]:
    """The classifier of ``checkpoint`` in eval mode, on its device (CUDA settings, channels_last), with the study's precision."""
    device = device_for(use_gpu)
    prepare_device(device)
    model = prepare_model(classifier_from_checkpoint(study.model, checkpoint), device)
    return model, device, Precision.of(study.model.precision, device)


@torch.no_grad()
def predict_splits(
    study: StudyConfig,
    images: StoreRef,
    model_bytes: bytes,
    model_name: str,
    splits: tuple[str, ...] = SPLITS,
    use_gpu: bool = False,
    prefix: PrefixRef | None = None,
) -> pd.DataFrame:
    """One row per image of ``splits``: the model's prediction and its softmax probability.

    With ``prefix`` (the study's frozen-prefix cache), train and val are scored
    from the cache's plain view (view 0), only the trainable layers running;
    the test split, which the cache does not hold, always runs the whole network.
    """
    model, device, precision = inference_model(study, parse_classifier_checkpoint(model_bytes, model_name, study.model.arch), use_gpu)
    store = open_store(images)
    frames = []
    for split in splits:
        if prefix is not None and split in CACHED_SPLITS:
            batches = cached_logits(model, open_cache(prefix), study.debug.trainable, store.labels(split), split, study.debug.eval_batch_size, device)
        else:
            batches = image_logits(model, store, split, study, device)
        confidences, predictions = [], []
        for logits in batches:
            with precision.autocast():
                best = torch.softmax(logits().float(), dim=1).max(dim=1)
            confidences.append(best.values)
            predictions.append(best.indices)
        labels = store.labels(split)
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "image_index": np.arange(len(labels), dtype=np.int64),
                    "image_id": store.ids(split),
                    "label": labels,
                    "model": model_name,
                    "pred": torch.cat(predictions).cpu().numpy().astype(np.int64) if predictions else np.zeros(0, np.int64),
                    "confidence": torch.cat(confidences).cpu().numpy().astype(np.float32) if confidences else np.zeros(0, np.float32),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def image_logits(model: FilterClassifier, store, split: str, study: StudyConfig, device: torch.device) -> Iterator[Callable[[], torch.Tensor]]:
    """Per batch of the split's stored images (plain), a call that runs the whole network on it."""
    dataset = StoredImages(store, split)
    loader = DataLoader(dataset, batch_size=study.debug.eval_batch_size, pin_memory=device.type == "cuda", collate_fn=batched_collate(dataset))
    for inputs, _labels in device_batches(loader, device, lambda images, _indices: model_inputs(images, study.data.image_size, preprocess=study.data.preprocess)):
        yield lambda inputs=inputs: model(inputs)


def cached_logits(
    model: FilterClassifier, cache: PrefixCache, scope: str, labels: np.ndarray, split: str, batch_size: int, device: torch.device
) -> Iterator[Callable[[], torch.Tensor]]:
    """Per batch of a cached split (training images in their plain view 0), a call that runs only the trainable tail on it."""
    tail = TrainableTail(model, scope).eval()
    for start in range(0, len(labels), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(labels)))
        views = torch.zeros_like(indices) if split == "train" else None
        cached = cache.batch(split, indices, views, device)
        yield lambda cached=cached: tail(*cached)[0]


def predict_models(
    study: StudyConfig, images: StoreRef, models: dict[str, bytes], splits: tuple[str, ...] = SPLITS, use_gpu: bool = False, prefix: PrefixRef | None = None
) -> pd.DataFrame:
    """:func:`predict_splits` for several named models, one after the other, in this process."""
    return pd.concat([predict_splits(study, images, model_bytes, name, splits, use_gpu, prefix) for name, model_bytes in models.items()], ignore_index=True)


def predict_on_ray(study: StudyConfig, images: StoreRef, models: dict[str, bytes], tasks: int | None = None, prefix: PrefixRef | None = None) -> pd.DataFrame:
    """:func:`predict_splits` for each named ``model.pt``, as parallel Ray tasks (one GPU each with ``debug.use_gpu``), rows in the models' order.

    ``prefix``: score train and val from this frozen-prefix cache (see
    :func:`predict_splits`).  ``tasks``: at most that many tasks, each predicting its share of the
    models in turn (fewer worker start-ups when there are many small
    models); None: one task per model.
    """
    import ray

    names = list(models)
    count = len(names) if tasks is None else max(1, min(tasks, len(names)))
    shares = [names[start::count] for start in range(count)]
    task = ray.remote(predict_models).options(num_cpus=1, num_gpus=1 if study.debug.use_gpu else 0)
    frames = ray.get([task.remote(study, images, {name: models[name] for name in share}, SPLITS, study.debug.use_gpu, prefix) for share in shares])
    frame = pd.concat(frames, ignore_index=True)
    position = frame["model"].map({name: index for index, name in enumerate(names)}).to_numpy()
    return frame.iloc[np.argsort(position, kind="stable")].reset_index(drop=True)
