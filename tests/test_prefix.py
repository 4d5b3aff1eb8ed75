"""The frozen-prefix cache (raycf.data.prefix_cache, stage prefix): what it holds, that training on it is training the network,
its size and its budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_image_store
from raycf.models.checkpoint import ClassifierCheckpoint, complete, parse_classifier_checkpoint
from raycf.config import study_from_mapping, with_values
from raycf.errors import UserError
from raycf.data.image_store import open_store
from raycf.models.prefix import FrozenPrefix
from raycf.models.build import build_model
from raycf.data.prefix_cache import PrefixCache, PrefixRef, cache_bytes, cached_shapes, check_budget, uses_cache
from raycf.stages.prefix import write_cache_here
from raycf.training import debug
from raycf.data.views import model_inputs, view_seeds

VIEWS = 3


def _setup(folder, arch: str):
    """A tiny digits study (3 views per image) on ``arch``, its image store and a random base model."""
    study = study_from_mapping(
        {
            "name": "p",
            "data": {"kind": "digits", "image_size": 16, "test_fraction": 0.8, "val_fraction": 0.2},
            "model": {"arch": arch, "dropout": 0.3},
            "debug": {"epochs": 1, "batch_size": 32, "lr": 0.05, "views": VIEWS, "trainable": "last_conv_and_head"},
        }
    )
    images = write_image_store(study, folder / "images")
    torch.manual_seed(0)
    model = build_model(study.model, 10)
    width = model.fc.in_features
    (folder / "model.pt").write_bytes(ClassifierCheckpoint(arch, width, 10, [str(d) for d in range(10)], 16, "x", model.state_dict()).to_bytes())
    global_filters = np.random.default_rng(1).random((10, width)) < 0.3
    return study, images, folder, global_filters


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """vgg_tiny: one cached tensor per image."""
    return _setup(tmp_path_factory.mktemp("prefix"), "vgg_tiny")


@pytest.fixture(scope="module")
def resnet_setup(tmp_path_factory):
    """resnet18: two cached tensors per image (the last block's input and its last conv's input)."""
    return _setup(tmp_path_factory.mktemp("prefix-resnet"), "resnet18")


def build_cache(setup, dtype: str) -> PrefixRef:
    study, images, folder, _ = setup
    output = folder / f"prefix-{dtype}"
    if not output.exists():
        write_cache_here(with_values(study, {"prefix.dtype": dtype}), str(folder / "model.pt"), images, str(output))
    return PrefixRef(str(output), f"test-{dtype}")


def retrain(setup, prefix: PrefixRef | None, name: str, lambdas=(0.3, 0.05)) -> dict[str, torch.Tensor]:
    study, images, folder, global_filters = setup
    job = debug.DebugJob(
        study=study, global_filters=global_filters, base_model=(folder / "model.pt").read_bytes(), lambda1=lambdas[0], lambda2=lambdas[1], images=images, prefix=prefix
    )
    result = debug.run_debug_training(job, name=name, storage_path=str(folder / "runs"), workers=0)
    return parse_classifier_checkpoint(result.best_model_bytes).state_dict, result.history


def test_the_cache_holds_the_frozen_layers_output_for_every_view(setup):
    study, images, folder, _ = setup
    cache = PrefixCache(build_cache(setup, "float32").location)
    store = open_store(images)
    assert cache.array("train", 0).shape == (len(store.labels("train")), VIEWS, 64, 4, 4)
    assert cache.array("val", 0).shape == (len(store.labels("val")), 64, 4, 4)
    model = build_model(study.model, 10, load_weights=False)
    model.load_state_dict(parse_classifier_checkpoint((folder / "model.pt").read_bytes()).state_dict)
    prefix = FrozenPrefix(model.eval(), "last_conv_and_head")
    indices = torch.tensor([0, 5, 5])
    views = torch.tensor([0, 1, 2])
    pixels = torch.from_numpy(np.array(store.images("train")[indices.numpy()])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = prefix(model_inputs(pixels, 16, study.data.augment, view_seeds(study.seed, "train", indices, views), plain=views == 0))[0]
    assert torch.allclose(cache.batch("train", indices, views, torch.device("cpu"))[0], expected, atol=1e-5)
    assert not torch.allclose(expected[1], expected[2])  # views of one image differ


def test_one_epoch_on_the_cache_is_one_epoch_through_the_whole_network(setup):
    on_cache, history_cached = retrain(setup, build_cache(setup, "float32"), "cached")
    whole, history_full = retrain(setup, None, "full")
    assert history_cached[0]["train_loss"] == pytest.approx(history_full[0]["train_loss"], rel=1e-5)
    assert history_cached[0]["val_acc"] == history_full[0]["val_acc"]
    for name, value in whole.items():
        assert torch.allclose(on_cache[name].float(), value.float(), atol=1e-5), name
    assert not torch.equal(whole["fc.weight"], parse_classifier_checkpoint((setup[2] / "model.pt").read_bytes()).state_dict["fc.weight"])  # it trained


def test_resnets_two_tensor_cache_trains_as_the_whole_network(resnet_setup):
    cache = build_cache(resnet_setup, "float32")
    assert PrefixCache(cache.location).tensors == 2
    on_cache, history_cached = retrain(resnet_setup, cache, "cached")
    whole, history_full = retrain(resnet_setup, None, "full")
    assert history_cached[0]["train_loss"] == pytest.approx(history_full[0]["train_loss"], rel=1e-5)
    assert history_cached[0]["val_acc"] == history_full[0]["val_acc"]
    for name, value in whole.items():
        assert torch.allclose(on_cache[name].float(), value.float(), atol=1e-5), name
    base = parse_classifier_checkpoint((resnet_setup[2] / "model.pt").read_bytes()).state_dict
    assert not torch.equal(whole["fc.weight"], base["fc.weight"]) and not torch.equal(whole["last_conv.0.weight"], base["last_conv.0.weight"])


def _in_a_tune_trial(config, job) -> None:
    from raycf.stages.jobs import train_in_trial

    train_in_trial(job, None)  # one worker: the loop runs inside the trial, as a search trial's does


def test_a_tune_trial_on_the_cache_trains_as_the_whole_network_in_this_process(setup, ray_session):
    import sys

    import ray.cloudpickle
    import ray.tune as tune

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trial's worker cannot import this test module

    from raycf.method.selection import SCORE_KEY

    study, images, folder, global_filters = setup
    job = debug.DebugJob(
        study=study, global_filters=global_filters, base_model=(folder / "model.pt").read_bytes(), lambda1=0.3, lambda2=0.05, images=images, prefix=build_cache(setup, "float32")
    )
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_in_a_tune_trial, job=job), {"cpu": 1}),
        run_config=tune.RunConfig(name="tune-cached", storage_path=str(folder / "tune"), verbose=0),
    )
    (result,) = list(tuner.fit())
    assert result.error is None
    with result.get_best_checkpoint(SCORE_KEY, "max").as_directory() as checkpoint:
        saved = parse_classifier_checkpoint(open(f"{checkpoint}/model.pt", "rb").read())
    in_trial = complete(saved, job.base_model).state_dict  # a trial keeps only the layers it trains
    whole, history_full = retrain(setup, None, "full-for-tune")
    assert result.metrics_dataframe["train_loss"].iloc[0] == pytest.approx(history_full[0]["train_loss"], rel=1e-4)
    for name, value in whole.items():
        assert torch.allclose(in_trial[name].float(), value.float(), atol=1e-4), name


def test_a_float16_cache_stays_within_its_stated_tolerance(setup):
    """The stated tolerance of prefix.dtype float16: after an epoch, the same losses to 1e-3 and the retrained
    model's validation logits within 1e-2 of training on float32 (both absolute), and the same predictions."""
    study, images, _, _ = setup
    on_half, history_half = retrain(setup, build_cache(setup, "float16"), "half")
    on_single, history_single = retrain(setup, build_cache(setup, "float32"), "single")
    for key in ("train_loss", "val_loss"):
        assert history_half[0][key] == pytest.approx(history_single[0][key], rel=0, abs=1e-3)
    store = open_store(images)
    inputs = model_inputs(torch.from_numpy(np.array(store.images("val"))).permute(0, 3, 1, 2), 16)
    logits = []
    for state in (on_half, on_single):
        model = build_model(study.model, 10, load_weights=False)
        model.load_state_dict(state)
        with torch.no_grad():
            logits.append(model.eval()(inputs))
    assert float((logits[0] - logits[1]).abs().max()) < 1e-2
    assert torch.equal(logits[0].argmax(1), logits[1].argmax(1))


