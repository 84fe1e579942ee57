"""Image decoding, checking and the image sources that datasets read from.

:func:`load_rgb` converts any Pillow mode to 8-bit RGB, and :func:`center_crop_resize` brings an
image to a square working size without stretching. :func:`inspect_image` decodes a file fully and
hashes its bytes, so the source readers can leave out broken files before training starts.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from simclr_lightning.data.index import FaceIndex

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Skip reasons that :func:`check_image` and :func:`inspect_image` return.
SKIP_EMPTY = "empty"
SKIP_NOT_AN_IMAGE = "not_an_image"
SKIP_TRUNCATED = "truncated"
SKIP_CORRUPT = "corrupt"
SKIP_UNREADABLE = "unreadable"
SKIP_TOO_LARGE = "too_large"

# File signatures of the formats the datasets use. A file that starts with one of them but that
# Pillow cannot identify is a damaged image ("corrupt"), not some other kind of file.
_IMAGE_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
    b"RIFF",  # WebP container
)


def load_rgb(path: PathLike) -> Image.Image:
    """Load an image file as 8-bit RGB.

    The EXIF orientation tag is applied first. Modes are converted as follows:

    - ``RGB`` is returned as decoded. ``1``, ``L``, ``CMYK``, ``YCbCr``, ``HSV`` and ``LAB`` use
      Pillow's own conversion to RGB.
    - Modes with an alpha channel (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``) and palette images
      with a transparency entry are composited on black, so transparent pixels become black
      instead of showing whatever colour the encoder left under them.
    - 16-bit greyscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) is scaled from 0-65535 to 0-255.
      32-bit integer ``I`` is clipped to 0-65535 and scaled the same way when any pixel exceeds
      255, otherwise taken as 8-bit values. Float ``F`` is taken as 0-1 when its maximum is at
      most 1, otherwise clipped to 0-255.

    Args:
        path: Image file to read.

    Returns:
        A decoded RGB image whose file handle is already closed.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        PIL.UnidentifiedImageError: If the file is not an image Pillow can read.
        OSError: If the file is truncated or otherwise cannot be decoded.
    """
    with Image.open(path) as image:
        image.load()
        oriented = ImageOps.exif_transpose(image)
    return to_rgb(oriented)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB, as described in :func:`load_rgb`."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_black(image)
    if mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float64)
        return _gray_to_rgb(pixels / 257.0)
    if mode == "I":
        pixels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        if pixels.size and pixels.max() > 255:
            pixels = pixels / 257.0
        return _gray_to_rgb(pixels)
    if mode == "F":
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if pixels.size and pixels.max() <= 1.0:
            pixels = pixels * 255.0
        return _gray_to_rgb(pixels)
    return image.convert("RGB")


def _composite_on_black(image: Image.Image) -> Image.Image:
    # Premultiplied modes (RGBa, La) already hold colour scaled by alpha, which is the same as
    # compositing on black, so dropping their alpha channel is enough.
    if image.mode == "RGBa":
        return Image.merge("RGB", image.split()[:3])
    if image.mode == "La":
        return Image.merge("RGB", [image.getchannel(0)] * 3)
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (0, 0, 0))
    background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return background


def _gray_to_rgb(pixels: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray, gray, gray], axis=-1), mode="RGB")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Crop the centred square of ``image`` and resize it to ``size`` x ``size`` pixels.

    The crop keeps the shorter side whole, so faces are never stretched. When the image has an odd
    excess, the extra pixel is taken from the right or bottom edge.

    Args:
        image: Image of any size.
        size: Side of the output square, in pixels.

    Raises:
        ValueError: If ``size`` is not a positive integer.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer number of pixels, got {size!r}.")
    width, height = image.size
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    if side != width or side != height:
        image = image.crop((left, top, left + side, top + side))
    if side == size:
        return image
    return image.resize((size, size), resample=Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class ImageCheck:
    """Result of decoding and hashing one file with :func:`inspect_image`.

    Attributes:
        reason: ``None`` for a readable image, otherwise the skip reason. The reasons are
            ``"empty"`` (0 bytes),
            ``"not_an_image"`` (no known image signature and Pillow cannot identify it),
            ``"truncated"`` (the data ends before the image does), ``"corrupt"`` (any other
            decoding failure), ``"too_large"`` (over Pillow's decompression-bomb limit) or
            ``"unreadable"`` (the file could not be opened or read).
        content_hash: Hex digest of the 128-bit BLAKE2b hash of the file bytes, ``""`` when the
            file could not be read.
        width: Decoded width in pixels, 0 when the image was not decoded.
        height: Decoded height in pixels, 0 when the image was not decoded.
        detail: The decoder's error message, ``""`` for a readable image.
    """

    reason: str | None
    content_hash: str
    width: int = 0
    height: int = 0
    detail: str = ""


def hash_bytes(data: bytes) -> str:
    """Return the hex BLAKE2b digest (16 bytes, 32 hex characters) used as a content hash."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def inspect_image(path: PathLike) -> ImageCheck:
    """Read ``path`` once, hash its bytes and decode every pixel to find broken files.

    Args:
        path: File to check.

    Returns:
        The skip reason (``None`` when the image decodes), the content hash and the size.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        return ImageCheck(SKIP_UNREADABLE, "", detail=str(error))
    content_hash = hash_bytes(data)
    if not data:
        return ImageCheck(SKIP_EMPTY, content_hash, detail="file has 0 bytes")
    try:
        # No warnings.catch_warnings() here: it swaps process-wide state, and the readers call
        # this function from several threads at once.
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
    except Image.DecompressionBombError as error:
        return ImageCheck(SKIP_TOO_LARGE, content_hash, detail=str(error))
    except UnidentifiedImageError as error:
        reason = SKIP_CORRUPT if data.startswith(_IMAGE_SIGNATURES) else SKIP_NOT_AN_IMAGE
        return ImageCheck(reason, content_hash, detail=str(error))
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports a short file as OSError("image file is truncated ...") or
        # OSError("Truncated File Read"). Every other failure counts as a damaged file.
        reason = SKIP_TRUNCATED if "truncated" in str(error).lower() else SKIP_CORRUPT
        return ImageCheck(reason, content_hash, detail=str(error))
    return ImageCheck(None, content_hash, width, height)


def check_image(path: PathLike) -> str | None:
    """Decode ``path`` fully and return why it must be skipped, or ``None`` if it is readable.

    The reasons are those of :attr:`ImageCheck.reason`.
    """
    return inspect_image(path).reason


@runtime_checkable
class ImageSource(Protocol):
    """A sequence of RGB images addressed by row number, as the datasets read them."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> Image.Image:
        """Return image ``i`` as RGB."""
        ...


class FileImages:
    """Images decoded from their files on every access.

    Args:
        index: Rows whose ``paths`` are read.
        image_size: Side of the square that each image is centre-cropped and resized to, or
            ``None`` to return the decoded image at its own size.
    """

    def __init__(self, index: FaceIndex, image_size: int | None) -> None:
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ValueError(
                f"image_size must be a positive number of pixels or None, got {image_size!r}."
            )
        self.index = index
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> Image.Image:
        image = load_rgb(self.index.path(i))
        if self.image_size is None:
            return image
        return center_crop_resize(image, self.image_size)


class SubsetImages:
    """A view of some rows of another image source, in the order given.

    Args:
        images: The full image source.
        rows: Row numbers of ``images``; row ``i`` of this view is ``images.load(rows[i])``.
    """

    def __init__(self, images: ImageSource, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be a 1-D array of row numbers, got shape {rows.shape}.")
        if rows.size and (rows.min() < 0 or rows.max() >= len(images)):
            raise ValueError(
                f"rows must lie in [0, {len(images)}) for an image source of {len(images)} images, "
                f"got values from {rows.min()} to {rows.max()}."
            )
        self.images = images
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows.size)

    def load(self, i: int) -> Image.Image:
        return self.images.load(int(self.rows[i]))


@runtime_checkable
class ArrayImageSource(ImageSource, Protocol):
    """An image source that also returns each image as an (S, S, 3) uint8 array, without PIL."""

    def load_array(self, i: int) -> np.ndarray:
        """Return image ``i`` as an (S, S, 3) uint8 array."""
        ...


class SubsetArrayImages(SubsetImages):
    """A view of some rows of an :class:`ArrayImageSource`, which keeps ``load_array``."""

    images: ArrayImageSource

    def __init__(self, images: ArrayImageSource, rows: np.ndarray) -> None:
        super().__init__(images, rows)

    def load_array(self, i: int) -> np.ndarray:
        return self.images.load_array(int(self.rows[i]))


def subset_images(images: ImageSource, rows: np.ndarray) -> SubsetImages:
    """Return a view of the rows ``rows`` of ``images``, with ``load_array`` when it has one."""
    if isinstance(images, ArrayImageSource):
        return SubsetArrayImages(images, rows)
    return SubsetImages(images, rows)
