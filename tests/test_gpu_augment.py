"""Tests of the batched SimCLR augmentation against lightly's and torchvision's transforms.

Statistical checks draw a few hundred views from both implementations with fixed seeds and
compare per-view statistics. A mean is accepted within four standard errors of the difference plus
a small absolute margin, which covers the uint8 rounding and the resampling filter that differ
between Pillow and this float32 implementation.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from simclr_lightning.data.cache import CachedImages, PreparedCache, prepare_cache
from simclr_lightning.data.gpu_augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    SimCLRBatchAugment,
    UInt8ImageDataset,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    gaussian_blur,
    sample_crops,
    to_uint8_tensor,
)
from simclr_lightning.data.index import FaceIndex
from simclr_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SimCLRAugmentation,
    build_simclr_transform,
)

INPUT_SIZE = 32
OUTPUT_SIZE = 24
DRAWS = 600

# Every operation off: a full-image crop at the output size, nothing else.
IDENTITY = {
    "image_size": OUTPUT_SIZE,
    "min_scale": 1.0,
    "cj_prob": 0.0,
    "gray_prob": 0.0,
    "blur_prob": 0.0,
    "hflip_prob": 0.0,
}
JitterOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def make_image(size: int = INPUT_SIZE, seed: int = 0) -> np.ndarray:
    """Return an (size, size, 3) uint8 image with colour gradients, a stripe pattern and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    red = 255 * x
    green = 255 * (1 - y)
    blue = 128 + 100 * np.sin(6 * x + 3 * y)
    image = np.stack([red, green, blue], axis=-1) + rng.normal(0, 10, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def as_batch(image: np.ndarray, count: int) -> torch.Tensor:
    """Repeat an (H, W, 3) uint8 image into a (count, 3, H, W) uint8 batch."""
    single = torch.from_numpy(image).permute(2, 0, 1)
    return single.unsqueeze(0).expand(count, -1, -1, -1).contiguous()


def lightly_views(augmentation: SimCLRAugmentation, image: np.ndarray, count: int) -> torch.Tensor:
    """Draw ``count`` views of one image with lightly's transform, seeded."""
    torch.manual_seed(0)
    np.random.seed(0)
    view_transform = build_simclr_transform(augmentation).transforms[0]
    pil_image = Image.fromarray(image)
    return torch.stack([view_transform(pil_image) for _ in range(count)])


def batch_views(augmentation: SimCLRAugmentation, image: np.ndarray, count: int) -> torch.Tensor:
    """Draw ``count`` views of one image with the batched augmentation, seeded."""
    augment = SimCLRBatchAugment(augmentation, seed=0)
    return augment(as_batch(image, count))[0]


def unnormalize(views: torch.Tensor) -> torch.Tensor:
    return views * STD + MEAN


def assert_means_match(
    reference: torch.Tensor, ours: torch.Tensor, margin: float, label: str = "value"
) -> None:
    """Assert two samples have means within 4 standard errors plus ``margin``."""
    stderr = math.sqrt(reference.var().item() / len(reference) + ours.var().item() / len(ours))
    difference = abs(reference.mean().item() - ours.mean().item())
    limit = 4 * stderr + margin
    assert difference <= limit, f"{label}: means differ by {difference:.4f} > {limit:.4f}"


def assert_spreads_match(reference: torch.Tensor, ours: torch.Tensor, label: str) -> None:
    """Assert two samples have standard deviations within 20 % of each other."""
    ratio = ours.std().item() / reference.std().item()
    assert 0.8 <= ratio <= 1.25, f"{label}: standard deviation ratio {ratio:.3f}"


def assert_view_statistics_match(reference: torch.Tensor, ours: torch.Tensor) -> None:
    """Compare per-view statistics that crop, flip, jitter, grayscale and blur each move."""
    half = reference.shape[-1] // 2
    statistics = {
        "mean": lambda v: v.mean(dim=(1, 2, 3)),
        "std": lambda v: v.std(dim=(1, 2, 3)),
        "left_minus_right": lambda v: (
            v[..., :half].mean(dim=(1, 2, 3)) - v[..., half:].mean(dim=(1, 2, 3))
        ),
        "channel_spread": lambda v: unnormalize(v).std(dim=1).mean(dim=(1, 2)),
        "gradient": lambda v: unnormalize(v).diff(dim=-1).abs().mean(dim=(1, 2, 3)),
    }
    for name, statistic in statistics.items():
        ref_values, our_values = statistic(reference), statistic(ours)
        assert_means_match(ref_values, our_values, margin=0.02, label=name)
        if ref_values.std() > 0.01:
            assert_spreads_match(ref_values, our_values, label=name)


# Shapes, dtypes and input checks.


def test_forward_uint8_shapes_and_dtype() -> None:
    augment = SimCLRBatchAugment(SimCLRAugmentation(image_size=16), seed=0)
    views = augment(torch.randint(0, 256, (5, 3, 20, 28), dtype=torch.uint8))
    assert len(views) == 2
    for view in views:
        assert view.shape == (5, 3, 16, 16)
        assert view.dtype == torch.float32


def test_forward_float_input_matches_uint8() -> None:
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    augmentation = SimCLRAugmentation(image_size=16)
    from_uint8 = SimCLRBatchAugment(augmentation, seed=3)(images)
    from_float = SimCLRBatchAugment(augmentation, seed=3)(images.float() / 255)
    for view_uint8, view_float in zip(from_uint8, from_float, strict=True):
        torch.testing.assert_close(view_float, view_uint8, atol=1e-5, rtol=0)


def test_forward_under_autocast_stays_float32() -> None:
    augment = SimCLRBatchAugment(SimCLRAugmentation(image_size=16), seed=0)
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views = augment(images)
    assert views[0].dtype == torch.float32


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"blur_prob": 1.0, "cj_prob": 1.0, "gray_prob": 1.0},
        {"min_scale": 1.0, "image_size": 24},
    ],
)
def test_forward_keeps_work_on_images_device(changes: dict[str, float]) -> None:
    # Tensors on the "meta" device have shapes but no data, and an op that mixes them with CPU
    # tensors raises, as it would with CUDA tensors. This checks device placement without a GPU.
    augmentation = SimCLRAugmentation(image_size=16).replace(**changes)
    images = torch.zeros(4, 3, 24, 24, dtype=torch.uint8, device="meta")
    views = SimCLRBatchAugment(augmentation, seed=0)(images)
    for view in views:
        assert view.device.type == "meta"
        assert view.shape == (4, 3, augmentation.image_size, augmentation.image_size)


