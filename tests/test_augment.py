"""raycf.data.augment against a transcription of Keras' apply_affine_transform (scipy.ndimage), on the CPU.

Tolerance of the reference comparisons: Keras centres its matrix at
``n/2 − 0.5`` with pixel ``i`` at index ``i`` (scipy's convention), which is
exactly where ``affine_grid``/``grid_sample`` put pixel centres with
``align_corners=False``; 'nearest' fill is edge replication in both (scipy
extends by the edge pixel, ``padding_mode='border'`` clamps to it).  So both
sample the same points with the same bilinear weights and differ only by
float32 rounding (of the grid, ~1e-6 of a pixel): we ask for a max error of
1e-4 on the [0, 1] range, everywhere, edges included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from raycf.data.augment import (
    AffineParams,
    augment_batch,
    evaluate_batch,
    sample_params,
    warp_batch,
)
from raycf.config import AugmentConfig
from raycf.data.datasets import IMAGENET_MEAN, IMAGENET_STD

REFERENCE = AugmentConfig(rotation=15, shift=0.2, shear=0.2, zoom=0.2, hflip=True)
TOLERANCE = 1e-4  # on [0, 1]; see the module docstring


# ------------------------------------------------------------------ the reference


def keras_transform_matrix_offset_center(matrix: np.ndarray, x: float, y: float) -> np.ndarray:
    """Keras' transform_matrix_offset_center, as written there."""
    o_x = float(x) / 2 - 0.5
    o_y = float(y) / 2 - 0.5
    offset_matrix = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset_matrix = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    return offset_matrix @ matrix @ reset_matrix


def keras_matrix(theta, tx, ty, shear, zx, zy, h, w, true_centre=False) -> np.ndarray:
    """The 3×3 matrix Keras' apply_affine_transform hands to scipy (channels first: row_axis=1, col_axis=2).

    ``tx``/``ty`` in pixels, angles in degrees.  ``true_centre`` passes the
    centre in (x, y) order (raycf's choice for non-square images; Keras passes (h, w)).
    """
    theta, shear = np.deg2rad(theta), np.deg2rad(shear)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    shearing = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
    zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    matrix = rotation @ shift @ shearing @ zoom
    matrix = keras_transform_matrix_offset_center(matrix, *((w, h) if true_centre else (h, w)))
    # Keras (col_axis > row_axis): M' = P M P, the matrix acts on (x, y) = (col, row)
    matrix[:, [0, 1]] = matrix[:, [1, 0]]
    matrix[[0, 1]] = matrix[[1, 0]]
    return matrix


def keras_reference(image: np.ndarray, params: dict, out_size: int | None = None, true_centre: bool = False) -> np.ndarray:
    """Keras' augmentation of a float C×H×W image (order 1, fill 'nearest', flip after), optionally resampled.

    ``params`` uses raycf's units (shifts as fractions); Keras' tx is the
    fraction times the height and ty times the width (get_random_transform).
    ``out_size`` samples the same field of view on an out×out grid of pixel
    centres (output pixel p sits at (p + 0.5)·n/out − 0.5 of the input).
    """
    _, h, w = image.shape
    tx = params.get("tx", 0.0) * (w if true_centre else h)
    ty = params.get("ty", 0.0) * (h if true_centre else w)
    matrix = keras_matrix(
        params.get("angle", 0.0), tx, ty, params.get("shear", 0.0), params.get("zx", 1.0), params.get("zy", 1.0), h, w, true_centre
    )
    out_shape = (out_size or h, out_size or w)
    row_scale, col_scale = h / out_shape[0], w / out_shape[1]
    resample = np.array([[row_scale, 0, row_scale / 2 - 0.5], [0, col_scale, col_scale / 2 - 0.5], [0, 0, 1]])
    matrix = matrix @ resample
    channels = [
        ndimage.affine_transform(channel, matrix[:2, :2], matrix[:2, 2], output_shape=out_shape, order=1, mode="nearest")
        for channel in image
    ]
    result = np.stack(channels)
    return result[:, :, ::-1].copy() if params.get("flip", False) else result


