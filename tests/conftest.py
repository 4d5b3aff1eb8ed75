"""Shared fixtures: one Ray session for the whole run, tiny studies and datasets on disk."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Every process of the suite (Ray's workers included, which inherit the
# environment of the session's cluster) talks to the local S3 server of
# ``s3_bucket``, never to a real account.
S3_BUCKET = "raycf-results"
S3_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",  # botocore and pyarrow's S3 filesystem both honour it
}
os.environ.update(S3_ENVIRONMENT)
# Tests run on CPU with few cores: keep torch to one thread per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# What tests find on the machine -> the Debian package that provides it.
SYSTEM_TOOLS = {
    "sshd": ("openssh-server", "/usr/sbin/sshd"),
    "rsync": ("rsync", "rsync"),
    "ip": ("iproute2", "ip"),
    "unshare": ("util-linux", "unshare"),
    "chromium": ("chromium", "chromium"),
    "fashion-mnist": ("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"),
}


def present(probe: str) -> bool:
    """Whether a program (by name, on PATH) or a file (by absolute path) is on this machine."""
    return Path(probe).exists() if probe.startswith("/") else shutil.which(probe) is not None


def require_system(*tools: str, root: bool = False) -> None:
    """Skip the calling test unless these programs (and root, when asked) are here; under CI=true, fail instead.

    The message names the Debian packages and how to install them
    (``make test`` as root installs them: .ci/system-packages.sh).
    """
    missing = sorted({SYSTEM_TOOLS[tool][0] for tool in tools if not present(SYSTEM_TOOLS[tool][1])})
    needs = []
    if missing:
        needs.append(f"the Debian package(s) {' '.join(missing)} (install: sudo apt-get install -y {' '.join(missing)}, or run `make test` as root)")
    if root and os.geteuid() != 0:
        needs.append("root (Linux namespaces and an SSH server)")
    if not needs:
        return
    message = "needs " + " and ".join(needs)
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; under CI every system package must be installed (.ci/system-packages.sh)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster shared by every test that needs Ray (ray.init costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


def write_image_store(study, folder: Path):
    """The study's uint8 image store written in this process (no Ray) into ``folder``; its StoreRef."""
    from raycf.data.datasets import load_splits
    from raycf.data.image_store import StoreRef, write_store_here

    write_store_here(load_splits(study.data, study.seed), str(folder), study.data, study.seed)
    return StoreRef(str(folder), f"test-{folder.name}")


def write_study(folder: Path, **sections) -> Path:
    """A study file in ``folder`` whose results go under ``folder/results``."""
    study = {"name": "t", "storage_path": str(folder / "results"), "seed": 0}
    study.update(sections)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture
def digits_study(tmp_path: Path) -> Path:
    """A tiny digits study: 16-pixel images, one epoch, results under tmp_path."""
    return write_study(
        tmp_path,
        data={"kind": "digits", "image_size": 16, "test_fraction": 0.5, "val_fraction": 0.2},
        model={"arch": "vgg_tiny"},
        base={"epochs": 1, "batch_size": 64, "workers": 1, "lr": 0.05},
    )


def _image(path: Path, color: tuple[int, int, int], size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size, size + 4, 3), dtype=np.uint8)
    pixels[...] = color
    pixels[size // 4 : size // 2, size // 4 : size // 2] = 255 - np.array(color, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    """A tiny folder in the official CUB_200_2011 layout: 3 classes, 6 images each (4 train, 2 test)."""
    root = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, split, boxes = [], [], [], []
    image_id = 0
    for class_number, class_name in enumerate(classes, start=1):
        for k in range(6):
            image_id += 1
            relative = f"{class_name}/{class_name.split('.')[1]}_{k:04d}.jpg"
            _image(root / "images" / relative, (40 * class_number, 20 * k, 100))
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_number}")
            split.append(f"{image_id} {1 if k < 4 else 0}")
            boxes.append(f"{image_id} 2.0 3.0 10.0 8.0")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i} {name}" for i, name in enumerate(classes, start=1)) + "\n")
    return root


@pytest.fixture
def imagefolder_root(tmp_path: Path) -> Path:
    """``train/`` (2 classes × 5 images) and ``test/`` (2 × 2); no ``val/``."""
    root = tmp_path / "folder"
    for class_index, name in enumerate(["cat", "dog"]):
        for k in range(5):
            _image(root / "train" / name / f"{k}.png", (100 * class_index, 30 * k, 50))
        for k in range(2):
            _image(root / "test" / name / f"{k}.jpg", (100 * class_index, 30 * k + 10, 50))
    return root


