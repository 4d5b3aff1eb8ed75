"""studies/cub_vgg16.yaml on cluster.yaml as written: its data and weights are where the cluster's file_mounts put them."""

from __future__ import annotations

import argparse
import shutil
from pathlib import PurePosixPath
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
NODE_HOME = PurePosixPath("/home/ray")  # the container user's home in rayproject/ray images


def _mounts() -> dict[PurePosixPath, str]:
    """cluster.yaml's file_mounts: path on every node -> path on the user's machine."""
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    return {PurePosixPath(target.replace("~", str(NODE_HOME), 1)): source for target, source in raw["file_mounts"].items()}


def _study() -> dict:
    return yaml.safe_load((REPO / "studies" / "cub_vgg16.yaml").read_text())


def _under(path: PurePosixPath, folder: PurePosixPath) -> bool:
    return path == folder or folder in path.parents


def test_the_studys_data_and_weights_lie_under_the_clusters_mounts():
    from raycf.models.build import imagenet_weights_file

    mounts, study = _mounts(), _study()
    root = PurePosixPath(study["data"]["root"])
    assert any(_under(root, target) for target in mounts), f"data.root {root} is not under any of {sorted(map(str, mounts))}"
    assert study["model"]["weights"] == "imagenet"
    # torchvision's cache on a node: $HOME/.cache/torch/hub/checkpoints/<the file torchvision names for vgg16>.
    weights = NODE_HOME / ".cache" / "torch" / "hub" / "checkpoints" / imagenet_weights_file("vgg16").name
    assert weights in mounts and mounts[weights].endswith(weights.name)


def test_the_clis_pre_checks_pass_on_a_node_with_the_mounted_files_faked(cub_root: Path, tmp_path: Path, monkeypatch):
    """The node's file system under tmp_path: the mounts' targets filled with a tiny CUB and a stand-in weights file."""
    from raycf.cli import _load_checked_study

    node = tmp_path / "node"
    study = _study()
    data_root = node / PurePosixPath(study["data"]["root"]).relative_to("/")
    shutil.copytree(cub_root, data_root)
    weights = next(target for target in _mounts() if target.name.endswith(".pth"))
    (node / weights.relative_to("/")).parent.mkdir(parents=True)
    (node / weights.relative_to("/")).write_bytes(b"")  # the pre-check looks for the file; nothing loads it
    monkeypatch.setenv("TORCH_HOME", str(node / "home" / "ray" / ".cache" / "torch"))
    args = argparse.Namespace(
        study=str(REPO / "studies" / "cub_vgg16.yaml"),
        overrides=[f"data.root={data_root}", f"storage_path={tmp_path / 'results'}"],
        smoke=True,
        verbose=False,
    )
    checked = _load_checked_study(args)
    assert checked.data.root == str(data_root) and checked.model.weights == "imagenet"
    assert not (tmp_path / "results").exists()  # pre-checks write nothing

    (node / weights.relative_to("/")).unlink()
    try:
        _load_checked_study(args)
    except Exception as error:  # noqa: BLE001 - the one-line error the CLI prints
        assert "model.weights: imagenet weights for vgg16 not found" in str(error)
    else:
        raise AssertionError("the missing weights file passed the pre-check")