# ------------------------------------------------------------------ helpers


def make_image(height: int = 48, width: int = 48) -> torch.Tensor:
    """uint8 3×H×W: a different gradient per channel and a bright off-centre rectangle."""
    rows = torch.linspace(0, 1, height).view(-1, 1).expand(height, width)
    cols = torch.linspace(0, 1, width).view(1, -1).expand(height, width)
    image = torch.stack([rows, cols, (rows * cols).sqrt()]) * 0.7
    image[:, height // 6 : height // 3, width * 4 // 7 : width * 4 // 5] = 1.0
    return (image * 255).round().to(torch.uint8)


def params_of(batch_size: int = 1, **values) -> AffineParams:
    """Identity parameters with some fields set (the same for every image)."""
    identity = AffineParams.identity(batch_size)
    fields = {name: getattr(identity, name) for name in ("angle", "tx", "ty", "shear", "zx", "zy", "flip")}
    for name, value in values.items():
        fields[name] = torch.full_like(fields[name], value)
    return AffineParams(**fields)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of float images in [0, 1], written plainly: the reference the fused path is checked against."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """Back to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return images * std + mean


def warp_one(image: torch.Tensor, out_size: int | None = None, **values) -> np.ndarray:
    out = warp_batch(image.unsqueeze(0), params_of(1, **values), out_size or image.shape[-1])
    return denormalise(out[0]).numpy()


# ------------------------------------------------------------------ parameters


def test_sampled_parameters_cover_the_configured_ranges():
    params = sample_params(REFERENCE, torch.arange(3000))
    for values, bound in ((params.angle, 15), (params.tx, 0.2), (params.ty, 0.2), (params.shear, 0.2)):
        assert values.abs().max() <= bound
        assert values.min() < -0.97 * bound and values.max() > 0.97 * bound  # uniform over the whole range
        assert abs(values.mean()) < 0.05 * bound
    for zoom in (params.zx, params.zy):
        assert zoom.min() >= 0.8 and zoom.max() <= 1.2 and zoom.min() < 0.81 and zoom.max() > 1.19
    assert params.angle.shape == (3000,) and params.flip.dtype == torch.bool


def test_zoom_factors_are_drawn_independently():
    params = sample_params(REFERENCE, torch.arange(3000))
    assert not torch.any(params.zx == params.zy)
    assert abs(np.corrcoef(params.zx.numpy(), params.zy.numpy())[0, 1]) < 0.1


def test_flips_half_the_time_only_when_enabled():
    seeds = torch.arange(4000)
    flips = sample_params(REFERENCE, seeds).flip.float().mean()
    assert 0.46 < flips < 0.54
    assert not sample_params(REFERENCE.model_copy(update={"hflip": False}), seeds).flip.any()


def test_same_seed_same_parameters_whatever_the_batch():
    a = sample_params(REFERENCE, torch.tensor([5, 7, 9]))
    b = sample_params(REFERENCE, torch.tensor([9, 100, 5, 5]))
    for name in ("angle", "tx", "ty", "shear", "zx", "zy", "flip"):
        first, second = getattr(a, name), getattr(b, name)
        assert first[0] == second[2] == second[3] and first[2] == second[0]
    assert a.angle[0] != a.angle[1]


def test_every_bit_of_the_seed_counts_and_the_draws_do_not_depend_on_the_ranges():
    seeds = torch.tensor([1, 1 + 2**32, -1, 2**63 - 1])
    angles = sample_params(REFERENCE, seeds).angle
    assert len(set(angles.tolist())) == 4  # torch's generator alone keeps only the low 32 bits
    wider = sample_params(REFERENCE.model_copy(update={"rotation": 30, "hflip": False}), seeds)
    torch.testing.assert_close(wider.angle, 2 * angles)


def test_seeds_must_be_one_integer_per_image():
    with pytest.raises(ValueError, match="seeds"):
        sample_params(REFERENCE, torch.zeros(3))
    with pytest.raises(ValueError, match="one seed per image"):
        augment_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.arange(3), REFERENCE, 8)


# ------------------------------------------------------------------ against Keras


