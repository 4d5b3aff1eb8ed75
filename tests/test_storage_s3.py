"""A results folder on S3 (moto's S3 server on 127.0.0.1): read back without a cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli

BUCKET = "raycf-results"


@pytest.fixture
def s3_server(monkeypatch, tmp_path):
    """A local S3 server with an empty bucket, and this test's own node cache folder."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    environment = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",  # botocore and pyarrow's S3 filesystem both honour it
        "RAYCF_NODE_CACHE": str(tmp_path / "node-cache"),
    }
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client, environment
    server.stop()


@pytest.fixture
def s3_results(smoke_study_results: Path, s3_server):
    """The smoke study's results uploaded to s3://raycf-results/runs/digits on a local S3 server."""
    client, environment = s3_server
    for path in smoke_study_results.rglob("*"):
        relative = path.relative_to(smoke_study_results)
        if path.is_file() and relative.parts[0] not in ("_ray", "report", "features"):
            client.upload_file(str(path), BUCKET, f"runs/digits/{relative.as_posix()}")
    return f"s3://{BUCKET}/runs/digits", environment


def put_images_stage(client, pixels: bytes, finished_at: str) -> None:
    """An images/ folder on S3 whose stage hash never changes: one file and its _stage.json."""
    client.put_object(Bucket=BUCKET, Key="runs/rewritten/images/train.npy", Body=pixels)
    marker = {"stage": "images", "hash": "0123456789abcdef", "finished_at": finished_at}
    client.put_object(Bucket=BUCKET, Key="runs/rewritten/images/_stage.json", Body=json.dumps(marker).encode())


def test_a_stage_rewritten_under_the_same_hash_gets_a_fresh_node_copy(s3_server):
    """A node-local copy is keyed by the stage's write, not only its hash: a forced rerun's new bytes are read."""
    from raycf.artefacts import store_ref
    from raycf.node_cache import local_folder

    client, _ = s3_server
    results = f"s3://{BUCKET}/runs/rewritten"
    put_images_stage(client, b"first write", "2026-12-01T10:00:00+00:00")
    first = store_ref(results)
    assert first.key == "0123456789abcdef-20261201T1000000000"
    assert (local_folder(first.location, first.key) / "train.npy").read_bytes() == b"first write"

    put_images_stage(client, b"second write", "2026-12-01T11:00:00+00:00")
    second = store_ref(results)
    assert second.key != first.key
    assert (local_folder(second.location, second.key) / "train.npy").read_bytes() == b"second write"
    assert (local_folder(first.location, first.key) / "train.npy").read_bytes() == b"first write"  # the old copy, by its own key


def test_leaderboard_and_rerun_read_an_s3_results_folder(s3_results, smoke_study_results):
    uri, environment = s3_results
    local = run_cli("leaderboard", str(smoke_study_results), "--format", "json")
    remote = run_cli("leaderboard", uri, "--format", "json", env_extra={**environment, "RAY_ADDRESS": ""})
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert json.loads(remote.stdout) == json.loads(local.stdout)

    rerun = run_cli("rerun", uri, "--best", env_extra={**environment, "RAY_ADDRESS": ""})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "matches the recorded run" in rerun.stdout

    missing = run_cli("leaderboard", f"s3://{BUCKET}/runs/nothing", env_extra=environment)
    assert missing.returncode == 2 and "no leaderboard.parquet" in missing.stderr
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
