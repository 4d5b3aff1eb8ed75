"""cluster.yaml, offline: Ray's own config preparation and schema, plus raycf's invariants.

The invariants are docs/cluster.md's promises: the dashboard and Jobs API on the
head's loopback only, token authentication on every node with a token that
never lives in the repository, GPU workers scaling from zero, Tune drivers
pinned to the head, and the same Ray, Python and torch versions the tests run.
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER_FILE = REPO / "cluster.yaml"
LOCAL_CLUSTER_FILE = REPO / "tests" / "cluster" / "local-cluster.yaml"
DRIVER_RESOURCE = "raycf_driver"
TOKEN_PATH = "~/.ray/auth_token"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_FILE.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """cluster.yaml as `ray up` prepares it before talking to AWS (no credentials needed)."""
    config = prepare_config(raw)
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_start_commands(commands: list[str]) -> list[list[str]]:
    """The ``ray start`` invocations in a command list, as words (env assignments first)."""
    found = []
    for command in commands:
        for part in command.split(";"):
            words = shlex.split(part)
            if "ray" in words and words[words.index("ray") + 1 : words.index("ray") + 2] == ["start"]:
                found.append(words)
    return found


def test_ray_prepares_and_validates_it(prepared):
    assert prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == {"head", "gpu_1x", "gpu_4x"}
    # Every setup and start command is ours: none of Ray's AWS defaults (a nightly wheel) leak in.
    assert not any("ray-wheels" in command or "nightly" in command for command in prepared["setup_commands"])


def test_dashboard_and_jobs_api_listen_on_the_head_loopback_only(prepared):
    (head_start,) = ray_start_commands(prepared["head_start_ray_commands"])
    assert "--head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert not any("0.0.0.0" in command for command in prepared["head_start_ray_commands"])


def test_every_node_starts_with_token_authentication(prepared):
    starts = ray_start_commands(prepared["head_start_ray_commands"]) + ray_start_commands(prepared["worker_start_ray_commands"])
    assert len(starts) == 2
    for words in starts:
        assert "RAY_AUTH_MODE=token" in words[: words.index("ray")], words


def test_the_token_is_shipped_from_the_users_home_never_from_the_repository(prepared):
    source = prepared["file_mounts"][TOKEN_PATH]
    assert source == TOKEN_PATH
    assert not Path(source).expanduser().resolve().is_relative_to(REPO)
    text = CLUSTER_FILE.read_text()
    assert "RAY_AUTH_TOKEN=" not in text and not re.search(r"aws_(access_key_id|secret_access_key)", text)
    # `ray exec` / `ray attach` sessions on the nodes use the token too.
    assert any("export RAY_AUTH_MODE=token" in command for command in prepared["setup_commands"])


def test_gpu_workers_scale_from_zero(prepared):
    workers = {name: spec for name, spec in prepared["available_node_types"].items() if name != prepared["head_node_type"]}
    assert workers
    for name, spec in workers.items():
        assert spec["min_workers"] == 0, name
        assert spec["max_workers"] >= 1, name
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_only_the_head_advertises_the_driver_resource(prepared):
    head = prepared["available_node_types"]["head"]
    assert isinstance(head["resources"][DRIVER_RESOURCE], int) and head["resources"][DRIVER_RESOURCE] >= 1
    for name, spec in prepared["available_node_types"].items():
        if name != "head":
            assert DRIVER_RESOURCE not in spec["resources"], name


def test_workers_have_an_instance_profile_for_s3_and_the_head_gets_rays(prepared):
    for name, spec in prepared["available_node_types"].items():
        profile = spec["node_config"].get("IamInstanceProfile")
        if name == "head":
            assert profile is None  # ray up creates and attaches ray-autoscaler-v1 (tests/test_cluster_aws.py)
        else:
            assert profile == {"Name": "raycf-worker"}, name


def test_image_runs_the_ray_and_python_the_project_pins(prepared, pyproject):
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<python>\d)(?P<minor>\d+)-gpu", prepared["docker"]["image"])
    assert match, prepared["docker"]["image"]
    pinned = {Requirement(text).name: Requirement(text) for text in pyproject["project"]["dependencies"]}
    assert pinned["ray"].specifier.contains(match["ray"])
    assert match["ray"] == ray.__version__  # the Ray these tests run
    python = f"{match['python']}.{match['minor']}"
    assert Requirement(f"python{pyproject['project']['requires-python']}").specifier.contains(f"{python}.0")
    assert python == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_nodes_install_raycf_and_its_pins_from_the_checkout(prepared, pyproject):
    pinned = {Requirement(text).name: str(Requirement(text).specifier) for text in pyproject["project"]["dependencies"]}
    assert pinned["torch"] == "==2.14.1" and pinned["torchvision"] == "==0.29.1"
    assert prepared["file_mounts"]["~/raycf"] == "."
    installs = [shlex.split(command) for command in prepared["setup_commands"] if command.startswith("pip install")]
    assert any(words[-1] == "~/raycf" for words in installs)
    assert ".gitignore" in prepared["rsync_filter"]  # not .venv, results, ...


def test_the_local_test_cluster_starts_nodes_exactly_like_cluster_yaml(raw):
    local = yaml.safe_load(LOCAL_CLUSTER_FILE.read_text())
    assert local["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert local["head_start_ray_commands"] == raw["head_start_ray_commands"]
    assert local["worker_start_ray_commands"] == raw["worker_start_ray_commands"]
    assert local["file_mounts"][TOKEN_PATH] == raw["file_mounts"][TOKEN_PATH]
    validate_config(prepare_config(local))
