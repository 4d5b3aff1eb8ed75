"""The stage table and the stage cache: what reruns, what stays cached, what a failed stage leaves."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from raycf.results import manifest, storage

from raycf import pipeline
from raycf.config import load_study
from raycf.stages import STAGES, stage_named

REPO = Path(__file__).resolve().parent.parent

# Fields that change where or how fast work runs, not what it computes.
RESOURCE_SETTINGS = [
    "data.loader_workers=3",
    "data.decode_actors=1",
    "prefix.max_gb=1",
    "prefix.batch_size=3",
    "prefix.actors=1",
    "prefix.use_gpu=true",
    "base.use_gpu=true",
    "base.max_failures=7",
    "base.eval_batch_size=17",
    "features.batch_size=7",
    "features.actors=5",
    "features.use_gpu=true",
    "cfe.use_gpu=true",
    "cfe.max_failures=9",
    "masks.batch_size=9",
    "masks.actors=4",
    "masks.use_gpu=true",
    "debug.use_gpu=true",
    "debug.max_failures=5",
    "debug.eval_batch_size=33",
    "search.driver_cpus=0.5",
    "search.driver_resources={raycf_driver: 0.01}",
]


def test_the_stage_table_is_in_designs_order_and_upstream_comes_first():
    names = [stage.name for stage in STAGES]
    assert names == ["images", "base", "features", "cfe", "masks", "analyze", "prefix", "debug", "search", "final", "report"]
    for position, stage in enumerate(STAGES):
        assert all(names.index(up) < position for up in stage.upstream), stage.name
        assert stage_named(stage.name) is stage
    assert {stage.command for stage in STAGES if stage.command} == {"train", "features", "cfe", "masks", "analyze", "debug"}


def _mark_everything_finished(study) -> None:
    for stage in STAGES:
        marker = {"hash": pipeline.stage_hash(study, stage.name), "finished_at": "now"}
        storage.write_text(storage.join_uri(study.results_uri, stage.folder, pipeline.MARKER_FILE), json.dumps(marker))


@pytest.mark.parametrize("setting", RESOURCE_SETTINGS)
def test_a_resource_field_leaves_every_stage_cached(tmp_path, setting):
    study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}"])
    _mark_everything_finished(study)
    moved = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}", setting])
    assert moved != study
    assert pipeline.plan(moved, ["analyze", "final", "report"], set()) == [(stage.name, "cached") for stage in STAGES if stage.name != "debug"]
    assert moved.config_hash() == study.config_hash()
    field = setting.split("=")[0]
    section, name = field.split(".")
    assert "resource only" in type(getattr(study, section)).model_fields[name].description or "display only" in type(getattr(study, section)).model_fields[name].description


def test_changing_debug_lr_reruns_debug_search_and_final_only(tmp_path):
    study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}"])
    _mark_everything_finished(study)
    changed = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}", "debug.lr=0.02"])
    decisions = dict(pipeline.plan(changed, ["analyze", "debug", "final", "report"], set()))
    assert {name for name, reason in decisions.items() if reason != "cached"} == {"debug", "search", "final", "report"}
    assert decisions["debug"] == decisions["search"] == "its inputs changed"
    assert decisions["final"] == "an upstream stage reran"


def test_plan_reruns_stale_and_forced_stages(digits_study, monkeypatch):
    study = load_study(digits_study)
    results = study.results_uri
    assert pipeline.plan(study, ["base"], set()) == [("images", "no finished result yet"), ("base", "an upstream stage reran")]
    for name in ("images", "base"):
        marker = {"hash": pipeline.stage_hash(study, name), "finished_at": "now"}
        storage.write_text(storage.join_uri(results, name, pipeline.MARKER_FILE), json.dumps(marker))
    assert pipeline.plan(study, ["base"], set()) == [("images", "cached"), ("base", "cached")]
    assert pipeline.plan(study, ["base"], {"base"}) == [("images", "cached"), ("base", "forced")]
    changed = load_study(digits_study, ["base.lr=0.2"])
    assert pipeline.plan(changed, ["base"], set()) == [("images", "cached"), ("base", "its inputs changed")]
    # a section the stage does not read leaves it cached
    unrelated = load_study(digits_study, ["debug.lr=0.5"])
    assert pipeline.plan(unrelated, ["base"], set()) == [("images", "cached"), ("base", "cached")]
    # another raycf release recomputes every stage
    manifest.raycf_version.cache_clear()
    monkeypatch.setattr("importlib.metadata.version", lambda package: "99.0" if package == "raycf" else "0")
    try:
        assert pipeline.plan(study, ["base"], set()) == [("images", "its inputs changed"), ("base", "an upstream stage reran")]
    finally:
        manifest.raycf_version.cache_clear()


def test_failed_stage_leaves_no_folder(digits_study, monkeypatch):
    study = load_study(digits_study)
    first = stage_named("images")

    def explode(run):
        storage.write_text(run.path("half-written.txt"), "partial")
        raise RuntimeError("boom")

    exploding = dataclasses.replace(first, run=explode)
    monkeypatch.setattr(pipeline, "stage_named", lambda name: exploding if name == "images" else stage_named(name))
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run_stages(study, ["base"])
    assert not storage.exists(storage.join_uri(study.results_uri, "images"))
    assert not storage.exists(storage.join_uri(study.results_uri, ".staging"))


def test_unknown_forced_stage_is_refused(digits_study):
    from raycf.errors import UserError

    with pytest.raises(UserError, match="--force nope: unknown stage"):
        pipeline.run_stages(load_study(digits_study), ["base"], force={"nope"})


def test_a_rerunning_stage_withdraws_its_own_and_its_downstream_markers_first(tmp_path, monkeypatch):
    """A forced search that dies leaves no final stage naming a trial of the old search, and no search folder looking finished."""
    study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}"])
    _mark_everything_finished(study)
    search = stage_named("search")

    def dies(run):
        storage.write_text(run.path("leaderboard-in-progress.txt"), "partial")
        raise RuntimeError("driver killed")

    monkeypatch.setattr(pipeline, "stage_named", lambda name: dataclasses.replace(search, run=dies) if name == "search" else stage_named(name))
    with pytest.raises(RuntimeError, match="driver killed"):
        pipeline.run_stage(study, "search", fresh=True)
    finished = {stage.name for stage in STAGES if pipeline.read_marker(study.results_uri, stage.name) is not None}
    assert finished == {stage.name for stage in STAGES} - {"search", "final", "report"}
    assert dict(pipeline.plan(study, ["final", "report"], set()))["final"] == "an upstream stage reran"