def test_cache_size_and_the_budget_refusal():
    vgg16 = study_from_mapping({"name": "c", "data": {"kind": "cub200", "root": "/tmp", "image_size": 224}, "model": {"arch": "vgg16"}})
    assert cached_shapes(vgg16, 200) == [(512, 14, 14)]  # the input of block5_conv3
    assert cache_bytes(vgg16, 200, 5394, 600) == (5394 * 4 + 600) * 512 * 14 * 14 * 2
    small = with_values(vgg16, {"prefix.max_gb": 1.0})
    with pytest.raises(UserError, match=r"prefix.max_gb=1: the frozen-prefix cache would take 4.45 GB \(\(5394 training images × 4 views \+ 600 validation images\) × \(512×14×14\) values × 2 bytes\)"):
        check_budget(small, 200, 5394, 600)
    check_budget(with_values(small, {"debug.trainable": "all"}), 200, 5394, 600)  # no cache, nothing to refuse
    resnet = with_values(vgg16, {"model.arch": "resnet50"})
    assert cached_shapes(resnet, 200) == [(2048, 7, 7), (512, 7, 7)]  # the last block's input and its last conv's input
    assert not uses_cache(with_values(vgg16, {"debug.trainable": "all"})) and uses_cache(vgg16)


def test_a_study_over_its_budget_is_refused_before_anything_runs(tmp_path, capsys):
    from raycf.cli import main

    code = main(["study", "studies/digits.yaml", "--set", f"storage_path={tmp_path}", "prefix.max_gb=0.001"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("raycf: error: prefix.max_gb=0.001: the frozen-prefix cache would take 13.6 MB ((345 training images × 4 views + 283")
    assert not (tmp_path / "digits").exists()


PREFIX_MEMBERS = [
    "vgg_tiny", "vgg11_bn", "resnet18", "resnext50_32x4d", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "mobilenet_v2",
    "regnet_y_400mf", "shufflenet_v2_x0_5", "convnext_tiny", "timm:resnet18", "timm:efficientnet_b0", "timm:convnext_atto",
]


@pytest.mark.parametrize("arch", PREFIX_MEMBERS)
def test_prefix_then_tail_is_the_whole_network_for_every_family(arch):
    """FrozenPrefix → TrainableTail equals the full forward: in evaluation, and in retraining's mode (frozen norms in eval)."""
    from raycf.config import ModelConfig
    from raycf.models.prefix import TrainableTail
    from raycf.training.loops import set_train_mode

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, dropout=0.0), 5)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for scope in ("last_conv_and_head", "head"):
            model.set_trainable(scope)
            prefix, tail = FrozenPrefix(model.eval(), scope), TrainableTail(model, scope)
            cached = prefix(images)
            logits, activations = tail(*cached)
            assert torch.allclose(logits, model(images), atol=1e-4) and torch.allclose(activations, model.features(images), atol=1e-4)
            set_train_mode(tail, freeze_frozen_norms=True)  # trainable BatchNorm layers use the batch's statistics, in both paths
            logits, activations = tail(*cached)
            assert torch.allclose(logits, model(images), atol=1e-4), scope
            assert torch.allclose(activations, model.features(images), atol=1e-4), scope


def test_the_cached_shapes_of_other_families():
    study = study_from_mapping({"name": "c", "data": {"kind": "cub200", "root": "/tmp", "image_size": 224}, "model": {"arch": "densenet121"}})
    assert cached_shapes(study, 200) == [(512, 7, 7)]  # the input of denseblock4 (the last dense layer's conv2 and norm5 are retrained)
    assert cached_shapes(with_values(study, {"model.arch": "efficientnet_b0"}), 200) == [(320, 7, 7)]  # the input of the 1×1 conv to 1280
    assert cached_shapes(with_values(study, {"model.arch": "convnext_tiny"}), 200) == [(768, 7, 7)]  # the input of the last block
    assert cached_shapes(with_values(study, {"model.arch": "timm:resnet18"}), 200) == [(512, 7, 7)]  # timm: the input of layer4's last block
    assert cached_shapes(with_values(study, {"model.arch": "timm:resnet18", "debug.trainable": "head"}), 200) == [(512,)]
