"""Batched SimCLR augmentation that runs on the device holding the images.

:class:`SimCLRBatchAugment` turns a batch of uint8 (or [0, 1] float) images of shape (B, 3, H, W)
into two augmented, normalised views. It draws the same random parameters, from the same
distributions and in the same order of operations, as lightly's ``SimCLRTransform`` (lightly 1.6,
torchvision 0.29 transforms v2), but per sample and for the whole batch at once:

1. random resized crop (scale ``(min_scale, 1)``, aspect ratio ``(3/4, 4/3)``, 10 attempts and
   torchvision's centre-crop fallback), resized to ``image_size`` with antialiased bilinear
   weights,
2. horizontal flip,
3. colour jitter with probability ``cj_prob``: brightness, contrast, saturation and hue in a random
   order per sample, with torchvision's factor ranges and its tensor formulas,
4. random grayscale (ITU-R 601 luma weights, as torchvision uses for tensors),
5. Gaussian blur with probability ``blur_prob`` and sigma uniform in ``blur_sigma``, computed as
   Pillow computes the ``ImageFilter.GaussianBlur`` that lightly calls,
6. ImageNet normalisation.

The DataModule side delivers batches of the form ``{"image": uint8 Tensor(B, 3, S, S), "target":
LongTensor(B)}`` (see :class:`UInt8ImageDataset`), and :meth:`SimCLRBatchAugment.augment_batch`
turns one into the pretraining batch ``{"views": [Tensor(B, 3, s, s)] * 2, "target": ...}`` after
it has been moved to the device.

No step loops over samples. The colour jitter loops over its 4 positions and 4 operations, and the
blur over its 6 passes, a fixed number of batched steps whatever the batch size.

Known difference from lightly's PIL pipeline: every step here works in float32 where Pillow rounds
to uint8 after each step, so pixels differ by a few 1/255 steps.

NOTE: the tests run on the CPU only. The same code has not yet been run on a CUDA device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from simclr_lightning.data.images import ImageSource
from simclr_lightning.data.transforms import (
    CROP_ATTEMPTS,
    CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SimCLRAugmentation,
    fallback_crop,
)

# torchvision's luma weights for float tensors (ITU-R 601-2).
GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)

# Pillow's GaussianBlur runs three extended box filters (Gwosdek et al. 2011, "Theoretical
# Foundations of Gaussian Convolution by Extended Box Filtering"), each with variance sigma**2 / 3.
BLUR_PASSES = 3

# Column order of the jitter operations in ViewParams.jitter_order, as torchvision's ColorJitter
# numbers them.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclass
class ViewParams:
    """Random parameters for a batch of views, one row per view, all on the CPU.

    Attributes:
        crops: (N, 4) int64 rows of ``top, left, height, width`` in input pixels.
        flip: (N,) bool, whether the view is flipped horizontally.
        jitter: (N,) bool, whether colour jitter is applied.
        jitter_order: (N, 4) int64, each row a permutation of the four jitter operations
            (``BRIGHTNESS, CONTRAST, SATURATION, HUE``), applied left to right.
        jitter_factors: (N, 4) float32 factors in the same column order: brightness, contrast and
            saturation are multiplicative (1 leaves the image unchanged), hue is a shift in turns.
        gray: (N,) bool, whether the view is converted to grayscale.
        blur: (N,) bool, whether the view is blurred.
        blur_sigma: (N,) float32 standard deviations of the blur in output pixels.
    """

    crops: Tensor
    flip: Tensor
    jitter: Tensor
    jitter_order: Tensor
    jitter_factors: Tensor
    gray: Tensor
    blur: Tensor
    blur_sigma: Tensor


def _uniform(
    low: float, high: float, size: Sequence[int], generator: torch.Generator | None
) -> Tensor:
    return low + (high - low) * torch.rand(tuple(size), generator=generator)


def _bernoulli(prob: float, count: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(count, generator=generator) < prob


def sample_crops(
    count: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw random resized crop boxes as torchvision's ``RandomResizedCrop.make_params`` does.

    torchvision tries up to 10 (area, aspect ratio) draws in turn and keeps the first box that
    fits. Here all 10 draws are made for every sample at once and the first fitting one is kept,
    which gives the same distribution. Samples with no fitting draw get torchvision's fallback,
    a centre crop clamped to the ratio range.

    Args:
        count: Number of boxes.
        height: Input image height in pixels.
        width: Input image width in pixels.
        scale: Range of the crop area as a fraction of the image area.
        generator: Random number generator, or ``None`` for torch's global one.

    Returns:
        (count, 4) int64 rows of ``top, left, height, width``.
    """
    area = float(height * width)
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])

    # Ten candidate boxes per sample, in float64 as torchvision does its arithmetic in Python.
    target_area = area * _uniform(scale[0], scale[1], (count, CROP_ATTEMPTS), generator).double()
    aspect = torch.exp(_uniform(log_low, log_high, (count, CROP_ATTEMPTS), generator).double())
    # torch.round rounds half to even, like Python's round() in torchvision.
    crop_w = torch.round(torch.sqrt(target_area * aspect)).long()
    crop_h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)

    # The first fitting attempt of each sample (argmax returns the first maximum).
    first = fits.int().argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    crop_w = crop_w.gather(1, first).squeeze(1)
    crop_h = crop_h.gather(1, first).squeeze(1)

    # Offsets uniform over the integers 0 .. size - crop, as torch.randint(0, size - crop + 1).
    offsets = torch.rand((count, 2), generator=generator).double()
    top = torch.floor(offsets[:, 0] * (height - crop_h + 1)).long()
    left = torch.floor(offsets[:, 1] * (width - crop_w + 1)).long()

    fallback = fallback_crop(height, width)
    top = torch.where(found, top, fallback[0])
    left = torch.where(found, left, fallback[1])
    crop_h = torch.where(found, crop_h, fallback[2])
    crop_w = torch.where(found, crop_w, fallback[3])
    return torch.stack([top, left, crop_h, crop_w], dim=1)


