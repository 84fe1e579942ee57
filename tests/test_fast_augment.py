"""Tests of FastSimCLRTransform against Pillow, torchvision and lightly's SimCLRTransform."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import UTKFaceTree
from PIL import Image, ImageEnhance, ImageFilter
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import _functional_pil as tv_pil

from simclr_lightning.data.cifar import CIFAR10_CLASSES, CIFAR10DataModule
from simclr_lightning.data.face_datamodule import FaceDataModule
from simclr_lightning.data.fast_augment import (
    BRIGHTNESS,
    CONTRAST,
    SATURATION,
    FastSimCLRTransform,
    ViewParams,
    adjust_hue,
    adjust_saturation,
    build_pretrain_transform,
    color_jitter,
    fallback_crop,
    sample_crop,
)
from simclr_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SimCLRAugmentation,
    build_simclr_transform,
)
from simclr_lightning.models.simclr import SimCLRModule

IDENTITY = SimCLRAugmentation(
    image_size=24, min_scale=1.0, cj_prob=0.0, gray_prob=0.0, blur_prob=0.0, hflip_prob=0.0
)


def smooth_image(size: int = 24, seed: int = 0) -> Image.Image:
    """Return a colourful RGB test image: low-frequency waves plus a little noise."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, size)
    channels = [
        np.sin((2 + c) * np.pi * grid[:, None] + c) * np.cos((1 + c) * np.pi * grid[None, :])
        for c in range(3)
    ]
    pixels = np.stack(channels, axis=-1) * 90 + 128 + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jitter_params(order: tuple[int, ...], **factors: float) -> ViewParams:
    values = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0} | factors
    return ViewParams((0, 0, 1, 1), False, True, order, gray=False, blur_sigma=None, **values)


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


# ------------------------------------------------------------------ output format


def test_call_returns_two_uint8_views() -> None:
    views = FastSimCLRTransform(SimCLRAugmentation(image_size=16), seed=0)(smooth_image(24))
    assert len(views) == 2
    for view in views:
        assert view.dtype == torch.uint8
        assert view.shape == (3, 16, 16)


def test_call_accepts_uint8_array() -> None:
    image = smooth_image(24)
    from_array = FastSimCLRTransform(IDENTITY, seed=0)(np.asarray(image))
    from_pil = FastSimCLRTransform(IDENTITY, seed=0)(image)
    assert torch.equal(from_array[0], from_pil[0])


def test_call_rejects_float_array() -> None:
    with pytest.raises(ValueError, match="uint8"):
        FastSimCLRTransform(IDENTITY)(np.zeros((8, 8, 3), dtype=np.float32))


def test_init_rejects_hue_above_half() -> None:
    with pytest.raises(ValueError, match="hue jitter"):
        FastSimCLRTransform(SimCLRAugmentation(cj_hue=0.6))


def test_init_rejects_negative_jitter() -> None:
    with pytest.raises(ValueError, match="brightness jitter"):
        FastSimCLRTransform(SimCLRAugmentation(cj_bright=-0.1))


# ------------------------------------------------------------------ identity and seeds


def test_identity_settings_reproduce_input() -> None:
    image = smooth_image(24)
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    for view in FastSimCLRTransform(IDENTITY, seed=0)(image):
        assert torch.equal(view, expected)


def test_seed_repeats_views() -> None:
    aug = SimCLRAugmentation(image_size=16)
    first = FastSimCLRTransform(aug, seed=3)(smooth_image())
    second = FastSimCLRTransform(aug, seed=3)(smooth_image())
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])


def test_different_seeds_differ() -> None:
    aug = SimCLRAugmentation(image_size=16)
    first = FastSimCLRTransform(aug, seed=3)(smooth_image())
    second = FastSimCLRTransform(aug, seed=4)(smooth_image())
    assert not torch.equal(first[0], second[0])


def test_unseeded_follows_torch_seed() -> None:
    aug = SimCLRAugmentation(image_size=16)
    torch.manual_seed(11)
    first = FastSimCLRTransform(aug)(smooth_image())
    torch.manual_seed(11)
    second = FastSimCLRTransform(aug)(smooth_image())
    assert torch.equal(first[0], second[0])


