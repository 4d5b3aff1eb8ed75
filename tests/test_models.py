"""The classifier contract of METHOD §1 for every architecture family."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from raycf.config import ModelConfig
from raycf.errors import UserError
from raycf.method.debug_loss import paper_indicator
from raycf.models.build import build_model
from raycf.training.loops import cross_entropy_loss, device_batches, train_loader, train_one_epoch

# One small member of every family, built at random initialisation on the CPU.
FAMILY_MEMBERS = [
    "vgg_tiny", "vgg16", "vgg11_bn", "resnet18", "resnext50_32x4d", "densenet121",
    "efficientnet_b0", "efficientnet_v2_s", "mobilenet_v2", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5", "convnext_tiny",
    "timm:resnet18", "timm:efficientnet_b0", "timm:convnext_atto",
]
# Families whose pooling normalises over the channels (ConvNeXt's LayerNorm): there a mask acts on a, after the norm.
NORMALISED_POOL = {"convnext_tiny", "timm:convnext_atto"}
SIGNED = {"efficientnet_b0", "efficientnet_v2_s", "convnext_tiny", "timm:resnet18", "timm:efficientnet_b0", "timm:convnext_atto"}


@pytest.fixture(scope="module")
def built():
    """Each family member, built once for the module (the contract tests only read them)."""
    models = {}

    def get(arch: str):
        if arch not in models:
            torch.manual_seed(0)
            models[arch] = build_model(ModelConfig(arch=arch), num_classes=7).eval()
        return models[arch]

    return get


@pytest.mark.parametrize("arch", FAMILY_MEMBERS)
def test_contract(arch, built):
    model = built(arch)
    k = model.num_filters
    assert k == model.fc.in_features and model.fc.out_features == 7 and model.arch == arch
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        activations = model.features(images)
        logits = model(images)
        assert activations.shape == (2, k) and logits.shape == (2, 7)
        assert model.nonnegative == (arch not in SIGNED)
        if model.nonnegative:
            assert (activations >= 0).all()
        assert torch.allclose(model.head(activations), logits, atol=1e-5)
        assert torch.allclose(model.forward_masked(images, torch.ones(k)), logits, atol=1e-5)
        zero = model.forward_masked(images, torch.zeros(2, k))
        assert torch.allclose(zero, model.fc.bias.expand(2, 7))
        logits_too, activations_too = model.forward_with_features(images)
        assert torch.allclose(logits_too, logits, atol=1e-5) and torch.allclose(activations_too, activations, atol=1e-5)
        # Masking a filter in ``a`` equals zeroing its whole feature map before pooling.
        if arch not in NORMALISED_POOL:
            mask = torch.ones(k)
            mask[:5] = 0
            maps = model.feature_maps(images)
            assert maps.dim() == 4 and maps.shape[1] == k
            maps[:, :5] = 0
            assert torch.allclose(model.head(model.pool_maps(maps)), model.forward_masked(images, mask), atol=1e-5)


@pytest.mark.parametrize("arch", FAMILY_MEMBERS)
def test_trainable_scopes_of_every_family(arch, built):
    model = built(arch)
    parts = list(model.last_conv) if isinstance(model.last_conv, nn.ModuleList) else [model.last_conv]
    assert isinstance(parts[0], (nn.Conv2d, nn.Linear)) and len(parts) <= 2
    assert all(isinstance(part, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) for part in parts[1:])
    assert any(part is module for part in parts for module in model.trunk.modules())
    try:
        head = model.set_trainable("head")
        assert [id(p) for p in head] == [id(p) for p in model.fc.parameters()]
        tail = model.set_trainable("last_conv_and_head")
        expected = {id(p) for part in parts for p in part.parameters()} | {id(p) for p in model.fc.parameters()}
        assert {id(p) for p in tail} == expected and len(tail) == len(expected)
        assert sum(p.requires_grad for p in model.parameters()) == len(expected)
        assert len(model.set_trainable("all")) == len(list(model.parameters()))
    finally:
        model.set_trainable("all")


def test_each_family_retrains_its_own_last_conv(built):
    resnet, densenet, convnext = built("resnext50_32x4d"), built("densenet121"), built("convnext_tiny")
    last_block = resnet.trunk[-1][-1]
    assert list(resnet.last_conv) == [last_block.conv3, last_block.bn3]
    # DenseNet: the last dense layer's conv and norm5, the BatchNorm every pooled filter passes through.
    assert densenet.last_conv[0] is densenet.trunk[0].denseblock4.denselayer16.conv2 and densenet.last_conv[1] is densenet.trunk[0].norm5
    assert isinstance(densenet.trunk[-1], nn.ReLU)  # torchvision's functional ReLU before pooling
    # ConvNeXt: the last block's second pointwise layer and the LayerNorm over the pooled vector.
    assert convnext.last_conv[0] is convnext.trunk[-1][-1].block[5] and convnext.last_conv[1] is convnext.pool[2]


@pytest.mark.parametrize("arch", ["convnext_tiny", "resnet18"])
def test_what_a_signed_a_means_for_the_paper_indicator(arch, built):
    """With a ≥ 0 the paper's indicator only drops exact zeros; with signed a (ConvNeXt) it is a threshold at a = 0."""
    with torch.no_grad():
        activations = built(arch).features(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    indicator = paper_indicator(activations)
    assert torch.equal(indicator > 0, activations > 0)
    assert (indicator[activations > 0] > 0.5).all()
    if arch == "convnext_tiny":  # LayerNorm'd a: a good share of every image's filters sits below zero, so inactive
        assert ((activations < 0).float().mean(1) > 0.25).all()
    if arch == "resnet18":
        assert (activations >= 0).all()


def test_vgg16_trunk_ends_with_the_block5_conv3_relu():
    model = build_model(ModelConfig(arch="vgg16"), num_classes=3)
    assert isinstance(model.trunk[-1], torch.nn.ReLU) and model.trunk[-2] is model.last_conv
    assert model.last_conv.in_channels == 512 and model.last_conv.out_channels == 512
    assert isinstance(model.pool[0], torch.nn.MaxPool2d)


@pytest.mark.parametrize(("scope", "expected"), [("head", 2), ("last_conv_and_head", 5), ("all", None)])
def test_trainable_scopes_of_vgg_tiny(scope, expected):
    model = build_model(ModelConfig(arch="vgg_tiny"), num_classes=4)
    trainable = model.set_trainable(scope)
    assert len(trainable) == (expected if expected is not None else len(list(model.parameters())))
    assert all(p.requires_grad for p in trainable)
    assert sum(p.requires_grad for p in model.parameters()) == len(trainable)


def test_dropout_only_in_training():
    model = build_model(ModelConfig(arch="vgg_tiny", dropout=0.9), num_classes=3)
    images = torch.randn(4, 3, 16, 16)
    model.eval()
    assert torch.equal(model(images), model(images))
    model.train()
    activations = torch.ones(4, 64)
    assert not torch.equal(model.head(activations), model.head(activations))


def test_imagenet_weights_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="imagenet weights for resnet18 not found at .*resnet18-f37072fd.pth"):
        build_model(ModelConfig(arch="resnet18", weights="imagenet"), num_classes=3)
    with pytest.raises(UserError, match="vgg_tiny is raycf's own network: no imagenet weights"):
        build_model(ModelConfig(arch="vgg_tiny", weights="imagenet"), num_classes=3)


