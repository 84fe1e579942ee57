"""The face index file: the index and skip reports of some dataset roots, built once and reused.

Reading the dataset roots decodes and hashes every image (see :mod:`simclr_lightning.data.sources`).
:func:`load_or_build_face_index` does that once and stores the result in an index folder as
``face_index-<key>.npz`` (the :class:`~simclr_lightning.data.index.FaceIndex`) and
``face_index-<key>.json`` (the skip report of each dataset and the build details). Later calls
read those two files instead of the images.

The key is a digest of the resolved roots, the reader options, :data:`READER_VERSION` and a
fingerprint of the folder listings (:func:`~simclr_lightning.data.sources.fingerprint_face_sources`,
names, sizes and modification times from ``os.scandir``). Adding, removing or rewriting a file or
changing an option gives a new key, so a stale file is never read. Writing the file of a new key
removes the files in the same folder that the same roots and options wrote for older listings
(:func:`remove_superseded_index_files`); files of other options stay, for a switch back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import stat
import time
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from simclr_lightning.data.index import FaceIndex, SkipReport
from simclr_lightning.data.sources import (
    ListingFingerprint,
    PathLike,
    fingerprint_face_sources,
    read_face_sources,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: Version of the reader rules, part of every key. Bump it when a reader change alters the rows
#: or skip reports of unchanged files, so that index files of the old rules are not reused.
READER_VERSION = 1
#: Folder created next to the first dataset root when no ``index_dir`` is given.
INDEX_FOLDER_NAME = "simclr-lightning-index"
FILE_PREFIX = "face_index-"
#: Field of a prepared cache's ``meta.json`` with the index key of the rows it was built from.
CACHE_KEY_FIELD = "face_index_key"
#: File in a prepared cache folder with the skip report of each dataset.
CACHE_REPORT_FILE = "prepare_report.json"
#: File in a prepared cache folder with the face index of the request, byte-identical copies
#: included, so that a datamodule reading the cache splits the same rows as one reading files.
CACHE_FACE_INDEX_FILE = "face_index.npz"

Origin = Literal["index file", "prepared cache", "built"]
Partition = Literal["train", "val", "test"]

# np.load and FaceIndex.load raise these for a damaged or foreign file.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    zipfile.BadZipFile,
)


@dataclass(frozen=True)
class FaceIndexRequest:
    """Dataset roots and reader options, which together fix the rows of a face index.

    Build one with :meth:`create`. It resolves the roots and resets the options that cannot change
    the result, so that they leave the key unchanged: the CelebA options when there is no CelebA
    root, and the seed when CelebA keeps every image.

    Attributes:
        utkface_root: Resolved UTKFace root, or ``None``.
        ffhq_root: Resolved FFHQ root, or ``None``.
        celeba_root: Resolved CelebA root, or ``None``.
        celeba_one_per_identity: Keep one CelebA image per identity.
        celeba_partition: Official CelebA partition to keep, or ``None`` for all.
        celeba_gender_labels: Read CelebA gender labels.
        seed: Seed of the CelebA per-identity choice.
    """

    utkface_root: str | None = None
    ffhq_root: str | None = None
    celeba_root: str | None = None
    celeba_one_per_identity: bool = True
    celeba_partition: Partition | None = None
    celeba_gender_labels: bool = False
    seed: int = 0

    @classmethod
    def create(
        cls,
        utkface_root: PathLike | None = None,
        ffhq_root: PathLike | None = None,
        celeba_root: PathLike | None = None,
        *,
        celeba_one_per_identity: bool = True,
        celeba_partition: Partition | None = None,
        celeba_gender_labels: bool = False,
        seed: int = 0,
    ) -> FaceIndexRequest:
        """Resolve the roots and drop the options that do not affect the index.

        Raises:
            ValueError: If no root is given.
        """
        if utkface_root is None and ffhq_root is None and celeba_root is None:
            raise ValueError(
                "No dataset root given: pass at least one of utkface_root, ffhq_root or "
                "celeba_root."
            )
        if celeba_root is None:
            celeba_one_per_identity, celeba_partition, celeba_gender_labels = True, None, False
        if celeba_root is None or not celeba_one_per_identity:
            seed = 0
        return cls(
            utkface_root=_resolve(utkface_root),
            ffhq_root=_resolve(ffhq_root),
            celeba_root=_resolve(celeba_root),
            celeba_one_per_identity=bool(celeba_one_per_identity),
            celeba_partition=celeba_partition,
            celeba_gender_labels=bool(celeba_gender_labels),
            seed=int(seed),
        )

    def roots(self) -> list[str]:
        """Return the given roots, UTKFace first, then FFHQ, then CelebA."""
        return [root for root in (self.utkface_root, self.ffhq_root, self.celeba_root) if root]

    def fingerprint(self) -> ListingFingerprint:
        """List the folders that the readers read and fingerprint them, without reading files."""
        return fingerprint_face_sources(self.utkface_root, self.ffhq_root, self.celeba_root)

    def key(self, fingerprint: ListingFingerprint) -> str:
        """Return the 32-character hex key of this request over the listing ``fingerprint``."""
        content = {
            "reader_version": READER_VERSION,
            "request": dataclasses.asdict(self),
            "listing": fingerprint.digest,
        }
        encoded = json.dumps(content, sort_keys=True).encode("utf-8")
        return hashlib.blake2b(encoded, digest_size=16).hexdigest()

    def read(
        self, num_threads: int | None = None, progress: bool = True
    ) -> tuple[FaceIndex, dict[str, SkipReport]]:
        """Read the roots with :func:`~simclr_lightning.data.sources.read_face_sources`."""
        return read_face_sources(
            self.utkface_root,
            self.ffhq_root,
            self.celeba_root,
            celeba_one_per_identity=self.celeba_one_per_identity,
            celeba_partition=self.celeba_partition,
            celeba_gender_labels=self.celeba_gender_labels,
            seed=self.seed,
            num_threads=num_threads,
            progress=progress,
        )


def _resolve(root: PathLike | None) -> str | None:
    if root is None:
        return None
    return str(Path(root).expanduser().resolve())


@dataclass
class StoredIndex:
    """A face index with the skip report of each dataset and where it came from.

    Attributes:
        index: The index rows.
        skipped: Skip report of each dataset that was read, by source name.
        origin: ``"index file"``, ``"prepared cache"`` or ``"built"`` (read from the images).
        path: The index file read or written, or the cache folder; ``None`` when nothing was
            read or saved.
        notes: Decisions that change the data, in plain sentences.
    """

    index: FaceIndex
    skipped: dict[str, SkipReport]
    origin: Origin
    path: Path | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Index folders
# ---------------------------------------------------------------------------------------------


def user_index_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/simclr-lightning/face_index``, by default under ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "simclr-lightning" / "face_index"


def candidate_index_dirs(request: FaceIndexRequest, index_dir: PathLike | None) -> list[Path]:
    """Return the folders searched for the index file, in order, and tried for writing it.

    ``index_dir`` alone when it is given. Otherwise a :data:`INDEX_FOLDER_NAME` folder in the
    parent folder of the first root, then :func:`user_index_dir`.
    """
    if index_dir is not None:
        return [Path(index_dir).expanduser()]
    first_root = Path(request.roots()[0])
    return [first_root.parent / INDEX_FOLDER_NAME, user_index_dir()]


def _allows_writes(folder: Path) -> bool:
    """Tell whether ``folder``, or its nearest existing parent, permits creating files.

    A folder without any write permission bit counts as read-only even for the superuser, who
    passes ``os.access`` everywhere.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return False
    mode = existing.stat().st_mode
    has_write_bit = bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return has_write_bit and os.access(existing, os.W_OK | os.X_OK)