# ------------------------------------------------------------------ parameter distributions


def test_sample_crop_area_matches_torchvision() -> None:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    image = torch.zeros(3, 40, 60)
    ours, theirs = [], []
    for _ in range(4000):
        _, _, h, w = sample_crop(rng, 40, 60, (0.08, 1.0))
        ours.append(h * w / 2400)
        _, _, h, w = RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        theirs.append(h * w / 2400)
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    # With 4000 draws, each quantile's standard error is below 0.01.
    difference = np.abs(np.quantile(ours, quantiles) - np.quantile(theirs, quantiles))
    assert difference.max() < 0.04


def test_sample_crop_ratio_in_range() -> None:
    rng = np.random.default_rng(1)
    for _ in range(2000):
        top, left, h, w = sample_crop(rng, 50, 50, (0.08, 1.0))
        assert top + h <= 50
        assert left + w <= 50
        # Rounding the sides to whole pixels can push the ratio past the range by one pixel.
        assert 3 / 4 - 1 / h - 1 / w <= w / h <= 4 / 3 + 1 / h + 1 / w


def test_fallback_crop_matches_torchvision() -> None:
    torch.manual_seed(0)
    image = torch.zeros(3, 10, 100)
    # A scale range no box can reach forces torchvision into its fallback.
    expected = RandomResizedCrop.get_params(image, [50.0, 60.0], [3 / 4, 4 / 3])
    assert fallback_crop(10, 100) == tuple(expected)


def test_sample_params_rates_match_probabilities() -> None:
    aug = SimCLRAugmentation(
        image_size=32, hflip_prob=0.5, cj_prob=0.8, gray_prob=0.2, blur_prob=0.5
    )
    transform = FastSimCLRTransform(aug, seed=0)
    params = [transform.sample_params(32, 32) for _ in range(5000)]
    # Binomial standard error at n = 5000 is at most 0.0071, so 0.03 is over 4 of them.
    assert abs(np.mean([p.flip for p in params]) - 0.5) < 0.03
    assert abs(np.mean([p.jitter for p in params]) - 0.8) < 0.03
    assert abs(np.mean([p.gray for p in params]) - 0.2) < 0.03
    assert abs(np.mean([p.blur_sigma is not None for p in params]) - 0.5) < 0.03


def test_sample_params_factor_ranges() -> None:
    aug = SimCLRAugmentation(image_size=32, cj_strength=0.5, blur_sigma=(0.1, 2.0))
    transform = FastSimCLRTransform(aug, seed=0)
    params = [transform.sample_params(32, 32) for _ in range(3000)]
    brightness = np.array([p.brightness for p in params])
    hue = np.array([p.hue for p in params])
    sigma = np.array([p.blur_sigma for p in params if p.blur_sigma is not None])
    # torchvision draws brightness in [1 - 0.4, 1 + 0.4] and hue in [-0.1, 0.1] at strength 0.5.
    assert brightness.min() >= 0.6
    assert brightness.max() <= 1.4
    assert abs(brightness.mean() - 1.0) < 0.02
    assert hue.min() >= -0.1
    assert hue.max() <= 0.1
    assert sigma.min() >= 0.1
    assert sigma.max() <= 2.0
    assert abs(sigma.mean() - 1.05) < 0.03


def test_sample_params_orders_are_permutations() -> None:
    transform = FastSimCLRTransform(SimCLRAugmentation(image_size=32), seed=0)
    orders = [transform.sample_params(32, 32).jitter_order for _ in range(2400)]
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)
    first = np.bincount([order[0] for order in orders], minlength=4) / len(orders)
    # Each operation comes first with probability 1/4; standard error 0.009.
    assert np.abs(first - 0.25).max() < 0.04


# ------------------------------------------------------------------ pixel operations


@pytest.mark.parametrize("factor", [0.0, 0.35, 1.0, 1.7])
def test_brightness_matches_pillow(factor: float) -> None:
    image = smooth_image()
    ours = color_jitter(image, jitter_params((BRIGHTNESS,), brightness=factor))
    expected = ImageEnhance.Brightness(image).enhance(factor)
    assert np.array_equal(as_array(ours), as_array(expected))