def test_forward_rejects_channels_last_array() -> None:
    augment = SimCLRBatchAugment(SimCLRAugmentation(image_size=16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        augment(torch.zeros(2, 20, 20, 3, dtype=torch.uint8))


def test_forward_rejects_integer_dtype() -> None:
    augment = SimCLRBatchAugment(SimCLRAugmentation(image_size=16))
    with pytest.raises(TypeError, match="uint8 or floating point"):
        augment(torch.zeros(2, 3, 20, 20, dtype=torch.int32))


def test_forward_rejects_empty_batch() -> None:
    augment = SimCLRBatchAugment(SimCLRAugmentation(image_size=16))
    with pytest.raises(ValueError, match="empty batch"):
        augment(torch.zeros(0, 3, 20, 20, dtype=torch.uint8))


def test_init_rejects_hue_above_half() -> None:
    with pytest.raises(ValueError, match=r"cj_strength \* cj_hue"):
        SimCLRBatchAugment(SimCLRAugmentation(cj_hue=0.3, cj_strength=2.0))


def test_init_rejects_unset_size() -> None:
    with pytest.raises(ValueError, match="image_size is None"):
        SimCLRBatchAugment(SimCLRAugmentation())


def test_init_rejects_negative_jitter() -> None:
    with pytest.raises(ValueError, match="brightness jitter must be non-negative"):
        SimCLRBatchAugment(SimCLRAugmentation(cj_bright=-0.1))


# Identity settings and determinism.


def test_identity_settings_reproduce_normalisation() -> None:
    images = torch.randint(0, 256, (6, 3, OUTPUT_SIZE, OUTPUT_SIZE), dtype=torch.uint8)
    augment = SimCLRBatchAugment(SimCLRAugmentation(**IDENTITY), seed=0)
    expected = TF.normalize(
        TF.to_dtype(images, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD
    )
    for view in augment(images):
        assert torch.equal(view, expected)


def test_identity_settings_match_lightly() -> None:
    image = make_image(OUTPUT_SIZE)
    augmentation = SimCLRAugmentation(**IDENTITY)
    expected = lightly_views(augmentation, image, 1)
    ours = batch_views(augmentation, image, 1)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_seed_repeats_views() -> None:
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    augmentation = SimCLRAugmentation(image_size=16)
    first = SimCLRBatchAugment(augmentation, seed=7)(images)
    second = SimCLRBatchAugment(augmentation, seed=7)(images)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])


def test_different_seeds_differ() -> None:
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    augmentation = SimCLRAugmentation(image_size=16)
    first = SimCLRBatchAugment(augmentation, seed=7)(images)
    second = SimCLRBatchAugment(augmentation, seed=8)(images)
    assert not torch.equal(first[0], second[0])


def test_manual_seed_restarts_sequence() -> None:
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    augment = SimCLRBatchAugment(SimCLRAugmentation(image_size=16), seed=1)
    first = augment(images)[0]
    augment.manual_seed(1)
    assert torch.equal(augment(images)[0], first)


def test_two_views_differ() -> None:
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    views = SimCLRBatchAugment(SimCLRAugmentation(image_size=16), seed=0)(images)
    assert not torch.equal(views[0], views[1])


# Random resized crop.


def torchvision_crops(
    height: int, width: int, scale: tuple[float, float], count: int
) -> torch.Tensor:
    torch.manual_seed(0)
    crop = T.RandomResizedCrop(OUTPUT_SIZE, scale=scale)
    image = torch.zeros(3, height, width)
    rows = []
    for _ in range(count):
        params = crop.make_params([image])
        rows.append([params["top"], params["left"], params["height"], params["width"]])
    return torch.tensor(rows, dtype=torch.float64)


def test_sample_crops_area_distribution_matches_torchvision() -> None:
    height, width, count = 30, 40, 4000
    reference = torchvision_crops(height, width, (0.08, 1.0), count)
    ours = sample_crops(
        count, height, width, (0.08, 1.0), torch.Generator().manual_seed(0)
    ).double()
    ref_area = reference[:, 2] * reference[:, 3] / (height * width)
    our_area = ours[:, 2] * ours[:, 3] / (height * width)
    assert_means_match(ref_area, our_area, margin=0.0)
    # Quantile standard error is about 0.01 at 4000 draws for a spread of 0.27.
    quantiles = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(ref_area.quantile(quantiles), our_area.quantile(quantiles), atol=0.04)


def test_sample_crops_ratio_and_offsets_match_torchvision() -> None:
    height, width, count = 30, 40, 4000
    reference = torchvision_crops(height, width, (0.08, 1.0), count)
    ours = sample_crops(
        count, height, width, (0.08, 1.0), torch.Generator().manual_seed(0)
    ).double()
    assert_means_match(reference[:, 3] / reference[:, 2], ours[:, 3] / ours[:, 2], margin=0.0)
    assert_means_match(reference[:, 0], ours[:, 0], margin=0.0)
    assert_means_match(reference[:, 1], ours[:, 1], margin=0.0)


def test_sample_crops_stay_inside_image() -> None:
    height, width = 30, 40
    crops = sample_crops(2000, height, width, (0.08, 1.0), torch.Generator().manual_seed(0))
    top, left, crop_h, crop_w = crops.unbind(dim=1)
    assert bool((top >= 0).all())
    assert bool((left >= 0).all())
    assert bool((crop_h >= 1).all())
    assert bool((crop_w >= 1).all())
    assert bool((top + crop_h <= height).all())
    assert bool((left + crop_w <= width).all())


def test_sample_crops_scale_range_respected() -> None:
    crops = sample_crops(2000, 64, 64, (0.5, 0.6), torch.Generator().manual_seed(0)).double()
    area = crops[:, 2] * crops[:, 3] / 64**2
    # Rounding the sides to whole pixels moves the area by at most about 2 / 64 of a side.
    assert area.min() >= 0.5 - 0.04
    assert area.max() <= 0.6 + 0.04


def test_sample_crops_fallback_matches_torchvision() -> None:
    # A 4 x 40 strip never fits a full-area crop of ratio in [3/4, 4/3], so every draw falls back.
    reference = torchvision_crops(4, 40, (1.0, 1.0), 1)
    ours = sample_crops(3, 4, 40, (1.0, 1.0), torch.Generator().manual_seed(0)).double()
    # torchvision: height 4, width round(4 * 4 / 3) = 5, centred: top 0, left (40 - 5) // 2 = 17.
    assert reference[0].tolist() == [0.0, 17.0, 4.0, 5.0]
    for row in ours:
        assert row.tolist() == reference[0].tolist()


def test_crop_views_match_lightly() -> None:
    image = make_image()
    augmentation = SimCLRAugmentation(**{**IDENTITY, "min_scale": 0.08})
    assert_view_statistics_match(
        lightly_views(augmentation, image, DRAWS), batch_views(augmentation, image, DRAWS)
    )


@pytest.mark.parametrize("crop", [(3, 5, 12, 16), (0, 0, 32, 32), (2, 1, 30, 27), (20, 10, 5, 9)])
def test_resized_crop_matches_torchvision(crop: tuple[int, int, int, int]) -> None:
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    augment = SimCLRBatchAugment(SimCLRAugmentation(**IDENTITY))
    params = augment.sample_params(1, 32, 32)
    params.crops = torch.tensor([crop])
    ours = unnormalize(augment.build_views(images, params, torch.tensor([0])))
    expected = TF.resized_crop(
        images.float() / 255, *crop, [OUTPUT_SIZE, OUTPUT_SIZE], antialias=True
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("input_size", "crops"),
    [
        # Shrunk and enlarged crops of 24-pixel images.
        (24, [(0, 0, 24, 24), (0, 2, 22, 20), (1, 2, 10, 12), (4, 4, 20, 10)]),
        # Whole 16-pixel images, copied, next to enlarged crops.
        (16, [(0, 0, 16, 16), (2, 3, 8, 10), (0, 0, 16, 16), (5, 0, 11, 16)]),
    ],
)
def test_resized_crop_mixed_batch_matches_torchvision(
    input_size: int, crops: list[tuple[int, int, int, int]]
) -> None:
    images = torch.randint(0, 256, (2, 3, input_size, input_size), dtype=torch.uint8)
    augment = SimCLRBatchAugment(SimCLRAugmentation(**{**IDENTITY, "image_size": 16}))
    params = augment.sample_params(4, input_size, input_size)
    params.crops = torch.tensor(crops)
    source = torch.tensor([0, 1, 0, 1])
    ours = unnormalize(augment.build_views(images, params, source))
    for i, crop in enumerate(crops):
        expected = TF.resized_crop(images[source[i]].float() / 255, *crop, [16, 16], antialias=True)
        torch.testing.assert_close(ours[i], expected, atol=1e-5, rtol=0)


def test_resized_crop_shrink_matches_pillow() -> None:
    image = make_image(40)
    top, left, height, width = 2, 3, 36, 30
    # torchvision's PIL path crops first, then resizes the crop alone.
    cropped = Image.fromarray(image).crop((left, top, left + width, top + height))
    expected = np.asarray(cropped.resize((16, 16), Image.BILINEAR))
    augment = SimCLRBatchAugment(SimCLRAugmentation(**{**IDENTITY, "image_size": 16}))
    params = augment.sample_params(1, 40, 40)
    params.crops = torch.tensor([[top, left, height, width]])
    ours = unnormalize(augment.build_views(as_batch(image, 1), params, torch.tensor([0])))[0] * 255
    difference = np.abs(ours.permute(1, 2, 0).numpy() - expected)
    # Pillow rounds its two passes to uint8.
    assert difference.max() <= 1.5


# Flip and grayscale rates.


def test_flip_rate_matches_probability() -> None:
    count, prob = 2000, 0.3
    images = as_batch(make_image(OUTPUT_SIZE), count)
    augment = SimCLRBatchAugment(SimCLRAugmentation(**{**IDENTITY, "hflip_prob": prob}), seed=0)
    views = augment(images)[0]
    plain = SimCLRBatchAugment(SimCLRAugmentation(**IDENTITY))(images[:1])[0]
    flipped = torch.isclose(views, plain.flip(-1)).flatten(1).all(dim=1)
    unflipped = torch.isclose(views, plain).flatten(1).all(dim=1)
    assert bool((flipped ^ unflipped).all())
    # Binomial standard error sqrt(0.3 * 0.7 / 2000) = 0.0102.
    assert abs(flipped.double().mean().item() - prob) <= 4 * 0.0102


def test_grayscale_rate_matches_probability() -> None:
    count, prob = 2000, 0.2
    images = as_batch(make_image(OUTPUT_SIZE), count)
    augment = SimCLRBatchAugment(SimCLRAugmentation(**{**IDENTITY, "gray_prob": prob}), seed=0)
    views = unnormalize(augment(images)[0])
    is_gray = (views.amax(dim=1) - views.amin(dim=1)).flatten(1).amax(dim=1) < 1e-5
    # Binomial standard error sqrt(0.2 * 0.8 / 2000) = 0.0089.
    assert abs(is_gray.double().mean().item() - prob) <= 4 * 0.0089


def test_grayscale_uses_torchvision_luma() -> None:
    images = as_batch(make_image(OUTPUT_SIZE), 1)
    augment = SimCLRBatchAugment(SimCLRAugmentation(**{**IDENTITY, "gray_prob": 1.0}))
    ours = unnormalize(augment(images)[0])
    expected = TF.rgb_to_grayscale(images.float() / 255, num_output_channels=3)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_grayscale_views_match_lightly() -> None:
    image = make_image()
    augmentation = SimCLRAugmentation(**{**IDENTITY, "gray_prob": 0.5})
    reference = lightly_views(augmentation, image, DRAWS)
    ours = batch_views(augmentation, image, DRAWS)
    channel_spread = lambda v: unnormalize(v).std(dim=1).mean(dim=(1, 2))  # noqa: E731
    assert_means_match(channel_spread(reference), channel_spread(ours), margin=0.01)


# Colour jitter.


def test_jitter_factor_ranges_match_torchvision() -> None:
    augmentation = SimCLRAugmentation(image_size=16, cj_strength=0.5)
    params = SimCLRBatchAugment(augmentation, seed=0).sample_params(5000, 20, 20)
    factors = params.jitter_factors
    # Strength 0.5: brightness, contrast and saturation in [0.6, 1.4], hue in [-0.1, 0.1].
    bounds = {
        BRIGHTNESS: (0.6, 1.4),
        CONTRAST: (0.6, 1.4),
        SATURATION: (0.6, 1.4),
        HUE: (-0.1, 0.1),
    }
    for column, (low, high) in bounds.items():
        assert factors[:, column].min() >= low
        assert factors[:, column].max() <= high
        # 5000 uniform draws come within 0.2 % of the range of each end.
        assert factors[:, column].min() <= low + 0.002 * (high - low)
        assert factors[:, column].max() >= high - 0.002 * (high - low)
        # Uniform: the mean of 5000 draws is within 4 * range / sqrt(12 * 5000) of the centre.
        centre = (low + high) / 2
        assert abs(factors[:, column].mean().item() - centre) <= 4 * (high - low) / math.sqrt(60000)


def test_jitter_brightness_floor_at_zero() -> None:
    augment = SimCLRBatchAugment(SimCLRAugmentation(image_size=32, cj_bright=1.5), seed=0)
    params = augment.sample_params(2000, 8, 8)
    # torchvision clips the low end of 1 - 1.5 to 0.
    assert params.jitter_factors[:, BRIGHTNESS].min() >= 0.0
    assert params.jitter_factors[:, BRIGHTNESS].min() <= 0.01


def test_jitter_probability_and_order() -> None:
    augment = SimCLRBatchAugment(SimCLRAugmentation(image_size=32, cj_prob=0.8), seed=0)
    params = augment.sample_params(4000, 8, 8)
    # Binomial standard error sqrt(0.8 * 0.2 / 4000) = 0.0063.
    assert abs(params.jitter.double().mean().item() - 0.8) <= 4 * 0.0063
    assert bool((params.jitter_order.sort(dim=1).values == torch.arange(4)).all())
    # Each operation comes first in a quarter of the views, standard error 0.0068.
    for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
        share = (params.jitter_order[:, 0] == op).double().mean().item()
        assert abs(share - 0.25) <= 4 * 0.0068


@pytest.mark.parametrize(
    ("ours", "reference", "factors"),
    [
        (adjust_brightness, TF.adjust_brightness, [0.0, 0.3, 1.0, 1.8]),
        (adjust_contrast, TF.adjust_contrast, [0.0, 0.3, 1.0, 1.8]),
        (adjust_saturation, TF.adjust_saturation, [0.0, 0.3, 1.0, 1.8]),
        (adjust_hue, TF.adjust_hue, [-0.5, -0.2, 0.0, 0.45]),
    ],
)
def test_jitter_op_matches_torchvision(
    ours: JitterOp, reference: Callable[[torch.Tensor, float], torch.Tensor], factors: list[float]
) -> None:
    views = torch.rand(len(factors), 3, 9, 11, generator=torch.Generator().manual_seed(0))
    result = ours(views, torch.tensor(factors))
    for i, factor in enumerate(factors):
        torch.testing.assert_close(result[i], reference(views[i], factor), atol=2e-6, rtol=0)


def test_adjust_hue_ties_match_torchvision() -> None:
    # Four levels per channel give many pixels with two equal largest channels, and gray pixels.
    generator = torch.Generator().manual_seed(0)
    views = torch.randint(0, 4, (4, 3, 8, 8), generator=generator).float() / 3
    shifts = [-0.4, -0.1, 0.15, 0.5]
    result = adjust_hue(views, torch.tensor(shifts))
    for i, shift in enumerate(shifts):
        torch.testing.assert_close(result[i], TF.adjust_hue(views[i], shift), atol=2e-6, rtol=0)


def test_color_jitter_follows_each_order() -> None:
    views = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
    factors = torch.tensor([[1.5, 0.5, 1.7, 0.1], [0.7, 1.6, 0.2, -0.3], [1.2, 1.9, 0.4, 0.25]])
    mask = torch.tensor([True, True, False])
    result = color_jitter(views, mask, orders, factors)
    reference_ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(2):
        expected = views[i]
        for op in orders[i].tolist():
            expected = reference_ops[op](expected, float(factors[i, op]))
        torch.testing.assert_close(result[i], expected, atol=2e-6, rtol=0)
    assert torch.equal(result[2], views[2])


def test_jitter_views_match_lightly() -> None:
    image = make_image()
    augmentation = SimCLRAugmentation(**{**IDENTITY, "cj_prob": 0.8})
    assert_view_statistics_match(
        lightly_views(augmentation, image, DRAWS), batch_views(augmentation, image, DRAWS)
    )


# Gaussian blur.


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.37, 2.0])
def test_gaussian_blur_matches_pillow(sigma: float) -> None:
    image = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    expected = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))
    views = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float()
    blurred = gaussian_blur(views, torch.tensor([True]), torch.tensor([sigma]), max_sigma=2.0)
    difference = (blurred[0].permute(1, 2, 0).numpy() - expected.astype(np.float64)).__abs__()
    # Pillow rounds to uint8 after each of its six passes, so pixels differ by up to 3 levels.
    assert difference.max() <= 3.0
    assert difference.mean() <= 1.1


