"""Dataset readers on the embedded digits and on tiny folders written by the fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycf.config import DataConfig
from raycf.data import load_splits
from raycf.errors import UserError


def test_digits_split_is_stratified_deterministic_and_disjoint():
    config = DataConfig(kind="digits", image_size=16, test_fraction=0.5, val_fraction=0.2)
    splits = load_splits(config, seed=3)
    again = load_splits(config, seed=3)
    other = load_splits(config, seed=4)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sizes) == 1797 and sizes[2] == 899
    assert splits.train.ids == again.train.ids and splits.train.ids != other.train.ids
    assert not set(splits.train.ids) & set(splits.val.ids) and not set(splits.val.ids) & set(splits.test.ids)
    # every class appears in every split in proportion (stratified)
    for dataset in (splits.train, splits.val, splits.test):
        counts = np.bincount(dataset.labels, minlength=10)
        assert counts.min() >= 0.08 * len(dataset)
    image, label = splits.split("val")[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and 0 <= label < 10
    assert splits.class_names == [str(d) for d in range(10)]


def test_augmented_and_plain_views_differ_only_for_augmentation():
    splits = load_splits(DataConfig(kind="digits", image_size=16), seed=0)
    plain_a, _ = splits.split("train", augment=False)[0]
    plain_b, _ = splits.split("train", augment=False)[0]
    torch.manual_seed(1)
    augmented, _ = splits.split("train", augment=True)[0]
    assert torch.equal(plain_a, plain_b)
    assert not torch.equal(plain_a, augmented)


def test_cub_reader_uses_the_official_split_and_carves_validation(cub_root):
    splits = load_splits(DataConfig(kind="cub200", root=str(cub_root), image_size=24, val_fraction=0.25), seed=0)
    assert splits.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert len(splits.test) == 6 and len(splits.train) + len(splits.val) == 12 and len(splits.val) == 3
    assert sorted(np.bincount(splits.test.labels).tolist()) == [2, 2, 2]
    image, label = splits.split("test")[0]
    assert image.shape == (3, 24, 24) and label == 0


def test_cub_bounding_box_crop(cub_root):
    cropped = load_splits(DataConfig(kind="cub200", root=str(cub_root), bbox_crop=True), seed=0)
    assert cropped.test.raw(0).size == (10, 8)  # (w, h) of the box


def test_cub_missing_file_is_named(cub_root):
    (cub_root / "train_test_split.txt").unlink()
    with pytest.raises(UserError, match="missing train_test_split.txt"):
        load_splits(DataConfig(kind="cub200", root=str(cub_root)), seed=0)


def test_imagefolder_without_val_carves_it(imagefolder_root):
    splits = load_splits(DataConfig(kind="imagefolder", root=str(imagefolder_root), image_size=16, val_fraction=0.2), seed=0)
    assert splits.class_names == ["cat", "dog"]
    assert len(splits.train) == 8 and len(splits.val) == 2 and len(splits.test) == 4
    assert splits.test.ids[0] == "test/cat/0.jpg"


def test_imagefolder_with_val_uses_it(imagefolder_root):
    (imagefolder_root / "val" / "dog").mkdir(parents=True)
    (imagefolder_root / "test" / "dog" / "0.jpg").rename(imagefolder_root / "val" / "dog" / "0.jpg")
    splits = load_splits(DataConfig(kind="imagefolder", root=str(imagefolder_root)), seed=0)
    assert len(splits.train) == 10 and splits.val.ids == ["val/dog/0.jpg"]


def test_missing_root_and_unknown_class(tmp_path, imagefolder_root):
    with pytest.raises(UserError, match="folder not found"):
        load_splits(DataConfig(kind="imagefolder", root=str(tmp_path / "none")), seed=0)
    (imagefolder_root / "test" / "bird").mkdir()
    (imagefolder_root / "test" / "dog" / "0.jpg").rename(imagefolder_root / "test" / "bird" / "0.jpg")
    with pytest.raises(UserError, match="test/bird/ is not a class of train/"):
        load_splits(DataConfig(kind="imagefolder", root=str(imagefolder_root)), seed=0)


def test_corrupt_image_is_named(imagefolder_root):
    bad = imagefolder_root / "train" / "cat" / "3.png"
    bad.write_bytes(b"not an image at all")
    splits = load_splits(DataConfig(kind="imagefolder", root=str(imagefolder_root)), seed=0)
    with pytest.raises(UserError, match=r"3\.png: corrupt or unreadable image"):
        for index in range(len(splits.train)):
            splits.train.raw(index)
    with pytest.raises(UserError, match=r"3\.png: corrupt or unreadable image"):
        load_splits(DataConfig(kind="imagefolder", root=str(imagefolder_root)), seed=0, verify_images=True)
