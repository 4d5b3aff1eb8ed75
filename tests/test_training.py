"""Base training: the Ray Train function in local mode, a 2-worker DDP run, and the stage cache."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from raycf import pipeline, storage
from raycf.checkpoint import load_classifier_checkpoint
from raycf.config import load_study
from raycf.training import Phase, base_phases, base_train_loop, fit, phase_at, scheduled_lr


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


def test_training_function_in_local_mode_reports_every_epoch(digits_study, tmp_path):
    study = load_study(digits_study, ["base.head_epochs=1", "base.epochs=1"])
    result = fit(base_train_loop, {"study": study}, name="local", storage_path=str(tmp_path), workers=0, use_gpu=False, max_failures=0)
    history = result.return_value
    assert [row["epoch"] for row in history] == [1, 2]
    assert [row["phase"] for row in history] == ["head", "all"]
    for row in history:
        assert 0.0 <= row["val_acc"] <= 1.0 and row["train_loss"] > 0
    assert result.metrics["epoch"] == 2


def test_two_worker_ddp_run_then_cache(ray_session, digits_study, capsys):
    study = load_study(digits_study, ["base.workers=2", "base.epochs=2"])
    summaries = pipeline.run_stages(study, ["base"])
    results = study.results_uri
    summary = summaries["base"]
    assert summary["epochs"] == 2 and 1 <= summary["best_epoch"] <= 2
    assert 0.1 < summary["train_acc"] <= 1.0 and 0 <= summary["test_acc"] <= 1.0
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


def test_plan_reruns_stale_and_forced_stages(digits_study, monkeypatch):
    study = load_study(digits_study)
    results = study.results_uri
    assert pipeline.plan(study, ["base"], set()) == [("base", "no finished result yet")]
    marker = {"hash": pipeline.stage_hash(study, "base"), "finished_at": "now"}
    storage.write_text(storage.join_uri(results, "base", pipeline.MARKER_FILE), json.dumps(marker))
    assert pipeline.plan(study, ["base"], set()) == [("base", "cached")]
    assert pipeline.plan(study, ["base"], {"base"}) == [("base", "forced")]
    changed = load_study(digits_study, ["base.lr=0.2"])
    assert pipeline.plan(changed, ["base"], set()) == [("base", "its inputs changed")]
    # a section the stage does not read leaves it cached
    unrelated = load_study(digits_study, ["debug.lr=0.5"])
    assert pipeline.plan(unrelated, ["base"], set()) == [("base", "cached")]
    # another raycf release recomputes every stage
    pipeline.raycf_version.cache_clear()
    monkeypatch.setattr("importlib.metadata.version", lambda package: "99.0" if package == "raycf" else "0")
    try:
        assert pipeline.plan(study, ["base"], set()) == [("base", "its inputs changed")]
    finally:
        pipeline.raycf_version.cache_clear()


def test_failed_stage_leaves_no_folder(digits_study, monkeypatch):
    study = load_study(digits_study)
    stage = pipeline.stages()["base"]

    def explode(run):
        storage.write_text(run.path("half-written.txt"), "partial")
        raise RuntimeError("boom")

    monkeypatch.setitem(pipeline._STAGES, "base", pipeline.Stage("base", stage.sections, stage.upstream, explode))
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run_stages(study, ["base"])
    assert not storage.exists(storage.join_uri(study.results_uri, "base"))
    assert not storage.exists(storage.join_uri(study.results_uri, ".staging"))


def test_same_seed_same_initial_weights(digits_study):
    from raycf.models import build_model
    from raycf.training import seed_everything

    study = load_study(digits_study)
    seed_everything(5)
    first = build_model(study.model, 10).state_dict()
    seed_everything(5)
    second = build_model(study.model, 10).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
