"""The features and masks actors, without Ray: deterministic views, mask columns, Parquet types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import write_image_store
from raycf.results.arrow import column_array, vector_column
from raycf.models.checkpoint import ClassifierCheckpoint
from raycf.config import study_from_mapping
from raycf.data.datasets import load_splits
from raycf.method.bank import CfeBank
from raycf.method.masks import compute_masks
from raycf.models.build import build_model
from raycf.stages.features import FeatureExtractor, feature_records
from raycf.data.views import view_seed
from raycf.stages.masks import masks_table


def test_vector_columns_survive_parquet_as_plain_fixed_size_lists(tmp_path: Path):
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    nested = np.arange(24).reshape(3, 2, 4) % 3 == 0
    pq.write_table(pa.table({"a": vector_column(vectors, pa.float32()), "m": vector_column(nested, pa.bool_())}), tmp_path / "t.parquet")
    table = pq.read_table(tmp_path / "t.parquet")
    assert str(table.schema.field("a").type) == "fixed_size_list<element: float>[4]"
    assert str(table.schema.field("m").type) == "fixed_size_list<element: fixed_size_list<element: bool>[4]>[2]"
    assert table.schema.metadata is None or b"ray" not in b"".join(table.schema.metadata.values())
    assert np.array_equal(column_array(table.column("a")), vectors)
    assert np.array_equal(column_array(table.column("m")), nested)


def test_feature_records_cover_every_image_and_extra_views_of_training_images():
    records = feature_records({"train": 2, "val": 1, "test": 1}, views=3)
    assert [(r["folder"], r["image_index"], r["view"]) for r in records] == [
        ("train", 0, 0), ("train", 1, 0), ("val", 0, 0), ("test", 0, 0),
        ("train_augmented", 0, 1), ("train_augmented", 0, 2), ("train_augmented", 1, 1), ("train_augmented", 1, 2),
    ]  # fmt: skip
    assert view_seed(0, "train", 3, 1) == view_seed(0, "train", 3, 1)
    assert len({view_seed(0, "train", 3, 1), view_seed(0, "train", 3, 2), view_seed(1, "train", 3, 1), view_seed(0, "train", 4, 1)}) == 4


@pytest.fixture(scope="module")
def extractor_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    study = study_from_mapping(
        {"name": "t", "seed": 0, "data": {"kind": "digits", "image_size": 16, "test_fraction": 0.5, "val_fraction": 0.2}, "model": {"arch": "vgg_tiny"}}
    )
    torch.manual_seed(0)
    model = build_model(study.model, 10)
    checkpoint = ClassifierCheckpoint("vgg_tiny", 64, 10, [str(d) for d in range(10)], 16, "test", model.state_dict())
    (folder / "model.pt").write_bytes(checkpoint.to_bytes())
    return study, str(folder / "model.pt"), write_image_store(study, folder / "images")


def records_table(rows: list[tuple[str, int, int]]) -> pa.Table:
    return pa.table(
        {
            "folder": [split if view == 0 else "train_augmented" for split, _, view in rows],
            "split": [split for split, _, _ in rows],
            "image_index": pa.array([index for _, index, _ in rows], pa.int64()),
            "view": pa.array([view for _, _, view in rows], pa.int64()),
        }
    )


def test_augmented_views_depend_on_the_view_not_on_the_worker_or_the_batch(extractor_inputs):
    study, model_location, images = extractor_inputs
    rows = [("train", 0, 0), ("train", 0, 1), ("train", 0, 2), ("train", 5, 1), ("test", 3, 0)]
    first = FeatureExtractor(study, model_location, images, use_gpu=False)(records_table(rows))
    other_worker = FeatureExtractor(study, model_location, images, use_gpu=False)
    other_worker(records_table([("train", 7, 3), ("val", 2, 0)]))  # a worker that has done other work
    torch.manual_seed(123)  # and whose global RNG is elsewhere
    reversed_batch = other_worker(records_table(rows[::-1]))
    a_first, a_reversed = column_array(first.column("a")), column_array(reversed_batch.column("a"))[::-1]
    assert np.array_equal(a_first, a_reversed)
    assert np.array_equal(column_array(first.column("logits")), column_array(reversed_batch.column("logits"))[::-1])
    assert not np.allclose(a_first[0], a_first[1]) and not np.allclose(a_first[1], a_first[2])
    assert first.column("image_id").to_pylist()[0] == extractor_inputs_ids(study)[0]
    logits = column_array(first.column("logits"))
    assert first.column("pred").to_pylist() == logits.argmax(1).tolist()
    assert column_array(first.column("confidence")) == pytest.approx(torch.softmax(torch.from_numpy(logits), 1).max(1).values.numpy(), rel=1e-5)


def extractor_inputs_ids(study) -> list[str]:
    return load_splits(study.data, study.seed).train.ids


def tiny_bank() -> CfeBank:
    """Three filters, three classes; masks from the biases: class 0 -> {0}, class 1 -> {1, 2}, class 2 -> {}."""
    bias = torch.tensor([[5.0, -5.0, -5.0], [-5.0, 5.0, 5.0], [-5.0, -5.0, -5.0]])
    head_weight = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    return CfeBank(torch.zeros(3, 3, 3), bias, head_weight, torch.tensor([0.0, 0.0, 0.1]))


def test_compute_masks_known_answer():
    activations = torch.tensor([[1.0, 0.2, 0.2], [0.1, 1.0, 1.0]])
    logits = tiny_bank().logits(activations)
    columns = compute_masks(tiny_bank(), activations, logits, topk=2)
    assert columns["pred"].tolist() == [0, 1]
    assert columns["topk_classes"].tolist() == [[0, 2], [1, 2]]
    assert columns["mc_mask"].tolist() == [[True, False, False], [False, True, True]]
    assert columns["mc_size"].tolist() == [1, 2]
    assert columns["masked_pred"].tolist() == [0, 1]
    # class 2's mask is empty: the head's bias decides, and the empty-mask prediction is class 2
    assert columns["topk_mc_sizes"].tolist() == [[1, 0], [2, 0]]
    assert columns["topk_masked_preds"].tolist() == [[0, 2], [1, 2]]
    assert columns["empty_pred"].tolist() == [2, 2]
    assert np.array_equal(columns["topk_mc_masks"][:, 0], columns["mc_mask"])
    probabilities = torch.softmax(logits, 1)
    assert columns["confidence"] == pytest.approx(probabilities.max(1).values.numpy())
    table = masks_table(
        {"image_index": np.array([0, 1]), "image_id": np.array(["x", "y"]), "split": np.array(["test"] * 2), "label": np.array([0, 2]), "a": activations.numpy()},
        columns,
    )
    assert str(table.schema.field("mc_mask").type) == "fixed_size_list<item: bool>[3]"
    assert str(table.schema.field("topk_mc_masks").type) == "fixed_size_list<item: fixed_size_list<item: bool>[3]>[2]"
