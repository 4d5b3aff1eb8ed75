"""Dataset readers on the embedded digits and on tiny folders written by the fixtures."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from raycf.config import DataConfig
from raycf.data.datasets import load_splits, read_idx, stored_side
from raycf.errors import UserError

from conftest import _image


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
    image = splits.split("val").decode(0)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and image.max() > 200  # white ink on black
    assert np.array_equal(image[..., 0], image[..., 2])  # grey, repeated to three channels
    assert splits.class_names == [str(d) for d in range(10)]


def test_stored_side_leaves_room_for_augmentation_on_large_inputs(tmp_path):
    assert stored_side(DataConfig(kind="digits", image_size=32)) == 32
    assert stored_side(DataConfig(kind="cub200", root=str(tmp_path), image_size=224)) == 256
    assert stored_side(DataConfig(kind="cub200", root=str(tmp_path), image_size=224, stored_side=300)) == 300
    with pytest.raises(ValueError, match="stored_side must be at least data.image_size"):
        DataConfig(kind="cub200", root=str(tmp_path), image_size=224, stored_side=200)


def test_cub_reader_uses_the_official_split_and_carves_validation(cub_root):
    splits = load_splits(DataConfig(kind="cub200", root=str(cub_root), image_size=24, val_fraction=0.25), seed=0)
    assert splits.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert len(splits.test) == 6 and len(splits.train) + len(splits.val) == 12 and len(splits.val) == 3
    assert sorted(np.bincount(splits.test.labels).tolist()) == [2, 2, 2]
    assert splits.split("test").decode(0).shape == (27, 27, 3) and splits.test.labels[0] == 0  # stored at 8/7 of 24


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


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(folder: Path, train: int, test: int) -> None:
    """A Fashion-MNIST folder of random images, labels cycling through the 10 classes."""
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(count, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)


def test_fashion_mnist_reads_idx_files_with_the_official_split(tmp_path):
    _write_fashion_mnist(tmp_path, train=40, test=10)
    assert read_idx(tmp_path / "t10k-images-idx3-ubyte.gz").shape == (10, 28, 28)
    splits = load_splits(DataConfig(kind="fashion_mnist", root=str(tmp_path), val_fraction=0.25), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    assert splits.class_names[0] == "T-shirt/top" and splits.test.ids[0] == "fashion-test-00000"
    assert splits.test.decode(0).shape == (32, 32, 3)  # 28 px upscaled to the default 32
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x09\x01"))
    with pytest.raises(UserError, match="not an IDX file of unsigned bytes"):
        load_splits(DataConfig(kind="fashion_mnist", root=str(tmp_path)), seed=0)


def test_fashion_mnist_missing_or_truncated_files_name_the_file_and_the_package(tmp_path):
    _write_fashion_mnist(tmp_path, train=40, test=10)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    whole = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(whole[:-100]))
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.gz: truncated IDX file \(expected 31360 values .* found 31260; from the Debian package dataset-fashion-mnist\)"):
        load_splits(DataConfig(kind="fashion_mnist", root=str(tmp_path)), seed=0)
    images.write_bytes(gzip.compress(whole)[:200])  # a gzip stream cut short
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: unreadable IDX file .*dataset-fashion-mnist"):
        load_splits(DataConfig(kind="fashion_mnist", root=str(tmp_path)), seed=0)
    images.unlink()
    with pytest.raises(UserError, match="missing train-images-idx3-ubyte.gz .*dataset-fashion-mnist"):
        load_splits(DataConfig(kind="fashion_mnist", root=str(tmp_path)), seed=0)


def test_max_per_split_keeps_a_stratified_sample_by_seed(tmp_path):
    _write_fashion_mnist(tmp_path, train=400, test=100)
    config = DataConfig(kind="fashion_mnist", root=str(tmp_path), val_fraction=0.25, max_per_split=50)
    splits = load_splits(config, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 50, 50)
    assert np.bincount(splits.train.labels).tolist() == [5] * 10  # stratified
    assert splits.test.ids == sorted(splits.test.ids)  # the split's order is kept
    full = load_splits(config.model_copy(update={"max_per_split": 0}), seed=0)
    assert set(splits.train.ids) <= set(full.train.ids) and len(full.train) == 300
    assert load_splits(config, seed=0).train.ids == splits.train.ids
    assert load_splits(config, seed=1).train.ids != splits.train.ids
    small = load_splits(config.model_copy(update={"max_per_split": 1000}), seed=0)
    assert len(small.train) == 300  # a cap above the split's size keeps it whole


def test_the_real_fashion_mnist_package():
    from conftest import require_system

    require_system("fashion-mnist")
    splits = load_splits(DataConfig(kind="fashion_mnist"), seed=0)
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (60000, 10000)
    assert np.bincount(splits.test.labels).tolist() == [1000] * 10
    assert (np.bincount(splits.train.labels) + np.bincount(splits.val.labels)).tolist() == [6000] * 10
    assert splits.train.decode(0).shape == (32, 32, 3)


def test_an_empty_class_folder_is_refused_not_dropped(imagefolder_root):
    (imagefolder_root / "train" / "bird" / "nested").mkdir(parents=True)  # folders, no images
    with pytest.raises(UserError, match=r"train/bird/ holds no images .*searched recursively"):
        load_splits(DataConfig(kind="imagefolder", root=str(imagefolder_root)), seed=0)
    _image(imagefolder_root / "train" / "bird" / "nested" / "0.png", (5, 5, 5))  # found in a subfolder
    assert load_splits(DataConfig(kind="imagefolder", root=str(imagefolder_root)), seed=0).class_names == ["bird", "cat", "dog"]
