"""Augmentation settings and the transforms built from them.

All SimCLR augmentation parameters live in :class:`SimCLRAugmentation`, so the CPU transform
(lightly's ``SimCLRTransform``) and the batched GPU transform are built from one definition.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from lightly.transforms import SimCLRTransform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torchvision.transforms import v2 as T

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_NORMALIZE["mean"])  # type: ignore[assignment]
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_NORMALIZE["std"])  # type: ignore[assignment]


# torchvision's RandomResizedCrop defaults, which lightly's SimCLRTransform keeps.
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10


def fallback_crop(height: int, width: int) -> tuple[int, int, int, int]:
    """Return torchvision's fallback crop ``(top, left, height, width)``."""
    in_ratio = width / height
    if in_ratio < min(CROP_RATIO):
        crop_w = width
        crop_h = int(round(crop_w / min(CROP_RATIO)))
    elif in_ratio > max(CROP_RATIO):
        crop_h = height
        crop_w = int(round(crop_h * max(CROP_RATIO)))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


@dataclass(frozen=True)
class SimCLRAugmentation:
    """SimCLR augmentation parameters, with the defaults of the SimCLR paper (Chen et al. 2020,
    appendix A) as lightly implements them.

    Attributes:
        image_size: Side of the square output views, in pixels. ``None`` takes the image size of
            the datamodule that receives these settings, so a config that changes one field
            keeps the datamodule's size.
        min_scale: Smallest area fraction kept by the random resized crop.
        cj_prob: Probability of applying colour jitter.
        cj_strength: Multiplier on the four jitter amounts below. The SimCLR paper uses 1.0 on
            ImageNet and 0.5 on CIFAR-10.
        cj_bright: Brightness jitter before scaling by ``cj_strength``.
        cj_contrast: Contrast jitter before scaling by ``cj_strength``.
        cj_sat: Saturation jitter before scaling by ``cj_strength``.
        cj_hue: Hue jitter before scaling by ``cj_strength``.
        gray_prob: Probability of converting a view to grayscale.
        blur_prob: Probability of Gaussian blur. The SimCLR paper turns blur off for 32-pixel
            CIFAR images, where it removes most of the signal.
        blur_sigma: Range of the blur's standard deviation, in pixels at ``image_size``.
        hflip_prob: Probability of a horizontal flip.
    """

    image_size: int | None = None
    min_scale: float = 0.08
    cj_prob: float = 0.8
    cj_strength: float = 1.0
    cj_bright: float = 0.8
    cj_contrast: float = 0.8
    cj_sat: float = 0.8
    cj_hue: float = 0.2
    gray_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    hflip_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}.")
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {self.min_scale}.")
        for name in ("cj_prob", "gray_prob", "blur_prob", "hflip_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability and must be in [0, 1], got {value}.")
        low, high = self.blur_sigma
        if not 0.0 < low <= high:
            raise ValueError(
                f"blur_sigma must be (low, high) with 0 < low <= high, got {self.blur_sigma}."
            )

    @classmethod
    def cifar10(cls, image_size: int | None = None) -> SimCLRAugmentation:
        """Return the SimCLR paper's CIFAR-10 settings: no blur and colour-jitter strength 0.5."""
        return cls(image_size=image_size, cj_strength=0.5, blur_prob=0.0)

    def replace(self, **changes: object) -> SimCLRAugmentation:
        """Return a copy with the given fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def for_size(self, image_size: int) -> SimCLRAugmentation:
        """Return these settings with ``image_size`` filled in.

        Raises:
            ValueError: ``self.image_size`` is set to another size.
        """
        if self.image_size is None:
            return self.replace(image_size=image_size)
        if self.image_size != image_size:
            raise ValueError(
                f"augmentation.image_size is {self.image_size} but the datamodule's image_size "
                f"is {image_size}; leave augmentation.image_size unset or set both to one value."
            )
        return self

    @property
    def size(self) -> int:
        """The view side in pixels.

        Raises:
            ValueError: ``image_size`` is unset; pass the settings to a datamodule or call
                :meth:`for_size` first.
        """
        if self.image_size is None:
            raise ValueError(
                "SimCLRAugmentation.image_size is None, so the view size is unknown; set it, or "
                "pass the settings to a datamodule, which fills in its own image_size."
            )
        return self.image_size


def build_simclr_transform(augmentation: SimCLRAugmentation) -> SimCLRTransform:
    """Build lightly's two-view ``SimCLRTransform`` from ``augmentation``."""
    return SimCLRTransform(
        input_size=augmentation.size,
        cj_prob=augmentation.cj_prob,
        cj_strength=augmentation.cj_strength,
        cj_bright=augmentation.cj_bright,
        cj_contrast=augmentation.cj_contrast,
        cj_sat=augmentation.cj_sat,
        cj_hue=augmentation.cj_hue,
        min_scale=augmentation.min_scale,
        random_gray_scale=augmentation.gray_prob,
        gaussian_blur=augmentation.blur_prob,
        sigmas=augmentation.blur_sigma,
        hf_prob=augmentation.hflip_prob,
        normalize=IMAGENET_NORMALIZE,
    )


def build_eval_transform(image_size: int) -> T.Compose:
    """Build the deterministic evaluation transform: resize, centre crop, tensor, normalise."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(image_size, antialias=True),
            T.CenterCrop(image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def build_finetune_transform(image_size: int, min_scale: float = 0.5) -> T.Compose:
    """Build the light training augmentation used for fine-tuning: crop, flip, normalise."""
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )
