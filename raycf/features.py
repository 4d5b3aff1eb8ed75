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
Read them with :func:`load_features`, which never needs Ray.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from raycf import storage
from raycf.config import StudyConfig
from raycf.data import SPLITS
from raycf.models import classifier_from_checkpoint, device_for

if TYPE_CHECKING:
    import ray.data

    from raycf.pipeline import StageRun

AUGMENTED_FOLDER = "train_augmented"
FEATURE_FOLDERS = (*SPLITS, AUGMENTED_FOLDER)
EMPTY_MARKER = "_empty"  # written instead of Parquet files into a folder with no rows


# ------------------------------------------------------------------ arrays


def vector_column(matrix: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    """A ``fixed_size_list<dtype>[width]`` column from an N×width (or N×a×b: nested) array."""
    matrix = np.asarray(matrix)
    if matrix.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=dtype), matrix.shape[1])
    inner = vector_column(matrix.reshape(-1, *matrix.shape[2:]), dtype)
    return pa.FixedSizeListArray.from_arrays(inner, matrix.shape[1])


def column_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A Parquet column as numpy: scalars as 1-D, (nested) fixed-size lists as N×… arrays."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    values = array.to_numpy(zero_copy_only=False)
    if not values.flags.writeable:  # zero-copy views are read-only; torch warns on those
        values = values.copy()
    return values.reshape(shape) if len(shape) > 1 else values


def table_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Every column of ``table`` through :func:`column_array`."""
    return {name: column_array(table.column(name)) for name in table.column_names}


def view_seed(seed: int, split: str, image_index: int, view: int) -> int:
    """The augmentation seed of one view: a function of its identity only, never of worker state."""
    digest = hashlib.sha256(f"{seed}/{split}/{image_index}/{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


# ---------------------------------------------------------------- reading


@dataclass
class FeatureSet:
    """Cached vectors of one split, sorted by (image_index, view)."""

    image_index: np.ndarray
    image_id: np.ndarray
    label: np.ndarray
    view: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray
    logits: np.ndarray  # N×C
    a: np.ndarray  # N×K

    def __len__(self) -> int:
        return len(self.label)


def load_features(results: str, split: str, views: str = "plain") -> FeatureSet:
    """The cached features of ``split`` (``train``, ``val``, ``test``).

    ``views="plain"`` gives one row per image (view 0); ``views="all"`` adds,
    for ``train``, the augmented views.  Reads Parquet only (no Ray).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if views not in ("plain", "all"):
        raise ValueError(f"views must be 'plain' or 'all' (got {views!r})")
    folders = [split] + ([AUGMENTED_FOLDER] if split == "train" and views == "all" else [])
    locations = [storage.join_uri(results, "features", folder) for folder in folders]
    tables = [storage.read_table(location) for location in locations if not storage.exists(storage.join_uri(location, EMPTY_MARKER))]
    arrays = table_arrays(pa.concat_tables(tables))
    order = np.lexsort((arrays["view"], arrays["image_index"]))
    return FeatureSet(**{name: arrays[name][order] for name in FeatureSet.__dataclass_fields__})


# ------------------------------------------------------------- the actors


