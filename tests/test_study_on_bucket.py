"""A study whose ``storage_path`` is a bucket (moto's S3 server on 127.0.0.1), end to end.

One smoke study runs every stage on S3 (``resumed_bucket_study``): its
driver is killed once a search trial has finished, and the study is
resubmitted as on a new head (no local Optuna file, an empty node cache),
which finds every stage before the search committed in the bucket and
resumes the search; then, from other processes with empty node caches and
no cluster, ``raycf leaderboard``, ``report``, ``explain`` and
``rerun --best`` read the results from the bucket.  (One study, not a
finished one plus a killed copy: the suite's time, issue 20.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.fs as pafs
import pytest
import torch

from conftest import REPO, ray_address, run_cli
from raycf.results import storage
from raycf.results.artefacts import MARKER_FILE, debugged_model_bytes, load_results_study, read_marker
from raycf.models.checkpoint import parse_classifier_checkpoint
from raycf.models.build import classifier_from_checkpoint
from raycf.search.leaderboard import read_leaderboard
from raycf.search.tune_state import finished_trials, read_snapshot

SEARCH_SETTINGS = ["search.num_samples=2", "search.max_concurrent=1", "search.scheduler.asha=null"]
# The smoke study trains the base model on one worker and runs one actor per Ray Data pool; here the base model trains
# on two (DDP), its checkpoints written to the bucket, and the images and prefix pools have two actors writing to it.
BASE_SETTINGS = ["base.workers=2", "data.decode_actors=2", "prefix.actors=2"]
CACHED_STAGES = ("images", "base", "features", "cfe", "masks", "analysis", "prefix")
STAGE_FOLDERS = (*CACHED_STAGES, "search", "final", "report")


def _driver_snapshots(results: str) -> list[str]:
    filesystem, root = storage.resolve(storage.join_uri(results, "_ray"))
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        return []
    return [
        storage.with_scheme(entry.path, results) + "/state.zip"
        for entry in filesystem.get_file_info(pafs.FileSelector(root))
        if entry.base_name.startswith("search-") and entry.base_name.endswith("-driver")
    ]


def _finished(results: str) -> list[str]:
    return [trial for snapshot in _driver_snapshots(results) for trial in finished_trials(read_snapshot(snapshot))]


@pytest.fixture(scope="module")
def resumed_bucket_study(ray_session, s3_bucket, tmp_path_factory) -> dict:
    """The smoke study on the bucket, its driver SIGKILLed after the search's first finished trial, then resubmitted as on a new head."""
    folder = tmp_path_factory.mktemp("bucket-study")
    results = f"{s3_bucket}/runs/digits"
    args = ["study", "studies/digits.yaml", "--smoke", "--set", f"storage_path={s3_bucket}/runs", *BASE_SETTINGS, *SEARCH_SETTINGS]
    first_head = {**os.environ, "RAY_ADDRESS": ray_address(), "TUNE_GLOBAL_CHECKPOINT_S": "0", "RAYCF_NODE_CACHE": str(folder / "head-1")}
    driver = subprocess.Popen([sys.executable, "-m", "raycf.cli", *args], cwd=REPO, env=first_head, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while not _finished(results):
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        assert time.time() < deadline, "no trial finished in time"
        time.sleep(0.5)
    first = _finished(results)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    killed_at = time.time()
    assert read_marker(results, "search") is None  # the stage did not finish
    # A new head: no local Optuna file, an empty node cache.
    for local in Path(tempfile.gettempdir()).glob("raycf-digits-*-optuna.db"):
        local.unlink()
    resumed = run_cli(*args, "--resume", env_extra={"RAY_ADDRESS": ray_address(), "RAYCF_NODE_CACHE": str(folder / "head-2")})
    (folder / "stdout.txt").write_text(resumed.stdout)
    (folder / "stderr.txt").write_text(resumed.stderr)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"results": results, "first": first, "killed_at": killed_at, "stderr": resumed.stderr, "folder": folder}


def test_every_stage_of_the_bucket_study_is_committed_by_its_marker(resumed_bucket_study):
    results = resumed_bucket_study["results"]
    for folder in STAGE_FOLDERS:
        assert read_marker(results, folder) is not None, folder
    filesystem, root = storage.resolve(results)
    names = {entry.base_name for entry in filesystem.get_file_info(pafs.FileSelector(root))}
    assert ".staging" not in names  # an object store has no rename: nothing is staged and copied
    assert {"leaderboard.parquet", "optuna.db", "config.yaml", "logs"} <= names
    assert storage.exists(storage.join_uri(results, "logs", "ray.log"))
    board = read_leaderboard(results)
    # Every checkpoint the leaderboard records is a full URI that opens from anywhere.
    assert board["checkpoint_path"].str.startswith(f"{results}/_ray/").all()
    assert all(storage.exists(storage.join_uri(path, "model.pt")) for path in board["checkpoint_path"])


