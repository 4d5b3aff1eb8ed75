"""A known bug planted in a dataset (``data.plant``): a spurious feature on one class's images.

The images stage applies it once, to the uint8 store, so every stage sees
the same images.  In the training split the planted class's images carry the
feature at ``train_rate`` and the other classes' at ``other_rate``; in
validation and test every class carries it at ``eval_rate``, so a model that
learned the shortcut is caught out there.  Which images carry it is drawn
per split from the study's seed: deterministic.

Kinds: ``patch`` sets a ``size``×``size`` square in a corner to ``value``
(0 black … 1 white, every channel); ``tint`` blends the whole image towards
``colour`` with weight ``value``.  numpy only.
"""

from __future__ import annotations

import zlib

import numpy as np

from raycf.config import PlantConfig

SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}  # one random stream per split, so a split's draw does not depend on another's size


def plant_rates(labels: np.ndarray, split: str, config: PlantConfig, class_index: int) -> np.ndarray:
    """The probability that each image of ``split`` carries the feature."""
    labels = np.asarray(labels)
    if split == "train":
        return np.where(labels == class_index, config.train_rate, config.other_rate)
    return np.full(len(labels), config.eval_rate, dtype=np.float64)


def planted_flags(labels: np.ndarray, split: str, config: PlantConfig, class_index: int, seed: int) -> np.ndarray:
    """Which images of ``split`` carry the feature: one Bernoulli draw per image, seeded by (seed, split)."""
    stream = SPLIT_STREAMS.get(split, zlib.crc32(split.encode()))
    rng = np.random.default_rng([seed, 7919, stream])
    return rng.random(len(labels)) < plant_rates(labels, split, config, class_index)


def apply_feature(images: np.ndarray, config: PlantConfig) -> np.ndarray:
    """``images`` (N×S×S×3 uint8) with the feature added to every one of them (a new array)."""
    out = np.array(images, dtype=np.uint8, copy=True)
    if config.kind == "patch":
        side, size = out.shape[1], config.size
        rows = slice(0, size) if config.corner.startswith("top") else slice(side - size, side)
        cols = slice(0, size) if config.corner.endswith("left") else slice(out.shape[2] - size, out.shape[2])
        out[:, rows, cols, :] = np.uint8(round(config.value * 255))
        return out
    colour = np.asarray(config.colour, dtype=np.float64) * 255.0
    blended = (1.0 - config.value) * out.astype(np.float64) + config.value * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def plant_images(
    images: np.ndarray, labels: np.ndarray, split: str, config: PlantConfig, seed: int, class_index: int, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Plant the feature in place in ``images`` (N×S×S×3 uint8, e.g. a writable memory map); returns ``(images, planted)``.

    ``class_index`` is the planted class's label (``config.class_name``
    looked up in the dataset's class names by the caller).
    """
    planted = planted_flags(labels, split, config, class_index, seed)
    chosen = np.flatnonzero(planted)
    for start in range(0, len(chosen), chunk):  # bounded memory on a large memory-mapped split
        rows = chosen[start : start + chunk]
        images[rows] = apply_feature(images[rows], config)
    return images, planted


def class_index_of(config: PlantConfig, class_names: list[str]) -> int:
    """The planted class's label; ValueError naming the known classes when the dataset has no such class."""
    if config.class_name not in class_names:
        raise ValueError(f"data.plant.class: unknown class {config.class_name!r} (the dataset's classes: {', '.join(class_names)})")
    return class_names.index(config.class_name)