def test_gaussian_blur_leaves_unselected_views() -> None:
    views = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(views, torch.tensor([False, True]), torch.tensor([1.0, 1.0]), 2.0)
    assert torch.equal(blurred[0], views[0])
    assert not torch.equal(blurred[1], views[1])


def test_gaussian_blur_keeps_constant_image() -> None:
    views = torch.full((1, 3, 10, 10), 0.25)
    blurred = gaussian_blur(views, torch.tensor([True]), torch.tensor([2.0]), 2.0)
    torch.testing.assert_close(blurred, views, atol=1e-6, rtol=0)


def test_blur_probability_and_sigma_range() -> None:
    augmentation = SimCLRAugmentation(image_size=32, blur_prob=0.5, blur_sigma=(0.1, 2.0))
    params = SimCLRBatchAugment(augmentation, seed=0).sample_params(4000, 8, 8)
    # Binomial standard error sqrt(0.25 / 4000) = 0.0079.
    assert abs(params.blur.double().mean().item() - 0.5) <= 4 * 0.0079
    assert params.blur_sigma.min() >= 0.1
    assert params.blur_sigma.max() <= 2.0
    assert abs(params.blur_sigma.mean().item() - 1.05) <= 4 * 1.9 / math.sqrt(12 * 4000)


def test_blur_views_match_lightly() -> None:
    image = make_image()
    augmentation = SimCLRAugmentation(**{**IDENTITY, "blur_prob": 1.0})
    assert_view_statistics_match(
        lightly_views(augmentation, image, DRAWS), batch_views(augmentation, image, DRAWS)
    )


