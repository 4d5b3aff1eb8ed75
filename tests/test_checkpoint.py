"""The checkpoint format: round trip, refusals, and no code execution on load."""

from __future__ import annotations

import pickle

import pytest
import torch

from raycf.checkpoint import ClassifierCheckpoint, load_classifier_checkpoint, save_classifier_checkpoint, unwrap_state_dict
from raycf.config import ModelConfig
from raycf.errors import UserError
from raycf.models import build_model


def _saved(tmp_path, arch="vgg_tiny", classes=4):
    model = build_model(ModelConfig(arch=arch), num_classes=classes)
    checkpoint = ClassifierCheckpoint(
        arch=arch, num_filters=model.num_filters, num_classes=classes, class_names=[f"c{i}" for i in range(classes)],
        image_size=16, config_hash="abc", state_dict=unwrap_state_dict(model), metrics={"val_acc": 0.5},
    )
    path = tmp_path / "model.pt"
    save_classifier_checkpoint(checkpoint, str(path))
    return model, path


def test_round_trip_restores_identical_outputs(tmp_path):
    model, path = _saved(tmp_path)
    loaded = load_classifier_checkpoint(str(path), expected_arch="vgg_tiny", expected_classes=4)
    assert loaded.class_names == ["c0", "c1", "c2", "c3"] and loaded.num_filters == 64 and loaded.metrics == {"val_acc": 0.5}
    again = build_model(ModelConfig(arch="vgg_tiny", weights=str(path)), num_classes=4).eval()
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(again(images), model.eval()(images))


def test_refuses_other_arch_or_class_count(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(UserError, match="checkpoint is for arch vgg_tiny, but the study's model.arch is resnet18"):
        load_classifier_checkpoint(str(path), expected_arch="resnet18")
    with pytest.raises(UserError, match="checkpoint has 4 classes, but the dataset has 10"):
        build_model(ModelConfig(arch="vgg_tiny", weights=str(path)), num_classes=10)


class _Exploit:
    def __reduce__(self):
        return (print, ("code ran",))


def test_refuses_pickles_that_would_run_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "raycf.classifier/1", "x": _Exploit()}))
    with pytest.raises(UserError, match="not a loadable raycf checkpoint"):
        load_classifier_checkpoint(str(path))
    assert "code ran" not in capsys.readouterr().out


def test_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_classifier_checkpoint(str(tmp_path / "none.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a raycf classifier checkpoint"):
        load_classifier_checkpoint(str(tmp_path / "other.pt"))
