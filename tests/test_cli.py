"""The command line: help, and exit code 2 with one line for every kind of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_study
from raycf.models.checkpoint import ClassifierCheckpoint, save_classifier_checkpoint, unwrap_state_dict
from raycf.cli import build_parser, main
from raycf.config import ModelConfig
from raycf.models.build import build_model

REPO = Path(__file__).resolve().parent.parent


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    top = capsys.readouterr().out
    assert "train" in top and "Exit codes" in top
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    sub = capsys.readouterr().out
    for option in ("STUDY", "--smoke", "--set KEY=VALUE", "--force STAGE", "--debug"):
        assert option in sub
    # every option of every subcommand has help text
    for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions:
        assert action.help, action.dest


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("raycf: error: "), err
    assert expected in lines[0], err
    assert "Traceback" not in err


def _checkpoint(path: Path, classes: int) -> Path:
    model = build_model(ModelConfig(arch="vgg_tiny"), classes)
    save_classifier_checkpoint(
        ClassifierCheckpoint("vgg_tiny", 64, classes, [str(i) for i in range(classes)], 16, "h", unwrap_state_dict(model)), str(path)
    )
    return path


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"model": {"arch": "alexnet"}}, "model.arch: alexnet is refused: its head is three fully connected layers over 6×6 maps"),
        ({"data": {"kind": "svhn"}}, "data.kind: Input should be 'digits', 'fashion_mnist', 'cub200' or 'imagefolder' (got 'svhn')"),
        ({"base": {"epochs": -2}}, "base.epochs: Input should be greater than 0 (got -2)"),
        ({"base": {"lr": 0}}, "base.lr: Input should be greater than 0 (got 0)"),
        ({"base": {"epochs": "many"}}, "base.epochs: Input should be a valid integer"),
        ({"base": {"epoch": 3}}, "base.epoch: unknown field 'epoch'"),
        ({"data": {"kind": "cub200", "root": "/nonexistent/cub"}}, "data.root /nonexistent/cub: folder not found"),
        ({"model": {"weights": "/nonexistent/model.pt"}}, "/nonexistent/model.pt: checkpoint not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, sections, expected):
    study = write_study(tmp_path, **sections)
    code, err = _run(capsys, "train", str(study))
    _assert_one_line_error(code, err, expected)
    assert not (tmp_path / "results").exists()  # nothing written


def test_missing_study_file_and_yaml_syntax(tmp_path, capsys):
    code, err = _run(capsys, "train", str(tmp_path / "none.yaml"))
    _assert_one_line_error(code, err, "none.yaml: study file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase: {epochs: 3\n")
    code, err = _run(capsys, "train", str(bad))
    _assert_one_line_error(code, err, "YAML syntax error at line")


def test_incomplete_cub_folder_names_the_missing_file(tmp_path, capsys, cub_root):
    (cub_root / "classes.txt").unlink()
    study = write_study(tmp_path, data={"kind": "cub200", "root": str(cub_root)})
    code, err = _run(capsys, "train", str(study))
    _assert_one_line_error(code, err, "missing classes.txt")


def test_corrupt_image_is_named(tmp_path, capsys, imagefolder_root):
    (imagefolder_root / "test" / "dog" / "1.jpg").write_bytes(b"\xff\xd8 truncated")
    study = write_study(tmp_path, data={"kind": "imagefolder", "root": str(imagefolder_root)})
    code, err = _run(capsys, "train", str(study))
    _assert_one_line_error(code, err, "1.jpg: corrupt or unreadable image")


def test_checkpoint_for_another_class_count_is_refused(tmp_path, capsys):
    weights = _checkpoint(tmp_path / "five.pt", classes=5)
    study = write_study(tmp_path, model={"arch": "vgg_tiny", "weights": str(weights)})
    code, err = _run(capsys, "train", str(study))
    _assert_one_line_error(code, err, "checkpoint has 5 classes, but the dataset has 10")


def test_bad_override_leaves_existing_results_untouched(tmp_path, capsys):
    study = write_study(tmp_path)
    results = tmp_path / "results" / "t"
    results.mkdir(parents=True)
    (results / "config.yaml").write_text("earlier: run\n")
    code, err = _run(capsys, "train", str(study), "--set", "base.lr=-1")
    _assert_one_line_error(code, err, "--set: base.lr: Input should be greater than 0 (got -1)")
    assert (results / "config.yaml").read_text() == "earlier: run\n"
    code, err = _run(capsys, "train", str(study), "--force", "bogus")
    _assert_one_line_error(code, err, "--force bogus: unknown stage")
    assert (results / "config.yaml").read_text() == "earlier: run\n"


def test_console_script_prints_no_traceback(tmp_path):
    study = write_study(tmp_path, model={"arch": "lenet"})
    completed = subprocess.run([sys.executable, "-m", "raycf.cli", "train", str(study)], capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith("raycf: error: ") and "Traceback" not in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_rerun_on_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    code, err = _run(capsys, "rerun", str(tmp_path), "--best", "--device", "cuda")
    _assert_one_line_error(code, err, "--device cuda: no CUDA device is visible here")