class FeatureExtractor:
    """Ray Data actor: holds the classifier (read from ``model_location``) and the dataset; images in, vectors out.

    Input batches are pyarrow tables of records (``folder``, ``split``,
    ``image_index``, ``view``); view 0 uses the evaluation transform, other
    views the training augmentation seeded by :func:`view_seed`.
    """

    def __init__(self, study: StudyConfig, model_location: str, use_gpu: bool):
        from raycf.checkpoint import load_classifier_checkpoint
        from raycf.data import load_splits

        self.seed = study.seed
        self.splits = load_splits(study.data, study.seed)
        checkpoint = load_classifier_checkpoint(model_location, study.model.arch, self.splits.num_classes)
        self.device = device_for(use_gpu)
        self.model = classifier_from_checkpoint(study.model, checkpoint).to(self.device)
        self.datasets = {name: getattr(self.splits, name) for name in SPLITS}

    def image(self, split: str, index: int, view: int) -> torch.Tensor:
        """The model input of one (split, image, view)."""
        raw = self.datasets[split].raw(index)
        if view == 0:
            return self.splits.eval_transform(raw)
        torch.manual_seed(view_seed(self.seed, split, index, view))
        return self.splits.train_transform(raw)

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        records = batch.to_pydict()
        images = torch.stack(
            [self.image(split, index, view) for split, index, view in zip(records["split"], records["image_index"], records["view"])]
        )
        logits, activations = self.model.forward_with_features(images.to(self.device))
        probabilities = torch.softmax(logits.float(), dim=1)
        confidence, pred = probabilities.max(dim=1)
        labels = [int(self.datasets[split].labels[index]) for split, index in zip(records["split"], records["image_index"])]
        ids = [self.datasets[split].ids[index] for split, index in zip(records["split"], records["image_index"])]
        return pa.table(
            {
                "folder": pa.array(records["folder"], pa.string()),
                "image_index": pa.array(records["image_index"], pa.int64()),
                "image_id": pa.array(ids, pa.string()),
                "split": pa.array(records["split"], pa.string()),
                "label": pa.array(labels, pa.int64()),
                "view": pa.array(records["view"], pa.int32()),
                "pred": pa.array(pred.cpu().numpy(), pa.int64()),
                "confidence": pa.array(confidence.cpu().numpy(), pa.float32()),
                "logits": vector_column(logits.float().cpu().numpy(), pa.float32()),
                "a": vector_column(activations.float().cpu().numpy(), pa.float32()),
            }
        )


# --------------------------------------------------------------- Ray Data


def data_context(preserve_order: bool = True) -> None:
    """Ray Data settings of raycf's pipelines: ordered output; progress bars on a terminal, none in logs."""
    import logging
    import sys

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one line per execution and sink otherwise
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = preserve_order
    context.enable_progress_bars = sys.stderr.isatty()
    context.print_on_execution_start = False


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


def write_folders(dataset: "ray.data.Dataset", counts: dict[str, int], output: str, column: str = "folder", keep_column: bool = False) -> None:
    """Run ``dataset`` once, then write the rows of each ``column`` value to ``output/<value>/``.

    ``counts`` holds the expected rows per value (known from the input
    records); ``column`` is dropped from the files unless ``keep_column``.  A
    folder with no rows gets an ``_empty`` marker instead of Parquet files.
    """
    from ray.data.expressions import col

    materialised = dataset.materialize()
    for folder, count in counts.items():
        location = storage.join_uri(output, folder)
        if count == 0:
            storage.write_text(storage.join_uri(location, EMPTY_MARKER), "")
            continue
        part = materialised.filter(expr=col(column) == folder)
        (part if keep_column else part.drop_columns([column])).write_parquet(location)


def run_features_stage(run: "StageRun") -> dict:
    """Compute and write the features of every image (see the module docstring)."""
    import ray

    from raycf.checkpoint import CHECKPOINT_FILE
    from raycf.data import load_splits
    from raycf.pipeline import ensure_ray, log

    study = run.study
    ensure_ray()
    data_context()
    splits = load_splits(study.data, study.seed)
    sizes = {name: len(getattr(splits, name)) for name in SPLITS}
    records = feature_records(sizes, study.cfe.views)
    counts = {folder: sum(record["folder"] == folder for record in records) for folder in FEATURE_FOLDERS}
    settings = study.features
    dataset = ray.data.from_items(records).map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"study": study, "model_location": run.upstream("base", CHECKPOINT_FILE), "use_gpu": settings.use_gpu},
        compute=ray.data.ActorPoolStrategy(size=settings.actors),
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        num_gpus=1 if settings.use_gpu else 0,
    )
    write_folders(dataset, counts, run.output)
    log(
        "features: "
        + ", ".join(f"{folder} {counts[folder]}" for folder in FEATURE_FOLDERS)
        + f" vectors of {study.cfe.views} view(s) per training image"
    )
    return {f"{folder}_rows": count for folder, count in counts.items()}


def _register() -> None:
    from raycf.pipeline import Stage, register

    register(
        Stage(
            name="features",
            sections=("data", "model", "features"),
            upstream=("base",),
            run=run_features_stage,
            extra_hash=lambda study: study.cfe.views,
        )
    )


_register()