@pytest.mark.parametrize("factor", [0.2, 1.0, 1.8])
def test_contrast_within_one_level_of_pillow(factor: float) -> None:
    image = smooth_image()
    ours = color_jitter(image, jitter_params((CONTRAST,), contrast=factor))
    expected = ImageEnhance.Contrast(image).enhance(factor)
    # The mean grey level can differ by one, which moves each value by at most |1 - factor|.
    assert np.abs(as_array(ours) - as_array(expected)).max() <= 1


def test_fused_brightness_contrast_matches_pillow_chain() -> None:
    image = smooth_image()
    params = jitter_params((BRIGHTNESS, CONTRAST), brightness=1.3, contrast=0.6)
    ours = color_jitter(image, params)
    expected = ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(1.3)).enhance(0.6)
    assert np.abs(as_array(ours) - as_array(expected)).max() <= 1


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.6])
def test_saturation_matches_pillow(factor: float) -> None:
    image = smooth_image()
    expected = ImageEnhance.Color(image).enhance(factor)
    assert np.array_equal(as_array(adjust_saturation(image, factor)), as_array(expected))


@pytest.mark.parametrize("shift", [-0.2, -0.05, 0.0, 0.13, 0.2])
def test_hue_matches_torchvision(shift: float) -> None:
    image = smooth_image()
    expected = tv_pil.adjust_hue(image, shift)
    assert np.array_equal(as_array(adjust_hue(image, shift)), as_array(expected))


def test_jitter_order_is_respected() -> None:
    image = smooth_image()
    params = jitter_params((SATURATION, BRIGHTNESS), saturation=0.0, brightness=1.5)
    ours = color_jitter(image, params)
    expected = ImageEnhance.Brightness(ImageEnhance.Color(image).enhance(0.0)).enhance(1.5)
    assert np.array_equal(as_array(ours), as_array(expected))


def test_apply_matches_pillow_crop_flip_blur() -> None:
    image = smooth_image(32)
    transform = FastSimCLRTransform(SimCLRAugmentation(image_size=16))
    params = ViewParams((4, 6, 20, 18), True, False, (0, 1, 2, 3), 1, 1, 1, 0, True, 1.2)
    ours = transform.apply(image, params)
    expected = (
        image.crop((6, 4, 24, 24))
        .resize((16, 16), Image.Resampling.BILINEAR)
        .transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        .convert("L")
        .convert("RGB")
        .filter(ImageFilter.GaussianBlur(radius=1.2))
    )
    # Resizing the box from the whole image lets pixels next to the box into the edge taps.
    difference = np.abs(as_array(ours) - as_array(expected))
    assert difference.mean() < 1.0
    assert difference.max() <= 24


# ------------------------------------------------------------------ against lightly