KERAS_CASES = {
    "rotation": {"angle": 15.0},
    "shift": {"tx": 0.13, "ty": -0.07},
    "shear": {"shear": 20.0},
    "zoom": {"zx": 1.2, "zy": 0.85},
    "combined": {"angle": -12.0, "tx": 0.1, "ty": 0.15, "shear": 10.0, "zx": 0.9, "zy": 1.15},
    "combined_flip": {"angle": 7.0, "tx": -0.18, "ty": 0.05, "shear": -0.2, "zx": 1.1, "zy": 0.95, "flip": True},
}


@pytest.mark.parametrize("case", KERAS_CASES)
def test_matches_keras_at_the_stored_size(case):
    image = make_image()
    expected = keras_reference(image.numpy() / 255.0, KERAS_CASES[case])
    got = warp_one(image, **KERAS_CASES[case])
    assert np.abs(got - expected).max() < TOLERANCE
    assert np.abs(got - image.numpy() / 255.0).mean() > 0.005  # the case does transform the image


@pytest.mark.parametrize("case", ["rotation", "combined_flip"])
def test_resize_is_folded_into_the_same_field_of_view(case):
    image = make_image(64, 64)
    expected = keras_reference(image.numpy() / 255.0, KERAS_CASES[case], out_size=40)
    got = warp_one(image, out_size=40, **KERAS_CASES[case])
    assert got.shape == (3, 40, 40)
    assert np.abs(got - expected).max() < TOLERANCE


def test_non_square_images_use_the_true_centre_and_per_axis_fractions():
    image = make_image(40, 56)
    values = KERAS_CASES["combined"]
    expected = keras_reference(image.numpy() / 255.0, values, out_size=32, true_centre=True)
    got = denormalise(warp_batch(image.unsqueeze(0), params_of(1, **values), 32)[0]).numpy()
    assert np.abs(got - expected).max() < TOLERANCE


def test_positive_shifts_move_the_content_left_and_up():
    """Keras' matrix maps output to input: output(x) = input(x + tx), so content moves towards the origin."""
    image = make_image()
    plain = image.numpy() / 255.0
    moved_left = warp_one(image, tx=6 / 48)  # 6 pixels along the columns
    moved_up = warp_one(image, ty=6 / 48)  # 6 pixels along the rows
    assert np.abs(moved_left[:, :, :-6] - plain[:, :, 6:]).max() < 1e-5
    assert np.abs(moved_up[:, :-6, :] - plain[:, 6:, :]).max() < 1e-5


def test_positive_rotation_turns_the_content_counter_clockwise():
    image = make_image()
    turned = warp_one(image, angle=90.0)
    assert np.abs(turned - np.rot90(image.numpy() / 255.0, k=1, axes=(1, 2))).max() < 1e-5


def test_zoom_above_one_shows_more_of_the_image():
    image = torch.zeros(3, 48, 48, dtype=torch.uint8)
    image[:, 16:32, 16:32] = 255
    zoomed_out = warp_one(image, zx=2.0, zy=2.0)
    assert (zoomed_out > 0.5).sum() == pytest.approx((image > 127).sum().item() / 4, rel=0.1)
    squeezed = warp_one(image, zx=2.0)  # only the columns
    assert (squeezed[0] > 0.5).any(axis=0).sum() == 8 and (squeezed[0] > 0.5).any(axis=1).sum() == 16


def test_identity_parameters_return_the_normalised_input():
    images = torch.stack([make_image(), make_image().flip(-1)])
    out = warp_batch(images, AffineParams.identity(2), 48)
    torch.testing.assert_close(out, normalise(images.float() / 255), rtol=0, atol=5e-5)


def test_flip_mirrors_the_augmented_image():
    images = make_image().unsqueeze(0)
    values = KERAS_CASES["combined"]
    plain = warp_batch(images, params_of(1, **values), 48)
    flipped = warp_batch(images, params_of(1, flip=True, **values), 48)
    torch.testing.assert_close(flipped, plain.flip(-1), rtol=0, atol=5e-5)


