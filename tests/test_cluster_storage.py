"""What raycf checks about the cluster before a stage runs: a local storage_path only where all the work
stays on this machine, and use_gpu only where a GPU can be had.

The multi-node case runs on a simulated cluster in tests/test_cluster_placement.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config

from raycf.config import load_study
from raycf.errors import UserError
from raycf.runtime.cluster import check_gpus, check_storage_for_cluster, launcher_worker_types
from raycf.pipeline import run_stages

REPO = Path(__file__).resolve().parent.parent


def write_launcher_config(home: Path, cluster_file: Path) -> None:
    """What `ray up` leaves on a head: its prepared cluster config, as JSON."""
    config = prepare_config(yaml.safe_load(cluster_file.read_text()))
    (home / "ray_bootstrap_config.yaml").write_text(json.dumps(config))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def study_with(storage_path: str):
    return load_study(REPO / "studies" / "digits.yaml", [f"storage_path={storage_path}"])


def test_shared_storage_is_accepted_without_asking_ray(home):
    write_launcher_config(home, REPO / "cluster.yaml")
    check_storage_for_cluster(study_with("s3://bucket/raycf"))
    check_storage_for_cluster(study_with("file:///mnt/efs/raycf"))


def test_the_launcher_config_names_the_worker_types_it_may_add(home):
    assert launcher_worker_types() == []
    write_launcher_config(home, REPO / "cluster.yaml")
    assert launcher_worker_types() == ["gpu_1x", "gpu_4x"]
    write_launcher_config(home, REPO / "tests" / "cluster" / "local-cluster.yaml")
    assert launcher_worker_types() == []


def test_a_head_that_can_add_gpu_nodes_refuses_a_local_folder(home, ray_session, tmp_path):
    write_launcher_config(home, REPO / "cluster.yaml")
    with pytest.raises(UserError, match=r"storage_path=/\S+: a local folder, .* \(ray up may add gpu_1x, gpu_4x nodes"):
        check_storage_for_cluster(study_with(str(tmp_path / "results")))


def test_run_stages_refuses_before_writing_anything(home, ray_session, tmp_path):
    write_launcher_config(home, REPO / "cluster.yaml")
    study = study_with(str(tmp_path / "results"))
    with pytest.raises(UserError, match="expected an s3:// or other shared filesystem URI"):
        run_stages(study, ["base"])
    assert not (tmp_path / "results").exists()


def test_one_node_that_cannot_grow_keeps_a_local_folder(home, ray_session, tmp_path):
    check_storage_for_cluster(study_with(str(tmp_path / "results")))
    write_launcher_config(home, REPO / "tests" / "cluster" / "local-cluster.yaml")
    check_storage_for_cluster(study_with(str(tmp_path / "results")))


def test_use_gpu_without_any_gpu_is_refused_before_anything_runs(home, tmp_path, capsys):
    from raycf.cli import main

    study = load_study(REPO / "studies" / "digits.yaml", [f"storage_path={tmp_path / 'results'}", "debug.use_gpu=true"])
    with pytest.raises(UserError, match=r"^debug.use_gpu: true, but no GPU is visible here .* --set debug.use_gpu=false"):
        check_gpus(study)
    check_gpus(load_study(REPO / "studies" / "digits.yaml"))  # nothing asked, nothing checked
    code = main(["study", str(REPO / "studies" / "digits.yaml"), "--set", f"storage_path={tmp_path / 'results'}", "masks.use_gpu=true"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("raycf: error: masks.use_gpu: true, but no GPU is visible")
    assert not (tmp_path / "results").exists()


def test_use_gpu_is_accepted_where_the_launcher_can_add_gpu_nodes(home):
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_1x"]["resources"] = {"CPU": 4, "GPU": 1}  # as ray up fills them in
    config["available_node_types"]["gpu_4x"]["resources"] = {"CPU": 48, "GPU": 4}
    (home / "ray_bootstrap_config.yaml").write_text(json.dumps(prepare_config(config)))
    check_gpus(load_study(REPO / "studies" / "digits.yaml", ["debug.use_gpu=true"]))
    for node_type in ("gpu_1x", "gpu_4x"):
        config["available_node_types"][node_type]["resources"] = {"CPU": 4}  # CPU workers only
    (home / "ray_bootstrap_config.yaml").write_text(json.dumps(prepare_config(config)))
    with pytest.raises(UserError, match="debug.use_gpu: true"):
        check_gpus(load_study(REPO / "studies" / "digits.yaml", ["debug.use_gpu=true"]))