# The whole pipeline.


def test_default_views_match_lightly() -> None:
    image = make_image()
    augmentation = SimCLRAugmentation(image_size=OUTPUT_SIZE)
    assert_view_statistics_match(
        lightly_views(augmentation, image, DRAWS), batch_views(augmentation, image, DRAWS)
    )


def test_cifar_views_match_lightly() -> None:
    image = make_image()
    augmentation = SimCLRAugmentation.cifar10(image_size=OUTPUT_SIZE)
    assert_view_statistics_match(
        lightly_views(augmentation, image, DRAWS), batch_views(augmentation, image, DRAWS)
    )


# uint8 data path.


def test_to_uint8_tensor_from_pil() -> None:
    image = make_image(12)
    tensor = to_uint8_tensor(Image.fromarray(image).convert("RGBA"))
    assert tensor.shape == (3, 12, 12)
    assert tensor.dtype == torch.uint8
    assert torch.equal(tensor, torch.from_numpy(image).permute(2, 0, 1))


def test_to_uint8_tensor_rejects_float_array() -> None:
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        to_uint8_tensor(np.zeros((12, 12, 3), dtype=np.float32))


def test_uint8_dataset_from_memmap(tmp_path: Path) -> None:
    path = tmp_path / "images.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(6, 12, 12, 3))
    array[:] = np.stack([make_image(12, seed) for seed in range(6)])
    array.flush()
    dataset = UInt8ImageDataset(np.load(path, mmap_mode="r"), targets=[0, 1, 2, 0, 1, 2])
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 12, 12)
    assert batch["image"].dtype == torch.uint8
    assert batch["target"].tolist() == [0, 1, 2, 0]
    assert torch.equal(batch["image"][1], torch.from_numpy(make_image(12, 1)).permute(2, 0, 1))


