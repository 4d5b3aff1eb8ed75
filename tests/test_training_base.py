"""Base training (raycf.training.base): the loop in this process, a 2-worker DDP run through the base stage."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from conftest import write_image_store
from raycf import pipeline
from raycf.results import storage
from raycf.models.checkpoint import load_classifier_checkpoint, parse_classifier_checkpoint
from raycf.config import load_study
from raycf.method.selection import best_epoch
from raycf.training.base import BaseJob, Phase, base_phases, base_train_loop, phase_at, scheduled_lr
from raycf.training.loops import seed_everything
from raycf.training.trainer import run_local


def test_phases_follow_the_reference_recipe(digits_study):
    study = load_study(digits_study, ["base.head_epochs=2", "base.head_lr=0.001", "base.epochs=3"])
    phases = base_phases(study)
    assert [(p.scope, p.epochs, p.lr) for p in phases] == [("head", 2, 0.001), ("all", 3, study.base.lr)]
    assert [phase_at(phases, e)[0].name for e in range(5)] == ["head", "head", "all", "all", "all"]
    assert phase_at(phases, 3) == (phases[1], 1)
    with pytest.raises(ValueError):
        phase_at(phases, 5)


def test_cosine_schedule_starts_at_lr_and_decays():
    phase = Phase("all", "all", 0.1, 4)
    rates = [scheduled_lr(phase, i, "cosine") for i in range(4)]
    assert rates[0] == pytest.approx(0.1) and rates[2] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert scheduled_lr(phase, 3, "constant") == 0.1
    assert rates[1] == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))


def test_training_loop_in_this_process_reports_every_epoch_and_keeps_the_best(digits_study, tmp_path):
    study = load_study(digits_study, ["base.head_epochs=1", "base.epochs=2"])
    images = write_image_store(study, tmp_path / "images")
    outcome = run_local(base_train_loop, BaseJob(study, images, [str(d) for d in range(10)]), tmp_path / "run")
    history = outcome.return_value
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert [row["phase"] for row in history] == ["head", "all", "all"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it learns
    saved = parse_classifier_checkpoint(outcome.best_files["model.pt"], expected_arch="vgg_tiny", expected_classes=10)
    assert saved.metrics["epoch"] == best_epoch(history)["epoch"]


def test_two_worker_ddp_run_then_cache(ray_session, digits_study, capsys):
    study = load_study(digits_study, ["base.workers=2", "base.epochs=2"])
    summaries = pipeline.run_stages(study, ["base"])
    results = study.results_uri
    summary = summaries["base"]
    assert summary["epochs"] == 2 and 1 <= summary["best_epoch"] <= 2
    assert summary["train_acc"] > 0.3 and "test_acc" not in summary  # the base stage never reads the test split
    epochs = pd.read_parquet(storage.join_uri(results, "base", "epochs.parquet"))
    assert list(epochs["epoch"]) == [1, 2]
    # the kept model is the best validation epoch's
    best_val = epochs["val_acc"].max()
    checkpoint = load_classifier_checkpoint(storage.join_uri(results, "base", "model.pt"), "vgg_tiny", 10)
    assert checkpoint.metrics["val_acc"] == pytest.approx(best_val)
    assert checkpoint.class_names == [str(d) for d in range(10)] and checkpoint.num_filters == 64
    assert checkpoint.config_hash == study.config_hash()
    assert summary["val_acc"] == pytest.approx(best_val, abs=1e-6)
    manifest = json.loads(storage.read_text(storage.join_uri(results, "manifest.json")))
    assert manifest["config_hash"] == study.config_hash() and manifest["versions"]["torch"].startswith("2.14.1")
    assert manifest["finished_at"] and manifest["stages"]["base"]["hash"] == pipeline.stage_hash(study, "base")
    assert storage.exists(storage.join_uri(results, "config.yaml"))

    capsys.readouterr()
    again = pipeline.run_stages(study, ["base"])
    assert again["base"] == summary
    assert "base: skipped, cached" in capsys.readouterr().err


def test_same_seed_same_initial_weights(digits_study):
    from raycf.models.build import build_model

    study = load_study(digits_study)
    seed_everything(5)
    first = build_model(study.model, 10).state_dict()
    seed_everything(5)
    second = build_model(study.model, 10).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bf16_reaches_the_fp32_validation_accuracy_within_one_point(tmp_path):
    """The same base training on digits in fp32 and under bf16 autocast (on the CPU), side by side.

    Trained to convergence (10 epochs) and compared on 432 validation images, so one point is four images:
    a 6-epoch run on 180 images moved by two images between precisions from noise alone."""
    from raycf.config import study_from_mapping

    accuracies = {}
    for precision in ("fp32", "bf16"):
        study = study_from_mapping(
            {
                "name": "p",
                "data": {"kind": "digits", "image_size": 16, "test_fraction": 0.2, "val_fraction": 0.3},
                "model": {"arch": "vgg_tiny", "precision": precision},
                "base": {"epochs": 10, "lr": 0.05, "lr_schedule": "cosine", "batch_size": 32, "workers": 1},
            }
        )
        images = write_image_store(study, tmp_path / f"images-{precision}")
        history = run_local(base_train_loop, BaseJob(study, images, [str(d) for d in range(10)]), tmp_path / precision).return_value
        accuracies[precision] = best_epoch(history)["val_acc"]
    assert accuracies["fp32"] > 0.95  # a model that learned, so the comparison means something
    assert abs(accuracies["bf16"] - accuracies["fp32"]) <= 0.01
