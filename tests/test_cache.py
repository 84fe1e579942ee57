"""Tests for the prepared cache: building, resuming, validation and reading."""

from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclr_lightning.data import cache as cache_module
from simclr_lightning.data.cache import (
    CachedImages,
    PreparedCache,
    pixel_digest,
    prepare_cache,
    prepare_main,
)
from simclr_lightning.data.images import ImageSource, hash_bytes
from simclr_lightning.data.index import SOURCE_FFHQ, FaceIndex
from tests.conftest import UTKFaceTree

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write_images(folder: Path, count: int, size: tuple[int, int] = (40, 30)) -> list[Path]:
    """Write ``count`` PNG files whose pixels depend on the file number and position."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    paths = []
    for n in range(count):
        pixels = np.stack([(x * 6) % 256, (y * 8) % 256, np.full_like(x, n * 5 % 256)], axis=-1)
        path = folder / f"{n:05d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _index(paths: list[Path]) -> FaceIndex:
    hashes = [hash_bytes(path.read_bytes()) for path in paths]
    return FaceIndex(paths=[str(p) for p in paths], source=SOURCE_FFHQ, content_hash=hashes)


def _expected_pixels(path: Path, size: int) -> np.ndarray:
    """Crop the centred square with plain PIL calls and resize it bicubically."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


@pytest.fixture()
def index(tmp_path: Path) -> FaceIndex:
    return _index(_write_images(tmp_path / "images", 70))


def test_prepare_cache_writes_contract_files(tmp_path: Path, index: FaceIndex) -> None:
    out = prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["image_size"] == 16
    assert meta["count"] == 70
    assert meta["complete"] is True
    assert meta["format_version"] == 1
    assert meta["done_count"] == 70
    images = np.load(out / "images.npy", mmap_mode="r")
    assert images.shape == (70, 16, 16, 3)
    assert images.dtype == np.uint8
    assert FaceIndex.load(out / "index.npz").paths.tolist() == index.paths.tolist()


def test_prepare_cache_pixels_match_crop_resize(tmp_path: Path, index: FaceIndex) -> None:
    out = prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    cache = PreparedCache.open(out)
    for row in (0, 33, 69):
        expected = _expected_pixels(Path(index.path(row)), 16)
        assert np.array_equal(cache.images[row], expected)


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_prepare_cache_pools_match_inline(
    tmp_path: Path, index: FaceIndex, executor: cache_module.ExecutorKind
) -> None:
    inline = prepare_cache(index, tmp_path / "inline", 12, num_workers=0, progress=False)
    pooled = prepare_cache(
        index, tmp_path / executor, 12, num_workers=2, executor=executor, progress=False
    )
    assert np.array_equal(np.load(inline / "images.npy"), np.load(pooled / "images.npy")), (
        f"{executor} pool wrote different pixels than decoding in this process"
    )


