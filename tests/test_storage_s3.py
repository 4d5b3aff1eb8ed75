"""A results folder on S3 (moto's S3 server on 127.0.0.1): read back without a cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli

BUCKET = "raycf-results"


@pytest.fixture
def s3_results(smoke_study_results: Path, monkeypatch):
    """The smoke study's results uploaded to s3://raycf-results/runs/digits on a local S3 server."""
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
    }
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for path in smoke_study_results.rglob("*"):
        relative = path.relative_to(smoke_study_results)
        if path.is_file() and relative.parts[0] not in ("_ray", "report", "features"):
            client.upload_file(str(path), BUCKET, f"runs/digits/{relative.as_posix()}")
    yield f"s3://{BUCKET}/runs/digits", environment
    server.stop()


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
