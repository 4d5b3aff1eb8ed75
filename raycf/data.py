"""Datasets: the embedded digits default, the official CUB-200-2011 folder, and image folders.

:func:`load_splits` returns train / val / test :class:`ImageDataset` objects
with integer labels, stable image ids and the class names.  The validation
split is always carved from the training data by seed; the test split is only
read by final evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from raycf.config import AugmentConfig, DataConfig
from raycf.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
CUB_REQUIRED_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
SPLITS = ("train", "val", "test")


class ImageDataset(Dataset):
    """Images with integer labels and stable string ids.

    ``load(i)`` returns the raw image (a PIL image or a 3×H×W float tensor in
    [0, 1]); ``transform`` turns it into the model's input.  Items are
    ``(image_tensor, label)``.
    """

    def __init__(
        self,
        ids: Sequence[str],
        labels: Sequence[int],
        load: Callable[[int], object],
        transform: Callable[[object], torch.Tensor],
    ):
        self.ids = list(ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._load = load
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self._load(index)), int(self.labels[index])

    def raw(self, index: int) -> object:
        """The untransformed image."""
        return self._load(index)

    def with_transform(self, transform: Callable[[object], torch.Tensor]) -> "ImageDataset":
        """The same images under another transform."""
        return ImageDataset(self.ids, self.labels, self._load, transform)


@dataclass
class DataSplits:
    """The three splits (train with augmentation) and the class names."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    class_names: list[str]
    eval_transform: Callable[[object], torch.Tensor]
    train_transform: Callable[[object], torch.Tensor]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str, augment: bool = False) -> ImageDataset:
        """One split by name; ``augment`` chooses the training transform."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        dataset = getattr(self, name)
        return dataset.with_transform(self.train_transform if augment else self.eval_transform)


def load_splits(config: DataConfig, seed: int, verify_images: bool = False) -> DataSplits:
    """Build the train / val / test splits that ``config`` describes.

    ``verify_images`` opens every image file once (header only) so that a
    corrupt file is reported before any work starts; the command line does
    this at its edge, workers skip it.
    """
    if config.kind == "digits":
        return _digits_splits(config, seed)
    root = Path(config.root or "")
    if not root.is_dir():
        raise UserError(f"data.root {root}: folder not found (expected the {config.kind} dataset folder)")
    if config.kind == "cub200":
        splits = _cub_splits(config, root, seed)
    else:
        splits = _imagefolder_splits(config, root, seed)
    if verify_images:
        for name in SPLITS:
            dataset = getattr(splits, name)
            for index in range(len(dataset)):
                dataset.raw(index)
    return splits


# ------------------------------------------------------------------ transforms


def build_transforms(config: DataConfig, augment: AugmentConfig | None) -> Callable[[object], torch.Tensor]:
    """Resize → (augmentation) → float tensor → ImageNet normalisation."""
    steps: list[object] = [v2.ToImage(), v2.Resize((config.image_size, config.image_size), antialias=True)]
    if augment is not None:
        scale = (1 - augment.zoom, 1 + augment.zoom)
        steps.append(
            v2.RandomAffine(
                degrees=augment.rotation,
                translate=(augment.shift, augment.shift),
                scale=scale,
                shear=augment.shear,
            )
        )
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held out) with ``fraction`` of each class held out."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and round(fraction * len(labels)) >= len(counts[counts > 0]) else None
    kept, held = train_test_split(indices, test_size=fraction, stratify=stratify, random_state=seed)
    return np.sort(kept), np.sort(held)


def _make_splits(
    config: DataConfig,
    ids: list[str],
    labels: np.ndarray,
    load: Callable[[int], object],
    train_index: np.ndarray,
    val_index: np.ndarray,
    test_index: np.ndarray,
    class_names: list[str],
) -> DataSplits:
    eval_transform = build_transforms(config, None)
    train_transform = build_transforms(config, config.augment)

    def subset(index: np.ndarray, transform: Callable[[object], torch.Tensor]) -> ImageDataset:
        positions = [int(i) for i in index]
        return ImageDataset([ids[i] for i in positions], labels[positions], lambda k: load(positions[k]), transform)

    return DataSplits(
        train=subset(train_index, train_transform),
        val=subset(val_index, eval_transform),
        test=subset(test_index, eval_transform),
        class_names=class_names,
        eval_transform=eval_transform,
        train_transform=train_transform,
    )


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
        config, ids, labels, lambda i: images[i], rest[train_pos], rest[val_pos], test_index, [str(d) for d in range(10)]
    )


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
        config, [f"cub-{i}" for i in image_ids], labels, load, official_train[train_pos], official_train[val_pos], test_index, class_names
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
    return _make_splits(config, ids, label_array, load, train_index, val_index, test_index, class_names)
