"""Per-image predictions of a classifier on the study's splits: the one pass each model makes over them.

The final stage (and ``raycf debug``) runs each retrained model once over
train, val and test and keeps its predictions
(``predictions.parquet``: ``split``, ``image_index``, ``image_id``,
``label``, ``model``, ``pred``, ``confidence``); Tables 2 and 3 and the
report's gallery are computed from those rows, so the test split is read
once per model.  The base model's rows come from the features stage.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from raycf.checkpoint import ClassifierCheckpoint, parse_classifier_checkpoint
from raycf.config import StudyConfig
from raycf.data import SPLITS
from raycf.image_store import StoredImages, StoreRef, open_store
from raycf.models import FilterClassifier, classifier_from_checkpoint, device_for
from raycf.precision import Precision, prepare_device, prepare_model
from raycf.training.loops import batched_collate, device_batches
from raycf.views import model_inputs


def inference_model(study: StudyConfig, checkpoint: ClassifierCheckpoint, use_gpu: bool) -> tuple[FilterClassifier, torch.device, Precision]:
    """The classifier of ``checkpoint`` in eval mode, on its device (CUDA settings, channels_last), with the study's precision."""
    device = device_for(use_gpu)
    prepare_device(device)
    model = prepare_model(classifier_from_checkpoint(study.model, checkpoint), device)
    return model, device, Precision.of(study.model.precision, device)


@torch.no_grad()
def predict_splits(study: StudyConfig, images: StoreRef, model_bytes: bytes, model_name: str, splits: tuple[str, ...] = SPLITS, use_gpu: bool = False) -> pd.DataFrame:
    """One row per image of ``splits``: the model's prediction and its softmax probability."""
    model, device, precision = inference_model(study, parse_classifier_checkpoint(model_bytes, model_name, study.model.arch), use_gpu)
    store = open_store(images)
    frames = []
    for split in splits:
        dataset = StoredImages(store, split)
        loader = DataLoader(dataset, batch_size=study.debug.eval_batch_size, pin_memory=device.type == "cuda", collate_fn=batched_collate(dataset))
        confidences, predictions = [], []
        for inputs, _labels in device_batches(loader, device, lambda images, _indices: model_inputs(images, study.data.image_size, preprocess=study.data.preprocess)):
            with precision.autocast():
                best = torch.softmax(model(inputs).float(), dim=1).max(dim=1)
            confidences.append(best.values)
            predictions.append(best.indices)
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "image_index": np.arange(len(dataset), dtype=np.int64),
                    "image_id": store.ids(split),
                    "label": store.labels(split),
                    "model": model_name,
                    "pred": torch.cat(predictions).cpu().numpy().astype(np.int64) if predictions else np.zeros(0, np.int64),
                    "confidence": torch.cat(confidences).cpu().numpy().astype(np.float32) if confidences else np.zeros(0, np.float32),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def predict_models(study: StudyConfig, images: StoreRef, models: dict[str, bytes], splits: tuple[str, ...] = SPLITS, use_gpu: bool = False) -> pd.DataFrame:
    """:func:`predict_splits` for several named models, one after the other, in this process."""
    return pd.concat([predict_splits(study, images, model_bytes, name, splits, use_gpu) for name, model_bytes in models.items()], ignore_index=True)


def predict_on_ray(study: StudyConfig, images: StoreRef, models: dict[str, bytes], tasks: int | None = None) -> pd.DataFrame:
    """:func:`predict_splits` for each named ``model.pt``, as parallel Ray tasks (one GPU each with ``debug.use_gpu``), rows in the models' order.

    ``tasks``: at most that many tasks, each predicting its share of the
    models in turn (fewer worker start-ups when there are many small
    models); None: one task per model.
    """
    import ray

    names = list(models)
    count = len(names) if tasks is None else max(1, min(tasks, len(names)))
    shares = [names[start::count] for start in range(count)]
    task = ray.remote(predict_models).options(num_cpus=1, num_gpus=1 if study.debug.use_gpu else 0)
    frames = ray.get([task.remote(study, images, {name: models[name] for name in share}, SPLITS, study.debug.use_gpu) for share in shares])
    frame = pd.concat(frames, ignore_index=True)
    position = frame["model"].map({name: index for index, name in enumerate(names)}).to_numpy()
    return frame.iloc[np.argsort(position, kind="stable")].reset_index(drop=True)
