"""Bring your own CNN: torchvision and timm state_dicts as model.weights, the refused architectures, and a study of a user's model."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import pandas as pd
import pytest
import torch
import torchvision

from safetensors.torch import load_file

from conftest import _image as make_image
from conftest import ray_address, run_cli, write_study
from raycf.results.artefacts import debugged_model_bytes, load_results_study
from raycf.models.checkpoint import load_classifier_checkpoint, parse_classifier_checkpoint
from raycf.data.image_store import ImageStore
from raycf.data.views import model_inputs
from raycf.cli import check_study_inputs, main
from raycf.config import DataConfig, ModelConfig, StudyConfig
from raycf.data.datasets import load_splits
from raycf.errors import UserError
from raycf.models.build import adopted_model_bytes, build_model, check_model_weights, classifier_from_checkpoint

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _saved(tmp_path, net: torch.nn.Module, name: str = "user.pt", prefix: str = "") -> str:
    """A user-style state_dict file (what ``torch.save(model.state_dict(), path)`` writes)."""
    path = tmp_path / name
    torch.save({f"{prefix}{key}": value for key, value in net.state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def user_resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).eval()


@pytest.mark.parametrize("prefix", ["", "module."])
def test_a_torchvision_state_dict_is_the_users_model(tmp_path, user_resnet, prefix):
    path = _saved(tmp_path, user_resnet, prefix=prefix)  # "module.": saved from a DDP-wrapped model
    check_model_weights(ModelConfig(arch="resnet18", weights=path), 3, ["a", "b", "c"])
    model = build_model(ModelConfig(arch="resnet18", weights=path), 3).eval()
    with torch.no_grad():
        assert torch.allclose(model(IMAGES), user_resnet(IMAGES), atol=1e-5)


def test_a_timm_state_dict_is_the_users_model(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    user = timm.create_model("resnet18", num_classes=3).eval()
    path = _saved(tmp_path, user)
    check_model_weights(ModelConfig(arch="timm:resnet18", weights=path), 3)
    model = build_model(ModelConfig(arch="timm:resnet18", weights=path), 3).eval()
    with torch.no_grad():
        assert torch.allclose(model(IMAGES), user(IMAGES), atol=1e-5)
        assert torch.allclose(model.features(IMAGES), user.forward_head(user.forward_features(IMAGES), pre_logits=True), atol=1e-5)


def test_class_names_put_the_heads_rows_in_the_dataset_order(tmp_path, user_resnet):
    path = _saved(tmp_path, user_resnet)
    dataset = ["cat", "dog", "fox"]
    config = ModelConfig(arch="resnet18", weights=path, class_names=["fox", "cat", "dog"])  # the head's order
    check_model_weights(config, 3, dataset)
    model = build_model(config, 3, dataset_classes=dataset).eval()
    with torch.no_grad():
        assert torch.allclose(model(IMAGES), user_resnet(IMAGES)[:, [1, 2, 0]], atol=1e-5)
    with pytest.raises(UserError, match=r"^model.class_names: 2 names, but the dataset has 3 classes$"):
        check_model_weights(ModelConfig(arch="resnet18", weights=path, class_names=["cat", "dog"]), 3, dataset)
    with pytest.raises(UserError, match="model.class_names: 'dgo' where the dataset has 'dog'"):
        check_model_weights(ModelConfig(arch="resnet18", weights=path, class_names=["fox", "cat", "dgo"]), 3, dataset)
    with pytest.raises(UserError, match="model.class_names: states the class order of a state_dict's head"):
        check_model_weights(ModelConfig(arch="resnet18", class_names=dataset), 3, dataset)


def test_a_head_for_another_class_count_is_refused_unless_the_trunk_alone_is_adopted(tmp_path, user_resnet):
    path = _saved(tmp_path, user_resnet)
    with pytest.raises(UserError, match=r"its head has 3 classes, but the dataset has 5 \(expected a state_dict trained on this dataset, or model.weights_trunk_only: true"):
        check_model_weights(ModelConfig(arch="resnet18", weights=path), 5)
    config = ModelConfig(arch="resnet18", weights=path, weights_trunk_only=True)
    check_model_weights(config, 5)
    model = build_model(config, 5)
    assert torch.equal(model.trunk[0].weight, user_resnet.conv1.weight) and model.fc.out_features == 5


def test_a_state_dict_of_another_arch_is_named(tmp_path, user_resnet):
    path = _saved(tmp_path, user_resnet)
    with pytest.raises(UserError, match=r"not a state_dict of resnet34 \(missing layer1.2.conv1.weight, .* \(96 in all\)\)"):
        check_model_weights(ModelConfig(arch="resnet34", weights=path), 3)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a state_dict of resnet18 .*unexpected weights"):
        build_model(ModelConfig(arch="resnet18", weights=str(tmp_path / "other.pt")), 3)


def test_a_torchvision_vgg_state_dict_is_refused_unless_its_trunk_is_adopted(tmp_path):
    # torchvision's vgg11 with its three FC layers (shrunk here: their shapes do not matter, they are never loaded).
    with torch.device("meta"):
        vgg = torchvision.models.vgg11()
    vgg.features.to_empty(device="cpu")
    for parameter in vgg.features.parameters():
        torch.nn.init.normal_(parameter)
    state = {f"features.{key}": value for key, value in vgg.features.state_dict().items()}
    state.update({f"classifier.{i}.{kind}": torch.zeros(2, 2) if kind == "weight" else torch.zeros(2) for i in (0, 3, 6) for kind in ("weight", "bias")})
    torch.save(state, tmp_path / "vgg.pt")
    path = str(tmp_path / "vgg.pt")
    with pytest.raises(UserError, match=r"three FC layers over 7×7 maps, but raycf's vgg11 is its trunk, a 2×2 max pool, GAP and one linear layer .*weights_trunk_only: true"):
        check_model_weights(ModelConfig(arch="vgg11", weights=path), 3)
    model = build_model(ModelConfig(arch="vgg11", weights=path, weights_trunk_only=True), 3)
    assert torch.equal(model.last_conv.weight, vgg.features[-3].weight) and model.fc.in_features == 512



def _lightning(tmp_path, net: torch.nn.Module, prefix: str = "model.", name: str = "user.ckpt") -> str:
    """What a LightningModule holding the network as ``self.model`` saves: the weights under ``model.``, its other parts beside them."""
    state = {f"{prefix}{key}": value for key, value in net.state_dict().items()}
    state["criterion.weight"] = torch.ones(3)  # e.g. a weighted loss: not part of the network
    path = tmp_path / name
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0", "state_dict": state, "optimizer_states": [], "lr_schedulers": []}, path)
    return str(path)


def test_a_lightning_checkpoint_is_read_with_its_prefix_found_or_named(tmp_path, user_resnet):
    path = _lightning(tmp_path, user_resnet)
    for config in (ModelConfig(arch="resnet18", weights=path), ModelConfig(arch="resnet18", weights=path, weights_prefix="model.")):
        check_model_weights(config, 3)
        with torch.no_grad():
            assert torch.allclose(build_model(config, 3).eval()(IMAGES), user_resnet(IMAGES), atol=1e-5)
    with pytest.raises(UserError, match=r"^model.weights_prefix: no key of .*user.ckpt starts with 'net.' \(its first keys: model.conv1.weight"):
        check_model_weights(ModelConfig(arch="resnet18", weights=path, weights_prefix="net."), 3)
    # The same network twice (e.g. a teacher and a student): the prefix is not unambiguous.
    state = {**{f"student.{k}": v for k, v in user_resnet.state_dict().items()}, **{f"teacher.{k}": v for k, v in user_resnet.state_dict().items()}}
    torch.save({"state_dict": state}, tmp_path / "two.ckpt")
    with pytest.raises(UserError, match=r"found under several prefixes \(student., teacher.\); set model.weights_prefix"):
        check_model_weights(ModelConfig(arch="resnet18", weights=str(tmp_path / "two.ckpt")), 3)
    check_model_weights(ModelConfig(arch="resnet18", weights=str(tmp_path / "two.ckpt"), weights_prefix="student."), 3)


def test_a_safetensors_file_is_read(tmp_path, user_resnet):
    from safetensors.torch import save_file

    path = tmp_path / "user.safetensors"
    save_file({key: value.contiguous() for key, value in user_resnet.state_dict().items()}, str(path))
    config = ModelConfig(arch="resnet18", weights=str(path))
    check_model_weights(config, 3)
    with torch.no_grad():
        assert torch.allclose(build_model(config, 3).eval()(IMAGES), user_resnet(IMAGES), atol=1e-5)


def test_a_pickled_module_or_torchscript_is_refused_with_the_recipe(tmp_path, user_resnet):
    torch.save(user_resnet, tmp_path / "whole.pt")
    whole = str(tmp_path / "whole.pt")
    with pytest.raises(UserError, match=r"whole.pt: a pickled module, not weights .*torch.save\(torch.load\('.*whole.pt', weights_only=False\).state_dict\(\), 'weights.pt'\)"):
        check_model_weights(ModelConfig(arch="resnet18", weights=whole), 3)
    torch.jit.save(torch.jit.script(user_resnet), tmp_path / "scripted.pt")
    scripted = str(tmp_path / "scripted.pt")
    with pytest.raises(UserError, match=r"scripted.pt: a TorchScript module, not weights .*torch.save\(torch.jit.load\('.*scripted.pt'\).state_dict\(\), 'weights.pt'\)"):
        check_model_weights(ModelConfig(arch="resnet18", weights=scripted), 3)
    torch.save(torch.jit.load(scripted).state_dict(), tmp_path / "weights.pt")  # the recipe works
    check_model_weights(ModelConfig(arch="resnet18", weights=str(tmp_path / "weights.pt")), 3)


# ------------------------------------------------------------ the command line


def _one_line_error(capsys, study) -> str:
    code = main(["train", str(study)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("raycf: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("arch", "reason"),
    [
        ("alexnet", "its head is three fully connected layers over 6×6 maps"),
        ("mobilenet_v3_small", "its head is an MLP (Linear, Hardswish, Dropout, Linear)"),
        ("squeezenet1_1", "its head is a 1×1 conv and a ReLU before pooling"),
        ("vit_b_16", "a transformer"),
        ("swin_t", "a transformer"),
        ("maxvit_t", "a transformer"),
    ],
)
def test_refused_architectures_exit_2_with_their_reason(tmp_path, capsys, arch, reason):
    err = _one_line_error(capsys, write_study(tmp_path, model={"arch": arch}))
    assert f"model.arch: {arch} is refused: {reason}" in err
    assert not (tmp_path / "results").exists()


def test_unknown_architectures_name_the_families(tmp_path, capsys):
    err = _one_line_error(capsys, write_study(tmp_path, model={"arch": "googlenet"}))
    assert "model.arch: unknown architecture 'googlenet' (expected vgg_tiny, vgg11 … vgg19, vgg*_bn, resnet*" in err and "refused: alexnet" in err
    err = _one_line_error(capsys, write_study(tmp_path, model={"arch": "resnet7"}))
    assert "model.arch: torchvision has no model 'resnet7' (its resnet family: resnet101, resnet152, resnet18" in err


def test_a_timm_arch_without_timm_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails, as without the extra
    err = _one_line_error(capsys, write_study(tmp_path, model={"arch": "timm:resnet18"}))
    assert "model.arch: timm:<name> needs timm, raycf's optional extra (pip install 'raycf[timm]')" in err


def test_a_state_dict_for_another_dataset_exits_2(tmp_path, capsys, user_resnet):
    err = _one_line_error(capsys, write_study(tmp_path, model={"arch": "resnet18", "weights": _saved(tmp_path, user_resnet)}))
    assert "its head has 3 classes, but the dataset has 10" in err


# ------------------------------------------------------------ a study of the user's model


@dataclass
class OwnModelStudy:
    arch: str
    folder: Path  # the image folder
    results: Path
    user: torch.nn.Module  # the user's network, as the weights file holds it
    adopted: bool  # base.train: false
    output: str  # the command's stdout and stderr


def _image_folder(root: Path) -> Path:
    """``train/`` (2 classes × 5 images) and ``test/`` (2 × 2), no ``val/`` (as the imagefolder_root fixture)."""
    for class_index, name in enumerate(["cat", "dog"]):
        for k in range(5):
            make_image(root / "train" / name / f"{k}.png", (100 * class_index, 30 * k, 50))
        for k in range(2):
            make_image(root / "test" / name / f"{k}.jpg", (100 * class_index, 30 * k + 10, 50))
    return root


@pytest.fixture(scope="module", params=["resnet18", "timm:resnet18"])
def own_model_study(request, ray_session, tmp_path_factory) -> OwnModelStudy:
    """A user's model on an image folder, run once per module with ``--smoke``; preprocessing from the weights.

    resnet18: its state_dict saved as a Lightning checkpoint (under ``model.``,
    beside a loss's weights), base.train: false: raycf debugs that model as is.
    timm:resnet18: a plain state_dict; base training starts from it.  Both: the
    training split holds one image more than a multiple of the batch size (a
    batch of one would crash BatchNorm in base training and in every search trial).
    """
    arch = request.param
    tmp_path = tmp_path_factory.mktemp(arch.replace(":", "_"))
    torch.manual_seed(0)
    if arch.startswith("timm:"):
        user = pytest.importorskip("timm").create_model(arch.removeprefix("timm:"), num_classes=2).eval()
        weights = _saved(tmp_path, user)
    else:
        user = getattr(torchvision.models, arch)(num_classes=2).eval()
        weights = _lightning(tmp_path, user)
    data = {"kind": "imagefolder", "root": str(_image_folder(tmp_path / "folder")), "image_size": 32, "decode_actors": 1, "preprocess": {"mode": "weights"}}
    train_count = len(load_splits(DataConfig(**{key: value for key, value in data.items() if key != "preprocess"}), 0).train)
    batch_size = train_count - 1  # the last batch would hold one image
    adopted = not arch.startswith("timm:")
    study = write_study(
        tmp_path,
        data=data,
        model={"arch": arch, "weights": weights},
        base={"train": False} if adopted else {"epochs": 1, "batch_size": batch_size, "workers": 1},
        features={"actors": 1},
        cfe={"epochs": 1, "views": 1, "workers": 0},
        masks={"actors": 1},
        prefix={"actors": 1},
        debug={"epochs": 1, "views": 1, "batch_size": batch_size},
        search={"num_samples": 2, "max_concurrent": 1},
        smoke={"debug": {"epochs": 1}},
    )
    completed = run_cli("study", str(study), "--smoke", env_extra={"RAY_ADDRESS": ray_address()})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return OwnModelStudy(arch, tmp_path / "folder", tmp_path / "results" / "t", user, adopted, completed.stdout + completed.stderr)


def test_a_smoke_study_debugs_a_users_model(own_model_study):
    study = own_model_study
    base = load_classifier_checkpoint(str(study.results / "base" / "model.pt"), expected_arch=study.arch, expected_classes=2)
    assert base.class_names == ["cat", "dog"]
    user_head = study.user.get_classifier().weight if study.arch.startswith("timm:") else study.user.fc.weight
    assert torch.equal(base.state_dict["fc.weight"], user_head) == study.adopted
    assert ("(adopted from model.weights)" in study.output) == study.adopted
    board = pd.read_parquet(study.results / "leaderboard.parquet")
    assert len(board) == 2 and (board["status"] != "error").all() and (study.results / "final" / "final.parquet").is_file()
    preprocess = load_results_study(str(study.results)).data.preprocess
    expected = (37, "bilinear") if study.arch == "resnet18" else (33, "bicubic")  # torchvision 256/224; timm floor(32 / 0.95)
    assert (preprocess.mode, preprocess.resize, preprocess.interpolation) == ("weights", *expected)


def test_flagged_parquet_lists_every_test_image_most_suspicious_first(own_model_study, tmp_path):
    flagged = pd.read_parquet(own_model_study.results / "analysis" / "flagged.parquet")
    masks = pd.read_parquet(own_model_study.results / "masks" / "test")
    assert sorted(flagged["image_id"]) == sorted(masks["image_id"]) and list(flagged["rank"]) == list(range(1, len(flagged) + 1))
    own = [column for column in flagged.columns if column.startswith("flag: study: ")]
    assert len(own) == 1 and flagged[own[0]].dtype == bool
    assert list(flagged[own[0]]) == sorted(flagged[own[0]], reverse=True)  # the study's flags first
    detection = pd.read_parquet(own_model_study.results / "analysis" / "detection.parquet")
    study_row = detection[(detection["split"] == "test") & detection["setting"].str.startswith("study: ")].iloc[0]
    assert int(flagged[own[0]].sum()) == study_row["flagged"]
    masks = masks.set_index("image_id")
    for _, row in flagged.iterrows():  # the filter lists are the MC set against the predicted class's global set
        local = set(np.flatnonzero(masks.loc[row["image_id"], "mc_mask"]))
        assert not (set(row["missing_filters"]) & local) and set(row["extra_filters"]) <= local
    assert 0 <= flagged["f1"].min() and flagged["f1"].max() <= 1 and np.allclose(flagged["suspicion"], -flagged["f1"])
    code = main(["explain", str(own_model_study.results), "--flagged", "2", "--out", str(tmp_path / "bundles")])
    assert code == 0 and len(list((tmp_path / "bundles").iterdir())) == 2
    report = (own_model_study.results / "report" / "index.html").read_text()
    assert 'href="../analysis/flagged.parquet"' in report and "--flagged" in report


def _test_inputs(results: Path) -> tuple[torch.Tensor, pd.DataFrame]:
    """raycf's evaluation inputs of the test split (the images stage's store, then the device transform) and the debugged model's predictions."""
    study = load_results_study(str(results))
    store = ImageStore(results / "images")
    images = torch.from_numpy(np.array(store.images("test"))).permute(0, 3, 1, 2)
    inputs = model_inputs(images, study.data.image_size, preprocess=study.data.preprocess)
    predictions = pd.read_parquet(results / "final" / "predictions.parquet")
    debugged = predictions[(predictions["model"] == "debugged") & (predictions["split"] == "test")].sort_values("image_index")
    return inputs, debugged


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_the_exported_debugged_model_loads_in_its_library_and_predicts_as_raycf(own_model_study, tmp_path, fmt):
    study, out = own_model_study, tmp_path / f"model.{fmt}"
    code = main(["export", str(study.results), "--format", fmt, "--out", str(out)])
    assert code == 0
    state = load_file(str(out)) if fmt == "safetensors" else torch.load(out, weights_only=True)
    if study.arch.startswith("timm:"):
        net = pytest.importorskip("timm").create_model(study.arch.removeprefix("timm:"), num_classes=2)
    else:
        net = torchvision.models.resnet18(num_classes=2)
    net.load_state_dict(state)  # strict: the library's own key names
    net.eval()
    inputs, debugged = _test_inputs(study.results)
    trial_id, model_bytes = debugged_model_bytes(str(study.results))
    raycf_model = classifier_from_checkpoint(load_results_study(str(study.results)).model, parse_classifier_checkpoint(model_bytes, "debugged"))
    with torch.no_grad():
        logits = net(inputs)
        torch.testing.assert_close(logits, raycf_model(inputs), rtol=0, atol=1e-5)
    assert logits.argmax(1).tolist() == debugged["pred"].tolist()
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["arch"] == study.arch and sidecar["class_names"] == ["cat", "dog"] and sidecar["trial_id"] == trial_id
    assert sidecar["preprocess"]["mode"] == "weights" and "lambda1" in sidecar["params"] and "val_acc" in sidecar["val_metrics"]
    assert "test_acc" in sidecar["test_metrics"]


