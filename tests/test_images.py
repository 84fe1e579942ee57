"""Tests for image decoding, cropping, file checks and image sources."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from conftest import image_bytes, write_image
from PIL import Image

from simclr_lightning.data.images import (
    FileImages,
    ImageSource,
    SubsetArrayImages,
    SubsetImages,
    center_crop_resize,
    check_image,
    inspect_image,
    load_rgb,
    subset_images,
    to_rgb,
)
from simclr_lightning.data.index import FaceIndex


def _pixel(image: Image.Image, x: int = 0, y: int = 0) -> tuple[int, ...]:
    return tuple(np.asarray(image)[y, x].tolist())


@pytest.mark.parametrize(
    ("mode", "value", "fmt", "expected"),
    [
        ("RGB", (10, 20, 30), "PNG", (10, 20, 30)),
        ("L", 77, "PNG", (77, 77, 77)),
        ("1", 1, "PNG", (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), "JPEG", (255, 255, 255)),
        ("YCbCr", (128, 128, 128), "JPEG", (128, 128, 128)),
        ("I;16", 65535, "PNG", (255, 255, 255)),
        ("I;16", 257 * 100, "PNG", (100, 100, 100)),
    ],
)
def test_load_rgb_modes(
    tmp_path: Path, mode: str, value: object, fmt: str, expected: tuple[int, int, int]
) -> None:
    path = tmp_path / f"image.{fmt.lower()}"
    Image.new(mode, (4, 4), value).save(path, fmt)  # type: ignore[arg-type]

    image = load_rgb(path)

    assert image.mode == "RGB"
    assert image.size == (4, 4)
    # JPEG may move a flat colour by a step or two.
    assert np.abs(np.subtract(_pixel(image), expected)).max() <= 2


def test_load_rgb_rgba_composites_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque
    rgba[0, 1] = (200, 100, 50, 0)  # transparent
    rgba[0, 2] = (200, 100, 50, 128)  # half transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)

    image = load_rgb(path)

    assert image.mode == "RGB"
    assert _pixel(image, 0) == (200, 100, 50)
    assert _pixel(image, 1) == (0, 0, 0)
    # 200 * 128 / 255 = 100.4, 100 * 128 / 255 = 50.2, 50 * 128 / 255 = 25.1.
    assert np.abs(np.subtract(_pixel(image, 2), (100, 50, 25))).max() <= 1


def test_load_rgb_la_composites_on_black(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    image = Image.new("LA", (2, 1), (90, 255))
    image.putpixel((1, 0), (90, 0))
    image.save(path)

    loaded = load_rgb(path)

    assert _pixel(loaded, 0) == (90, 90, 90)
    assert _pixel(loaded, 1) == (0, 0, 0)


def test_load_rgb_palette_with_transparency(tmp_path: Path) -> None:
    palette_image = Image.new("P", (2, 1), 0)
    palette_image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    palette_image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=1)

    image = load_rgb(path)

    assert image.mode == "RGB"
    assert _pixel(image, 0) == (255, 0, 0)
    assert _pixel(image, 1) == (0, 0, 0)


def test_load_rgb_palette_without_transparency(tmp_path: Path) -> None:
    palette_image = Image.new("P", (1, 1), 0)
    palette_image.putpalette([12, 34, 56] + [0] * (256 * 3 - 3))
    path = tmp_path / "palette.png"
    palette_image.save(path)

    assert _pixel(load_rgb(path)) == (12, 34, 56)


def test_to_rgb_int32_scales_16_bit_values() -> None:
    image = Image.fromarray(np.array([[0, 257 * 200, 70000]], dtype=np.int32), "I")

    converted = to_rgb(image)

    # 70000 is clipped to 65535 before dividing by 257.
    assert [_pixel(converted, x)[0] for x in range(3)] == [0, 200, 255]


def test_to_rgb_int32_keeps_8_bit_values() -> None:
    image = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), "I")

    assert [_pixel(to_rgb(image), x)[0] for x in range(3)] == [0, 100, 255]


def test_to_rgb_float_unit_range() -> None:
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")

    assert [_pixel(to_rgb(image), x)[0] for x in range(3)] == [0, 128, 255]


def test_to_rgb_premultiplied_rgba() -> None:
    image = Image.new("RGBa", (1, 1), (40, 20, 10, 128))

    assert _pixel(to_rgb(image)) == (40, 20, 10)


def test_load_rgb_applies_exif_orientation(tmp_path: Path) -> None:
    image = Image.new("RGB", (6, 3), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)

    assert load_rgb(path).size == (3, 6)


def test_center_crop_resize_landscape_keeps_centre() -> None:
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0)
    pixels[:, 10:20] = (0, 255, 0)
    pixels[:, 20:] = (0, 0, 255)

    result = center_crop_resize(Image.fromarray(pixels), 10)

    assert result.size == (10, 10)
    assert np.all(np.asarray(result) == (0, 255, 0))


def test_center_crop_resize_portrait_never_stretches() -> None:
    pixels = np.zeros((40, 20, 3), dtype=np.uint8)
    pixels[10:30] = 200

    result = center_crop_resize(Image.fromarray(pixels), 5)

    assert result.size == (5, 5)
    assert np.all(np.asarray(result) == 200)


def test_center_crop_resize_odd_excess_takes_right_pixel() -> None:
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[:, 2] = 255

    result = center_crop_resize(Image.fromarray(pixels), 2)

    assert np.all(np.asarray(result) == 0)


def test_center_crop_resize_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="size must be a positive integer"):
        center_crop_resize(Image.new("RGB", (4, 4)), 0)


def test_check_image_readable(tmp_path: Path) -> None:
    assert check_image(write_image(tmp_path / "ok.jpg", 1)) is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"just some text", "not_an_image"),
        (image_bytes(2)[:200], "truncated"),
        (image_bytes(3, "PNG")[:400], "truncated"),
        (image_bytes(4)[:2] + b"\xff" + bytes(100), "corrupt"),
        (image_bytes(5, "PNG")[:40] + bytes(60), "corrupt"),
    ],
    ids=["empty", "text", "jpeg-truncated", "png-truncated", "jpeg-garbage", "png-garbage"],
)
def test_check_image_broken_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)

    assert check_image(path) == reason


def test_check_image_unreadable(tmp_path: Path) -> None:
    assert check_image(tmp_path / "absent.jpg") == "unreadable"


def test_inspect_image_hash_and_size(tmp_path: Path) -> None:
    path = write_image(tmp_path / "face.png", 6, "PNG", size=(7, 5))

    check = inspect_image(path)

    assert check.reason is None
    assert check.content_hash == hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    assert len(check.content_hash) == 32
    assert (check.width, check.height) == (7, 5)


def _index_of(paths: list[Path]) -> FaceIndex:
    return FaceIndex([str(path) for path in paths], source=0)


def test_file_images_loads_cropped_squares(tmp_path: Path) -> None:
    paths = [write_image(tmp_path / f"{i}.jpg", i, size=(12, 20)) for i in range(3)]

    images = FileImages(_index_of(paths), 8)

    assert isinstance(images, ImageSource)
    assert len(images) == 3
    assert images.load(2).size == (8, 8)
    assert images.load(2).mode == "RGB"


def test_file_images_without_size_keeps_original(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.jpg", 1, size=(12, 20))

    assert FileImages(_index_of([path]), None).load(0).size == (12, 20)


def test_subset_images_maps_rows(tmp_path: Path) -> None:
    paths = [write_image(tmp_path / f"{i}.png", i, "PNG") for i in range(4)]
    images = FileImages(_index_of(paths), None)

    subset = SubsetImages(images, np.array([3, 1]))

    assert len(subset) == 2
    assert np.array_equal(np.asarray(subset.load(0)), np.asarray(Image.open(paths[3])))


def test_subset_images_rejects_out_of_range_rows(tmp_path: Path) -> None:
    images = FileImages(_index_of([write_image(tmp_path / "a.jpg", 1)]), None)

    with pytest.raises(ValueError, match=r"rows must lie in \[0, 1\)"):
        SubsetImages(images, np.array([1]))


class _ArrayImages:
    """An image source of 4 constant images, image ``i`` filled with the value ``i``."""

    def __len__(self) -> int:
        return 4

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.load_array(i))

    def load_array(self, i: int) -> np.ndarray:
        return np.full((2, 2, 3), i, dtype=np.uint8)


def test_subset_images_keeps_load_array() -> None:
    subset = subset_images(_ArrayImages(), np.array([3, 0, 2]))
    nested = subset_images(subset, np.array([2, 0]))

    assert isinstance(subset, SubsetArrayImages)
    assert isinstance(nested, SubsetArrayImages)
    assert int(subset.load_array(0)[0, 0, 0]) == 3
    assert int(nested.load_array(0)[0, 0, 0]) == 2
    assert int(nested.load_array(1)[0, 0, 0]) == 3


def test_subset_images_of_files_has_no_load_array(tmp_path: Path) -> None:
    images = FileImages(_index_of([write_image(tmp_path / "a.jpg", 1)]), None)

    subset = subset_images(images, np.array([0]))

    assert not isinstance(subset, SubsetArrayImages)
    assert not hasattr(subset, "load_array")


def test_image_bytes_fixture_differs_by_seed() -> None:
    first = Image.open(io.BytesIO(image_bytes(1)))
    second = Image.open(io.BytesIO(image_bytes(2)))

    assert not np.array_equal(np.asarray(first), np.asarray(second))
