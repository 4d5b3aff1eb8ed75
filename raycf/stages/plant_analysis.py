"""Planted studies only (``data.plant``), inside stage ``analyze``: does the base model use the bug, and does the method point at it?

Writes, beside the analysis tables:

* ``analysis/plant.parquet``: per ranking of the planted class's filters
  (CFE global-MC frequency, CFE class-specificity, plain a·W, random, the
  oracle) and k, the mean planted-feature sensitivity of its top k filters
  with a bootstrap interval over images (:mod:`raycf.method.plant_check`);
* ``analysis/plant_effect.parquet``: the base model on the clean validation
  and test images, as they are and with the feature planted on the fly: the
  planted class's recall, and the share of the other classes' images it
  predicts as the planted class (the shortcut's signature).

Both use the clean images (those the images stage did not plant), so each
image is its own control.  One forward pass of the base model on this
process's CPU (or GPU with base.use_gpu): a few thousand images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from raycf.data.image_store import open_store, read_planted
from raycf.data.views import model_inputs
from raycf.method.plant import apply_feature, class_index_of
from raycf.method.plant_check import filter_scores, sensitivity_table
from raycf.models.checkpoint import parse_classifier_checkpoint
from raycf.outputs.predict import inference_model
from raycf.results import storage
from raycf.results.artefacts import base_model_bytes, class_names, load_features, store_ref
from raycf.runtime.console import log

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun

EVALUATED = ("val", "test")
BATCH = 512


def write_plant_analysis(run: "StageRun", global_mc: pd.DataFrame) -> dict[str, float]:
    """Write ``plant.parquet`` and ``plant_effect.parquet`` into the analyze stage's output; the summary's plant entries."""
    study, results = run.study, run.results
    plant = study.data.plant
    names = class_names(results)
    target = class_index_of(plant, names)
    store = open_store(store_ref(results))
    checkpoint = parse_classifier_checkpoint(base_model_bytes(results), "base model", study.model.arch)
    model, device, _precision = inference_model(study, checkpoint, study.base.use_gpu)
    clean = {split: np.flatnonzero(~read_planted(store, split)) for split in EVALUATED}
    images = np.concatenate([np.asarray(store.images(split)[indices]) for split, indices in clean.items()])
    labels = np.concatenate([store.labels(split)[indices] for split, indices in clean.items()])
    without, preds_without = _activations(model, images, study, device)
    with_feature, preds_with = _activations(model, apply_feature(images, plant), study, device)

    of_class = labels == target
    counts = global_mc.pivot(index="class", columns="filter", values="count").sort_index().to_numpy()
    accepted = global_mc.drop_duplicates("class").set_index("class")["images"].sort_index().to_numpy()
    train = load_features(results, "train")
    scores = filter_scores(counts, accepted, target, train.a[train.label == target], model.fc.weight.detach().cpu().numpy())
    table = sensitivity_table(with_feature[of_class] - without[of_class], scores, bootstrap=study.analysis.bootstrap, seed=study.seed)
    table.insert(0, "class", plant.class_name)
    table.insert(1, "kind", plant.kind)
    effect = effect_frame(labels, preds_without, preds_with, target, plant.class_name)
    storage.write_frame(table, run.path("plant.parquet"))
    storage.write_frame(effect, run.path("plant_effect.parquet"))
    at3 = table[table["k"] == table["k"].unique()[min(1, table["k"].nunique() - 1)]].set_index("ranking")["sensitivity"]
    log(
        f"analyze: planted {plant.kind} on {plant.class_name}: top-{int(table['k'].unique()[min(1, table['k'].nunique() - 1)])} filters' sensitivity "
        + ", ".join(f"{ranking} {value:+.4f}" for ranking, value in at3.items())
    )
    summary = {f"plant_top{int(row.k)}_{row.ranking}": round(float(row.sensitivity), 6) for row in table.itertuples()}
    summary.update({f"plant_{row.measure}_{state}": round(float(getattr(row, state)), 6) for row in effect.itertuples() for state in ("clean", "planted")})
    return summary


def effect_frame(labels: np.ndarray, preds_without: np.ndarray, preds_with: np.ndarray, target: int, target_name: str) -> pd.DataFrame:
    """The base model's dependence on the feature: the planted class's recall and the others' share predicted as it, clean vs planted."""
    of_class, others = labels == target, labels != target
    rows = [
        {"measure": "class_recall", "description": f"{target_name} images predicted {target_name}", "images": int(of_class.sum()),
         "clean": _share(preds_without[of_class] == target), "planted": _share(preds_with[of_class] == target)},
        {"measure": "others_as_class", "description": f"other images predicted {target_name}", "images": int(others.sum()),
         "clean": _share(preds_without[others] == target), "planted": _share(preds_with[others] == target)},
        {"measure": "accuracy", "description": "all images correct", "images": int(len(labels)),
         "clean": _share(preds_without == labels), "planted": _share(preds_with == labels)},
    ]  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["change"] = frame["planted"] - frame["clean"]
    return frame


def _share(flags: np.ndarray) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


@torch.no_grad()
def _activations(model, images: np.ndarray, study, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Pooled vectors (N×K) and predicted classes of N×S×S×3 uint8 images."""
    pooled, predicted = [], []
    for start in range(0, len(images), BATCH):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + BATCH])).permute(0, 3, 1, 2).to(device)
        logits, activations = model.forward_with_features(model_inputs(batch, study.data.image_size, preprocess=study.data.preprocess))
        pooled.append(activations.float().cpu().numpy())
        predicted.append(logits.argmax(dim=1).cpu().numpy())
    if not pooled:
        return np.zeros((0, model.num_filters)), np.zeros(0, dtype=np.int64)
    return np.concatenate(pooled), np.concatenate(predicted)