def _jitter_range(amount: float, name: str) -> tuple[float, float]:
    """Return torchvision's ColorJitter factor range for a multiplicative jitter amount."""
    if amount < 0:
        raise ValueError(f"{name} jitter must be non-negative, got {amount}. Use 0 to disable it.")
    return max(0.0, 1.0 - amount), 1.0 + amount


class SimCLRBatchAugment(nn.Module):
    """Two-view SimCLR augmentation of a whole batch on its device.

    Random parameters are drawn on the CPU (a few numbers per view) and copied to the device, so a
    given seed gives the same views on every device. Under DDP, give each rank its own seed, for
    example ``seed + global_rank``. With ``seed=None`` the parameters come from torch's global
    generator, and ``lightning.pytorch.seed_everything`` seeds that with the same value on every
    rank, so ranks then draw the same parameters for different images.

    Args:
        augmentation: Augmentation parameters, shared with the CPU transform.
        seed: Seed of the module's own generator, or ``None`` to use torch's global generator.

    Raises:
        ValueError: If a jitter amount is negative, the hue jitter exceeds 0.5 or
            ``augmentation.image_size`` is unset.

    Example:
        >>> augment = SimCLRBatchAugment(SimCLRAugmentation(image_size=16), seed=0)
        >>> views = augment(torch.zeros(4, 3, 24, 24, dtype=torch.uint8))
        >>> [tuple(view.shape) for view in views]
        [(4, 3, 16, 16), (4, 3, 16, 16)]
    """

    mean: Tensor
    std: Tensor

    def __init__(self, augmentation: SimCLRAugmentation, seed: int | None = None) -> None:
        super().__init__()
        self.augmentation = augmentation
        strength = augmentation.cj_strength
        self.brightness = _jitter_range(strength * augmentation.cj_bright, "brightness")
        self.contrast = _jitter_range(strength * augmentation.cj_contrast, "contrast")
        self.saturation = _jitter_range(strength * augmentation.cj_sat, "saturation")
        hue = strength * augmentation.cj_hue
        if not 0.0 <= hue <= 0.5:
            raise ValueError(
                f"cj_strength * cj_hue must be in [0, 0.5] (a hue shift in turns), got {hue}. "
                "Lower cj_hue or cj_strength."
            )
        self.hue = (-hue, hue)
        self.size = augmentation.size
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        # Non-persistent: they follow .to(device) but stay out of checkpoints.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def manual_seed(self, seed: int) -> None:
        """Seed the module's own generator, creating it if the module used the global one."""
        self.generator = torch.Generator().manual_seed(seed)

    def sample_params(self, count: int, height: int, width: int) -> ViewParams:
        """Draw the random parameters of ``count`` views of ``height`` x ``width`` images."""
        aug = self.augmentation
        gen = self.generator
        crops = sample_crops(count, height, width, (aug.min_scale, 1.0), gen)
        flip = _bernoulli(aug.hflip_prob, count, gen)

        jitter = _bernoulli(aug.cj_prob, count, gen)
        # argsort of i.i.d. uniforms is a uniform random permutation, like torch.randperm(4).
        jitter_order = torch.rand((count, 4), generator=gen).argsort(dim=1)
        ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        factors = [_uniform(low, high, (count,), gen) for low, high in ranges]
        jitter_factors = torch.stack(factors, dim=1)

        gray = _bernoulli(aug.gray_prob, count, gen)
        blur = _bernoulli(aug.blur_prob, count, gen)
        blur_sigma = _uniform(aug.blur_sigma[0], aug.blur_sigma[1], (count,), gen)
        return ViewParams(crops, flip, jitter, jitter_order, jitter_factors, gray, blur, blur_sigma)

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        """Augment a batch into two views.

        Args:
            images: (B, 3, H, W) uint8 in [0, 255], or floating point in [0, 1].

        Returns:
            Two float32 tensors of shape (B, 3, image_size, image_size), normalised with the
            ImageNet mean and standard deviation.
        """
        _check_images(images)
        batch_size, _, height, width = images.shape
        params = self.sample_params(2 * batch_size, height, width)
        # Rows 0..B-1 are the first view of each image, rows B..2B-1 the second.
        source = torch.arange(batch_size).repeat(2)
        views = self.build_views(images, params, source)
        return [views[:batch_size], views[batch_size:]]

    @torch.no_grad()
    def build_views(self, images: Tensor, params: ViewParams, source: Tensor) -> Tensor:
        """Build one view per row of ``params`` from the image ``images[source[row]]``.

        Args:
            images: (B, 3, H, W) uint8 in [0, 255], or floating point in [0, 1].
            params: Parameters from :meth:`sample_params`.
            source: (N,) int64 index into ``images`` for each view.

        Returns:
            (N, 3, image_size, image_size) float32 normalised views.
        """
        _check_images(images)
        device = images.device
        size = self.size
        # The parameters stay on the CPU, where selecting rows needs no device synchronisation.
        # Autocast is off so that the colour maths stays in float32 under bf16-mixed training.
        with _autocast_off(device):
            views = resized_crop(images, params.crops, source, size)
            views = flip_horizontal(views, params.flip)
            views = color_jitter(views, params.jitter, params.jitter_order, params.jitter_factors)
            views = grayscale(views, params.gray)
            views = gaussian_blur(
                views, params.blur, params.blur_sigma, max_sigma=self.augmentation.blur_sigma[1]
            )
            # .to() is a no-op once the module is on the images' device.
            return views.sub(self.mean.to(device)).div(self.std.to(device))

    def augment_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Replace the uint8 ``"image"`` entry of a batch with the two ``"views"``.

        Args:
            batch: A batch with ``"image"`` of shape (B, 3, S, S), as :class:`UInt8ImageDataset`
                yields it after default collation, already on the target device.

        Returns:
            A new dict with the same entries, but ``"views"`` in place of ``"image"``.

        Raises:
            KeyError: If ``batch`` has no ``"image"`` entry.
        """
        if "image" not in batch:
            raise KeyError(
                f"Batch has no 'image' entry to augment (keys: {sorted(batch)}). The GPU "
                "augmentation expects batches from UInt8ImageDataset."
            )
        augmented = {key: value for key, value in batch.items() if key != "image"}
        augmented["views"] = self(batch["image"])
        return augmented


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Return a context with autocast off on ``device``, or a no-op where autocast is unknown."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must have shape (B, 3, H, W), got {tuple(images.shape)}. "
            "Convert (B, H, W, 3) arrays with permute(0, 3, 1, 2)."
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}.")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch. Pass at least one image.")


def resized_crop(images: Tensor, crops: Tensor, source: Tensor, size: int) -> Tensor:
    """Crop boxes from images and resize them to ``size`` x ``size``, as torchvision does.

    The result equals torchvision's ``resized_crop(..., antialias=True)``: cropping first, then
    bilinear resizing with antialiasing. Crops no larger than ``size`` along both axes, the only
    kind when the images are stored at the output size, are enlarged with one ``grid_sample``
    call. Larger crops need the antialiasing filter and go through :func:`_shrink_crops`. Each
    kind is resampled as one batch.

    Args:
        images: (B, 3, H, W) uint8 or float.
        crops: (N, 4) int64 rows of ``top, left, height, width``, best on the CPU.
        source: (N,) int64 index into ``images`` for each crop, on the same device as ``crops``.
        size: Output side in pixels.

    Returns:
        (N, 3, size, size) float32, in [0, 1] for uint8 input.
    """
    device = images.device
    height, width = images.shape[-2:]
    top, left, crop_h, crop_w = crops.unbind(dim=1)
    # Whole images already at the output size are copied, so their pixels stay bit-exact.
    copy = (top == 0) & (left == 0) & (crop_h == height) & (crop_w == width)
    copy &= height == size and width == size
    shrink = ~copy & ((crop_h > size) | (crop_w > size))
    enlarge = ~copy & ~shrink
    resamplers = [(copy, _copy_crops), (shrink, _shrink_crops), (enlarge, _enlarge_crops)]

    views = images.new_empty((len(crops), 3, size, size), dtype=torch.float32)
    for rows, resample in resamplers:
        if bool(rows.all()):
            views = resample(images, crops.to(device), source.to(device), size)
        elif bool(rows.any()):
            index = torch.nonzero(rows).squeeze(1)
            resampled = resample(images, crops[index].to(device), source[index].to(device), size)
            views.index_copy_(0, index.to(device), resampled)
    # Scale after resampling so an untouched pixel equals torchvision's uint8 * (1 / 255) exactly.
    return views.mul_(1.0 / 255.0) if images.dtype == torch.uint8 else views


def _copy_crops(images: Tensor, crops: Tensor, source: Tensor, size: int) -> Tensor:
    """Return the whole source images as float, for crops that cover them at the output size."""
    return images.index_select(0, source).float()


def _enlarge_crops(images: Tensor, crops: Tensor, source: Tensor, size: int) -> Tensor:
    """Resize crops no larger than ``size`` with bilinear sampling clamped to each crop."""
    height, width = images.shape[-2:]
    top, left, crop_h, crop_w = crops.float().unbind(dim=1)
    # Sample positions in input pixel indices (align_corners=False), clamped to the crop so that
    # pixels outside it never contribute, as when cropping first.
    steps = torch.arange(size, device=crops.device) + 0.5
    rows = top[:, None] + steps * (crop_h / size)[:, None] - 0.5
    rows = torch.minimum(rows.clamp(min=0.0).maximum(top[:, None]), (top + crop_h - 1)[:, None])
    columns = left[:, None] + steps * (crop_w / size)[:, None] - 0.5
    columns = torch.minimum(
        columns.clamp(min=0.0).maximum(left[:, None]), (left + crop_w - 1)[:, None]
    )

    # grid_sample takes (x, y) in [-1, 1], where -1 and 1 are the outer edges of the image.
    grid_x = ((columns + 0.5) * (2.0 / width) - 1.0)[:, None, :].expand(-1, size, -1)
    grid_y = ((rows + 0.5) * (2.0 / height) - 1.0)[:, :, None].expand(-1, -1, size)
    grid = torch.stack([grid_x, grid_y], dim=-1)
    pixels = images.index_select(0, source).float()
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _shrink_crops(images: Tensor, crops: Tensor, source: Tensor, size: int) -> Tensor:
    """Resize crops with antialiased bilinear weights, as two batched matrix products.

    Each view is ``A_y @ image @ A_x.T``, with one (size, H) and one (size, W) interpolation matrix
    per view. The matrices hold the weights that torchvision's ``resize(antialias=True)`` and
    Pillow's ``BILINEAR`` resize use. The weights come from a triangle filter, widened by the
    shrink factor when the crop is larger than ``size``. Pixels outside a crop get zero weight and
    the rest are renormalised, so the result equals cropping first and resizing after.
    """
    height, width = images.shape[-2:]
    top, left, crop_h, crop_w = crops.unbind(dim=1)
    rows = _resize_weights(top, crop_h, height, size)
    columns = _resize_weights(left, crop_w, width, size)

    # (N, 1, size, H) @ (N, 3, H, W) @ (N, 1, W, size) -> (N, 3, size, size)
    pixels = images.index_select(0, source).float()
    return rows.unsqueeze(1) @ pixels @ columns.transpose(1, 2).unsqueeze(1)


def _resize_weights(start: Tensor, length: Tensor, input_size: int, size: int) -> Tensor:
    """Build (N, size, input_size) antialiased bilinear weights for crops along one axis."""
    device = start.device
    scale = (length.float() / size).unsqueeze(1)
    support = scale.clamp(min=1.0).unsqueeze(2)
    # Centres of the output pixels in input coordinates, where input pixel i covers [i, i + 1).
    centres = start.float().unsqueeze(1) + (torch.arange(size, device=device) + 0.5) * scale
    pixels = torch.arange(input_size, device=device).float()
    distance = (pixels + 0.5 - centres.unsqueeze(2)) / support
    weights = (1.0 - distance.abs()).clamp_(min=0.0)

    inside = (pixels >= start.unsqueeze(1)) & (pixels < (start + length).unsqueeze(1))
    weights = weights * inside.unsqueeze(1)
    # Every output pixel has a crop pixel within half a pixel of its centre, so no row sums to 0.
    return weights / weights.sum(dim=2, keepdim=True)


def _selected_rows(mask: Tensor, device: torch.device) -> Tensor | None:
    """Return the indices where ``mask`` is true on ``device``, or ``None`` if there are none."""
    rows = torch.nonzero(mask).squeeze(1)
    return rows.to(device) if rows.numel() else None


def flip_horizontal(views: Tensor, mask: Tensor) -> Tensor:
    """Flip the views selected by ``mask`` (N,) left to right."""
    rows = _selected_rows(mask, views.device)
    if rows is None:
        return views
    return views.index_copy(0, rows, views.index_select(0, rows).flip(-1))


def _luma(views: Tensor) -> Tensor:
    """Return the (N, 1, H, W) luma of (N, 3, H, W) views with torchvision's weights."""
    red, green, blue = views.unbind(dim=1)
    luma = red * GRAY_WEIGHTS[0] + green * GRAY_WEIGHTS[1] + blue * GRAY_WEIGHTS[2]
    return luma.unsqueeze(1)


