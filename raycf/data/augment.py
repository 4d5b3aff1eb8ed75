"""Batched, seeded, Keras-style affine augmentation on the training device.

The reference trains with Keras' ``ImageDataGenerator(rotation_range=15,
width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2, zoom_range=0.2)``
(``fill_mode='nearest'``, bilinear interpolation).  This module reproduces that
augmentation as one batched resampling on whatever device holds the images, with
each image's random parameters drawn from its own seed.

Random parameters (Keras' ``get_random_transform``), per image:
  * rotation angle θ ~ U(-rotation, rotation) degrees;
  * shifts tx, ty ~ U(-shift, shift), kept as fractions of the image side
    (Keras multiplies them by the side in pixels: tx by the height, ty by the width);
  * shear angle ~ U(-shear, shear) in DEGREES (so the reference's 0.2 is a tiny shear);
  * zoom factors zx, zy ~ U(1 - zoom, 1 + zoom), drawn independently;
  * a horizontal flip with probability 0.5 when ``hflip`` is on (applied after
    the affine map, as Keras does).

The matrix (Keras' ``apply_affine_transform``):
``A = rotation · shift · shear · zoom`` about the image centre, and ``A`` maps
OUTPUT coordinates to INPUT coordinates (it says where each output pixel is read
from).  Hence zoom > 1 shows MORE of the image (zooms out) and a positive shift
reads from further along the axis, i.e. moves the content towards the origin.

Coordinate convention.  Current Keras (``keras/src/legacy/preprocessing/image.py``
in Keras 3, ``keras/preprocessing/image.py`` in late Keras 2; the change is
keras-preprocessing PR #318, Oct 2020) swaps the axes of the matrix before
handing it to ``scipy.ndimage.affine_transform`` (``M' = P M P``), so the matrix
acts on (x, y) = (column, row), with y pointing down:
  * ``tx`` moves along the columns: a positive tx moves the content LEFT by
    ``tx · side`` pixels; ``ty`` moves along the rows: positive moves it UP;
  * ``zx`` scales the columns (width), ``zy`` the rows (height);
  * shear: ``x_in = x − sin(s)·y``, ``y_in = cos(s)·y`` (a horizontal shear);
  * a positive θ turns the content counter-clockwise on screen.
Older releases applied the same matrix to (row, column) instead (tx moved the
content up, zx scaled the rows, the shear was vertical) and centred it at
``n/2 + 0.5``, one pixel off.  For the reference's square images and symmetric
ranges both give the same distribution of augmentations, except for the
shear's axis (0.2° either way) and that one-pixel offset.

Pixel centres.  Keras offsets the matrix to the centre ``(n/2 − 0.5)`` in pixel
indices where pixel ``i`` sits at ``i``.  That is exactly the convention of
``affine_grid`` / ``grid_sample`` with ``align_corners=False`` (pixel ``i`` at
normalised ``(2i + 1)/n − 1``, the image centre at 0), so a pixel-space matrix
``A`` about the centre becomes ``D · A · D⁻¹`` in normalised space, with
``D = diag(2/width, 2/height)``.  Fill 'nearest' is ``padding_mode='border'``.

Why one ``grid_sample``.  Normalised coordinates cover the same field of view at
every resolution, so the resize from the stored side S to the model's side
(e.g. 256 → 224) is just the output size given to ``affine_grid``; the flip is a
sign on the matrix's x column.  Rotation, shift, shear, zoom, resize and flip
are therefore one gather with one bilinear interpolation: no intermediate image,
no double blur, and the cost does not depend on the parameters.  (The fused
resize is plain bilinear, without antialiasing; for small shrink factors such as
256 → 224 that is harmless.)

Seeding.  Each image's parameters come from a ``torch.Generator`` seeded with a
splitmix64 hash of that image's seed, on the CPU: the result depends only on the
seed, never on the batch, worker or device.  (Torch's CPU generator keeps only
the low 32 bits of a seed; hashing first makes all 64 bits count, though there
are still only 2³² distinct streams.)

Deviations from Keras, only for non-square images: Keras scales tx by the height
although it moves along the width (and ty vice versa) and centres the matrix at
the swapped centre ``(h/2 − 0.5, w/2 − 0.5)`` in (x, y); here each shift is a
fraction of the axis it moves along and the centre is the true centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raycf.config import AugmentConfig
from raycf.data.datasets import IMAGENET_MEAN, IMAGENET_STD

Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std) per RGB channel, images in [0, 1]
IMAGENET: Normalisation = (IMAGENET_MEAN, IMAGENET_STD)

_DRAWS_PER_IMAGE = 8  # angle, tx, ty, shear, zx, zy, flip (+1 spare: adding a draw must not change the others)
_UINT64 = (1 << 64) - 1


@dataclass(frozen=True)
class AffineParams:
    """Per-image augmentation parameters, each a tensor of shape (B,).

    ``angle`` and ``shear`` are in degrees; ``tx`` (along the columns) and ``ty``
    (along the rows) are fractions of the image side; ``zx`` (columns) and
    ``zy`` (rows) are Keras zoom factors (> 1 shows more of the image); ``flip``
    is a bool tensor, True where the output is mirrored left–right.
    """

    angle: torch.Tensor
    tx: torch.Tensor
    ty: torch.Tensor
    shear: torch.Tensor
    zx: torch.Tensor
    zy: torch.Tensor
    flip: torch.Tensor

    @classmethod
    def identity(cls, batch_size: int) -> "AffineParams":
        """Parameters that leave every image as it is."""
        zeros = torch.zeros(batch_size, dtype=torch.float64)
        ones = torch.ones(batch_size, dtype=torch.float64)
        return cls(zeros, zeros, zeros, zeros, ones, ones, torch.zeros(batch_size, dtype=torch.bool))


def sample_params(config: AugmentConfig, seeds: torch.Tensor) -> AffineParams:
    """Draw each image's parameters from a generator seeded by its own seed.

    ``seeds`` is an integer tensor of shape (B,) on any device.  The same seed
    always gives the same parameters, whatever the other seeds in the batch.
    Returns float64 (bool for ``flip``) tensors on the CPU.
    """
    if seeds.ndim != 1 or seeds.is_floating_point():
        raise ValueError(f"seeds: expected an integer tensor of shape (B,) (got {seeds.dtype} {tuple(seeds.shape)})")
    draws = [_uniforms(seed) for seed in seeds.tolist()]
    uniforms = torch.stack(draws) if draws else torch.empty(0, _DRAWS_PER_IMAGE, dtype=torch.float64)
    symmetric = uniforms * 2 - 1  # U(-1, 1)
    return AffineParams(
        angle=symmetric[:, 0] * config.rotation,
        tx=symmetric[:, 1] * config.shift,
        ty=symmetric[:, 2] * config.shift,
        shear=symmetric[:, 3] * config.shear,
        zx=1 + symmetric[:, 4] * config.zoom,
        zy=1 + symmetric[:, 5] * config.zoom,
        flip=(uniforms[:, 6] < 0.5) & config.hflip,
    )


def affine_matrices(params: AffineParams, height: int, width: int) -> torch.Tensor:
    """B×2×3 ``affine_grid`` matrices (normalised, ``align_corners=False``) of Keras' transform.

    Builds Keras' ``rotation · shift · shear · zoom`` in pixel units of an input
    of ``height`` × ``width``, about its centre, acting on (x, y) and mapping
    output to input; converts it to normalised coordinates (``D · A · D⁻¹``) and
    mirrors x where ``flip``.  The output size is free: the same matrix samples
    the same field of view at any resolution.  Dtype and device follow ``params``.
    """
    pixel_matrix = (
        _rotation(params.angle) @ _shift(params.tx * width, params.ty * height) @ _shear(params.shear) @ _zoom(params.zx, params.zy)
    )
    to_normalised = _diagonal(torch.full_like(params.tx, 2 / width), torch.full_like(params.tx, 2 / height))
    to_pixels = _diagonal(torch.full_like(params.tx, width / 2), torch.full_like(params.tx, height / 2))
    mirror = _diagonal(1 - 2 * params.flip.to(params.tx.dtype), torch.ones_like(params.tx))
    return (to_normalised @ pixel_matrix @ to_pixels @ mirror)[:, :2, :]


def augment_batch(images: torch.Tensor, seeds: torch.Tensor, config: AugmentConfig, out_size: int, normalisation: Normalisation = IMAGENET) -> torch.Tensor:
    """Augment a uint8 B×3×S×S batch on its own device: float32 B×3×out×out, normalised (ImageNet's mean and std by default).

    Each image's parameters come from its seed (:func:`sample_params`); the
    affine map, the resize from S to ``out_size`` and the flip are one
    ``grid_sample`` (see the module docstring).
    """
    if seeds.shape != images.shape[:1]:
        raise ValueError(f"seeds: expected one seed per image, shape ({len(images)},) (got {tuple(seeds.shape)})")
    return warp_batch(images, sample_params(config, seeds.cpu()), out_size, normalisation)


def warp_batch(images: torch.Tensor, params: AffineParams, out_size: int, normalisation: Normalisation = IMAGENET) -> torch.Tensor:
    """Apply given parameters to a uint8 B×3×H×W batch: float32 B×3×out×out, normalised.

    One ``affine_grid`` + ``grid_sample`` (bilinear, border fill) in float32,
    outside any autocast; the uint8 → float conversion happens on the images' device.
    """
    _check_images(images)
    batch, channels, height, width = images.shape
    if params.angle.shape != (batch,):
        raise ValueError(f"params: expected parameters for {batch} images (got shape {tuple(params.angle.shape)})")
    theta = affine_matrices(params, height, width).to(device=images.device, dtype=torch.float32)
    warped = torch.empty(batch, channels, out_size, out_size, device=images.device)
    with torch.autocast(images.device.type, enabled=False):
        for start in range(0, batch, _chunk(images)):
            part = slice(start, start + _chunk(images))
            grid = affine_grid(theta[part], out_size)
            warped[part] = F.grid_sample(images[part].contiguous().float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return normalise_255(warped, normalisation)


def _chunk(images: torch.Tensor) -> int:
    """Images resampled per call: the whole batch on a GPU; four on a CPU, where small buffers stay in cache and reuse
    freed memory (whole-batch float buffers cost page faults on every call: about 4× slower)."""
    return len(images) if images.is_cuda else 4


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, size, size), align_corners=False)``, computed by broadcasting.

    The same sampling points (pixel centres ``(2i + 1)/size − 1``): each grid
    coordinate is a row term (B×size×1, small) plus a column term added into
    the output in one pass, without the B×size²×3 base grid and its batched
    matmul: several times faster on a CPU.
    """
    centres = (torch.arange(size, dtype=theta.dtype, device=theta.device) * 2 + 1) / size - 1
    x, y = centres.view(1, 1, size), centres.view(1, size, 1)
    grid = torch.empty(len(theta), size, size, 2, dtype=theta.dtype, device=theta.device)
    for row in (0, 1):
        by_row = theta[:, row, 2].view(-1, 1, 1) + theta[:, row, 1].view(-1, 1, 1) * y
        torch.add(by_row, theta[:, row, 0].view(-1, 1, 1) * x, out=grid[..., row])
    return grid


def evaluate_batch(images: torch.Tensor, out_size: int, normalisation: Normalisation = IMAGENET) -> torch.Tensor:
    """No augmentation: uint8 B×3×H×W → float32 B×3×out×out, normalised, on the images' device.

    Resized bilinearly (antialiased when shrinking); when the images already
    have the output size this is exactly ``normalise(images / 255)``.
    """
    _check_images(images)
    height, width = images.shape[-2:]
    if (height, width) == (out_size, out_size):
        return normalise_255(images.contiguous().float(), normalisation)
    resized = torch.empty(len(images), images.shape[1], out_size, out_size, device=images.device)
    with torch.autocast(images.device.type, enabled=False):
        for start in range(0, len(images), _chunk(images)):
            part = slice(start, start + _chunk(images))
            pixels = images[part].contiguous().float()
            resized[part] = F.interpolate(pixels, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=out_size < max(height, width))
        return normalise_255(resized, normalisation)


def normalise_255(pixels: torch.Tensor, normalisation: Normalisation = IMAGENET) -> torch.Tensor:
    """``(pixels / 255 − mean) / std`` of float B×3×H×W images in [0, 255], in place: one fused multiply-add per value."""
    mean_values, std_values = normalisation
    std = torch.tensor(std_values, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    mean = torch.tensor(mean_values, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    return pixels.mul_(1 / (255 * std)).sub_(mean / std)


# ------------------------------------------------------------------ helpers


def _uniforms(seed: int) -> torch.Tensor:
    """The fixed sequence of U(0, 1) draws of one image, from its own generator."""
    generator = torch.Generator().manual_seed(_splitmix64(seed))
    return torch.rand(_DRAWS_PER_IMAGE, generator=generator, dtype=torch.float64)


def _splitmix64(seed: int) -> int:
    """A 64-bit hash whose low 32 bits (all that torch's CPU generator keeps) depend on every bit of ``seed``."""
    mixed = (seed + 0x9E3779B97F4A7C15) & _UINT64
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & _UINT64
    return mixed ^ (mixed >> 31)


def _matrices(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    """B×3×3 from a 3×3 layout of (B,) tensors and constants."""
    entries = [[torch.as_tensor(value, dtype=like.dtype, device=like.device).expand_as(like) for value in row] for row in rows]
    return torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)


def _diagonal(x_scale: torch.Tensor, y_scale: torch.Tensor) -> torch.Tensor:
    return _matrices([[x_scale, 0.0, 0.0], [0.0, y_scale, 0.0], [0.0, 0.0, 1.0]], x_scale)


def _rotation(degrees: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(torch.deg2rad(degrees)), torch.sin(torch.deg2rad(degrees))
    return _matrices([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], degrees)


def _shift(x_pixels: torch.Tensor, y_pixels: torch.Tensor) -> torch.Tensor:
    return _matrices([[1.0, 0.0, x_pixels], [0.0, 1.0, y_pixels], [0.0, 0.0, 1.0]], x_pixels)


def _shear(degrees: torch.Tensor) -> torch.Tensor:
    radians = torch.deg2rad(degrees)
    return _matrices([[1.0, -torch.sin(radians), 0.0], [0.0, torch.cos(radians), 0.0], [0.0, 0.0, 1.0]], degrees)


def _zoom(x_factor: torch.Tensor, y_factor: torch.Tensor) -> torch.Tensor:
    return _diagonal(x_factor, y_factor)


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected uint8 B×3×H×W (got {images.dtype} {tuple(images.shape)})")