def index_file_paths(folder: PathLike, key: str) -> tuple[Path, Path]:
    """Return the ``.npz`` and ``.json`` paths of the index file of ``key`` in ``folder``."""
    folder = Path(folder)
    return folder / f"{FILE_PREFIX}{key}.npz", folder / f"{FILE_PREFIX}{key}.json"


# ---------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------


def write_index_file(
    folder: PathLike,
    key: str,
    request: FaceIndexRequest,
    fingerprint: ListingFingerprint,
    index: FaceIndex,
    skipped: dict[str, SkipReport],
    build_seconds: float,
) -> Path:
    """Write the index file of ``key`` to ``folder``, creating the folder, and return its path.

    Each file is written under a temporary name and renamed into place, the ``.json`` last, so
    a reader never sees a partial file. Processes that write the same key at once write the same
    content, and the last rename wins.

    Raises:
        OSError: If the folder cannot be created or written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    npz_path, json_path = index_file_paths(folder, key)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary_npz = folder / f"{npz_path.stem}.{token}.tmp.npz"
    temporary_json = folder / f"{json_path.stem}.{token}.tmp.json"
    content = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "rows": len(index),
        "request": dataclasses.asdict(request),
        "listed_files": fingerprint.file_count,
        "listing_digest": fingerprint.digest,
        "reader_version": READER_VERSION,
        "build_seconds": round(build_seconds, 3),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "skipped": {source: report.to_dict() for source, report in skipped.items()},
    }
    try:
        index.save(temporary_npz)
        os.replace(temporary_npz, npz_path)
        temporary_json.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary_json, json_path)
    finally:
        temporary_npz.unlink(missing_ok=True)
        temporary_json.unlink(missing_ok=True)
    return npz_path


def remove_superseded_index_files(folder: PathLike, key: str, request: FaceIndexRequest) -> int:
    """Delete the index files in ``folder`` of ``request`` under keys other than ``key``.

    Those files describe older listings of the same roots with the same options, or older
    reader rules, so no later call can read them. Files of other requests, damaged files and
    temporary files are left alone; a file that cannot be deleted is logged and kept.

    Returns:
        The number of index files deleted.
    """
    folder = Path(folder)
    expected = dataclasses.asdict(request)
    removed = 0
    for json_path in sorted(folder.glob(f"{FILE_PREFIX}*.json")):
        old_key = json_path.stem[len(FILE_PREFIX) :]
        if old_key == key or ".tmp" in json_path.name:
            continue
        try:
            content = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            logger.debug("Keeping the unreadable index file %s: %s", json_path, error)
            continue
        if not isinstance(content, dict) or content.get("request") != expected:
            continue
        npz_path = index_file_paths(folder, old_key)[0]
        try:
            # The .npz goes first, so a failed delete leaves the .json that finds it next time.
            npz_path.unlink(missing_ok=True)
            json_path.unlink()
        except OSError as error:
            logger.warning("Failed to delete a superseded face index file: %s", error)
            continue
        removed += 1
    if removed:
        rank_zero_info(
            f"Deleted {removed} superseded face index file(s) of the same roots from {folder}."
        )
    return removed


def read_index_file(folder: PathLike, key: str) -> StoredIndex:
    """Read the index file of ``key`` from ``folder``.

    Raises:
        FileNotFoundError: If the ``.npz`` or the ``.json`` file is missing.
        ValueError: If the files are damaged, of a newer format, or disagree with ``key``.
    """
    npz_path, json_path = index_file_paths(folder, key)
    if not json_path.is_file() or not npz_path.is_file():
        raise FileNotFoundError(f"No face index file {npz_path} with its {json_path.name}.")
    try:
        content = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{json_path} is not valid JSON ({error}).") from error
    if not isinstance(content, dict):
        raise ValueError(f"{json_path} must contain a JSON object, got {type(content).__name__}.")
    version = content.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{json_path} has format version {version!r}, but this library reads version "
            f"{FORMAT_VERSION} or older."
        )
    if content.get("key") != key:
        raise ValueError(f"{json_path} belongs to key {content.get('key')!r}, expected {key}.")
    try:
        index = FaceIndex.load(npz_path)
    except _READ_ERRORS as error:
        raise ValueError(f"{npz_path} is not a readable face index ({error}).") from error
    if len(index) != content.get("rows"):
        raise ValueError(
            f"{npz_path} has {len(index)} rows, but {json_path.name} records {content.get('rows')}."
        )
    skipped = _skip_reports(content.get("skipped"), json_path)
    return StoredIndex(index, skipped, "index file", npz_path)


def _skip_reports(content: Any, source_path: Path) -> dict[str, SkipReport]:
    if not isinstance(content, dict):
        raise ValueError(f"{source_path} has no 'skipped' object of skip reports by dataset.")
    return {str(source): SkipReport.from_dict(report) for source, report in content.items()}


def find_index_file(folders: Sequence[Path], key: str) -> StoredIndex | None:
    """Read the index file of ``key`` from the first of ``folders`` that has one.

    A damaged file is logged as a warning and skipped, so the caller builds the index again.
    """
    for folder in folders:
        npz_path, json_path = index_file_paths(folder, key)
        if not json_path.is_file():
            continue
        try:
            return read_index_file(folder, key)
        except (FileNotFoundError, ValueError) as error:
            rank_zero_warn(f"Ignoring the face index file in {folder}: {error}")
    return None


def index_from_cache(cache_dir: PathLike, key: str) -> StoredIndex | None:
    """Return the face index stored in the prepared cache in ``cache_dir`` when it is for ``key``.

    The cache qualifies when it is complete, its ``meta.json`` records ``key`` under
    :data:`CACHE_KEY_FIELD`, and its :data:`CACHE_FACE_INDEX_FILE` is readable and contains only
    content hashes that the cache has pixels for. That file is the index that
    :meth:`FaceIndexRequest.read` returns, byte-identical copies included, so the splits equal
    those built from an index file or the images. The skip reports come from
    :data:`CACHE_REPORT_FILE` when present.
    """
    from simclr_lightning.data.cache import PreparedCache

    try:
        cache = PreparedCache.open(cache_dir)
    except (FileNotFoundError, ValueError) as error:
        logger.debug("Not taking the index from the prepared cache %s: %s", cache_dir, error)
        return None
    if cache.meta.get(CACHE_KEY_FIELD) != key:
        return None
    index_path = cache.path / CACHE_FACE_INDEX_FILE
    if not index_path.is_file():
        rank_zero_info(
            f"The prepared cache {cache.path} has no {CACHE_FACE_INDEX_FILE}, so the face index "
            "comes from an index file or the images. Rerun `simclr-lightning prepare` to add it."
        )
        return None
    try:
        index = FaceIndex.load(index_path)
    except _READ_ERRORS as error:
        rank_zero_warn(f"Ignoring {index_path}: it is not a readable face index ({error}).")
        return None
    uncached = int((~np.isin(index.content_hash, cache.index.content_hash)).sum())
    if uncached:
        rank_zero_warn(
            f"Ignoring {index_path}: {uncached} of its {len(index)} images have no pixels in the "
            "cache. Rebuild the cache with `simclr-lightning prepare --overwrite`."
        )
        return None

    notes = [f"The face index comes from the prepared cache {cache.path}."]
    report_path = cache.path / CACHE_REPORT_FILE
    skipped: dict[str, SkipReport] = {}
    try:
        content = json.loads(report_path.read_text(encoding="utf-8"))
        if not isinstance(content, dict):
            raise ValueError(f"expected a JSON object, got {type(content).__name__}")
        skipped = _skip_reports(content.get("skips"), report_path)
    except (OSError, ValueError) as error:
        notes.append(f"The skip reports are unknown because {report_path} is unreadable: {error}")
    return StoredIndex(index, skipped, "prepared cache", cache.path, notes)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def load_or_build_face_index(
    request: FaceIndexRequest,
    *,
    index_dir: PathLike | None = None,
    cache_dir: PathLike | None = None,
    num_threads: int | None = None,
) -> StoredIndex:
    """Return the index of ``request`` from a prepared cache, an index file, or the images.

    The sources are tried in that order. When the index is built from the images, it is written
    to the first folder of :func:`candidate_index_dirs` that permits it, unless the listing
    changed while the images were read. Each step is logged with its duration on rank zero.

    Args:
        request: Roots and reader options.
        index_dir: Folder of the index files, or ``None`` for :func:`candidate_index_dirs`.
        cache_dir: Prepared cache folder whose index is taken when it was built for the same key.
        num_threads: Threads that decode the images when the index is built.

    Raises:
        FileNotFoundError: If a root has no dataset folder.
    """
    started = time.perf_counter()
    fingerprint = request.fingerprint()
    key = request.key(fingerprint)
    rank_zero_info(
        f"Listed {fingerprint.file_count} dataset files in {time.perf_counter() - started:.2f} s "
        f"(face index key {key})."
    )

    loaded = index_from_cache(cache_dir, key) if cache_dir is not None else None
    folders = candidate_index_dirs(request, index_dir)
    if loaded is None:
        loaded = find_index_file(folders, key)
    if loaded is not None:
        rank_zero_info(
            f"Read the face index ({len(loaded.index)} images) from the {loaded.origin} "
            f"{loaded.path} in {time.perf_counter() - started:.2f} s."
        )
        return loaded

    rank_zero_info(
        f"No face index file for key {key} in {', '.join(map(str, folders))}, so the images are "
        "read, decoded and hashed now."
    )
    build_started = time.perf_counter()
    index, skipped = request.read(num_threads=num_threads)
    build_seconds = time.perf_counter() - build_started
    stored = StoredIndex(index, skipped, "built")
    if request.fingerprint() != fingerprint:
        rank_zero_warn(
            "The dataset files changed while they were indexed, so the face index is not saved. "
            "The next setup reads the images again."
        )
    else:
        stored.path = _save(folders, key, request, fingerprint, index, skipped, build_seconds)
    rank_zero_info(
        f"Built the face index ({len(index)} images) in {build_seconds:.1f} s"
        + (f" and saved it to {stored.path}." if stored.path else ".")
    )
    return stored


def _save(
    folders: Sequence[Path],
    key: str,
    request: FaceIndexRequest,
    fingerprint: ListingFingerprint,
    index: FaceIndex,
    skipped: dict[str, SkipReport],
    build_seconds: float,
) -> Path | None:
    """Write the index file to the first writable folder of ``folders``, or return ``None``."""
    for folder in folders:
        if not _allows_writes(folder):
            logger.debug("Not writing the face index to %s: the folder is read-only.", folder)
            continue
        try:
            path = write_index_file(
                folder, key, request, fingerprint, index, skipped, build_seconds
            )
        except OSError as error:
            rank_zero_warn(f"Failed to write the face index file to {folder}: {error}")
            continue
        remove_superseded_index_files(folder, key, request)
        return path
    rank_zero_warn(
        f"The face index could not be saved in {', '.join(map(str, folders))}, so every setup "
        "reads the images again. Pass index_dir with a writable folder."
    )
    return None
