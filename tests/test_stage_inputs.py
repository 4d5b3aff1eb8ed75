"""Stage hashes cover what the stages read: file contents, the objective, the report's display settings; --force reruns all of a stage."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from raycf import pipeline

from raycf.results import storage
from raycf.config import load_study
from raycf.stages import STAGES

REPO = Path(__file__).resolve().parent.parent


def _finish(study, *names: str) -> None:
    """Markers for ``names`` as run_stage writes them (hash of today's inputs)."""
    for name in names:
        marker = {"hash": pipeline.stage_hash(study, name), "finished_at": "now"}
        storage.write_text(storage.join_uri(study.results_uri, pipeline.FOLDERS[name], pipeline.MARKER_FILE), json.dumps(marker))


def _rerun(study, targets: list[str]) -> set[str]:
    return {name for name, reason in pipeline.plan(study, targets, set()) if reason != "cached"}


def test_editing_the_weights_files_bytes_reruns_base(tmp_path):
    weights = tmp_path / "base.pt"
    weights.write_bytes(b"A" * 64)
    study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}", f"model.weights={weights}", "base.train=false"])
    _finish(study, "images", "base", "features")
    assert _rerun(study, ["features"]) == set()
    status = weights.stat()
    weights.write_bytes(b"B" * 64)  # same size, same modification time: only the content differs
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns))
    decisions = dict(pipeline.plan(study, ["features"], set()))
    assert decisions == {"images": "cached", "base": "its inputs changed", "features": "an upstream stage reran"}


def test_adding_an_image_to_the_data_folder_reruns_images(tmp_path, imagefolder_root):
    study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}", "data.kind=imagefolder", f"data.root={imagefolder_root}", "data.image_size=16"])
    _finish(study, "images", "base")
    assert _rerun(study, ["base"]) == set()
    (imagefolder_root / "train" / "cat" / "extra.png").write_bytes((imagefolder_root / "train" / "cat" / "0.png").read_bytes())
    assert _rerun(study, ["base"]) == {"images", "base"}


def test_the_marker_records_the_fingerprints_of_the_files_it_read(tmp_path, monkeypatch):
    weights = tmp_path / "base.pt"
    weights.write_bytes(b"weights")
    study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}", f"model.weights={weights}"])
    monkeypatch.setattr("raycf.stages.images.run", lambda run: {})
    monkeypatch.setattr("raycf.stages.base.run", lambda run: {})
    pipeline.run_stage(study, "images")
    pipeline.run_stage(study, "base")
    assert pipeline.read_marker(study.results_uri, "images")["inputs"] == {}  # digits: no folder, and images reads no model
    recorded = pipeline.read_marker(study.results_uri, "base")["inputs"]["model.weights"]
    assert recorded["path"] == str(weights) and recorded["size"] == 7
    assert recorded["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert recorded["mtime_ns"] == weights.stat().st_mtime_ns


@pytest.mark.parametrize("setting", ["search.metric=val_loss", "search.mode=min"])
def test_the_objective_reruns_debug_which_picks_its_best_epoch_by_it(tmp_path, setting):
    study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}"])
    _finish(study, *(stage.name for stage in STAGES))
    changed = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}", setting])
    assert _rerun(changed, ["debug"]) == {"debug"}


def test_the_pareto_pair_reruns_the_report_only(tmp_path):
    study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}"])
    _finish(study, *(stage.name for stage in STAGES))
    changed = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}", "search.pareto=[val_acc, g_size]"])
    assert _rerun(changed, ["analyze", "debug", "final", "report"]) == {"report"}


def test_forcing_debug_clears_the_controls_run_too(tmp_path, monkeypatch):
    study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path}"])
    digest = pipeline.stage_hash(study, "debug")
    ray_runs = Path(study.results_uri, "_ray")
    kept = [f"debug-{'0' * 16}", f"debug-control-{'0' * 16}", f"search-{digest}"]  # another hash, another stage
    for name in [f"debug-{digest}", f"debug-control-{digest}", *kept]:
        (ray_runs / name).mkdir(parents=True)
    seen: list[list[str]] = []
    monkeypatch.setattr("raycf.stages.debug.run", lambda run: seen.append(sorted(path.name for path in ray_runs.iterdir() if path.is_dir())) or {})
    pipeline.run_stage(study, "debug", fresh=True)
    assert seen == [sorted(kept)]


@pytest.mark.parametrize("on", ["disk", "bucket"])
def test_a_stages_ray_runs_resume_only_on_the_upstream_writes_they_started_from(tmp_path, monkeypatch, request, on):
    location = str(tmp_path) if on == "disk" else f"{request.getfixturevalue('s3_bucket')}/resume-record/{tmp_path.name}"
    study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={location}"])
    digest = pipeline.stage_hash(study, "cfe")
    runs = storage.join_uri(study.results_uri, "_ray", f"cfe-{digest}")
    seen: list[bool] = []
    monkeypatch.setattr("raycf.stages.cfe.run", lambda run: seen.append(storage.exists(runs)) or {})

    def leave_a_run() -> None:  # what Tune leaves: a folder holding the experiment's state
        storage.write_text(storage.join_uri(runs, "experiment_state.json"), "{}")

    def write_features(finished_at: str) -> None:
        marker = {"hash": pipeline.stage_hash(study, "features"), "finished_at": finished_at}
        storage.write_text(storage.join_uri(study.results_uri, "features", pipeline.MARKER_FILE), json.dumps(marker))

    write_features("2026-12-07T10:00:00+00:00")
    leave_a_run()  # a run left by an earlier raycf, with no record of what it started from: not trusted
    pipeline.run_stage(study, "cfe")
    record = json.loads(storage.read_text(storage.join_uri(study.results_uri, "_ray", f"cfe-{digest}-upstream.json")))
    assert record == {"features": f"{pipeline.stage_hash(study, 'features')}-20261207T1000000000"}  # written_key: the hash and the finish time
    leave_a_run()  # the run this attempt started; the stage is interrupted and started again on the same features
    pipeline.run_stage(study, "cfe")
    write_features("2026-12-07T11:00:00+00:00")  # the features stage reran (--force base, or --force features)
    pipeline.run_stage(study, "cfe")
    leave_a_run()
    pipeline.run_stage(study, "cfe", fresh=True)  # --force cfe
    assert seen == [False, True, False, False]