def ray_address() -> str:
    """The address of the session's Ray cluster, for subprocesses that should join it."""
    import ray

    return ray.get_runtime_context().gcs_address


def run_cli(*args: str, env_extra: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python -m raycf.cli ARGS`` from the repository root."""

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "raycf.cli", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def shared_temp(tmp_path_factory) -> Path:
    """This run's temporary folder shared by every pytest-xdist worker (each worker's own folder is a child of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smoke_study_results(ray_session, tmp_path_factory) -> Path:
    """The digits study run once with ``--smoke`` through the command line (joining the session's cluster).

    Returns the results folder (``<tmp>/results/digits``).  Tests must not
    modify it.  Beside ``results/``: ``reads.log`` (every image read, see
    ``raycf.data.datasets.READ_LOG``), ``fields.log`` (every study field each stage
    read, see :mod:`raycf.runtime.field_reads`), ``stdout.txt`` and ``stderr.txt``.
    """
    from filelock import FileLock

    folder = shared_temp(tmp_path_factory) / "smoke-study"
    storage = folder / "results"
    with FileLock(f"{folder}.lock"):
        if not (folder / "stderr.txt").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died mid-study
            folder.mkdir()
            environment = {"RAY_ADDRESS": ray_address(), "RAYCF_READ_LOG": str(folder / "reads.log"), "RAYCF_FIELD_LOG": str(folder / "fields.log")}
            completed = run_cli("study", "studies/digits.yaml", "--smoke", "--set", f"storage_path={storage}", env_extra=environment)
            assert completed.returncode == 0, completed.stderr[-3000:]
            (folder / "stdout.txt").write_text(completed.stdout)
            (folder / "stderr.txt").write_text(completed.stderr)  # written last: the study is complete
    return storage / "digits"


@pytest.fixture(scope="session")
def s3_bucket():
    """moto's S3 server at ``AWS_ENDPOINT_URL`` with the empty bucket ``s3://raycf-results``; yields its URI.

    The server runs in a process of its own: in this one, leaving a test's
    in-process ``moto.mock_aws()`` (tests/test_cluster_aws.py) resets moto's
    backends, and a server thread here would lose its bucket with them.
    """
    import time

    import boto3

    port = int(S3_ENVIRONMENT["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert server.poll() is None and time.monotonic() < deadline, "moto's S3 server did not start"
        time.sleep(0.1)
    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
    yield f"s3://{S3_BUCKET}"
    server.terminate()
    server.wait(timeout=30)


RUN_STAGE = (
    "import sys\n"
    "from raycf.runtime import console\n"
    "from raycf.config import load_study\n"
    "from raycf.pipeline import run_stages\n"
    "study = load_study(sys.argv[2], sys.argv[3:], smoke=True)\n"
    "console.configure(study.results_uri)\n"
    "run_stages(study, [sys.argv[1]])\n"
)


# The smoke study's files up to its analysis: a copy of them makes a new search start from cached stages.
CACHED_UP_TO_ANALYSIS = ("config.yaml", "manifest.json", "images", "base", "features", "cfe", "masks", "analysis")


def copy_study_parts(source: Path, target: Path, names: tuple[str, ...]) -> None:
    """Copy the named files and stage folders of a results folder into a new one, ``target``."""
    target.mkdir(parents=True)
    for name in names:
        path = source / name
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, target / name)


def run_stage(stage: str, study_file: str, *overrides: str, env_extra: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``stage`` of ``study_file`` with ``--smoke`` (and the stages it needs first) in a fresh process joining the session's cluster."""
    environment = {**os.environ, "RAY_ADDRESS": ray_address(), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", RUN_STAGE, stage, study_file, *overrides], capture_output=True, text=True, cwd=REPO, env=environment, timeout=timeout)


RUN_WITHOUT_RAY = (
    "import sys, ray\n"
    "from raycf.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "assert not ray.is_initialized(), 'the command started Ray'\n"
    "sys.exit(code)\n"
)


def run_cli_without_ray(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a raycf command on the CPU in a fresh process and fail if it started or joined Ray."""

    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", RUN_WITHOUT_RAY, *args], capture_output=True, text=True, env=environment, timeout=timeout)