def test_export_refuses_a_gone_checkpoint_before_writing(own_model_study, tmp_path, capsys):
    copy = tmp_path / "results"
    shutil.copytree(own_model_study.results, copy)
    board = pd.read_parquet(copy / "leaderboard.parquet")
    board["checkpoint_path"] = str(tmp_path / "gone")
    board.to_parquet(copy / "leaderboard.parquet")
    out = tmp_path / "model.pt"
    code = main(["export", str(copy), "--model", "control", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "checkpoint is gone" in err and str(tmp_path / "gone") in err
    assert not out.exists() and not out.with_name("model.pt.json").exists()


def test_a_safetensors_file_of_the_same_model_gives_the_same_base_model(own_model_study, tmp_path):
    """The study's weights file (resnet18: the Lightning checkpoint), again as safetensors: the pre-checks pass and the base stage adopts the same model."""
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in own_model_study.user.state_dict().items()}, str(tmp_path / "user.safetensors"))
    config = load_results_study(str(own_model_study.results))
    config = config.model_copy(update={"base": config.base.model_copy(update={"train": False})})
    adopted = {}
    for name, weights in (("study's file", config.model.weights), ("safetensors", str(tmp_path / "user.safetensors"))):
        study = config.model_copy(update={"model": config.model.model_copy(update={"weights": weights})})
        check_study_inputs(study, ["cat", "dog"])
        adopted[name] = parse_classifier_checkpoint(adopted_model_bytes(study, ["cat", "dog"]), name).state_dict
    first, again = adopted.values()
    assert again.keys() == first.keys() and all(torch.equal(again[key], first[key]) for key in first)
    if own_model_study.adopted:  # base.train: false: the study's base model is that adoption
        base = load_classifier_checkpoint(str(own_model_study.results / "base" / "model.pt")).state_dict
        assert all(torch.equal(base[key], again[key]) for key in base)


def _accepted_names() -> list[str]:
    """Every torchvision name architectures.py accepts, vgg_tiny, and the timm members of the contract test."""
    from raycf.models.architectures import family_of

    def accepted(name: str) -> bool:
        try:
            family_of(name)
        except ValueError:
            return False
        return True

    return ["vgg_tiny", *(name for name in torchvision.models.list_models(module=torchvision.models) if accepted(name)), "timm:resnet18", "timm:efficientnet_b0", "timm:convnext_atto"]


@pytest.mark.parametrize("arch", _accepted_names())
def test_every_accepted_name_passes_the_cli_pre_checks(arch):
    """The pre-checks `raycf study` runs before anything is written (the models are built on the meta device: RegNet too)."""
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    check_study_inputs(StudyConfig(name="t", model=ModelConfig(arch=arch)), ["cat", "dog"])


def test_base_train_false_without_weights_exits_2_before_anything_is_written(tmp_path, capsys):
    for weights in ("none", "imagenet"):
        err = _one_line_error(capsys, write_study(tmp_path, model={"arch": "resnet18", "weights": weights}, base={"train": False}))
        assert f"base.train: false adopts model.weights as the base model, but model.weights is {weights}" in err
        assert not (tmp_path / "results").exists()
