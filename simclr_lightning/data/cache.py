"""The prepared cache: every image decoded once, centre-cropped, resized and stored as uint8.

A run that reads image files decodes, crops and resizes every file again on every epoch. A
prepared cache does that work once. A cache folder contains:

- ``images.npy``: uint8 array of shape (N, S, S, 3). Row ``i`` is row ``i`` of the index. It is
  opened with ``np.load(mmap_mode="r")``, so forked DataLoader workers share its pages.
- ``index.npz``: the :class:`~simclr_lightning.data.index.FaceIndex` of the rows.
- ``meta.json``: ``image_size``, ``count``, ``complete``, ``format_version`` and build details.
- ``row_status.npy``: uint8 per row, 0 pending, 1 written, 2 failed to decode. It lets an
  interrupted build resume where it stopped.

``simclr-lightning prepare`` caches one row per content hash and adds ``prepare_report.json``
(the skip reports) and ``face_index.npz``, the full index of the dataset roots with its
byte-identical copies. ``FaceDataModule`` splits that full index, as it does without a cache,
and reads the pixels of each row from the cache row of the same content hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from simclr_lightning.data.images import center_crop_resize, load_rgb
from simclr_lightning.data.index import SOURCES, FaceIndex
from simclr_lightning.data.index_file import (
    CACHE_FACE_INDEX_FILE,
    CACHE_KEY_FIELD,
    FaceIndexRequest,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGES_FILE = "images.npy"
INDEX_FILE = "index.npz"
META_FILE = "meta.json"
STATUS_FILE = "row_status.npy"

STATUS_PENDING = 0
STATUS_WRITTEN = 1
STATUS_FAILED = 2

#: Rows decoded per task sent to a worker.
CHUNK_ROWS = 32
#: Number of failures logged one by one. Later ones are only counted.
MAX_LOGGED_FAILURES = 10
#: Number of failed rows listed with path and error in ``meta.json``.
MAX_LISTED_FAILURES = 100

ExecutorKind = Literal["process", "thread"]


def pixel_digest(index: FaceIndex) -> str:
    """Hash the paths and content hashes of ``index``, which fix the pixels of a cache.

    Labels are left out, so relabelled rows of the same files keep the cache valid.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(len(index).to_bytes(8, "little"))
    digest.update(b"\0".join(index.paths.tolist()))
    digest.update(np.ascontiguousarray(index.content_hash.astype("S32")).tobytes())
    return digest.hexdigest()


