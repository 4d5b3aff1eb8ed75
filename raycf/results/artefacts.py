"""Reading a study's results folder (local path or ``s3://`` URI) back: pyarrow, pandas and torch, never Ray.

Every artefact a later stage, the report, ``raycf explain`` or ``raycf
rerun`` reads comes through here, so each format is read one way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from raycf.results import storage
from raycf.results.arrow import table_arrays
from raycf.models.checkpoint import CHECKPOINT_FILE, complete, parse_classifier_checkpoint
from raycf.config import StudyConfig
from raycf.data.datasets import SPLITS
from raycf.errors import UserError
from raycf.data.image_store import StoreRef
from raycf.method.bank import CfeBank, parse_bank
from raycf.method.detection import EVALUATED_SPLITS, SPLIT_COLUMNS, StudyData
from raycf.method.global_mc import TRAIN_COLUMNS
from raycf.method.learned_detector import runner_up_mi_sizes
from raycf.data.prefix_cache import PrefixRef, uses_cache
from raycf.runtime.ray_data import EMPTY_MARKER

MARKER_FILE = "_stage.json"  # a finished stage's marker, written last into its folder

BANK_FILE = "bank.pt"
AUGMENTED_FOLDER = "train_augmented"  # features/: views 1… of the training images
PREDICTIONS_FILE = "predictions.parquet"


def load_results_study(results: str) -> StudyConfig:
    """The resolved study saved in a results folder (``config.yaml``)."""
    location = storage.join_uri(storage.normalise_root(results), "config.yaml")
    if not storage.exists(location):
        raise UserError(f"{results}: no config.yaml (expected the results folder of a study, e.g. results/digits)")
    return StudyConfig.model_validate(yaml.safe_load(storage.read_text(location)))


def read_frame(results: str, *parts: str) -> pd.DataFrame | None:
    """A Parquet file (or folder) of the results folder as pandas, or None when it is missing."""
    location = storage.join_uri(results, *parts)
    if not storage.exists(location):
        return None
    return storage.read_table(location).to_pandas()


FINAL_FILES = ("final.parquet", "class_recall.parquet")  # in final/ (committed with its stage); at the results root before


def read_final_frame(results: str, name: str) -> pd.DataFrame | None:
    """``final/<name>`` (``final.parquet``, ``class_recall.parquet``) of a finished final stage; None when missing.

    Older results kept these two at the results root, read there when the
    stage's folder lacks them.
    """
    if read_marker(results, "final") is None:
        return None
    frame = read_frame(results, "final", name)
    return frame if frame is not None else read_frame(results, name)


def read_marker(results: str, folder: str) -> dict | None:
    """The ``_stage.json`` of a finished stage's folder (its hash, times and summary), or None."""
    location = storage.join_uri(results, folder, MARKER_FILE)
    if not storage.exists(location):
        return None
    return json.loads(storage.read_text(location))


def stage_marker(results: str, folder: str) -> dict:
    """The marker of a stage the caller needs finished (a one-line error when it is not)."""
    marker = read_marker(results, folder)
    if marker is None:
        raise UserError(f"{results}: no finished {folder}/ stage (expected a study that ran it)")
    return marker


def written_key(results: str, folder: str) -> str:
    """The address of one write of a stage's folder: its stage hash and when it finished.

    The hash alone names the inputs, not the bytes: a stage rerun with
    ``--force`` or by other code of the same version writes other bytes under
    the same hash, and a node-local copy keyed by the hash alone would go stale.
    """
    return marker_key(stage_marker(results, folder))


def marker_key(marker: dict) -> str:
    """:func:`written_key` of a marker already read: its stage hash and its finish time, letters and digits only."""
    finished = "".join(character for character in str(marker.get("finished_at", "")) if character.isalnum())
    return f"{marker['hash']}-{finished}"


def store_ref(results: str) -> StoreRef:
    """The study's image store: its folder and the address of its write (:func:`written_key`)."""
    return StoreRef(storage.join_uri(results, "images"), written_key(results, "images"))


def prefix_ref(results: str, study: StudyConfig) -> PrefixRef | None:
    """The study's frozen-prefix cache, or None when its retraining runs the whole network."""
    if not uses_cache(study):
        return None
    return PrefixRef(storage.join_uri(results, "prefix"), written_key(results, "prefix"))


def base_model_bytes(results: str) -> bytes:
    """The base stage's ``model.pt``."""
    return storage.read_bytes(storage.join_uri(results, "base", CHECKPOINT_FILE))


# ------------------------------------------------------------------ features


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
    for ``train``, the augmented views.
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


def base_predictions(results: str) -> pd.DataFrame:
    """The base model's per-image predictions on every split, from its plain-view features (the base model's one read of each split)."""
    frames = []
    for split in SPLITS:
        features = load_features(results, split)
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "image_index": features.image_index.astype(np.int64),
                    "image_id": features.image_id.astype(str),
                    "label": features.label.astype(np.int64),
                    "model": "base",
                    "pred": features.pred.astype(np.int64),
                    "confidence": features.confidence.astype(np.float32),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------ CFE bank and masks


def load_bank(results: str) -> CfeBank:
    """The trained bank of a study (``<results>/cfe/bank.pt``)."""
    location = storage.join_uri(results, "cfe", BANK_FILE)
    if not storage.exists(location):
        raise UserError(f"{location}: CFE bank not found (run `raycf cfe STUDY` first)")
    return parse_bank(storage.read_bytes(location), location)