def test_uint8_dataset_unlabeled_targets() -> None:
    dataset = UInt8ImageDataset(np.zeros((3, 8, 8, 3), dtype=np.uint8))
    assert [int(dataset[i]["target"]) for i in range(3)] == [-1, -1, -1]


def test_uint8_dataset_from_image_source() -> None:
    class Source:
        def __len__(self) -> int:
            return 2

        def load(self, i: int) -> Image.Image:
            return Image.fromarray(make_image(10, i))

    item = UInt8ImageDataset(Source())[1]
    assert torch.equal(item["image"], torch.from_numpy(make_image(10, 1)).permute(2, 0, 1))


def test_uint8_dataset_from_prepared_cache(tmp_path: Path) -> None:
    paths = []
    for seed in range(3):
        path = tmp_path / f"{seed}.png"
        Image.fromarray(make_image(12, seed)).save(path)
        paths.append(str(path))
    cache_dir = prepare_cache(FaceIndex(paths, source=0), tmp_path / "cache", 12, 0, progress=False)
    dataset = UInt8ImageDataset(CachedImages(PreparedCache.open(cache_dir)))
    assert torch.equal(dataset[2]["image"], torch.from_numpy(make_image(12, 2)).permute(2, 0, 1))


def test_uint8_dataset_rejects_target_count() -> None:
    with pytest.raises(ValueError, match="targets has 2 entries but there are 3 images"):
        UInt8ImageDataset(np.zeros((3, 8, 8, 3), dtype=np.uint8), targets=[0, 1])


