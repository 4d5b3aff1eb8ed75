"""Debug retraining (METHOD §5): the training loop, its control, recovery, and Tables 2 and 3.

Unit tests use Ray Train's local mode (``workers=0``) on 16-pixel digits and
a random-init vgg_tiny; only the 2-worker DDP smoke run and the fault
injection run use the shared Ray cluster.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from raycf import debug, storage
from raycf.checkpoint import ClassifierCheckpoint, parse_classifier_checkpoint
from raycf.config import study_from_mapping, with_values
from raycf.data import load_splits
from raycf.losses import DebugLoss
from raycf.models import build_model
from raycf.training import accuracy_on_splits, train_one_epoch

METRICS = {"epoch", "train_loss", "train_ce", "train_mc", "train_nonmc", "train_acc", "val_loss", "val_acc", "active_mc", "active_nonmc"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny digits study (16 px, 288 training images), a random-init base model and random G."""
    folder = tmp_path_factory.mktemp("debug")
    study = study_from_mapping(
        {
            "name": "t",
            "storage_path": str(folder / "results"),
            "data": {"kind": "digits", "image_size": 16, "test_fraction": 0.8, "val_fraction": 0.2},
            "model": {"arch": "vgg_tiny", "dropout": 0.2},
            "debug": {"epochs": 2, "batch_size": 32, "lr": 0.01, "workers": 1, "max_failures": 1},
        }
    )
    splits = load_splits(study.data, study.seed)
    torch.manual_seed(0)
    model = build_model(study.model, splits.num_classes)
    calibrate_batchnorm(model, splits.split("train"))
    base_bytes = ClassifierCheckpoint(
        arch="vgg_tiny", num_filters=64, num_classes=10, class_names=splits.class_names, image_size=16, config_hash="x", state_dict=model.state_dict()
    ).to_bytes()
    global_filters = np.random.default_rng(0).random((10, 64)) < 0.4
    return study, splits, base_bytes, global_filters, folder


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, dataset) -> None:
    """Running statistics of every BatchNorm over ``dataset``, as a trained model would have them."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=96):
        model(images)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def _run(tiny, lambdas, name, **options):
    study, _, base_bytes, global_filters, folder = tiny
    return debug.run_debug_training(
        study, global_filters, base_bytes, lambda1=lambdas[0], lambda2=lambdas[1], name=name, storage_path=str(folder / "ray"), **options
    )


# ------------------------------------------------------------- the training loop


def test_control_and_debugged_runs_see_the_same_batches(tiny, monkeypatch):
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    real = debug.train_one_epoch

    def recording(model, loader, optimizer, loss_fn, **options):
        epoch: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen.append(epoch)

        def passthrough():
            for images, labels in loader:
                epoch.append((images.clone(), labels.clone()))
                yield images, labels

        return real(model, passthrough(), optimizer, loss_fn, **options)

    monkeypatch.setattr(debug, "train_one_epoch", recording)
    control = _run(tiny, (0.0, 0.0), "order-control", workers=0)
    debugged = _run(tiny, (0.5, 0.5), "order-debug", workers=0)
    assert len(seen) == 4  # two runs × two epochs
    for control_epoch, debugged_epoch in zip(seen[:2], seen[2:]):
        assert len(control_epoch) == len(debugged_epoch) == math.ceil(288 / 32)
        for (images_c, labels_c), (images_d, labels_d) in zip(control_epoch, debugged_epoch):
            assert torch.equal(labels_c, labels_d)
            assert torch.equal(images_c, images_d)  # same order and same augmentation draws
    assert not torch.equal(seen[0][0][1], seen[1][0][1])  # the order changes from epoch to epoch
    # on the same data, the debugging terms did their job: the reward λ1·mc − λ2·nonmc rose more
    def reward(row):
        return 0.5 * row["train_mc"] - 0.5 * row["train_nonmc"]

    assert reward(debugged.history[-1]) - reward(debugged.history[0]) > reward(control.history[-1]) - reward(control.history[0])
    assert debugged.history[-1]["train_nonmc"] < control.history[-1]["train_nonmc"]


def test_local_mode_reports_every_metric_and_no_checkpoint(tiny):
    result = _run(tiny, (0.016, 3.2e-4), "local", workers=0)
    assert result.best_model_bytes is None
    assert [row["epoch"] for row in result.history] == [1, 2]
    for row in result.history:
        assert METRICS <= set(row)
        assert 0 <= row["active_mc"] <= 64 and 0 <= row["active_nonmc"] <= 64
        assert row["active_mc"] + row["active_nonmc"] <= 64
        assert row["train_loss"] == pytest.approx(row["train_ce"] - 0.016 * row["train_mc"] + 3.2e-4 * row["train_nonmc"], rel=1e-6)
    best = max(result.history, key=lambda row: (row["val_acc"], -row["epoch"]))
    assert (result.best_epoch, result.best_val_acc) == (best["epoch"], best["val_acc"])


def test_centred_indicator_counts_fewer_active_filters_than_the_paper_one(tiny):
    study = tiny[0]
    centred_study = with_values(study, {"debug.indicator": "centred", "debug.epochs": 1})
    paper = _run((with_values(study, {"debug.epochs": 1}), *tiny[1:]), (0.016, 3.2e-4), "paper", workers=0)
    centred = _run((centred_study, *tiny[1:]), (0.016, 3.2e-4), "centred", workers=0)
    paper_active = paper.history[0]["active_mc"] + paper.history[0]["active_nonmc"]
    centred_active = centred.history[0]["active_mc"] + centred.history[0]["active_nonmc"]
    # paper: every non-zero filter is active; centred: those above their training mean, about half
    assert centred_active < paper_active
    assert 0.2 * 64 < centred_active < 0.8 * 64


def test_filter_statistics_are_the_training_mean_and_std(tiny):
    study, splits, base_bytes, _, _ = tiny
    checkpoint = parse_classifier_checkpoint(base_bytes)
    model = build_model(study.model, 10, load_weights=False)
    model.load_state_dict(checkpoint.state_dict)
    loader = torch.utils.data.DataLoader(splits.split("train"), batch_size=100)
    stats = debug.filter_statistics(model, loader)
    with torch.no_grad():
        activations = torch.cat([model.features(images) for images, _ in loader])
    assert torch.allclose(stats.mean, activations.mean(0), atol=1e-5)
    assert torch.allclose(stats.std, activations.std(0, unbiased=False), atol=1e-5)


@pytest.mark.parametrize("scope", ["head", "last_conv_and_head", "all"])
def test_gradients_reach_the_trainable_scope_only(tiny, scope):
    study, splits, base_bytes, global_filters, _ = tiny
    checkpoint = parse_classifier_checkpoint(base_bytes)
    model = build_model(study.model, 10, load_weights=False)
    model.load_state_dict(checkpoint.state_dict)
    trainable = {id(p) for p in model.set_trainable(scope)}
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images = torch.stack([splits.train[i][0] for i in range(32)])
    labels = torch.tensor([splits.train[i][1] for i in range(32)])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    loss_fn = DebugLoss(torch.as_tensor(global_filters, dtype=torch.float32), 0.5, 0.05)
    train_one_epoch(model, [(images, labels)] * 2, optimizer, loss_fn, freeze_frozen_norms=True)
    after = model.state_dict()
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], after[name])
        assert changed == (id(parameter) in trainable), name
        assert (parameter.grad is not None) == (id(parameter) in trainable), name
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d) and not module.weight.requires_grad:
            assert torch.equal(before[f"{name}.running_mean"], after[f"{name}.running_mean"]), name  # frozen layers stay frozen


def test_head_only_debugging_equals_the_control(tiny):
    """The MC terms act on the pooled vector, which the head does not change: same update as λ = 0."""
    study, splits, base_bytes, global_filters, _ = tiny
    images = torch.stack([splits.train[i][0] for i in range(16)])
    labels = torch.tensor([splits.train[i][1] for i in range(16)])
    heads = []
    for lambdas in ((0.0, 0.0), (0.5, 0.05)):
        model = build_model(study.model, 10, load_weights=False)
        model.load_state_dict(parse_classifier_checkpoint(base_bytes).state_dict)
        optimizer = torch.optim.SGD(model.set_trainable("head"), lr=0.1)
        torch.manual_seed(1)
        train_one_epoch(model, [(images, labels)], optimizer, DebugLoss(torch.as_tensor(global_filters, dtype=torch.float32), *lambdas))
        heads.append(model.fc.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])


# ------------------------------------------------------------- Ray cluster runs


def test_two_worker_ddp_run_keeps_the_best_validation_checkpoint(tiny, ray_session):
    study, _, base_bytes, _, _ = tiny
    result = _run(tiny, (0.016, 3.2e-4), "ddp", workers=2)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert all(METRICS <= set(row) for row in result.history)
    best = max(result.history, key=lambda row: (row["val_acc"], -row["epoch"]))
    assert result.best_epoch == best["epoch"] and result.best_val_acc == best["val_acc"]
    saved = parse_classifier_checkpoint(result.best_model_bytes, expected_arch="vgg_tiny", expected_classes=10)
    assert saved.metrics["epoch"] == result.best_epoch
    # last_conv_and_head: the trunk below the last conv block is the base's, bit for bit
    base = parse_classifier_checkpoint(base_bytes).state_dict
    model = build_model(study.model, 10, load_weights=False)
    # (the state dict names the last conv block twice: as trunk.<i> and as last_conv.<j>)
    in_scope = tuple(f"trunk.{i}." for i, layer in enumerate(model.trunk) if any(layer is part for part in model.last_conv)) + ("last_conv.", "fc.")
    assert len(in_scope) == 4
    frozen = [name for name in base if not name.startswith(in_scope)]
    assert all(torch.equal(base[name], saved.state_dict[name]) for name in frozen)
    assert all(not torch.equal(base[name], saved.state_dict[name]) for name in base if name.startswith(in_scope) and "num_batches" not in name)


def test_worker_failure_resumes_from_the_checkpoint(tiny, ray_session, tmp_path):
    study = with_values(tiny[0], {"debug.epochs": 3})
    marker = tmp_path / "failed-once"
    result = _run((study, *tiny[1:]), (0.016, 3.2e-4), "fault", workers=1, fail_once=debug.FailOnce(epoch=1, marker=str(marker)))
    assert marker.exists()  # the failure did happen
    assert [row["epoch"] for row in result.history] == [1, 2, 3]  # every epoch exactly once
    failed_at = marker.stat().st_mtime
    # epoch 1 was trained before the failure and restored, not retrained; 2 and 3 after it
    assert result.history[0]["time"] < failed_at < result.history[1]["time"] < result.history[2]["time"]
    assert result.best_model_bytes is not None


# ------------------------------------------------------------------ evaluation


def test_evaluate_classifier_accuracy_and_recall(tiny):
    study, splits, base_bytes, _, _ = tiny
    evaluation = debug.evaluate_classifier(study, base_bytes, ("val", "test"), splits=splits)
    model = build_model(study.model, 10, load_weights=False)
    model.load_state_dict(parse_classifier_checkpoint(base_bytes).state_dict)
    expected = accuracy_on_splits(model, splits, ("val", "test"))
    for name in ("val", "test"):
        assert evaluation.accuracy[name] == pytest.approx(expected[f"{name}_acc"])
        support = evaluation.support[name]
        assert support.sum() == len(splits.split(name)) and support.shape == (10,)
        assert np.nansum(evaluation.recall[name] * support) / support.sum() == pytest.approx(evaluation.accuracy[name])


def _evaluation(recall: list[float], acc: tuple[float, float, float]) -> debug.ModelEvaluation:
    return debug.ModelEvaluation(
        accuracy=dict(zip(("train", "val", "test"), acc)), recall={"test": np.array(recall)}, support={"test": np.array([10, 10, 10, 10, 10])}
    )


def test_tables_2_and_3(tmp_path):
    base = _evaluation([0.5, 0.6, 0.7, 0.8, 0.9], (0.99, 0.9, 0.7))
    control = _evaluation([0.5, 0.6, 0.8, 0.8, 0.9], (0.995, 0.91, 0.72))
    debugged = _evaluation([0.9, 0.4, 0.8, 0.8, 0.7], (0.993, 0.92, 0.73))
    table2 = debug.build_table2(base, control, debugged, lambda1=0.016, lambda2=3.2e-4, indicator="paper", control_best_epoch=3, debugged_best_epoch=5)
    assert list(table2["model"]) == ["base", "control", "debugged"]
    assert list(table2.columns[:3]) == ["model", "lambda1", "lambda2"] and {"train_acc", "val_acc", "test_acc"} <= set(table2.columns)
    assert math.isnan(table2.loc[0, "lambda1"]) and table2.loc[1, "lambda1"] == 0 and table2.loc[2, "lambda2"] == 3.2e-4
    assert list(table2["test_acc"]) == [0.7, 0.72, 0.73] and table2.loc[2, "best_epoch"] == 5

    names = ["zero", "one", "two", "three", "four"]
    recall = debug.build_class_recall(names, base, control, debugged)
    table3 = debug.build_table3(recall)
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
    text = debug.describe_debug(str(folder))
    assert "Table 2" in text and "Table 3" in text
    assert "debugged - control test accuracy: +1.00 points" in text
    assert "zero" in text and "+0.400" in text


def test_table3_top_three_of_each_group():
    changes = [0.3, 0.2, 0.1, 0.05, -0.05, -0.1, -0.2, -0.3]
    count = len(changes)
    ones = _recall_eval([0.5] * count, count)
    after = _recall_eval([0.5 + c for c in changes], count)
    table3 = debug.build_table3(debug.build_class_recall([f"c{i}" for i in range(count)], ones, ones, after))
    assert list(table3["class"]) == ["c0", "c1", "c2", "c7", "c6", "c5"]


def _recall_eval(recall: list[float], count: int) -> debug.ModelEvaluation:
    return debug.ModelEvaluation(accuracy={}, recall={"test": np.array(recall)}, support={"test": np.full(count, 10)})


# ---------------------------------------------------------------- stage and CLI


def test_debug_stage_and_command_are_registered():
    from raycf.cli import build_parser
    from raycf.config import StudyConfig
    from raycf.pipeline import stages

    stage = stages()["debug"]
    assert stage.upstream == ("masks",) and stage.sections == ("debug",)
    study = StudyConfig(name="t")
    assert stage.extra_hash(study) != stage.extra_hash(with_values(study, {"tau": 0.5}))
    assert stage.extra_hash(study) != stage.extra_hash(with_values(study, {"freq_threshold": 0.0}))
    args = build_parser().parse_args(["debug", "s.yaml", "--set", "debug.lambda1=0.1", "analysis.tau=0.8"])
    assert args.stage == "debug" and args.overrides == ["debug.lambda1=0.1", "analysis.tau=0.8"]
