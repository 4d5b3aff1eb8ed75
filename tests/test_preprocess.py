"""data.preprocess: raycf's evaluation inputs are the ones the model's own library makes (torchvision's and timm's eval transforms)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import write_image_store
from raycf.config import ModelConfig, study_from_mapping
from raycf.errors import UserError
from raycf.data.image_store import ImageStore
from raycf.models.build import build_model
from raycf.data.views import model_inputs


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Non-square photos of several sizes (landscape and portrait), so resize-then-crop differs from a squash."""
    root = tmp_path_factory.mktemp("photos")
    generator = np.random.default_rng(0)
    sizes = [(300, 260), (250, 330), (240, 240), (410, 290)]
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            for k, (width, height) in enumerate(sizes):
                pixels = generator.integers(0, 256, (height // 10, width // 10, 3), dtype=np.uint8)
                image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC)  # smooth, like a photo
                path = root / split / label / f"{k}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path, quality=95)
    return root


def _study(root, arch: str, preprocess: dict, image_size: int = 224):
    return study_from_mapping(
        {"name": "p", "model": {"arch": arch}, "data": {"kind": "imagefolder", "root": str(root), "image_size": image_size, "preprocess": preprocess}}
    )


def _raycf_test_inputs(study, tmp_path) -> tuple[torch.Tensor, list[str]]:
    """The test split's evaluation inputs as raycf makes them: the images stage's store, then the device transform."""
    write_image_store(study, tmp_path / "store")
    store = ImageStore(tmp_path / "store")
    images = torch.from_numpy(np.array(store.images("test"))).permute(0, 3, 1, 2)
    return model_inputs(images, study.data.image_size, preprocess=study.data.preprocess), store.ids("test")


def test_weights_preprocessing_is_torchvisions_eval_transform_and_gives_its_predictions(photo_folder, tmp_path):
    study = _study(photo_folder, "resnet18", {"mode": "weights"})
    assert (study.data.preprocess.resize, study.data.preprocess.interpolation) == (256, "bilinear")
    inputs, ids = _raycf_test_inputs(study, tmp_path)
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    expected = torch.stack([transform(Image.open(photo_folder / image_id)) for image_id in ids])
    assert inputs.shape == expected.shape == (8, 3, 224, 224)
    torch.testing.assert_close(inputs, expected, rtol=0, atol=1e-5)
    torch.manual_seed(0)
    user = torchvision.models.resnet18(num_classes=2).eval()
    torch.save(user.state_dict(), tmp_path / "user.pt")
    model = build_model(ModelConfig(arch="resnet18", weights=str(tmp_path / "user.pt")), 2).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), user(expected), rtol=0, atol=1e-4)
        assert torch.equal(model(inputs).argmax(1), user(expected).argmax(1))


def test_resize_crop_with_the_users_settings_is_torchvisions_transform(photo_folder, tmp_path):
    settings = {"mode": "resize_crop", "resize": 40, "interpolation": "bicubic", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    study = _study(photo_folder, "resnet18", settings, image_size=32)
    inputs, ids = _raycf_test_inputs(study, tmp_path)
    T = torchvision.transforms
    transform = T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(), T.Normalize(settings["mean"], settings["std"])])
    expected = torch.stack([transform(Image.open(photo_folder / image_id).convert("RGB")) for image_id in ids])
    torch.testing.assert_close(inputs, expected, rtol=0, atol=1e-5)


def test_weights_preprocessing_of_a_timm_model_is_timms_eval_transform(photo_folder, tmp_path):
    timm = pytest.importorskip("timm")
    study = _study(photo_folder, "timm:resnet18", {"mode": "weights"})
    assert (study.data.preprocess.resize, study.data.preprocess.interpolation) == (235, "bicubic")  # crop_pct 0.95
    inputs, ids = _raycf_test_inputs(study, tmp_path)
    config = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg("resnet18").to_dict())
    transform = timm.data.create_transform(**config)
    expected = torch.stack([transform(Image.open(photo_folder / image_id).convert("RGB")) for image_id in ids])
    torch.testing.assert_close(inputs, expected, rtol=0, atol=1e-5)


def test_preprocessing_settings_are_inputs_of_the_images_stage(photo_folder):
    squash, crop = _study(photo_folder, "resnet18", {}), _study(photo_folder, "resnet18", {"mode": "resize_crop"})
    assert squash.section_hash("data") != crop.section_hash("data")
    assert crop.data.preprocess.resize == 256
    bicubic = _study(photo_folder, "resnet18", {"mode": "resize_crop", "interpolation": "bicubic"})
    assert bicubic.section_hash("data") != crop.section_hash("data")
    weights = _study(photo_folder, "resnet18", {"mode": "weights"})
    assert study_from_mapping(weights.model_dump(mode="json")).section_hash("data") == weights.section_hash("data")  # a results folder's config.yaml reads back


@pytest.mark.parametrize(
    ("arch", "preprocess", "message"),
    [
        ("vgg_tiny", {"mode": "weights"}, "data.preprocess.mode: weights: vgg_tiny is raycf's own network"),
        ("resnet18", {"mode": "weights", "mean": [0.5, 0.5, 0.5]}, "data.preprocess.mean: with mode: weights it is (0.485, 0.456, 0.406) from resnet18's weights"),
        ("resnet18", {"mode": "resize_crop", "resize": 100}, "data.preprocess.resize must be at least data.image_size (224; got 100)"),
        ("resnet18", {"std": [0.2, 0, 0.2]}, "data.preprocess.std must be positive"),
    ],
)
def test_bad_preprocessing_is_one_line(photo_folder, arch, preprocess, message):
    with pytest.raises(UserError, match=re.escape(message)):
        _study(photo_folder, arch, preprocess)
