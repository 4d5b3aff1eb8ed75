"""`ray up` / `ray job submit` / `ray down` against a head on 127.0.0.1.

The cluster guide's command sequence (docs/cluster.md), for real: the Ray cluster launcher
SSHes into 127.0.0.1, ships the token, starts the head with cluster.yaml's
commands (tests/cluster/local-cluster.yaml), the job is submitted through
`ray dashboard`'s port forward, and `ray down` stops it. It all runs in its own
namespaces (tests/cluster/sandbox.sh): nothing but loopback is reachable, and
`ray stop` cannot touch other Ray clusters on the machine. About two minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_system
from raycf.models.checkpoint import load_classifier_checkpoint

REPO = Path(__file__).resolve().parent.parent
SANDBOX_SCRIPT = REPO / "tests" / "cluster" / "sandbox.sh"
ROUND_TRIP_SCRIPT = REPO / "tests" / "cluster" / "roundtrip.py"

# (the job submitted to the cluster, a command run here on its results afterwards).
ROUND_TRIP = ("raycf study studies/digits.yaml --smoke", "raycf leaderboard {results}/digits --format json")
# What the job must leave in <results>/digits/.
EXPECTED_FILES = (
    "config.yaml",
    "manifest.json",
    "base/model.pt",
    "base/_stage.json",
    "leaderboard.parquet",
    "optuna.db",
    "final/final.parquet",
    "final/_stage.json",
    "report/index.html",
)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory) -> dict:
    """Run the round trip once; what it saw, plus the results folder."""
    require_system("sshd", "rsync", "ip", "unshare", root=True)
    sandbox = tmp_path_factory.mktemp("cluster-sandbox")
    results = sandbox / "results"
    status_file = sandbox / "status.json"
    job, read_back = ROUND_TRIP
    command = [
        "unshare", "--pid", "--net", "--mount", "--fork", "--mount-proc", "--kill-child", "--",
        "bash", str(SANDBOX_SCRIPT), str(sandbox),
        sys.executable, str(ROUND_TRIP_SCRIPT),
        "--sandbox", str(sandbox),
        "--repo", str(REPO),
        "--job", f"{job} --set storage_path={results}",
        "--read-back", read_back.format(results=results),
        "--status", str(status_file),
    ]  # fmt: skip
    completed = subprocess.run(command, timeout=900, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(completed.stdout)  # pytest shows it when a test fails
    assert status_file.is_file(), f"the round trip stopped before ray down (exit {completed.returncode}); output above"
    status = json.loads(status_file.read_text())
    status["exit code"] = completed.returncode
    status["results"] = results / "digits"
    return status


def test_ray_up_job_submit_ray_down(round_trip):
    steps = round_trip["steps"]
    assert steps["ray up"]["returncode"] == 0
    assert steps["ray job submit"]["returncode"] == 0
    assert steps["ray down"]["returncode"] == 0
    assert round_trip["exit code"] == 0
    assert round_trip["ray processes after ray down"] == []


def test_the_job_leaves_its_results_and_they_read_back(round_trip):
    results: Path = round_trip["results"]
    for name in EXPECTED_FILES:
        assert (results / name).is_file(), f"{name} missing from {results}"
    checkpoint = load_classifier_checkpoint(str(results / "base" / "model.pt"), expected_arch="vgg_tiny", expected_classes=10)
    assert checkpoint.num_classes == 10
    marker = json.loads((results / "base" / "_stage.json").read_text())
    assert marker["stage"] == "base" and marker["summary"]["epochs"] == 2  # the smoke block's base.epochs
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["command"].startswith(ROUND_TRIP[0].split(" --")[0])
    assert round_trip["steps"]["read back"]["returncode"] == 0, round_trip["read back output"]
    board = json.loads(round_trip["read back output"])
    assert len(board) == 2 and sum(row["is_control"] for row in board) == 1
    assert all(row["status"] == "completed" for row in board)


def test_jobs_api_rejects_requests_without_the_token(round_trip):
    codes = round_trip["jobs_api"]
    assert codes["no token"] == 401
    assert codes["no token, head port"] == 401
    assert codes["wrong token"] in (401, 403)
    assert codes["token"] == 200
    assert round_trip["steps"]["ray job submit without the token"]["returncode"] != 0


def test_dashboard_is_bound_to_loopback_and_the_token_reached_the_head(round_trip):
    assert round_trip["dashboard_listens_on"] == ["127.0.0.1"]
    assert round_trip["token_on_head_matches"] is True