def test_identity_resize_is_bilinear_without_antialias():
    """At exactly half size, bilinear sampling at the output pixel centres is a 2×2 mean."""
    images = torch.stack([make_image(64, 64), make_image(64, 64).flip(-2)])
    out = warp_batch(images, AffineParams.identity(2), 32)
    pixels = images.float() / 255
    torch.testing.assert_close(out, normalise(F.avg_pool2d(pixels, 2)), rtol=0, atol=5e-5)
    # evaluate_batch antialiases (a wider tent filter): close to it, not equal
    assert (out - evaluate_batch(images, 32)).abs().mean() < 0.05


# ------------------------------------------------------------------ batches


def test_augment_batch_shapes_dtype_and_determinism():
    images = torch.stack([make_image(56, 56)] * 4)
    out = augment_batch(images, torch.arange(4), REFERENCE, 48)
    assert out.shape == (4, 3, 48, 48) and out.dtype == torch.float32
    assert torch.equal(out, augment_batch(images, torch.arange(4), REFERENCE, 48))
    assert not torch.allclose(out[0], out[1])  # same image, different seeds


def test_permuted_seeds_permute_the_outputs():
    images = torch.stack([make_image(), make_image().flip(-1), make_image().flip(-2), make_image().transpose(-1, -2)])
    seeds = torch.tensor([11, 22, 33, 44])
    order = torch.tensor([2, 0, 3, 1])
    out = augment_batch(images, seeds, REFERENCE, 40)
    permuted = augment_batch(images[order], seeds[order], REFERENCE, 40)
    torch.testing.assert_close(permuted, out[order], rtol=0, atol=1e-6)


def test_channels_last_and_autocast_give_the_same_float32_result():
    images = torch.stack([make_image(), make_image().flip(-1)])
    seeds = torch.tensor([3, 4])
    expected = augment_batch(images, seeds, REFERENCE, 40)
    channels_last = augment_batch(images.contiguous(memory_format=torch.channels_last), seeds, REFERENCE, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = augment_batch(images, seeds, REFERENCE, 40)
        evaluated = evaluate_batch(images, 40)
    assert autocast.dtype == evaluated.dtype == torch.float32
    torch.testing.assert_close(channels_last, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(autocast, expected, rtol=0, atol=1e-6)


def test_rejects_images_that_are_not_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        evaluate_batch(torch.zeros(1, 3, 8, 8), 8)
    with pytest.raises(ValueError, match="uint8"):
        warp_batch(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), AffineParams.identity(1), 8)


# ------------------------------------------------------------------ evaluation


def test_evaluate_batch_at_the_stored_size_is_the_exact_normalisation():
    images = torch.stack([make_image(), make_image().flip(-1)])
    out = evaluate_batch(images, 48)
    assert out.shape == (2, 3, 48, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, normalise(images.float() / 255), rtol=0, atol=5e-5)  # one fused multiply-add: float rounding only
    assert torch.equal(evaluate_batch(images.contiguous(memory_format=torch.channels_last), 48), out)


def test_evaluate_batch_resizes_with_antialias():
    images = make_image(64, 64).unsqueeze(0)
    out = evaluate_batch(images, 32)
    expected = F.interpolate(images.float() / 255, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out, normalise(expected), rtol=0, atol=1e-6)
    assert evaluate_batch(images, 80).shape == (1, 3, 80, 80)  # upsampling works too


# ------------------------------------------------------------------ device


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # every device this machine has


@pytest.mark.parametrize("device", DEVICES)
def test_every_device_matches_the_cpu_and_stays_float32_under_autocast(device):
    images = torch.stack([make_image(64, 64), make_image(64, 64).flip(-1)])
    seeds = torch.tensor([1, 2])
    expected = augment_batch(images, seeds, REFERENCE, 48)
    on_device = images.to(device).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16):
        got = augment_batch(on_device, seeds.to(device), REFERENCE, 48)
        evaluated = evaluate_batch(on_device, 48)
    assert got.device.type == device and got.dtype == evaluated.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(evaluated.cpu(), evaluate_batch(images, 48), rtol=0, atol=1e-4)
