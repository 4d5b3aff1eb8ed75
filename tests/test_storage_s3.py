"""Node-local copies of a results folder on S3 (moto's S3 server on 127.0.0.1)."""

from __future__ import annotations

import json

import pytest

from conftest import S3_BUCKET as BUCKET


@pytest.fixture
def s3_client(s3_bucket, monkeypatch, tmp_path):
    """A boto3 client of the session's local S3 server, and this test's own node cache folder."""
    import boto3

    monkeypatch.setenv("RAYCF_NODE_CACHE", str(tmp_path / "node-cache"))
    return boto3.client("s3")


def put_images_stage(client, pixels: bytes, finished_at: str) -> None:
    """An images/ folder on S3 whose stage hash never changes: one file and its _stage.json."""
    client.put_object(Bucket=BUCKET, Key="runs/rewritten/images/train.npy", Body=pixels)
    marker = {"stage": "images", "hash": "0123456789abcdef", "finished_at": finished_at}
    client.put_object(Bucket=BUCKET, Key="runs/rewritten/images/_stage.json", Body=json.dumps(marker).encode())


def test_a_stage_rewritten_under_the_same_hash_gets_a_fresh_node_copy(s3_client):
    """A node-local copy is keyed by the stage's write, not only its hash: a forced rerun's new bytes are read."""
    from raycf.results.artefacts import store_ref
    from raycf.results.node_cache import local_folder

    client = s3_client
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


def _marker(client, prefix: str, folder: str) -> None:
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{folder}/_stage.json", Body=json.dumps({"stage": folder, "hash": "h", "finished_at": "t"}).encode())


def test_a_stage_on_a_bucket_is_committed_by_its_marker_alone(s3_client):
    """No rename on S3: a rerun withdraws its own and its downstream markers, empties its folder, writes in place; a crash leaves no marker."""
    from raycf.results import storage
    from raycf.results.artefacts import read_marker
    from raycf.pipeline import run_in_place, withdraw_markers
    from raycf.stages import Stage, StageRun

    results = f"s3://{BUCKET}/runs/in-place"
    for folder in ("masks", "search", "final", "report"):
        _marker(s3_client, "runs/in-place", folder)
    s3_client.put_object(Bucket=BUCKET, Key="runs/in-place/search/stale.parquet", Body=b"old run")
    withdraw_markers(results, "search")
    assert [folder for folder in ("masks", "search", "final", "report") if read_marker(results, folder) is not None] == ["masks"]

    def crashes(run: StageRun) -> dict:
        storage.write_text(run.path("half.txt"), "written before the crash")
        raise RuntimeError("killed")

    def finishes(run: StageRun) -> dict:
        storage.write_text(run.path("whole.txt"), "done")
        return {}

    folder = storage.join_uri(results, "search")
    for run_function in (crashes, finishes):
        stage = Stage("search", reads=(), upstream=(), run=run_function, folder="search")
        run = StageRun(study=None, results=results, output=folder, stage_hash="h", folders={})
        if run_function is crashes:
            with pytest.raises(RuntimeError):
                run_in_place(stage, run)
            assert storage.exists(storage.join_uri(folder, "half.txt")) and read_marker(results, "search") is None
        else:
            run_in_place(stage, run)
    assert not storage.exists(storage.join_uri(folder, "half.txt")) and not storage.exists(storage.join_uri(folder, "stale.parquet"))
    assert storage.read_text(storage.join_uri(folder, "whole.txt")) == "done"


def test_checkpoint_paths_get_their_scheme_back():
    from raycf.results.storage import with_scheme

    assert with_scheme("raycf-results/runs/digits/_ray/search-1/trial-a/checkpoint_000001", "s3://raycf-results/runs/digits") == (
        "s3://raycf-results/runs/digits/_ray/search-1/trial-a/checkpoint_000001"
    )
    assert with_scheme("/local/_ray/x", "/local") == "/local/_ray/x"
    assert with_scheme("s3://b/k", "s3://b") == "s3://b/k"


def test_a_bucket_that_does_not_exist_is_one_line_naming_storage_path(s3_bucket):
    from raycf.errors import UserError
    from raycf.results.storage import check_writable

    check_writable(f"{s3_bucket}/runs/probe")  # the bucket exists: nothing raised, nothing left
    with pytest.raises(UserError, match=r"^storage_path: cannot write to s3://no-such-bucket/runs \(.*not.*\)"):
        check_writable("s3://no-such-bucket/runs")