def lightly_uint8_statistics(views: list[torch.Tensor]) -> np.ndarray:
    """Return per-channel mean and std in 0..255 of normalised float views from lightly."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = torch.stack([view * std + mean for view in views]) * 255
    return np.stack([pixels.mean(dim=(0, 2, 3)).numpy(), pixels.std(dim=(0, 2, 3)).numpy()])


def fast_uint8_statistics(views: list[torch.Tensor]) -> np.ndarray:
    pixels = torch.stack(views).float()
    return np.stack([pixels.mean(dim=(0, 2, 3)).numpy(), pixels.std(dim=(0, 2, 3)).numpy()])


@pytest.mark.parametrize(
    "augmentation",
    [SimCLRAugmentation(image_size=16), SimCLRAugmentation.cifar10(image_size=16)],
    ids=["faces", "cifar10"],
)
def test_pixel_statistics_match_lightly(augmentation: SimCLRAugmentation) -> None:
    images = [smooth_image(24, seed) for seed in range(6)]
    torch.manual_seed(0)
    np.random.seed(0)
    lightly = build_simclr_transform(augmentation)
    fast = FastSimCLRTransform(augmentation, seed=0)
    lightly_views, fast_views = [], []
    for _ in range(100):
        for image in images:
            lightly_views += lightly(image)
            fast_views += fast(image)
    ours = fast_uint8_statistics(fast_views)
    theirs = lightly_uint8_statistics(lightly_views)
    # 1200 views per transform; channel means vary by about 1 grey level between seeds.
    assert np.abs(ours[0] - theirs[0]).max() < 3.0
    assert np.abs(ours[1] - theirs[1]).max() < 3.0
    assert math.isfinite(float(ours.sum()))


# ------------------------------------------------------------------ wiring into the library


def test_build_pretrain_transform_selects_fast() -> None:
    transform = build_pretrain_transform(SimCLRAugmentation(image_size=16), "fast")
    assert isinstance(transform, FastSimCLRTransform)


def test_build_pretrain_transform_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="cpu_augment must be"):
        build_pretrain_transform(SimCLRAugmentation(image_size=16), "torchvision")  # type: ignore[arg-type]


def test_face_datamodule_fast_yields_uint8_views(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    datamodule = FaceDataModule(
        utkface_root=str(utkface_tree.root),
        image_size=16,
        batch_size=4,
        num_workers=0,
        pin_memory=False,
        online_eval=False,
        index_dir=str(tmp_path / "index"),
        cpu_augment="fast",
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    for view in batch["views"]:
        assert view.dtype == torch.uint8
        assert view.shape == (4, 3, 16, 16)


def test_face_datamodule_rejects_unknown_cpu_augment(utkface_tree: UTKFaceTree) -> None:
    with pytest.raises(ValueError, match="cpu_augment must be"):
        FaceDataModule(utkface_root=str(utkface_tree.root), cpu_augment="pil")  # type: ignore[arg-type]


def test_cifar_datamodule_fast_yields_uint8_views(tmp_path: Path) -> None:
    for label, name in enumerate(CIFAR10_CLASSES):
        for split in ("train", "test"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            pixels = np.full((32, 32, 3), label * 20, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "0000.png")
    datamodule = CIFAR10DataModule(
        str(tmp_path), batch_size=4, num_workers=0, online_eval=False, cpu_augment="fast"
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["views"][0].dtype == torch.uint8
    assert batch["views"][0].shape == (4, 3, 32, 32)


def test_module_normalizes_uint8_views() -> None:
    module = SimCLRModule(backbone="resnet18", num_classes=0, batch_size_per_device=2)
    views = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    batch = module.on_after_batch_transfer({"views": [views, views], "target": torch.zeros(2)}, 0)
    normalised = batch["views"][0]
    # (value / 255 - mean) / std with the ImageNet mean (0.485, 0.456, 0.406) and std
    # (0.229, 0.224, 0.225).
    expected = torch.tensor([-2.1179039, 0.2051821, 2.64])
    assert normalised.dtype == torch.float32
    torch.testing.assert_close(normalised[0, :, 0, 0], expected, atol=1e-6, rtol=0)


def test_module_keeps_float_views() -> None:
    module = SimCLRModule(backbone="resnet18", num_classes=0, batch_size_per_device=2)
    views = torch.rand(2, 3, 4, 4)
    batch = module.on_after_batch_transfer({"views": [views, views], "target": torch.zeros(2)}, 0)
    assert batch["views"][0] is views


def test_module_rejects_health_every_zero() -> None:
    with pytest.raises(ValueError, match="health_every_n_steps"):
        SimCLRModule(backbone="resnet18", num_classes=0, health_every_n_steps=0)


# ------------------------------------------------------------------ view size


def test_for_size_fills_an_unset_size() -> None:
    settings = SimCLRAugmentation(cj_hue=0.0)
    filled = settings.for_size(40)
    assert (filled.image_size, filled.cj_hue) == (40, 0.0)
    assert settings.image_size is None
    assert IDENTITY.for_size(24) is IDENTITY


def test_for_size_rejects_another_size() -> None:
    with pytest.raises(ValueError, match="augmentation.image_size is 24 but"):
        IDENTITY.for_size(32)


def test_unset_size_error_at_construction() -> None:
    with pytest.raises(ValueError, match="image_size is None"):
        build_simclr_transform(SimCLRAugmentation())
    with pytest.raises(ValueError, match="image_size is None"):
        FastSimCLRTransform(SimCLRAugmentation(), seed=0)
