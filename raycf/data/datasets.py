"""Datasets: the embedded digits default, Fashion-MNIST, the official CUB-200-2011 folder, and image folders.

:func:`load_splits` returns the train / val / test :class:`SplitImages` of a
study: integer labels, stable image ids, the class names, and how to decode
each image to an RGB uint8 square at the study's stored side.  The validation
split is always carved from the training data by seed; the test split is only
read by final evaluations.  Nothing here transforms images for a model: the
``images`` stage decodes every split once into a uint8 store
(:mod:`raycf.data.image_store`), and training and inference resize, augment and
normalise batches on their own device (:mod:`raycf.data.augment`).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from raycf.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig  # noqa: F401 - IMAGENET_* are read from here too
from raycf.errors import UserError
from raycf.data.preprocess import preprocess_image
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
CUB_REQUIRED_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
SPLITS = ("train", "val", "test")

# Set (tests, audits) to a file path: every image read from a split appends
# "<split> <index>" to it, from whichever process reads it (raycf forwards
# RAYCF_* variables to its Ray workers).  How the "test split read once per
# model" promise is checked.
READ_LOG = "RAYCF_READ_LOG"


def log_read(split: str, index: int) -> None:
    """Append one read to the read log, when :data:`READ_LOG` names one."""
    location = os.environ.get(READ_LOG)
    if location:
        descriptor = os.open(location, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, f"{split} {index}\n".encode())
        finally:
            os.close(descriptor)


def stored_side(config: DataConfig) -> int:
    """The side of the decoded uint8 images: ``data.stored_side``, or by default the input side
    (digits, Fashion-MNIST: small images) or 8/7 of it (256 for 224-pixel inputs, room for zoom and shift)."""
    if config.stored_side:
        return config.stored_side
    if config.kind in ("digits", "fashion_mnist") or config.preprocess.mode != "squash":  # resize_crop stores the crop
        return config.image_size
    return round(config.image_size * 256 / 224)


def decode_to_side(image: object, side: int) -> np.ndarray:
    """An image (PIL, or a 3×H×W float tensor in [0, 1]) as an RGB uint8 side×side×3 array (antialiased resize)."""
    if isinstance(image, torch.Tensor):
        resized = F.interpolate(image[None].float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
        return (resized.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    rgb = image.convert("RGB")
    if rgb.size != (side, side):
        rgb = rgb.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(rgb, dtype=np.uint8)


class SplitImages:
    """The images of one split: integer labels, stable string ids, and their decoding."""

    def __init__(
        self, split: str, ids: Sequence[str], labels: Sequence[int], load: Callable[[int], object], side: int, preprocess: Callable[[object], np.ndarray] | None = None
    ):
        self.split = split
        self.ids = list(ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._load = load
        self.side = side
        self._preprocess = preprocess or (lambda image: decode_to_side(image, side))

    def __len__(self) -> int:
        return len(self.ids)

    def raw(self, index: int) -> object:
        """Image ``index`` as the source gives it: a PIL image, or a 3×H×W float tensor in [0, 1]."""
        return self._load(index)

    def decode(self, index: int) -> np.ndarray:
        """Image ``index`` as RGB uint8, side×side×3, made by ``data.preprocess`` (decoding for the image store, not a model's read)."""
        return self._preprocess(self._load(index))

    def check_readable(self) -> None:
        """Open every image once (a corrupt file raises :class:`UserError`); not a read of the split for a model."""
        for index in range(len(self)):
            self._load(index)


@dataclass
class DataSplits:
    """The three splits and the class names."""

    train: SplitImages
    val: SplitImages
    test: SplitImages
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> SplitImages:
        """One split by name."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)


def load_splits(config: DataConfig, seed: int, verify_images: bool = False) -> DataSplits:
    """Build the train / val / test splits that ``config`` describes.

    ``verify_images`` opens every image file once so that a corrupt file is
    reported before any work starts; the command line does this at its edge.
    """
    if config.kind == "digits":
        return _digits_splits(config, seed)
    root = Path(config.root or "")
    if not root.is_dir():
        raise UserError(f"data.root {root}: folder not found (expected the {config.kind} dataset folder)")
    if config.kind == "fashion_mnist":
        return _fashion_mnist_splits(config, root, seed)
    if config.kind == "cub200":
        splits = _cub_splits(config, root, seed)
    else:
        splits = _imagefolder_splits(config, root, seed)
    if verify_images:
        for name in SPLITS:
            getattr(splits, name).check_readable()
    return splits


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held out) with ``fraction`` of each class held out."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and round(fraction * len(labels)) >= len(counts[counts > 0]) else None
    kept, held = train_test_split(indices, test_size=fraction, stratify=stratify, random_state=seed)
    return np.sort(kept), np.sort(held)


def capped(index: np.ndarray, labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """At most ``cap`` of ``index`` (0: all), a stratified sample by seed, in the original order."""
    from sklearn.model_selection import train_test_split

    if not cap or len(index) <= cap:
        return index
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and cap >= len(counts[counts > 0]) else None
    _, kept = train_test_split(np.arange(len(index)), test_size=cap, stratify=stratify, random_state=seed)
    return index[np.sort(kept)]


def _make_splits(
    config: DataConfig,
    seed: int,
    ids: list[str],
    labels: np.ndarray,
    load: Callable[[int], object],
    train_index: np.ndarray,
    val_index: np.ndarray,
    test_index: np.ndarray,
    class_names: list[str],
) -> DataSplits:
    side = stored_side(config)

    def subset(split: str, index: np.ndarray) -> SplitImages:
        positions = [int(i) for i in capped(index, labels[index], config.max_per_split, seed)]
        return SplitImages(split, [ids[i] for i in positions], labels[positions], lambda k: load(positions[k]), side, lambda image: preprocess_image(image, config, side))

    return DataSplits(train=subset("train", train_index), val=subset("val", val_index), test=subset("test", test_index), class_names=class_names)


# ---------------------------------------------------------------------- digits


def _digits_splits(config: DataConfig, seed: int) -> DataSplits:
    """scikit-learn's 1,797 8×8 digits, upscaled, 3 channels, stratified split by seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    upscaled = F.interpolate(pixels, size=(config.image_size, config.image_size), mode="bilinear", align_corners=False)
    images = upscaled.clamp(0, 1).repeat(1, 3, 1, 1).contiguous()
    labels = bunch.target.astype(np.int64)
    rest, test_index = stratified_holdout(labels, config.test_fraction, seed)
    train_pos, val_pos = stratified_holdout(labels[rest], config.val_fraction, seed)
    ids = [f"digits-{i:04d}" for i in range(len(labels))]
    return _make_splits(
        config, seed, ids, labels, lambda i: images[i], rest[train_pos], rest[val_pos], test_index, [str(d) for d in range(10)]
    )


# ---------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_SOURCE = "from the Debian package dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path, source: str = "") -> np.ndarray:
    """An IDX file (gzip-compressed or not) as a numpy array: the MNIST format of unsigned bytes.

    ``source`` (e.g. the Debian package that ships the file) is named in the errors.
    """
    hint = f"; {source}" if source else ""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError) as error:
        raise UserError(f"{path}: unreadable IDX file ({error.__class__.__name__}; expected a gzip-compressed MNIST-format file{hint})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an IDX file of unsigned bytes (expected the magic 0x0000080N{hint})")
    dimensions = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dimensions)
    if values.size != int(np.prod(shape)):
        raise UserError(f"{path}: truncated IDX file (expected {int(np.prod(shape))} values for shape {shape}, found {values.size}{hint})")
    return values.reshape(shape)


