"""What image a model sees: the plain image, a seeded augmented view, or a fresh augmentation per epoch.

Every augmentation is drawn from a seed that depends only on what it is for
(study seed, split, image, view or epoch), never on the worker, batch or
device, so a study computes the same inputs wherever it runs:

* the features stage gives the CFE bank ``cfe.views`` views of each training
  image, and the prefix stage caches ``prefix.views`` views: view 0 is the
  plain image, view v > 0 is augmented with :func:`view_seed` ``(seed, split,
  image, v)``, so view v is the same image in both;
* debug retraining (the control included) draws one of ``prefix.views`` views
  of each image per epoch (:func:`epoch_views`), on the cache or not;
* base training augments each image afresh every epoch (:func:`epoch_seeds`).

Batches arrive as uint8 images (the image store); :func:`model_inputs` turns
them into normalised model inputs on their device (:mod:`raycf.data.augment`).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

from raycf.data.augment import IMAGENET, augment_batch, evaluate_batch
from raycf.config import AugmentConfig, PreprocessConfig


def view_seed(seed: int, split: str, image_index: int, view: int) -> int:
    """The augmentation seed of one view: a function of its identity only."""
    digest = hashlib.sha256(f"{seed}/{split}/{image_index}/{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def view_seeds(seed: int, split: str, indices: Iterable[int], views: Iterable[int]) -> torch.Tensor:
    """:func:`view_seed` of each (image, view) pair, as an int64 tensor."""
    return torch.tensor([view_seed(seed, split, int(i), int(v)) for i, v in zip(indices, views)], dtype=torch.int64)


def epoch_seeds(seed: int, epoch: int, indices: Iterable[int]) -> torch.Tensor:
    """Seeds of a fresh augmentation of each training image in ``epoch`` (base training)."""
    indices = list(indices)
    return view_seeds(seed, f"train@epoch{epoch}", indices, [0] * len(indices))


def epoch_views(seed: int, epoch: int, num_images: int, num_views: int) -> torch.Tensor:
    """The view (0 … num_views − 1) every training image is seen in during ``epoch``; uniform, fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_033 + epoch)
    return torch.randint(0, num_views, (num_images,), generator=generator)


def model_inputs(
    images: torch.Tensor,
    image_size: int,
    augment: AugmentConfig | None = None,
    seeds: torch.Tensor | None = None,
    plain: torch.Tensor | None = None,
    *,
    preprocess: PreprocessConfig | None = None,
) -> torch.Tensor:
    """uint8 B×3×S×S images (on their device) → normalised float B×3×image_size×image_size inputs.

    Without ``seeds`` every image is plain (resized, normalised).  With
    ``seeds``, each image is augmented with its seed, except where ``plain``
    (a B-boolean mask on the CPU: view 0) is true.  Nothing here waits for
    the device.  ``preprocess`` (``data.preprocess``) gives the normalisation's
    mean and std (default: ImageNet's).
    """
    norm = (preprocess.mean, preprocess.std) if preprocess is not None else IMAGENET
    if seeds is None:
        inputs = evaluate_batch(images, image_size, norm)
    elif plain is None or not bool(plain.any()):  # ``plain`` lives on the CPU: deciding costs no device sync
        inputs = augment_batch(images, seeds, augment, image_size, norm)
    else:
        inputs = evaluate_batch(images, image_size, norm)
        rows = torch.nonzero(~plain.cpu()).flatten()  # the augmented images, found on the CPU
        if len(rows):
            on_device = rows.to(images.device, non_blocking=True)
            inputs.index_copy_(0, on_device, augment_batch(images.index_select(0, on_device), seeds[rows], augment, image_size, norm))
    # channels_last on a GPU, as the model is (raycf.models.precision.prepare_model): cuDNN's fastest layout
    return inputs.contiguous(memory_format=torch.channels_last) if inputs.is_cuda else inputs
