"""The checkpoint format: round trip, refusals, and no code execution on load."""

from __future__ import annotations

import pickle

import pytest
import torch

from raycf.models.checkpoint import ClassifierCheckpoint, load_classifier_checkpoint, save_classifier_checkpoint, unwrap_state_dict
from raycf.config import ModelConfig
from raycf.errors import UserError
from raycf.models.build import build_model


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


def test_a_partial_checkpoint_holds_the_retrained_layers_and_completes_with_its_base():
    import torch

    from raycf.models.checkpoint import checkpoint_of, complete, model_hash, parse_classifier_checkpoint

    torch.manual_seed(0)
    base_model = build_model(ModelConfig(arch="vgg_tiny"), 10)
    base_bytes = checkpoint_of(base_model, [str(d) for d in range(10)], 32, "base").to_bytes()
    retrained = build_model(ModelConfig(arch="vgg_tiny"), 10)
    retrained.load_state_dict(base_model.state_dict())
    retrained.set_trainable("last_conv_and_head")
    with torch.no_grad():
        retrained.fc.weight.add_(1.0)
        retrained.last_conv[1].running_mean.add_(0.5)  # the trainable BatchNorm's statistics move too
    partial = parse_classifier_checkpoint(checkpoint_of(retrained, [str(d) for d in range(10)], 32, "debug", {"epoch": 3}, model_hash(base_bytes)).to_bytes())
    assert partial.partial and len(partial.to_bytes()) < len(base_bytes) / 2
    assert {"fc.weight", "fc.bias", "last_conv.0.weight", "last_conv.1.running_mean"} <= set(partial.state_dict) and "trunk.0.weight" not in partial.state_dict
    whole = complete(partial, base_bytes)
    assert not whole.partial and whole.metrics["epoch"] == 3
    expected = retrained.state_dict()
    assert all(torch.equal(whole.state_dict[name], expected[name]) for name in expected)
    with pytest.raises(UserError, match="a partial checkpoint of base model"):
        complete(partial, checkpoint_of(retrained, [str(d) for d in range(10)], 32, "other").to_bytes())
    with pytest.raises(ValueError, match="complete it with its base model first"):
        from raycf.models.build import classifier_from_checkpoint

        classifier_from_checkpoint(ModelConfig(arch="vgg_tiny"), partial)


@pytest.mark.parametrize("arch", ["densenet121", "timm:resnet18"])
def test_the_arch_string_round_trips_and_a_mismatch_is_refused(tmp_path, arch):
    from raycf.models.checkpoint import checkpoint_of
    from raycf.models.build import classifier_from_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch), 3).eval()
    path = tmp_path / "model.pt"
    save_classifier_checkpoint(checkpoint_of(model, ["a", "b", "c"], 32, "h"), str(path))
    loaded = load_classifier_checkpoint(str(path), expected_arch=arch, expected_classes=3)
    assert loaded.arch == arch and loaded.num_filters == model.num_filters and "fc.weight" in loaded.state_dict
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(classifier_from_checkpoint(ModelConfig(arch=arch), loaded)(images), model(images))
    assert torch.equal(build_model(ModelConfig(arch=arch, weights=str(path)), 3).eval()(images), model(images))
    other = "resnet18" if arch.startswith("timm:") else "densenet169"
    with pytest.raises(UserError, match=f"checkpoint is for arch {arch}, but the study's model.arch is {other}"):
        build_model(ModelConfig(arch=other, weights=str(path)), 3)