def test_prepare_cache_resumes_after_interrupt(
    tmp_path: Path, index: FaceIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_decode = cache_module.decode_chunk
    decoded: list[str] = []

    def decode_then_interrupt(paths: list[str], size: int) -> tuple[np.ndarray, list[str | None]]:
        if len(decoded) >= 2 * cache_module.CHUNK_ROWS:
            raise KeyboardInterrupt
        decoded.extend(paths)
        return real_decode(paths, size)

    monkeypatch.setattr(cache_module, "decode_chunk", decode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["complete"] is False
    assert meta["done_count"] == 64
    with pytest.raises(ValueError, match="incomplete prepared cache"):
        PreparedCache.open(tmp_path / "cache")

    decoded.clear()
    monkeypatch.setattr(cache_module, "decode_chunk", real_decode)
    calls: list[str] = []

    def counting_decode(paths: list[str], size: int) -> tuple[np.ndarray, list[str | None]]:
        calls.extend(paths)
        return real_decode(paths, size)

    monkeypatch.setattr(cache_module, "decode_chunk", counting_decode)
    prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    assert calls == [index.path(row) for row in range(64, 70)]
    cache = PreparedCache.open(tmp_path / "cache")
    assert np.array_equal(cache.images[69], _expected_pixels(Path(index.path(69)), 16))
    assert np.array_equal(cache.images[5], _expected_pixels(Path(index.path(5)), 16))


def test_prepare_cache_complete_is_not_rebuilt(
    tmp_path: Path, index: FaceIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)

    def fail(paths: list[str], size: int) -> None:
        raise AssertionError("a complete cache was decoded again")

    monkeypatch.setattr(cache_module, "decode_chunk", fail)
    out = prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    assert out == tmp_path / "cache"


def test_prepare_cache_rejects_other_size(tmp_path: Path, index: FaceIndex) -> None:
    prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    with pytest.raises(ValueError, match=r"image_size 16 \(requested 24\).*overwrite=True"):
        prepare_cache(index, tmp_path / "cache", 24, num_workers=0, progress=False)


def test_prepare_cache_rejects_other_index(tmp_path: Path, index: FaceIndex) -> None:
    prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    reordered = index.subset(np.arange(len(index))[::-1])
    with pytest.raises(ValueError, match="paths or content hashes differ"):
        prepare_cache(reordered, tmp_path / "cache", 16, num_workers=0, progress=False)


def test_prepare_cache_overwrite_rebuilds(tmp_path: Path, index: FaceIndex) -> None:
    prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    prepare_cache(index, tmp_path / "cache", 24, num_workers=0, overwrite=True, progress=False)
    cache = PreparedCache.open(tmp_path / "cache")
    assert cache.image_size == 24
    assert cache.images.shape == (70, 24, 24, 3)


def test_prepare_cache_updates_labels_only(tmp_path: Path, index: FaceIndex) -> None:
    prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    relabeled = FaceIndex(**{**index.columns(), "gender": np.ones(len(index), dtype=np.int8)})
    assert pixel_digest(relabeled) == pixel_digest(index)
    prepare_cache(relabeled, tmp_path / "cache", 16, num_workers=0, progress=False)
    assert PreparedCache.open(tmp_path / "cache").index.gender.tolist() == [1] * 70


def test_prepare_cache_broken_file_is_listed(tmp_path: Path, index: FaceIndex) -> None:
    broken = Path(index.path(3))
    broken.write_bytes(broken.read_bytes()[:40])
    out = prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] is True
    assert meta["failed_count"] == 1
    assert meta["failed"][0]["row"] == 3
    assert meta["failed"][0]["path"] == str(broken)
    cache = PreparedCache.open(out)
    assert cache.failed_rows().tolist() == [3]
    assert 3 not in cache.valid_rows().tolist()
    assert len(cache.valid_rows()) == 69
    assert int(cache.images[3].max()) == 0


def test_prepare_cache_resume_retries_failed_rows(tmp_path: Path, index: FaceIndex) -> None:
    broken = Path(index.path(3))
    original = broken.read_bytes()
    broken.write_bytes(original[:40])
    builder = cache_module._CacheBuilder(tmp_path / "cache", index, 16)
    builder.start_fresh()
    rows = np.arange(0, 32)
    builder.store(rows, *cache_module.decode_chunk(builder.paths(rows), 16))
    builder.flush()
    broken.write_bytes(original)
    prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    cache = PreparedCache.open(tmp_path / "cache")
    assert cache.failed_rows().tolist() == []
    assert np.array_equal(cache.images[3], _expected_pixels(broken, 16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 4}, "image_size must be an integer of at least 8"),
        ({"image_size": 16, "num_workers": -1}, "num_workers must be 0 or more"),
        ({"image_size": 16, "executor": "gpu"}, "executor must be 'process' or 'thread'"),
    ],
)
def test_prepare_cache_invalid_arguments(
    tmp_path: Path, index: FaceIndex, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        prepare_cache(index, tmp_path / "cache", **kwargs)  # type: ignore[arg-type]


def test_prepare_cache_empty_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to cache"):
        prepare_cache(FaceIndex.empty(), tmp_path / "cache", 16)


def test_prepared_cache_open_missing_meta(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        PreparedCache.open(tmp_path)


def test_prepared_cache_open_newer_format(tmp_path: Path, index: FaceIndex) -> None:
    out = prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(ValueError, match="format version 2"):
        PreparedCache.open(out)


def test_prepared_cache_open_shape_mismatch(tmp_path: Path, index: FaceIndex) -> None:
    out = prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    np.save(out / "images.npy", np.zeros((70, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expects uint8 of shape \(70, 16, 16, 3\)"):
        PreparedCache.open(out)


def test_prepared_cache_pickle_drops_pixels(tmp_path: Path, index: FaceIndex) -> None:
    cache = PreparedCache.open(
        prepare_cache(index, tmp_path / "c", 32, num_workers=0, progress=False)
    )
    assert cache.images.shape == (70, 32, 32, 3)
    payload = pickle.dumps(cache)
    # 70 * 32 * 32 * 3 = 215,040 bytes of pixels; the pickle contains only paths and metadata.
    assert len(payload) < 50_000
    restored = pickle.loads(payload)
    assert np.array_equal(restored.images[10], cache.images[10])


def test_cached_images_image_source(tmp_path: Path, index: FaceIndex) -> None:
    cache = PreparedCache.open(
        prepare_cache(index, tmp_path / "c", 16, num_workers=0, progress=False)
    )
    images = CachedImages(cache)
    assert isinstance(images, ImageSource)
    assert len(images) == 70
    image = images.load(7)
    assert image.mode == "RGB"
    assert image.size == (16, 16)
    assert np.array_equal(np.asarray(image), _expected_pixels(Path(index.path(7)), 16))
    array = images.load_array(7)
    assert array.shape == (16, 16, 3)
    assert not array.flags.writeable


def test_prepare_main_builds_deduplicated_cache(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "ffhq" / "thumbnails128x128" / "00000", 12, size=(20, 20))
    (paths[11]).write_bytes(paths[0].read_bytes())  # a byte-identical copy of 00000.png
    out = tmp_path / "cache"
    status = prepare_main(
        ["--ffhq-root", str(tmp_path / "ffhq"), "--out", str(out), "--image-size", "16"]
        + ["--workers", "0", "--no-progress"]
    )
    assert status == 0
    cache = PreparedCache.open(out)
    assert len(cache) == 11
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["duplicates_dropped"] == 1
    assert report["indexed"] == 12
    full_index = FaceIndex.load(out / "face_index.npz")
    assert len(full_index) == 12
    assert full_index.content_hash[11] == full_index.content_hash[0]


def test_prepare_main_logs_once_under_package_handler(tmp_path: Path) -> None:
    _write_images(tmp_path / "ffhq" / "thumbnails128x128" / "00000", 3, size=(20, 20))
    root = logging.getLogger()
    package = logging.getLogger("simclr_lightning")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    saved_root_handlers, saved_level = root.handlers[:], package.level
    # The simclr-lightning CLI attaches one handler to the package logger and none to the root.
    root.handlers.clear()
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        status = prepare_main(
            ["--ffhq-root", str(tmp_path / "ffhq"), "--out", str(tmp_path / "cache")]
            + ["--image-size", "16", "--workers", "0", "--no-progress"]
        )
        root_handlers_after = root.handlers[:]
    finally:
        package.removeHandler(handler)
        package.setLevel(saved_level)
        root.handlers[:] = saved_root_handlers

    assert status == 0
    assert root_handlers_after == []
    assert stream.getvalue().count("Wrote the prepared cache") == 1


def test_prepare_main_requires_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as raised:
        prepare_main(["--out", str(tmp_path / "cache")])
    assert raised.value.code == 2


def test_prepare_main_missing_root_returns_error(tmp_path: Path) -> None:
    status = prepare_main(
        ["--ffhq-root", str(tmp_path / "absent"), "--out", str(tmp_path / "cache")]
        + ["--no-progress"]
    )
    assert status == 1


def test_prepare_main_real_samples(tmp_path: Path) -> None:
    if not (SHARED_DATA / "utkface").is_dir() or not (SHARED_DATA / "ffhq").is_dir():
        pytest.skip(f"real UTKFace and FFHQ samples not found under {SHARED_DATA}")
    out = tmp_path / "cache"
    status = prepare_main(
        ["--utkface-root", str(SHARED_DATA / "utkface"), "--ffhq-root", str(SHARED_DATA / "ffhq")]
        + ["--out", str(out), "--image-size", "32", "--workers", "2", "--no-progress"]
    )
    assert status == 0
    cache = PreparedCache.open(out)
    report = json.loads((out / "prepare_report.json").read_text())
    assert len(cache) == report["kept"]
    assert report["kept"] == report["indexed"] - report["duplicates_dropped"]
    assert cache.meta["sources"]["ffhq"] == 113
    assert cache.images.shape == (len(cache), 32, 32, 3)


def test_prepare_cache_resume_without_images_rebuilds(tmp_path: Path, index: FaceIndex) -> None:
    builder = cache_module._CacheBuilder(tmp_path / "cache", index, 16)
    builder.start_fresh()
    rows = np.arange(0, 32)
    builder.store(rows, *cache_module.decode_chunk(builder.paths(rows), 16))
    builder.flush()
    (tmp_path / "cache" / "images.npy").unlink()
    prepare_cache(index, tmp_path / "cache", 16, num_workers=0, progress=False)
    cache = PreparedCache.open(tmp_path / "cache")
    assert cache.meta["done_count"] == 70
    assert np.array_equal(cache.images[0], _expected_pixels(Path(index.path(0)), 16))


def test_prepare_main_records_index_key(tmp_path: Path, utkface_tree: UTKFaceTree) -> None:
    from simclr_lightning.data.face_datamodule import FaceDataModule

    out = tmp_path / "cache"
    status = prepare_main(
        [
            "--utkface-root",
            str(utkface_tree.root),
            "--out",
            str(out),
            "--image-size",
            "16",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert status == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["face_index_key"]

    datamodule = FaceDataModule(
        utkface_root=str(utkface_tree.root),
        mode="pretrain",
        image_size=16,
        batch_size=4,
        num_workers=0,
        cache_dir=str(out),
        index_dir=str(tmp_path / "index"),
    )
    datamodule.setup("fit")
    # The index came from the cache, so no index file was written.
    assert not list((tmp_path / "index").glob("face_index-*"))
    assert datamodule.index is not None
    assert len(datamodule.index) == utkface_tree.indexed