def test_imagenet_weights_load_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchvision.models import resnet18

    reference = resnet18(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    model = build_model(ModelConfig(arch="resnet18", weights="imagenet"), num_classes=3)
    assert torch.equal(model.trunk[0].weight, reference.conv1.weight)


def test_imagenet_weights_of_any_torchvision_arch_come_from_its_registry(tmp_path, monkeypatch):
    """The file name is torchvision's (get_model_weights(arch).DEFAULT); another cached ImageNet set of the arch serves too."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchvision.models import get_model, get_model_weights

    from raycf.models.build import imagenet_weights_file

    cache = tmp_path / "hub" / "checkpoints"
    assert imagenet_weights_file("mobilenet_v2") == cache / Path(get_model_weights("mobilenet_v2").DEFAULT.url).name
    reference = get_model("shufflenet_v2_x0_5", weights=None)
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / Path(get_model_weights("shufflenet_v2_x0_5").DEFAULT.url).name)
    model = build_model(ModelConfig(arch="shufflenet_v2_x0_5", weights="imagenet"), num_classes=3)
    assert torch.equal(model.trunk[0][0].weight, reference.conv1[0].weight) and model.fc.out_features == 3
    # resnet50's DEFAULT is IMAGENET1K_V2; with only V1 cached (what raycf used before), V1 is loaded.
    v1 = cache / Path(get_model_weights("resnet50").IMAGENET1K_V1.url).name
    assert imagenet_weights_file("resnet50") != v1
    torch.save(get_model("resnet50", weights=None).state_dict(), v1)
    assert imagenet_weights_file("resnet50") == v1


def test_timm_pretrained_weights_come_from_timm_cache_only(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    import huggingface_hub.constants
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"imagenet weights for timm:resnet18 not in timm's cache \(looked for timm/resnet18.a1_in1k in .*hf.*raycf never downloads"):
        build_model(ModelConfig(arch="timm:resnet18", weights="imagenet"), num_classes=3)
    reference = timm.create_model("resnet18")
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, str(repo / "snapshots" / "abc" / "model.safetensors"))
    model = build_model(ModelConfig(arch="timm:resnet18", weights="imagenet"), num_classes=3)
    assert torch.equal(model.trunk.net.conv1.weight, reference.conv1.weight) and model.fc.out_features == 3


# The smallest member of every builder (torchvision's builder functions, RegNet's X and Y apart, and timm's).
SMALLEST_OF_EACH_BUILDER = [
    "vgg_tiny", "vgg11", "vgg11_bn", "resnet18", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "mobilenet_v2",
    "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5", "convnext_tiny", "timm:resnet18",
]


@pytest.mark.parametrize("arch", SMALLEST_OF_EACH_BUILDER)
def test_one_training_step_of_every_builder_on_a_count_of_one_mod_the_batch_size(arch, built):
    """Three tiny images at batch size 2: the loader merges the last image into the first batch (BatchNorm fails on a batch of one)."""
    model = copy.deepcopy(built(arch))
    model.set_trainable("all")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    dataset = TensorDataset(images, torch.tensor([0, 1, 2]), torch.arange(3))
    loader, sampler = train_loader(dataset, 2, seed=0, rank=0, world_size=1)
    sampler.set_epoch(0)
    before = [p.detach().clone() for p in model.fc.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = train_one_epoch(model, device_batches(loader, torch.device("cpu"), lambda data, _indices: data), optimizer, cross_entropy_loss)
    assert np.isfinite(metrics["train_loss"]) and 0 <= metrics["train_acc"] <= 1
    assert any(not torch.equal(old, new) for old, new in zip(before, model.fc.parameters()))


@pytest.mark.parametrize(("count", "batch_size", "world_size"), [(3, 2, 1), (17, 16, 1), (497, 16, 1), (16, 16, 1), (33, 16, 2), (35, 16, 2), (1, 16, 1), (5, 1, 1)])
def test_the_training_loader_never_forms_a_batch_of_one(count, batch_size, world_size):
    dataset = TensorDataset(torch.zeros(count, 1), torch.zeros(count, dtype=torch.long), torch.arange(count))
    for rank in range(world_size):
        loader, sampler = train_loader(dataset, batch_size, seed=0, rank=rank, world_size=world_size)
        sampler.set_epoch(1)
        sizes = [len(labels) for _data, labels, _indices in loader]
        shard = len(sampler)
        assert sum(sizes) == shard and len(sizes) == len(loader)  # merged, not dropped: every image of the shard, once
        per_rank = max(1, batch_size // world_size)
        assert all(size > 1 for size in sizes) or shard == 1 or per_rank == 1
        assert max(sizes) <= per_rank + 1


@pytest.mark.parametrize("arch", [arch for arch in FAMILY_MEMBERS if not arch.startswith("vgg")])
def test_the_exported_state_dict_loads_in_its_library_with_raycfs_logits(arch, built):
    """What `raycf export` writes for a torchvision or timm arch: the library's own module, built fresh, loads it (strict) and gives raycf's logits."""
    import io

    from raycf.models.checkpoint import checkpoint_of
    from raycf.models.build import native_from_checkpoint

    model = built(arch)
    classes = [f"c{i}" for i in range(7)]
    head_order = classes[3:] + classes[:3]  # the user's head order, not the sorted one
    state = native_from_checkpoint(ModelConfig(arch=arch), checkpoint_of(model, classes, 32, "h"), head_order).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    if arch.startswith("timm:"):
        fresh = pytest.importorskip("timm").create_model(arch.removeprefix("timm:"), num_classes=7)
    else:
        import torchvision

        fresh = torchvision.models.get_model(arch, num_classes=7)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), model(images)[:, [classes.index(name) for name in head_order]], rtol=0, atol=1e-5)