def class_names(results: str) -> list[str]:
    """The class names, in class order (from ``cfe/classes.parquet``)."""
    table = storage.read_table(storage.join_uri(results, "cfe", "classes.parquet"), columns=["class", "class_name"])
    frame = table.to_pandas().sort_values("class")
    return [str(name) for name in frame["class_name"]]


def load_masks(results: str, split: str, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """``masks/<split>/`` as numpy arrays sorted by image_index (masks as N×K / N×k×K booleans)."""
    table = storage.read_table(storage.join_uri(results, "masks", split), columns=None if columns is None else sorted({*columns, "image_index"}))
    arrays = table_arrays(table)
    order = np.argsort(arrays["image_index"], kind="stable")
    return {name: values[order] for name, values in arrays.items()}


def load_masks_frame(results: str, split: str) -> pd.DataFrame:
    """``masks/<split>/`` as a pandas DataFrame (vector columns hold numpy arrays), sorted by image_index."""
    table = storage.read_table(storage.join_uri(results, "masks", split))
    return table.to_pandas().sort_values("image_index", kind="stable").reset_index(drop=True)


def load_study_data(results: str, splits: tuple[str, ...] = EVALUATED_SPLITS, with_head: bool = True, detector_signals: bool = False) -> StudyData:
    """The masks an analysis needs (and, ``with_head``, the head's weights from the CFE bank).

    ``detector_signals`` adds to each split what the learned detector reads
    (:mod:`raycf.method.learned_detector`): ``logits`` (from the features),
    ``masked_confidence`` (from the masks) and, when the bank has MI
    generators and the masks hold a runner-up class, ``mi_size``.
    """
    bank = load_bank(results) if with_head or detector_signals else None
    columns = SPLIT_COLUMNS + (["masked_confidence"] if detector_signals else [])
    data = StudyData(
        train=load_masks(results, "train", TRAIN_COLUMNS),
        splits={split: load_masks(results, split, columns) for split in splits},
        class_names=class_names(results),
        head_weight=bank.head_weight.double().numpy() if with_head else None,
    )
    if detector_signals:
        for split, arrays in data.splits.items():
            _add_detector_signals(arrays, load_features(results, split), bank, split)
    return data


def _add_detector_signals(arrays: dict[str, np.ndarray], features: FeatureSet, bank: CfeBank, split: str) -> None:
    """``logits`` and, where the bank and top-k allow, ``mi_size`` of one split's mask arrays (aligned by image_index)."""
    if not np.array_equal(features.image_index, arrays["image_index"]):
        raise UserError(f"features/{split} and masks/{split} hold different images: rerun the masks stage")
    arrays["logits"] = features.logits
    if bank.has_mi and arrays["topk_classes"].shape[1] > 1:
        arrays["mi_size"] = runner_up_mi_sizes(bank, arrays["a"], arrays["topk_classes"][:, 1])


def global_mc_sets(results: str, tau: float, freq_threshold: float) -> np.ndarray:
    """G (C×K booleans) from ``<results>/masks/train`` for any τ and f."""
    return load_study_data(results, splits=(), with_head=False).global_filters(tau, freq_threshold)


# ------------------------------------------------------------------ search results


def trial_model_bytes(row: pd.Series, base_bytes: bytes, results: str = "") -> bytes | None:
    """The best epoch's ``model.pt`` of a leaderboard row (completed with ``base_bytes``, the base model), if its checkpoint is still there.

    ``results``: the results folder the row comes from; an older leaderboard
    of a bucket study recorded its checkpoints without the scheme, restored here.
    """
    folder = storage.with_scheme(str(row.get("checkpoint_path") or ""), results)
    location = storage.join_uri(folder, CHECKPOINT_FILE) if folder else ""
    if not folder or not storage.exists(location):
        return None
    saved = parse_classifier_checkpoint(storage.read_bytes(location), location)
    return complete(saved, base_bytes, location).to_bytes() if saved.partial else saved.to_bytes()


def debugged_model_bytes(results: str, base_bytes: bytes | None = None) -> tuple[str, bytes] | None:
    """The study's debugged model (``final.parquet``'s debugged row): its trial id and ``model.pt``, if still there.

    ``base_bytes``: the base model when the caller has read it already.
    """
    from raycf.search.leaderboard import read_leaderboard

    final = read_final_frame(results, "final.parquet")
    debugged = final[final["model"] == "debugged"] if final is not None else None
    if debugged is None or debugged.empty:
        return None
    trial_id = str(debugged["trial_id"].iloc[0])
    board = read_leaderboard(results)
    rows = board[board["trial_id"] == trial_id]
    model_bytes = trial_model_bytes(rows.iloc[0], base_bytes or base_model_bytes(results), results) if len(rows) else None
    return None if model_bytes is None else (trial_id, model_bytes)


def trial_val_predictions(board: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each leaderboard trial's validation predictions at its best epoch (``val_pred.npy`` beside its ``model.pt``), where it kept them."""
    import io

    from raycf.training.debug import VAL_PREDICTIONS_FILE

    predictions = {}
    for row in board.to_dict("records"):
        folder = str(row.get("checkpoint_path") or "")
        location = storage.join_uri(folder, VAL_PREDICTIONS_FILE) if folder else ""
        if folder and storage.exists(location):
            predictions[str(row["trial_id"])] = np.load(io.BytesIO(storage.read_bytes(location)), allow_pickle=False).astype(np.int64)
    return predictions