def _blend(views: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """Return ``factor * views + (1 - factor) * other`` clamped to [0, 1], factor per sample."""
    factor = factor.view(-1, 1, 1, 1)
    return (views * factor + other * (1.0 - factor)).clamp_(0.0, 1.0)


def adjust_brightness(views: Tensor, factor: Tensor) -> Tensor:
    """Scale each view by its factor, as torchvision's ``adjust_brightness``."""
    return (views * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(views: Tensor, factor: Tensor) -> Tensor:
    """Blend each view with its mean luma, as torchvision's ``adjust_contrast``."""
    mean = _luma(views).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(views, mean, factor)


def adjust_saturation(views: Tensor, factor: Tensor) -> Tensor:
    """Blend each view with its luma image, as torchvision's ``adjust_saturation``."""
    return _blend(views, _luma(views), factor)


def adjust_hue(views: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of each view by ``shift`` turns, as torchvision's ``adjust_hue``.

    Value (the largest channel) and chroma (largest minus smallest) do not change, so the output
    is computed from them and the shifted hue, without converting to HSV and back.
    """
    red, green, blue = views.unbind(dim=1)
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)

    # Hue in sextants [0, 6). Ties between largest channels go to red, then green, as in
    # torchvision.
    red_max = red == value
    green_max = (green == value) & ~red_max
    numerator = torch.where(red_max, green - blue, torch.where(green_max, blue - red, red - green))
    sector = torch.where(red_max, 0.0, torch.where(green_max, 2.0, 4.0))
    safe_chroma = torch.where(chroma > 0, chroma, 1.0)
    hue = numerator / safe_chroma + sector + 6.0 * shift.view(-1, 1, 1)

    # Channel c is value - chroma * clamp(min(k, 4 - k), 0, 1) with k = (n + hue) mod 6 and
    # n = 5, 3, 1 for red, green and blue. Gray pixels have zero chroma and stay unchanged.
    offsets = torch.tensor([5.0, 3.0, 1.0], device=views.device).view(1, 3, 1, 1)
    k = torch.remainder(hue.unsqueeze(1) + offsets, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * ramp


_JITTER_OPS = {
    BRIGHTNESS: adjust_brightness,
    CONTRAST: adjust_contrast,
    SATURATION: adjust_saturation,
    HUE: adjust_hue,
}


def color_jitter(views: Tensor, mask: Tensor, order: Tensor, factors: Tensor) -> Tensor:
    """Apply the four jitter operations, each sample in its own order, to the selected views.

    At each of the four positions, every operation runs once on the views that have it at that
    position, so the loop has a fixed 16 steps whatever the batch size, and each view goes through
    exactly its four operations.

    Args:
        views: (N, 3, H, W) float in [0, 1].
        mask: (N,) bool, the views to jitter. The others are returned unchanged.
        order: (N, 4) int64 permutations of ``BRIGHTNESS, CONTRAST, SATURATION, HUE``.
        factors: (N, 4) float32 factors in that column order.

    ``mask``, ``order`` and ``factors`` are best kept on the CPU, where selecting rows does not
    wait for the device.

    Returns:
        The jittered views (a new tensor).
    """
    views = views.clone()
    for position in range(4):
        for op, adjust in _JITTER_OPS.items():
            selected = mask & (order[:, position] == op)
            rows = _selected_rows(selected, views.device)
            if rows is None:
                continue
            op_factors = factors[selected, op].to(views.device)
            views.index_copy_(0, rows, adjust(views.index_select(0, rows), op_factors))
    return views


def grayscale(views: Tensor, mask: Tensor) -> Tensor:
    """Replace the views selected by ``mask`` (N,) with their luma on all three channels."""
    rows = _selected_rows(mask, views.device)
    if rows is None:
        return views
    gray = _luma(views.index_select(0, rows)).expand(-1, 3, -1, -1)
    return views.index_copy(0, rows, gray.contiguous())


def _box_radius(sigma: float) -> int:
    """Return the largest tap offset of one extended box pass for a blur of ``sigma`` pixels."""
    variance = sigma * sigma / BLUR_PASSES
    return math.floor((math.sqrt(12.0 * variance + 1.0) - 1.0) / 2.0) + 1


def extended_box_weights(sigma: Tensor, radius: int) -> Tensor:
    """Build the taps of one extended box pass for each sigma, as Pillow's GaussianBlur does.

    One pass is a box of ``2 * l + 1`` taps of weight 1 with one tap of weight ``a`` (0 <= a < 1)
    on each side, chosen so that its variance is ``sigma**2 / 3``. Three passes give variance
    ``sigma**2``.

    Args:
        sigma: (N,) blur standard deviations in pixels.
        radius: Half-width of the returned taps, at least ``_box_radius(sigma.max())``.

    Returns:
        (N, 2 * radius + 1) weights, each row summing to 1.
    """
    variance = sigma.double() ** 2 / BLUR_PASSES
    inner = torch.floor((torch.sqrt(12.0 * variance + 1.0) - 1.0) / 2.0)
    # Solve the variance of the extended box, (2 sum_{k<=l} k^2 + 2 a (l+1)^2) / (2l+1+2a), for a.
    edge = (
        (2 * inner + 1) * (inner * (inner + 1) - 3 * variance) / (6 * (variance - (inner + 1) ** 2))
    )
    offsets = torch.arange(-radius, radius + 1, device=sigma.device).abs().double()
    weights = (offsets <= inner[:, None]).double()
    weights = torch.where(offsets == inner[:, None] + 1, edge[:, None], weights)
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def gaussian_blur(views: Tensor, mask: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
    """Blur the selected views as Pillow's ``ImageFilter.GaussianBlur(radius=sigma)`` does.

    Each view gets three extended box passes along rows, then three along columns, each pass with
    edge pixels repeated, which reproduces Pillow's kernel and border handling. The passes are
    depthwise convolutions with one group per (view, channel), so every view has its own kernel.

    Args:
        views: (N, 3, H, W) float.
        mask: (N,) bool, the views to blur, best on the CPU. The others are returned unchanged.
        sigma: (N,) standard deviations in pixels, on the same device as ``mask``.
        max_sigma: Upper bound of ``sigma``, which fixes the kernel size for every batch.

    Returns:
        The blurred views (a new tensor).
    """
    rows = _selected_rows(mask, views.device)
    if rows is None:
        return views
    radius = _box_radius(max_sigma)
    count = rows.numel()
    channels, height, width = views.shape[1:]
    taps = extended_box_weights(sigma[mask], radius).repeat_interleave(channels, dim=0)
    horizontal = taps.view(count * channels, 1, 1, 2 * radius + 1).to(views)
    vertical = horizontal.view(count * channels, 1, 2 * radius + 1, 1)

    # Fold (views, channels) into channels of one image for a single depthwise convolution.
    blurred = views.index_select(0, rows).reshape(1, count * channels, height, width)
    for _ in range(BLUR_PASSES):
        padded = F.pad(blurred, (radius, radius, 0, 0), mode="replicate")
        blurred = F.conv2d(padded, horizontal, groups=count * channels)
    for _ in range(BLUR_PASSES):
        padded = F.pad(blurred, (0, 0, radius, radius), mode="replicate")
        blurred = F.conv2d(padded, vertical, groups=count * channels)

    return views.index_copy(0, rows, blurred.view(count, channels, height, width))


def to_uint8_tensor(image: PIL.Image.Image | np.ndarray) -> Tensor:
    """Convert a PIL image or an (H, W, 3) uint8 array to a (3, H, W) uint8 tensor.

    Raises:
        ValueError: If an array is not (H, W, 3) uint8.
    """
    if isinstance(image, PIL.Image.Image):
        array = np.asarray(image.convert("RGB"))
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(
                f"Expected an (H, W, 3) uint8 array, got shape {array.shape} and dtype "
                f"{array.dtype}."
            )
    # Copy so the tensor owns its memory (memory-mapped rows are read-only).
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).contiguous()


class UInt8ImageDataset(Dataset[dict[str, Tensor]]):
    """Un-augmented uint8 images for :class:`SimCLRBatchAugment`.

    Each item is ``{"image": uint8 Tensor(3, S, S), "target": int64 scalar}``, so the default
    collate function gives ``{"image": uint8 Tensor(B, 3, S, S), "target": LongTensor(B)}``. The
    augmentation then runs on the device, after the batch transfer.

    Args:
        images: An image source (``__len__`` and ``load(i) -> PIL.Image.Image``) or an
            (N, S, S, 3) uint8 array, memory-mapped or not. Sources with a ``load_array(i)``
            method, such as ``CachedImages``, are read through it, without a PIL image.
        targets: Task label per image, or ``None`` when the images have no labels (target -1).

    Raises:
        ValueError: If ``targets`` has a different length from ``images``.
    """

    def __init__(
        self,
        images: ImageSource | np.ndarray,
        targets: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        self.images = images
        count = len(images)
        if targets is None:
            self.targets = np.full(count, -1, dtype=np.int64)
        else:
            self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.targets) != count:
            raise ValueError(
                f"targets has {len(self.targets)} entries but there are {count} images. Pass one "
                "target per image, or None for unlabeled images."
            )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if isinstance(self.images, np.ndarray):
            image = to_uint8_tensor(self.images[index])
        elif hasattr(self.images, "load_array"):
            image = to_uint8_tensor(self.images.load_array(index))
        else:
            image = to_uint8_tensor(self.images.load(index))
        return {"image": image, "target": torch.tensor(self.targets[index], dtype=torch.int64)}