def default_workers() -> int:
    """Return the number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def decode_chunk(paths: Sequence[str], image_size: int) -> tuple[np.ndarray, list[str | None]]:
    """Decode, centre-crop and resize each file of ``paths``.

    Returns:
        A uint8 array of shape (len(paths), S, S, 3), zero where a file failed, and one entry per
        file: ``None`` when it decoded, else the error type and message.
    """
    pixels = np.zeros((len(paths), image_size, image_size, 3), dtype=np.uint8)
    errors: list[str | None] = []
    for k, path in enumerate(paths):
        try:
            pixels[k] = np.asarray(center_crop_resize(load_rgb(path), image_size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            errors.append(f"{type(error).__name__}: {error}")
        else:
            errors.append(None)
    return pixels, errors


def _write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(path.name + ".tmp.npy")
    np.save(temporary, array)
    os.replace(temporary, path)


def read_meta(cache_dir: Path) -> dict[str, Any]:
    """Read ``meta.json`` of ``cache_dir``.

    Raises:
        FileNotFoundError: If ``meta.json`` is missing.
        ValueError: If it is not a JSON object.
    """
    path = cache_dir / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{cache_dir} is not a prepared cache: {META_FILE} not found. Build one with "
            "`simclr-lightning prepare` or prepare_cache()."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}). Rebuild the cache.") from error
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must contain a JSON object, got {type(meta).__name__}.")
    return meta


def _mismatch(meta: dict[str, Any], index: FaceIndex, image_size: int) -> str | None:
    """Describe how an existing cache differs from the request, or return ``None``."""
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format version {meta.get('format_version')} (this library writes {FORMAT_VERSION})"
    if meta.get("image_size") != image_size:
        return f"image_size {meta.get('image_size')} (requested {image_size})"
    if meta.get("count") != len(index):
        return f"{meta.get('count')} images (the requested index has {len(index)})"
    if meta.get("pixel_digest") != pixel_digest(index):
        return "a different index (the paths or content hashes differ)"
    return None


class _CacheBuilder:
    """Writes the rows of one cache folder and records progress so a later run can resume."""

    def __init__(self, out_dir: Path, index: FaceIndex, image_size: int) -> None:
        self.out_dir = out_dir
        self.index = index
        self.image_size = image_size
        self.images: np.memmap | None = None
        self.status = np.zeros(len(index), dtype=np.uint8)
        self.failures: dict[int, str] = {}
        self.flush_rows = 2048
        self.flush_seconds = 30.0
        self._rows_since_flush = 0
        self._last_flush = time.monotonic()
        self.meta: dict[str, Any] = {}

    def start_fresh(self) -> None:
        self.status[:] = STATUS_PENDING
        self.failures.clear()
        for name in (IMAGES_FILE, INDEX_FILE, META_FILE, STATUS_FILE, CACHE_FACE_INDEX_FILE):
            (self.out_dir / name).unlink(missing_ok=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.index.save(self.out_dir / INDEX_FILE)
        shape = (len(self.index), self.image_size, self.image_size, 3)
        self.images = np.lib.format.open_memmap(
            self.out_dir / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=shape
        )
        now = datetime.now(UTC).isoformat(timespec="seconds")
        self.meta = {
            "format_version": FORMAT_VERSION,
            "image_size": self.image_size,
            "count": len(self.index),
            "complete": False,
            "pixel_digest": pixel_digest(self.index),
            "resize": "centre square crop, then bicubic resize (images.center_crop_resize)",
            "sources": _source_counts(self.index),
            "created": now,
        }
        self.flush()

    def resume(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        status_path = self.out_dir / STATUS_FILE
        if status_path.is_file():
            status = np.load(status_path)
            if status.shape == self.status.shape:
                self.status = status.astype(np.uint8)
        # Failed rows of an earlier run are tried again.
        self.status[self.status == STATUS_FAILED] = STATUS_PENDING
        images_path = self.out_dir / IMAGES_FILE
        shape = (len(self.index), self.image_size, self.image_size, 3)
        images = np.load(images_path, mmap_mode="r+") if images_path.is_file() else None
        if images is None or images.shape != shape or images.dtype != np.uint8:
            log.warning("%s is missing or has the wrong shape. Rebuilding it.", images_path)
            self.start_fresh()
            return
        self.images = images
        self.index.save(self.out_dir / INDEX_FILE)

    def pending_rows(self) -> np.ndarray:
        return np.flatnonzero(self.status == STATUS_PENDING)

    def store(self, rows: np.ndarray, pixels: np.ndarray, errors: list[str | None]) -> None:
        assert self.images is not None  # set by start_fresh or resume
        written = np.array([error is None for error in errors], dtype=bool)
        self.images[rows[written]] = pixels[written]
        self.status[rows[written]] = STATUS_WRITTEN
        for row, error in zip(rows[~written], (e for e in errors if e is not None), strict=True):
            self._record_failure(int(row), error)
        self._rows_since_flush += len(rows)
        due = time.monotonic() - self._last_flush >= self.flush_seconds
        if self._rows_since_flush >= self.flush_rows or due:
            self.flush()

    def _record_failure(self, row: int, error: str) -> None:
        self.status[row] = STATUS_FAILED
        self.failures[row] = error
        if len(self.failures) <= MAX_LOGGED_FAILURES:
            log.warning("Failed to decode row %d (%s): %s", row, self.index.path(row), error)
        if len(self.failures) == MAX_LOGGED_FAILURES:
            log.warning("Further decoding failures are counted but not logged one by one.")

    def flush(self, complete: bool = False) -> None:
        """Write pixels to disk first, then the row status, so no row is marked before its data."""
        if self.images is not None:
            self.images.flush()
        _save_npy_atomic(self.out_dir / STATUS_FILE, self.status)
        failed_rows = np.flatnonzero(self.status == STATUS_FAILED)
        self.meta.update(
            {
                "complete": complete,
                "done_count": int((self.status == STATUS_WRITTEN).sum()),
                "failed_count": int(failed_rows.size),
                "failed": [
                    {"row": int(row), "path": self.index.path(row), "error": self.failures[row]}
                    for row in failed_rows[:MAX_LISTED_FAILURES]
                ],
                "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        _write_json_atomic(self.out_dir / META_FILE, self.meta)
        self._rows_since_flush = 0
        self._last_flush = time.monotonic()

    def paths(self, rows: np.ndarray) -> list[str]:
        return [self.index.path(int(row)) for row in rows]


def _source_counts(index: FaceIndex) -> dict[str, int]:
    return {name: int((index.source == i).sum()) for i, name in enumerate(SOURCES)}


def _decode_pending(
    builder: _CacheBuilder, num_workers: int, executor: ExecutorKind, progress: bool
) -> None:
    """Decode every pending row, in a pool of ``num_workers`` or in this process when 0."""
    pending = builder.pending_rows()
    chunks = [pending[start : start + CHUNK_ROWS] for start in range(0, len(pending), CHUNK_ROWS)]
    total = len(builder.index)
    with tqdm(
        total=total,
        initial=total - len(pending),
        unit="img",
        desc=f"Caching {builder.image_size}px images",
        disable=not progress,
    ) as bar:

        def store(rows: np.ndarray, result: tuple[np.ndarray, list[str | None]]) -> None:
            builder.store(rows, *result)
            bar.update(len(rows))

        if num_workers == 0:
            for rows in chunks:
                store(rows, decode_chunk(builder.paths(rows), builder.image_size))
            return
        pool_class = ProcessPoolExecutor if executor == "process" else ThreadPoolExecutor
        with pool_class(max_workers=num_workers) as pool:
            _run_pool(pool, builder, chunks, store, window=4 * num_workers)


def _run_pool(
    pool: Executor,
    builder: _CacheBuilder,
    chunks: list[np.ndarray],
    store: Callable[[np.ndarray, tuple[np.ndarray, list[str | None]]], None],
    window: int,
) -> None:
    """Keep at most ``window`` chunks in flight and store each as soon as it is decoded."""
    remaining = iter(chunks)
    in_flight: dict[Future[tuple[np.ndarray, list[str | None]]], np.ndarray] = {}

    def submit_next() -> None:
        rows = next(remaining, None)
        if rows is not None:
            in_flight[pool.submit(decode_chunk, builder.paths(rows), builder.image_size)] = rows

    for _ in range(window):
        submit_next()
    try:
        while in_flight:
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                rows = in_flight.pop(future)
                store(rows, future.result())
                submit_next()
    except BaseException:
        for future in in_flight:
            future.cancel()
        raise


def prepare_cache(
    index: FaceIndex,
    out_dir: str | os.PathLike[str],
    image_size: int,
    num_workers: int | None = None,
    overwrite: bool = False,
    executor: ExecutorKind = "process",
    progress: bool = True,
) -> Path:
    """Build a prepared cache of ``index`` at ``image_size`` in ``out_dir``, or resume one.

    An interrupted build leaves ``meta.json`` with ``"complete": false`` and the rows written so
    far marked in ``row_status.npy``. Running again with the same index and size decodes only
    the remaining rows. Files that fail to decode are stored as black images, logged, and listed
    in ``meta.json``. :meth:`PreparedCache.valid_rows` leaves them out.

    Args:
        index: Rows to cache, in order. Row ``i`` of the cache is row ``i`` of ``index``.
        out_dir: Cache folder, created if missing. Only the four cache files in it are written.
        image_size: Side of the stored squares, in pixels.
        num_workers: Decoding workers. ``None`` uses every available core, 0 decodes in this
            process.
        overwrite: Rebuild from scratch even when ``out_dir`` contains a matching or a
            different cache.
        executor: ``"process"`` for a process pool, ``"thread"`` for a thread pool. The process
            pool was faster in two runs of ``benchmarks/data_scale.py`` on 2 cores (2,947 and
            3,305 images/s against 1,876 and 2,925).
        progress: Show a tqdm progress bar.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If an argument is invalid, or ``out_dir`` contains a cache of another index,
            image size or format version and ``overwrite`` is false.
    """
    _check_prepare_arguments(index, image_size, num_workers, executor)
    out_dir = Path(out_dir).expanduser()
    workers = default_workers() if num_workers is None else num_workers
    builder = _CacheBuilder(out_dir, index, image_size)
    existing = read_meta(out_dir) if (out_dir / META_FILE).is_file() else None

    if overwrite or existing is None:
        if existing is None and (out_dir / IMAGES_FILE).exists():
            log.warning("%s has %s but no %s. Rebuilding it.", out_dir, IMAGES_FILE, META_FILE)
        builder.start_fresh()
    else:
        problem = _mismatch(existing, index, image_size)
        if problem is not None:
            raise ValueError(
                f"{out_dir} contains a prepared cache of {problem}. Pass overwrite=True "
                "(--overwrite) to rebuild it, or choose another folder."
            )
        if existing.get("complete"):
            _refresh_labels(out_dir, index)
            log.info("Prepared cache %s is already complete (%d images).", out_dir, len(index))
            return out_dir
        builder.resume(existing)
        log.info(
            "Resuming prepared cache %s: %d of %d images left.",
            out_dir,
            len(builder.pending_rows()),
            len(index),
        )

    started = time.monotonic()
    try:
        _decode_pending(builder, workers, executor, progress)
    finally:
        builder.flush()
    builder.flush(complete=True)
    log.info(
        "Prepared cache %s: %d images at %d px in %.1f s, %d failed to decode.",
        out_dir,
        len(index),
        image_size,
        time.monotonic() - started,
        len(builder.failures),
    )
    return out_dir


def _refresh_labels(out_dir: Path, index: FaceIndex) -> None:
    """Rewrite ``index.npz`` when only the labels of the requested index differ from it."""
    stored = FaceIndex.load(out_dir / INDEX_FILE)
    columns = stored.columns()
    if all(np.array_equal(columns[name], value) for name, value in index.columns().items()):
        return
    index.save(out_dir / INDEX_FILE)
    log.info("Updated the labels in %s. The cached pixels are unchanged.", out_dir / INDEX_FILE)


def _check_prepare_arguments(
    index: FaceIndex, image_size: int, num_workers: int | None, executor: str
) -> None:
    if not isinstance(index, FaceIndex):
        raise TypeError(f"index must be a FaceIndex, got {type(index).__name__}.")
    if len(index) == 0:
        raise ValueError("index has no rows, so there is nothing to cache.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer of at least 8 pixels, got {image_size!r}.")
    if num_workers is not None and num_workers < 0:
        raise ValueError(
            f"num_workers must be 0 or more, or None for all cores, got {num_workers}."
        )
    if executor not in ("process", "thread"):
        raise ValueError(f"executor must be 'process' or 'thread', got {executor!r}.")


class PreparedCache:
    """A complete prepared cache folder, opened read-only.

    The images array is memory-mapped on first use and mapped again in each process after
    unpickling, so a DataLoader worker never receives a copy of the pixels.

    Attributes:
        path: The cache folder.
        meta: Contents of ``meta.json``.
        index: The index of the rows.
        image_size: Side of the stored squares, in pixels.
    """

    def __init__(self, path: Path, meta: dict[str, Any], index: FaceIndex) -> None:
        self.path = path
        self.meta = meta
        self.index = index
        self.image_size = int(meta["image_size"])
        self._images: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> PreparedCache:
        """Open the cache folder ``path`` after checking that it is complete and consistent.

        Raises:
            FileNotFoundError: If the folder or one of its files is missing.
            ValueError: If the cache is incomplete, of another format version, or its files
                disagree on the number of rows or the image size.
        """
        path = Path(path).expanduser()
        meta = read_meta(path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is a prepared cache of format version {meta.get('format_version')}, but "
                f"this library reads version {FORMAT_VERSION}. Rebuild it with --overwrite."
            )
        if not meta.get("complete"):
            raise ValueError(
                f"{path} is an incomplete prepared cache ({meta.get('done_count')} of "
                f"{meta.get('count')} images written). Run the same prepare command again to "
                "resume it."
            )
        index = FaceIndex.load(path / INDEX_FILE)
        cache = cls(path, meta, index)
        cache._check_consistent()
        return cache

    def _check_consistent(self) -> None:
        expected = (int(self.meta["count"]), self.image_size, self.image_size, 3)
        images = self.images
        if images.shape != expected or images.dtype != np.uint8:
            raise ValueError(
                f"{self.path / IMAGES_FILE} has shape {images.shape} and dtype {images.dtype}, "
                f"but {META_FILE} expects uint8 of shape {expected}. Rebuild the cache."
            )
        if len(self.index) != expected[0]:
            raise ValueError(
                f"{self.path / INDEX_FILE} has {len(self.index)} rows, but {META_FILE} expects "
                f"{expected[0]}. Rebuild the cache."
            )
        failed = int(self.meta.get("failed_count", 0))
        if failed:
            log.warning(
                "Prepared cache %s has %d rows that failed to decode and are stored black. "
                "PreparedCache.valid_rows() leaves them out.",
                self.path,
                failed,
            )

    @property
    def images(self) -> np.ndarray:
        """Read-only memory map of the pixels, uint8 of shape (N, S, S, 3)."""
        if self._images is None:
            self._images = np.load(self.path / IMAGES_FILE, mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return len(self.index)

    def failed_rows(self) -> np.ndarray:
        """Return the rows whose files failed to decode, int64, sorted."""
        status_path = self.path / STATUS_FILE
        if not int(self.meta.get("failed_count", 0)) or not status_path.is_file():
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.load(status_path) == STATUS_FAILED).astype(np.int64)

    def valid_rows(self) -> np.ndarray:
        """Return the rows with decoded pixels, int64, sorted."""
        return np.setdiff1d(np.arange(len(self), dtype=np.int64), self.failed_rows())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None
        return state


class CachedImages:
    """The images of a prepared cache as an image source (``__len__`` and ``load``).

    Args:
        cache: An open prepared cache.
    """

    def __init__(self, cache: PreparedCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def load(self, i: int) -> Image.Image:
        """Return row ``i`` as an RGB image of ``cache.image_size`` pixels square."""
        return Image.fromarray(np.array(self.cache.images[i]))

    def load_array(self, i: int) -> np.ndarray:
        """Return row ``i`` as a read-only uint8 view of shape (S, S, 3), without a copy."""
        return self.cache.images[i]


def build_prepare_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``simclr-lightning prepare``."""
    parser = argparse.ArgumentParser(
        prog="simclr-lightning prepare",
        description=(
            "Index the given face datasets, drop byte-identical duplicates, and decode every "
            "image once into a prepared cache folder. Rerunning an interrupted command resumes it."
        ),
    )

    parser.add_argument("--utkface-root", type=Path, help="UTKFace folder or its parent.")
    parser.add_argument("--ffhq-root", type=Path, help="FFHQ image folder or its parent.")
    parser.add_argument(
        "--celeba-root", type=Path, help="Folder with img_align_celeba/ and the annotation files."
    )
    parser.add_argument(
        "--celeba-all-images",
        action="store_true",
        help="Keep every CelebA image instead of one image per identity.",
    )
    parser.add_argument(
        "--celeba-gender-labels",
        action="store_true",
        help="Read CelebA gender labels from list_attr_celeba.txt.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed for the CelebA image chosen per identity."
    )

    parser.add_argument("--out", type=Path, required=True, help="Cache folder to write.")
    parser.add_argument(
        "--image-size", type=int, default=128, help="Side of the stored squares, in pixels."
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Number of decoding workers. Default: all available cores. 0 decodes in this process.",
    )
    parser.add_argument(
        "--executor",
        choices=("process", "thread"),
        default="process",
        help="Pool that decodes the images.",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Rebuild the cache even if OUT contains one."
    )
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    return parser


