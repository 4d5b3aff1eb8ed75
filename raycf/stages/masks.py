"""Stage ``masks``: every image's MC masks, on Ray Data over the cached vectors.

A Ray Data pipeline over ``features/{train,val,test}/`` (the plain view of
every image): an actor pool whose actors each hold the CFE bank computes,
per image, the binary MC mask of the inferred class and of each of the top-k
classes, and the predictions with those masks applied.  Output:
``<results>/masks/<split>/*.parquet``, one row per image, readable by
pandas/pyarrow without Ray (vectors are plain ``fixed_size_list`` columns):

=====================  ===================================  ==========================================
column                 type                                 meaning
=====================  ===================================  ==========================================
``image_index``        int64                                position of the image in its split
``image_id``           string                               the dataset's image id
``split``              string                               train, val or test
``label``              int64                                true class
``pred``               int64                                the classifier's prediction (inferred class)
``confidence``         float32                              its softmax probability (max softmax)
``topk_classes``       fixed_size_list<int64>[k]            the k most probable classes, best first
``topk_probs``         fixed_size_list<float32>[k]          their probabilities
``a``                  fixed_size_list<float32>[K]          the pooled filter vector
``mc_mask``            fixed_size_list<bool>[K]             MC mask of ``pred`` (filters the prediction rests on)
``mc_size``            int32                                filters in ``mc_mask``
``masked_pred``        int64                                prediction of ``W (a ⊙ mc_mask) + b``
``masked_confidence``  float32                              probability of ``pred`` under that mask
``topk_mc_masks``      fixed_size_list<fixed_size_list<bool>[K]>[k]   MC mask of each top-k class
``topk_mc_sizes``      fixed_size_list<int32>[k]            their sizes
``topk_masked_preds``  fixed_size_list<int64>[k]            prediction with each of those masks
``empty_pred``         int64                                prediction with an empty mask (argmax of the bias)
=====================  ===================================  ==========================================

k is ``min(masks.topk, C)``; ``topk_mc_masks[0]`` equals ``mc_mask``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from raycf.results import storage
from raycf.results.arrow import table_arrays, vector_column
from raycf.results.artefacts import BANK_FILE
from raycf.runtime.cluster import ensure_ray
from raycf.runtime.console import log
from raycf.data.datasets import SPLITS
from raycf.method.bank import parse_bank
from raycf.method.masks import compute_masks
from raycf.models.device import device_for
from raycf.runtime.ray_data import actor_pool, data_context, write_folders

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun

# Columns of the features Parquet a mask computation needs.
INPUT_COLUMNS = ["image_index", "image_id", "split", "label", "logits", "a"]


def masks_table(inputs: dict[str, np.ndarray], computed: dict[str, np.ndarray]) -> pa.Table:
    """The masks Parquet schema (module docstring) from input and computed columns."""
    return pa.table(
        {
            "image_index": pa.array(inputs["image_index"], pa.int64()),
            "image_id": pa.array(inputs["image_id"], pa.string()),
            "split": pa.array(inputs["split"], pa.string()),
            "label": pa.array(inputs["label"], pa.int64()),
            "pred": pa.array(computed["pred"], pa.int64()),
            "confidence": pa.array(computed["confidence"], pa.float32()),
            "topk_classes": vector_column(computed["topk_classes"], pa.int64()),
            "topk_probs": vector_column(computed["topk_probs"], pa.float32()),
            "a": vector_column(inputs["a"], pa.float32()),
            "mc_mask": vector_column(computed["mc_mask"], pa.bool_()),
            "mc_size": pa.array(computed["mc_size"], pa.int32()),
            "masked_pred": pa.array(computed["masked_pred"], pa.int64()),
            "masked_confidence": pa.array(computed["masked_confidence"], pa.float32()),
            "topk_mc_masks": vector_column(computed["topk_mc_masks"], pa.bool_()),
            "topk_mc_sizes": vector_column(computed["topk_mc_sizes"], pa.int32()),
            "topk_masked_preds": vector_column(computed["topk_masked_preds"], pa.int64()),
            "empty_pred": pa.array(computed["empty_pred"], pa.int64()),
        }
    )


class MaskComputer:
    """Ray Data actor: holds the CFE bank (read from ``bank_location``); cached vectors in, mask rows out."""

    def __init__(self, bank_location: str, topk: int, use_gpu: bool):
        self.device = device_for(use_gpu)
        self.bank = parse_bank(storage.read_bytes(bank_location), bank_location).to(self.device)
        self.topk = topk

    def __call__(self, batch: pa.Table) -> pa.Table:
        inputs = table_arrays(batch.select(INPUT_COLUMNS))
        activations = torch.tensor(inputs["a"], dtype=torch.float32, device=self.device)
        logits = torch.tensor(inputs["logits"], dtype=torch.float32, device=self.device)
        return masks_table(inputs, compute_masks(self.bank, activations, logits, self.topk))


def run(run: "StageRun") -> dict:
    """Compute and write ``masks/<split>/`` for every split (see the module docstring)."""
    import ray

    study = run.study
    settings = study.masks
    ensure_ray()
    data_context()
    # The vectors are small (K + C floats per image): read them here and hand
    # them to Ray Data.  With read_parquet, read tasks need CPUs too, and a
    # fixed actor pool holding every CPU of the cluster waits for them forever.
    tables = {split: storage.read_table(run.upstream("features", split), columns=INPUT_COLUMNS) for split in SPLITS}
    counts = {split: table.num_rows for split, table in tables.items()}
    arguments = {"bank_location": run.upstream("cfe", BANK_FILE), "topk": settings.topk, "use_gpu": settings.use_gpu}
    dataset = actor_pool(
        ray.data.from_arrow(list(tables.values())), MaskComputer, arguments, actors=settings.actors, batch_size=settings.batch_size, batch_format="pyarrow", use_gpu=settings.use_gpu
    )
    write_folders(dataset, counts, run.output, column="split", keep_column=True)
    summary = {}
    for split in SPLITS:
        arrays = table_arrays(storage.read_table(run.path(split), columns=["label", "pred", "mc_size", "masked_pred"]))
        summary[f"{split}_images"] = len(arrays["label"])
        summary[f"{split}_mc_size"] = round(float(arrays["mc_size"].mean()), 4) if len(arrays["label"]) else 0.0
        summary[f"{split}_masked_agreement"] = round(float((arrays["masked_pred"] == arrays["pred"]).mean()), 6) if len(arrays["label"]) else 0.0
    log(
        "masks: MC mask of the inferred class: "
        + "; ".join(
            f"{split} {summary[f'{split}_images']} images, {summary[f'{split}_mc_size']:.1f} filters, masked prediction = prediction "
            f"for {100 * summary[f'{split}_masked_agreement']:.1f} %"
            for split in SPLITS
        )
    )
    return summary