def test_augment_batch_replaces_image_with_views() -> None:
    dataset = UInt8ImageDataset(np.stack([make_image(20, seed) for seed in range(4)]), [0, 1, 0, 1])
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    augmented = SimCLRBatchAugment(SimCLRAugmentation(image_size=16), seed=0).augment_batch(batch)
    assert "image" not in augmented
    assert [tuple(view.shape) for view in augmented["views"]] == [(4, 3, 16, 16)] * 2
    assert torch.equal(augmented["target"], torch.tensor([0, 1, 0, 1]))


def test_augment_batch_rejects_missing_image() -> None:
    augment = SimCLRBatchAugment(SimCLRAugmentation(image_size=16))
    with pytest.raises(KeyError, match="no 'image' entry"):
        augment.augment_batch({"views": [], "target": torch.zeros(2)})


# The GPU benchmark script.


def load_gpu_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import benchmarks/gpu_bench.py, undoing its sys.path change after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look up their module in sys.modules while the module runs.
    monkeypatch.setitem(sys.modules, "gpu_bench", module)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_without_cuda_exits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu_bench = load_gpu_bench(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main([]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_bench_dry_run_writes_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_bench = load_gpu_bench(monkeypatch)
    report = tmp_path / "benchmarks.md"
    assert gpu_bench.main(["--dry-run", "--report", str(report)]) == 0
    text = report.read_text()
    assert "## GPU pretraining throughput and memory" in text
    for run in ("model only", "CPU augmentation", "GPU augmentation"):
        assert f"| {run} |" in text
    assert "Largest ResNet that fits: resnet18." in text
