"""Where a study's work lands on a cluster: a simulated head and two GPU workers (packed trials, node-local caches).

tests/cluster/simulate_placement.py starts the three nodes with
``ray.cluster_utils.Cluster`` in its own process and namespaces (never beside
the shared Ray session) and reports the node of each piece of work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_system

REPO = Path(__file__).resolve().parent.parent
SANDBOX_SCRIPT = REPO / "tests" / "cluster" / "sandbox.sh"
SIMULATION = REPO / "tests" / "cluster" / "simulate_placement.py"


@pytest.fixture(scope="module")
def placement(tmp_path_factory) -> dict:
    require_system("sshd", "ip", "unshare", root=True)  # tests/cluster/sandbox.sh starts an SSH server in new namespaces
    sandbox = tmp_path_factory.mktemp("placement-sandbox")
    command = [
        "unshare", "--pid", "--net", "--mount", "--fork", "--mount-proc", "--kill-child", "--",
        "bash", str(SANDBOX_SCRIPT), str(sandbox), sys.executable, str(SIMULATION),
    ]  # fmt: skip
    completed = subprocess.run(command, timeout=300, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(completed.stdout)  # shown when a test fails
    lines = [line for line in completed.stdout.splitlines() if line.startswith("PLACEMENT ")]
    assert completed.returncode == 0 and lines, f"the simulation failed (exit {completed.returncode}); output above"
    return json.loads(lines[-1].removeprefix("PLACEMENT "))


def test_packed_single_worker_trials_share_gpu_nodes_four_to_a_gpu(placement):
    trials = placement["packed"]["trials"]
    assert len(trials) == 8 and all(trial["error"] is None for trial in trials)
    nodes = [trial["node"] for trial in trials]
    assert set(nodes) == set(placement["workers"])  # on the GPU nodes, never on the head
    assert sorted(nodes.count(node) for node in set(nodes)) == [4, 4]  # debug.gpus_per_trial 0.25: four trials share a GPU
    assert all(trial["gpus"] == ["0"] for trial in trials)  # each trial sees its node's one GPU


def test_a_node_fetches_the_prefix_cache_once_for_all_its_trials(placement):
    downloads = placement["packed"]["downloads"]
    assert sorted(downloads) == sorted(placement["workers"])  # one download per node, eight trials reading it
    assert all(trial["cached"] == "activations" for trial in placement["packed"]["trials"])


def test_trial_drivers_run_on_the_head(placement):
    assert placement["head_resources"] == {"raycf_driver": 1}  # from cluster.yaml
    assert len(placement["trials"]) == 2
    for trial in placement["trials"]:
        assert trial["error"] is None
        assert trial["driver_node"] == placement["head"]


def test_train_workers_run_on_gpu_nodes_with_a_gpu_each(placement):
    worker_nodes = [trial["worker_node"] for trial in placement["trials"]]
    assert set(worker_nodes) <= set(placement["workers"])
    assert len(set(worker_nodes)) == 2  # one GPU per node: the two trials' workers cannot share one
    assert all(trial["worker_gpus"] == ["0"] for trial in placement["trials"])


def test_data_actors_run_on_gpu_nodes(placement):
    assert placement["data_actor_nodes"]
    assert set(placement["data_actor_nodes"]) <= set(placement["workers"])


def test_a_multi_node_cluster_refuses_a_local_storage_path(placement):
    storage = placement["storage"]
    assert storage["results"].startswith("refused: storage_path=results: a local folder, which work on other nodes")
    assert "(it has 3 nodes)" in storage["results"]
    assert "s3://" in storage["results"]
    assert storage["s3://raycf-bucket/studies"] == "accepted"
    assert storage["file:///mnt/shared/raycf"] == "accepted"