def prepare_main(argv: Sequence[str] | None = None) -> int:
    """Run ``simclr-lightning prepare`` with the arguments ``argv``.

    Besides the cache files, the command writes ``prepare_report.json`` to the cache folder with
    each dataset's skip report and the number of duplicates dropped.

    Returns:
        0 on success, 1 when a dataset folder or the cache folder is invalid.

    Raises:
        SystemExit: With status 2 when the arguments are invalid, as argparse does.
    """
    parser = build_prepare_parser()
    args = parser.parse_args(argv)
    if args.utkface_root is None and args.ffhq_root is None and args.celeba_root is None:
        parser.error("pass at least one of --utkface-root, --ffhq-root or --celeba-root")
    # The CLI attaches a handler to the package logger, and a root handler would print each
    # record a second time, so basicConfig runs only when no handler would receive the records.
    if not logging.getLogger("simclr_lightning").hasHandlers():
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        request = _index_request(args)
        # Listed before reading, so a file changed during the build changes the key.
        index_key = request.key(request.fingerprint())
        full_index, index, report = _build_deduplicated_index(request, not args.no_progress)
        prepare_cache(
            index,
            args.out,
            args.image_size,
            num_workers=args.workers,
            overwrite=args.overwrite,
            executor=args.executor,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as error:
        log.error("%s", error)
        return 1
    _write_json_atomic(args.out / "prepare_report.json", report)
    _record_index_key(args.out, index_key, full_index)
    log.info("Wrote the prepared cache of %d images to %s.", len(index), args.out)
    return 0


def _index_request(args: argparse.Namespace) -> FaceIndexRequest:
    """Build the FaceDataModule index request for the roots and options in ``args``."""
    return FaceIndexRequest.create(
        args.utkface_root,
        args.ffhq_root,
        args.celeba_root,
        celeba_one_per_identity=not args.celeba_all_images,
        celeba_gender_labels=args.celeba_gender_labels,
        seed=args.seed,
    )


def _record_index_key(cache_dir: Path, key: str, full_index: FaceIndex) -> None:
    """Store ``full_index`` and its key in the cache so FaceDataModule can take the index from it.

    The index file is written before the key, so a key in ``meta.json`` always comes with it.
    """
    temporary = cache_dir / f"{CACHE_FACE_INDEX_FILE}.tmp.npz"
    full_index.save(temporary)
    os.replace(temporary, cache_dir / CACHE_FACE_INDEX_FILE)
    meta = read_meta(cache_dir)
    meta[CACHE_KEY_FIELD] = key
    _write_json_atomic(cache_dir / META_FILE, meta)


def _build_deduplicated_index(
    request: FaceIndexRequest, progress: bool
) -> tuple[FaceIndex, FaceIndex, dict[str, Any]]:
    """Read the dataset roots of ``request``, merge them and keep one row per content hash.

    The roots are read through ``request`` so that the merged index equals, path for path, the
    one FaceDataModule builds for the same request.

    Returns:
        The merged index, the rows of it to cache (one per content hash) and the prepare report.
    """
    from simclr_lightning.data.splits import unique_by_hash

    started = time.monotonic()
    merged, reports = request.read(progress=progress)
    # The first copy of each file wins, and UTKFace is read first, so its labels are kept.
    kept = unique_by_hash(merged.content_hash)
    index = merged.subset(kept)
    duplicates = len(merged) - len(index)
    log.info(
        "Indexed %d images in %.1f s and dropped %d byte-identical duplicates.",
        len(merged),
        time.monotonic() - started,
        duplicates,
    )
    report = {
        "indexed": len(merged),
        "duplicates_dropped": duplicates,
        "kept": len(index),
        "skips": {name: skips.to_dict() for name, skips in reports.items()},
    }
    return merged, index, report