def test_a_killed_search_resumes_from_the_bucket_with_nothing_lost_or_duplicated(resumed_bucket_study):
    results, first = resumed_bucket_study["results"], resumed_bucket_study["first"]
    assert "resuming the interrupted search" in resumed_bucket_study["stderr"]
    for name in ("images", "base", "features", "cfe", "masks", "analyze", "prefix"):
        assert f"{name}: skipped, cached" in resumed_bucket_study["stderr"]
    board = read_leaderboard(results)
    assert len(board) == 2 and (board["status"] == "completed").all() and board["is_control"].sum() == 1
    assert set(first) <= set(board["trial_id"])
    # A finished trial was not run again: its checkpoint was written before the kill, each epoch reported once.
    filesystem, _ = storage.resolve(results)
    for trial_id in first:
        checkpoint = board.loc[board["trial_id"] == trial_id, "checkpoint_path"].iloc[0]
        _, path = storage.resolve(storage.join_uri(checkpoint, "model.pt"))
        assert filesystem.get_file_info(path).mtime.timestamp() < resumed_bucket_study["killed_at"]
        trial_folder = checkpoint.rsplit("/", 1)[0]
        epochs = [json.loads(line)["epoch"] for line in storage.read_text(storage.join_uri(trial_folder, "result.json")).splitlines()]
        assert epochs == list(range(1, len(epochs) + 1))
    # Optuna's storage, kept in the bucket, holds the searched trial once, complete.
    local = resumed_bucket_study["folder"] / "optuna.db"
    local.write_bytes(storage.read_bytes(storage.join_uri(results, "optuna.db")))
    (name,) = optuna.study.get_all_study_names(f"sqlite:///{local}")
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{local}").trials
    searched = board[~board["is_control"]]
    assert len(trials) == len(searched) == 1 and trials[0].state == optuna.trial.TrialState.COMPLETE
    assert trials[0].params["lambda1"] == pytest.approx(float(searched["lambda1"].iloc[0]))
    # final.parquet names a trial of this leaderboard, and its stage is committed.
    final = pd.read_parquet(storage.join_uri(results, "final", "final.parquet").removeprefix("s3://"), filesystem=filesystem)
    assert final.loc[final["model"] == "debugged", "trial_id"].iloc[0] in set(board["trial_id"])
    assert storage.exists(storage.join_uri(results, "final", MARKER_FILE))


def _laptop(tmp_path: Path) -> dict:
    """A second machine: no cluster, an empty node cache."""
    return {"RAY_ADDRESS": "", "RAYCF_NODE_CACHE": str(tmp_path / "laptop-cache")}


def test_leaderboard_report_explain_and_rerun_read_the_bucket(resumed_bucket_study, tmp_path):
    results = resumed_bucket_study["results"]
    laptop = _laptop(tmp_path)
    board = run_cli("leaderboard", results, "--format", "json", env_extra=laptop)
    assert board.returncode == 0, board.stderr[-2000:]
    rows = json.loads(board.stdout)
    assert {row["trial_id"] for row in rows} == set(read_leaderboard(results)["trial_id"])

    report = run_cli("report", results, env_extra=laptop)
    assert report.returncode == 0, report.stderr[-2000:]
    page = storage.read_text(storage.join_uri(results, "report", "index.html"))
    # The gallery found the best trial's checkpoint through the leaderboard's URI.
    assert "Grad-CAM (captum" in page and "No gallery" not in page and rows[0]["trial_id"] in page

    image_id = str(pd.read_parquet(storage.join_uri(results, "masks", "test").removeprefix("s3://"), filesystem=storage.resolve(results)[0])["image_id"].iloc[0])
    explain = run_cli("explain", results, image_id, "--out", str(tmp_path / "explanations"), env_extra=laptop)
    assert explain.returncode == 0, explain.stderr[-2000:]
    explanation = json.loads(next((tmp_path / "explanations").rglob("explanation.json")).read_text())
    assert 0.0 < explanation["prediction"]["confidence"] <= 1.0

    rerun = run_cli("rerun", results, "--best", env_extra=laptop)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "matches the recorded run" in rerun.stdout

    # raycf export from the bucket: the debugged model, as the bucket's checkpoint holds it.
    out = tmp_path / "model.ts"
    export = run_cli("export", results, "--format", "torchscript", "--out", str(out), env_extra=laptop)
    assert export.returncode == 0, export.stderr[-2000:]
    trial_id, model_bytes = debugged_model_bytes(results)
    study = load_results_study(results)
    model = classifier_from_checkpoint(study.model, parse_classifier_checkpoint(model_bytes, "debugged"))
    inputs = torch.rand(4, 3, study.data.image_size, study.data.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(out))(inputs), model(inputs), rtol=0, atol=1e-5)
    assert json.loads(out.with_name("model.ts.json").read_text())["trial_id"] == trial_id


def test_a_results_uri_without_a_study_is_refused_in_one_line(s3_bucket):
    empty = f"{s3_bucket}/nothing/here"
    for command in (["leaderboard", empty], ["rerun", empty, "--best"]):
        completed = run_cli(*command, env_extra={"RAY_ADDRESS": ""})
        assert completed.returncode == 2, completed.stderr[-2000:]
        lines = completed.stderr.strip().splitlines()
        assert len(lines) == 1 and empty in lines[0], command


def test_a_missing_bucket_is_refused_before_any_stage_runs(s3_bucket):
    completed = run_cli("study", "studies/digits.yaml", "--smoke", "--set", "storage_path=s3://no-such-bucket/runs", env_extra={"RAY_ADDRESS": ""})
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raycf: error: storage_path: cannot write to s3://no-such-bucket/runs/digits")
    assert "runs" not in completed.stdout and ": runs (" not in completed.stderr