def _fashion_mnist_splits(config: DataConfig, root: Path, seed: int) -> DataSplits:
    """Fashion-MNIST's official 60,000 / 10,000 train / test split (IDX files, as Debian's dataset-fashion-mnist ships them);
    28×28 grey images, upscaled and repeated to 3 channels; val carved from train by seed."""
    arrays = {}
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        for name in (images_file, labels_file):
            if not (root / name).is_file():
                raise UserError(
                    f"data.root {root}: missing {name} (expected Fashion-MNIST's IDX files: {', '.join(sum(FASHION_MNIST_FILES.values(), ()))}; "
                    f"{FASHION_MNIST_SOURCE})"
                )
        images, labels = read_idx(root / images_file, FASHION_MNIST_SOURCE), read_idx(root / labels_file, FASHION_MNIST_SOURCE)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"data.root {root}: {images_file} holds {images.shape}, {labels_file} {labels.shape} (expected N×28×28 images and N labels)")
        arrays[split] = (images, labels.astype(np.int64))
    images = np.concatenate([arrays["train"][0], arrays["test"][0]])
    labels = np.concatenate([arrays["train"][1], arrays["test"][1]])
    official_train = np.arange(len(arrays["train"][1]))
    test_index = np.arange(len(official_train), len(labels))
    train_pos, val_pos = stratified_holdout(labels[official_train], config.val_fraction, seed)

    def load(index: int) -> torch.Tensor:
        return torch.from_numpy(images[index].astype(np.float32) / 255.0)[None].expand(3, -1, -1)

    ids = [f"fashion-{'train' if i < len(official_train) else 'test'}-{i if i < len(official_train) else i - len(official_train):05d}" for i in range(len(labels))]
    return _make_splits(config, seed, ids, labels, load, official_train[train_pos], official_train[val_pos], test_index, FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------- files


def open_image(path: Path, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Open an image file as RGB, optionally cropped to ``(x, y, w, h)``."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{path}: corrupt or unreadable image ({error.__class__.__name__}; expected a JPEG or PNG file)") from None
    if box is not None:
        x, y, w, h = box
        image = image.crop((int(x), int(y), int(x + w), int(y + h)))
    return image


def _read_table(path: Path, columns: int) -> list[list[str]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns:
            raise UserError(f"{path}: line {number}: expected {columns} space-separated fields (got {line!r})")
        rows.append(parts)
    return rows


def _cub_splits(config: DataConfig, root: Path, seed: int) -> DataSplits:
    """The official CUB_200_2011 layout and train/test split; val carved from train."""
    for name in CUB_REQUIRED_FILES:
        if not (root / name).is_file():
            raise UserError(
                f"data.root {root}: missing {name} (expected the official CUB_200_2011 layout: {', '.join(CUB_REQUIRED_FILES)}, images/)"
            )
    paths = {image_id: relative for image_id, relative in _read_table(root / "images.txt", 2)}
    label_of = {image_id: int(label) - 1 for image_id, label in _read_table(root / "image_class_labels.txt", 2)}
    is_train = {image_id: flag.strip() == "1" for image_id, flag in _read_table(root / "train_test_split.txt", 2)}
    classes = sorted((int(number), name) for number, name in _read_table(root / "classes.txt", 2))
    class_names = [name.split(".", 1)[-1] for _, name in classes]
    boxes: dict[str, tuple[float, ...]] = {}
    if config.bbox_crop:
        if not (root / "bounding_boxes.txt").is_file():
            raise UserError(f"data.root {root}: missing bounding_boxes.txt (needed by data.bbox_crop: true)")
        boxes = {row[0]: tuple(float(v) for v in row[1].split()) for row in _read_table(root / "bounding_boxes.txt", 2)}
    image_ids = sorted(paths, key=int)
    for image_id in image_ids:
        if image_id not in label_of or image_id not in is_train:
            raise UserError(f"data.root {root}: image id {image_id} of images.txt has no label or split entry")
        if not 0 <= label_of[image_id] < len(class_names):
            raise UserError(f"data.root {root}: image id {image_id} has class {label_of[image_id] + 1}, not in classes.txt")
    labels = np.array([label_of[i] for i in image_ids], dtype=np.int64)
    files = [root / "images" / paths[i] for i in image_ids]
    for file in files:
        if not file.is_file():
            raise UserError(f"data.root {root}: missing image {file} listed in images.txt")

    def load(index: int) -> Image.Image:
        return open_image(files[index], boxes.get(image_ids[index]) if config.bbox_crop else None)

    official_train = np.array([i for i, image_id in enumerate(image_ids) if is_train[image_id]])
    test_index = np.array([i for i, image_id in enumerate(image_ids) if not is_train[image_id]])
    if len(official_train) == 0 or len(test_index) == 0:
        raise UserError(f"data.root {root}: train_test_split.txt must mark some images 1 (train) and some 0 (test)")
    train_pos, val_pos = stratified_holdout(labels[official_train], config.val_fraction, seed)
    return _make_splits(
        config, seed, [f"cub-{i}" for i in image_ids], labels, load, official_train[train_pos], official_train[val_pos], test_index, class_names
    )


def _list_class_folders(folder: Path) -> dict[str, list[Path]]:
    return {
        entry.name: sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        for entry in sorted(folder.iterdir())
        if entry.is_dir()
    }


def _imagefolder_splits(config: DataConfig, root: Path, seed: int) -> DataSplits:
    """``root/{train,val,test}/<class>/*``; val optional (carved from train by seed)."""
    for name in ("train", "test"):
        if not (root / name).is_dir():
            raise UserError(f"data.root {root}: missing {name}/ (expected train/, test/ and optionally val/ class folders)")
    train_folders = _list_class_folders(root / "train")
    class_names = [name for name, files in train_folders.items() if files]
    if not class_names:
        raise UserError(f"data.root {root}: train/ has no class folders with images ({', '.join(IMAGE_SUFFIXES)})")
    empty = [name for name, files in train_folders.items() if not files]
    if empty:  # refused, not dropped: a class silently missing would shift every class index after it
        raise UserError(f"data.root {root}: train/{empty[0]}/ holds no images ({', '.join(IMAGE_SUFFIXES)}, searched recursively; expected images, or the folder removed)")
    class_index = {name: i for i, name in enumerate(class_names)}
    files: list[Path] = []
    labels: list[int] = []
    split_of: list[str] = []
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        for name, paths in _list_class_folders(root / split).items():
            if paths and name not in class_index:
                raise UserError(f"data.root {root}: {split}/{name}/ is not a class of train/ (expected one of {', '.join(class_names)})")
            for path in paths:
                files.append(path)
                labels.append(class_index[name])
                split_of.append(split)
    label_array = np.array(labels, dtype=np.int64)
    split_array = np.array(split_of)
    ids = [str(path.relative_to(root)) for path in files]

    def load(index: int) -> Image.Image:
        return open_image(files[index])

    train_index = np.flatnonzero(split_array == "train")
    test_index = np.flatnonzero(split_array == "test")
    if len(test_index) == 0:
        raise UserError(f"data.root {root}: test/ has no images")
    val_index = np.flatnonzero(split_array == "val")
    if len(val_index) == 0:
        train_pos, val_pos = stratified_holdout(label_array[train_index], config.val_fraction, seed)
        train_index, val_index = train_index[train_pos], train_index[val_pos]
    return _make_splits(config, seed, ids, label_array, load, train_index, val_index, test_index, class_names)
