"""Paper Tables 2 and 3 from per-image predictions (raycf.method.treatment) and the predictions themselves (raycf.outputs.predict)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from conftest import write_image_store
from raycf.results import storage
from raycf.models.checkpoint import ClassifierCheckpoint
from raycf.config import DebugConfig, study_from_mapping
from raycf.data.image_store import open_store
from raycf.method import treatment
from raycf.models.build import build_model
from raycf.outputs.predict import predict_splits
from raycf.stages.debug import describe
from raycf.data.views import model_inputs


def test_predictions_of_a_model_on_every_split_are_its_argmax_and_softmax(tmp_path):
    study = study_from_mapping({"name": "t", "data": {"kind": "digits", "image_size": 16, "test_fraction": 0.8, "val_fraction": 0.2}})
    images = write_image_store(study, tmp_path / "images")
    store = open_store(images)
    torch.manual_seed(0)
    model = build_model(study.model, 10).eval()
    model_bytes = ClassifierCheckpoint("vgg_tiny", 64, 10, [str(d) for d in range(10)], 16, "x", model.state_dict()).to_bytes()
    predictions = predict_splits(study, images, model_bytes, "base")
    assert list(predictions.columns) == ["split", "image_index", "image_id", "label", "model", "pred", "confidence"]
    assert predictions.groupby("split").size().to_dict() == {name: len(store.labels(name)) for name in ("train", "val", "test")}
    val = predictions[predictions["split"] == "val"]
    inputs = model_inputs(torch.from_numpy(np.array(store.images("val"))).permute(0, 3, 1, 2), 16)
    with torch.no_grad():
        probabilities = torch.softmax(model(inputs), dim=1)
    assert val["pred"].tolist() == probabilities.argmax(1).tolist()
    assert val["confidence"].to_numpy() == pytest.approx(probabilities.max(1).values.numpy(), rel=1e-5)
    assert val["image_id"].tolist() == store.ids("val") and val["label"].tolist() == store.labels("val").tolist()


@pytest.mark.parametrize("scope", ["last_conv_and_head", "head"])
def test_predictions_from_the_prefix_cache_are_the_whole_networks_on_train_and_val(tmp_path, scope):
    from raycf.data.prefix_cache import PrefixRef
    from raycf.stages.prefix import write_cache_here

    study = study_from_mapping(
        {
            "name": "t",
            "data": {"kind": "digits", "image_size": 16, "test_fraction": 0.8, "val_fraction": 0.2},
            "debug": {"trainable": scope, "views": 2},
            "prefix": {"dtype": "float32"},
        }
    )
    images = write_image_store(study, tmp_path / "images")
    torch.manual_seed(0)
    model = build_model(study.model, 10).eval()
    model_bytes = ClassifierCheckpoint("vgg_tiny", 64, 10, [str(d) for d in range(10)], 16, "x", model.state_dict()).to_bytes()
    (tmp_path / "model.pt").write_bytes(model_bytes)
    write_cache_here(study, str(tmp_path / "model.pt"), images, str(tmp_path / "prefix"))
    whole = predict_splits(study, images, model_bytes, "m")
    cached = predict_splits(study, images, model_bytes, "m", prefix=PrefixRef(str(tmp_path / "prefix"), "test-prefix"))
    # train (its plain view 0) and val through the trainable tail on the cache: the whole network's predictions; test is always the whole network
    pd.testing.assert_frame_equal(cached.drop(columns="confidence"), whole.drop(columns="confidence"))
    assert cached["confidence"].to_numpy() == pytest.approx(whole["confidence"].to_numpy(), rel=1e-5)


def test_evaluation_of_predictions_gives_accuracy_recall_and_support():
    predictions = pd.DataFrame(
        {"split": ["test"] * 6 + ["val"] * 2, "label": [0, 0, 1, 1, 1, 2, 0, 1], "pred": [0, 1, 1, 1, 0, 0, 0, 0]}
    )
    evaluation = treatment.evaluation_of(predictions, num_classes=4)
    assert evaluation.accuracy == {"test": pytest.approx(3 / 6), "val": 0.5}
    assert evaluation.support["test"].tolist() == [2, 3, 1, 0]
    assert evaluation.recall["test"][:3].tolist() == pytest.approx([0.5, 2 / 3, 0.0]) and math.isnan(evaluation.recall["test"][3])


def test_treatment_tables_from_three_models_predictions():
    rows = []
    for model, preds in (("base", [0, 1, 1, 0]), ("control", [0, 1, 1, 1]), ("debugged", [1, 1, 1, 1])):
        for split in ("train", "val", "test"):
            rows += [{"split": split, "label": label, "model": model, "pred": pred} for label, pred in zip([0, 1, 1, 1], preds)]
    tables = treatment.treatment_tables(
        pd.DataFrame(rows), ["a", "b"], debugged_config=DebugConfig(lambda1=0.1, lambda2=0.01), control_best_epoch=2, debugged_best_epoch=3
    )
    assert tables.table2["test_acc"].tolist() == [0.75, 1.0, 0.75]
    assert tables.table2["lambda1"].tolist()[1:] == [0.0, 0.1]
    assert tables.class_recall["recall_debugged"].tolist() == [0.0, 1.0]
    assert tables.table3[["class", "group"]].values.tolist() == [["b", "improved"], ["a", "worsened"]]


def _evaluation(recall: list[float], acc: tuple[float, float, float]) -> treatment.ModelEvaluation:
    return treatment.ModelEvaluation(
        accuracy=dict(zip(("train", "val", "test"), acc)), recall={"test": np.array(recall)}, support={"test": np.array([10, 10, 10, 10, 10])}
    )


def test_tables_2_and_3(tmp_path):
    base = _evaluation([0.5, 0.6, 0.7, 0.8, 0.9], (0.99, 0.9, 0.7))
    control = _evaluation([0.5, 0.6, 0.8, 0.8, 0.9], (0.995, 0.91, 0.72))
    debugged = _evaluation([0.9, 0.4, 0.8, 0.8, 0.7], (0.993, 0.92, 0.73))
    table2 = treatment.build_table2(base, control, debugged, lambda1=0.016, lambda2=3.2e-4, indicator="paper", control_best_epoch=3, debugged_best_epoch=5)
    assert list(table2["model"]) == ["base", "control", "debugged"]
    assert list(table2.columns[:3]) == ["model", "lambda1", "lambda2"] and {"train_acc", "val_acc", "test_acc"} <= set(table2.columns)
    assert math.isnan(table2.loc[0, "lambda1"]) and table2.loc[1, "lambda1"] == 0 and table2.loc[2, "lambda2"] == 3.2e-4
    assert list(table2["test_acc"]) == [0.7, 0.72, 0.73] and table2.loc[2, "best_epoch"] == 5

    names = ["zero", "one", "two", "three", "four"]
    recall = treatment.build_class_recall(names, base, control, debugged)
    table3 = treatment.build_table3(recall)
    assert list(table3["class"]) == ["zero", "two", "four", "one"]  # +0.4, +0.1 | -0.2, -0.2 ; "three" did not change
    assert list(table3["group"]) == ["improved", "improved", "worsened", "worsened"]
    assert table3["change"].tolist() == pytest.approx([0.4, 0.1, -0.2, -0.2])
    assert table3.loc[0, "recall_before"] == 0.5 and table3.loc[0, "recall_after"] == 0.9 and table3.loc[1, "recall_control"] == 0.8

    folder = tmp_path / "results"
    for frame, file_name in ((table2, "table2.parquet"), (table3, "table3.parquet")):
        storage.write_table(pa.Table.from_pandas(frame, preserve_index=False), str(folder / "debug" / file_name))
    schema = pa.parquet.read_schema(folder / "debug" / "table2.parquet")
    assert not any(isinstance(field.type, pa.ExtensionType) for field in schema)
    assert pd.read_parquet(folder / "debug" / "table3.parquet").equals(table3)
    text = describe(str(folder))
    assert "Table 2" in text and "Table 3" in text
    assert "debugged - control test accuracy: +1.00 points" in text
    assert "zero" in text and "+0.400" in text


def test_table3_top_three_of_each_group():
    changes = [0.3, 0.2, 0.1, 0.05, -0.05, -0.1, -0.2, -0.3]
    count = len(changes)
    ones = _recall_eval([0.5] * count, count)
    after = _recall_eval([0.5 + c for c in changes], count)
    table3 = treatment.build_table3(treatment.build_class_recall([f"c{i}" for i in range(count)], ones, ones, after))
    assert list(table3["class"]) == ["c0", "c1", "c2", "c7", "c6", "c5"]


def _recall_eval(recall: list[float], count: int) -> treatment.ModelEvaluation:
    return treatment.ModelEvaluation(accuracy={}, recall={"test": np.array(recall)}, support={"test": np.full(count, 10)})


