"""Readers that turn the UTKFace, FFHQ and CelebA folder layouts into :class:`FaceIndex` rows.

Each reader finds the dataset folder under the root it is given and decodes and hashes every
image it keeps in a thread pool. Threads suffice because the work is mostly file reads and
Pillow decoder calls, which release the GIL. A reader returns the index together with a
:class:`SkipReport` of what it left out or kept with a caveat. Broken files are found here, so
they never reach a DataLoader worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from tqdm.auto import tqdm

from simclr_lightning.data.images import ImageCheck, inspect_image
from simclr_lightning.data.index import (
    AGE_RANGE,
    GENDER_RANGE,
    RACE_RANGE,
    SOURCE_CELEBA,
    SOURCE_FFHQ,
    SOURCE_UTKFACE,
    FaceIndex,
    SkipReport,
)

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".zip",
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.bz2",
    ".tar.xz",
    ".7z",
)

#: Trees with at least this many images show a progress bar on rank zero while they are checked.
PROGRESS_MIN_IMAGES = 2000

# The UTKFace date-time field is yyyymmddHHMMSS plus milliseconds, 17 digits.
_UTKFACE_TIMESTAMP_DIGITS = 17
# A third field of at least this many digits is a date-time, so the name lacks its race field.
_UTKFACE_MIN_TIMESTAMP_DIGITS = 8
_UTKFACE_SUFFIXES: tuple[str, ...] = (".jpg.chip.jpg", ".chip.jpg", ".jpg", ".jpeg", ".png")
_DIGITS = re.compile(r"[0-9]+")
_TIMESTAMP = re.compile(r"([0-9]+)(.*)", re.DOTALL)

UTKFACE_ALIGNED_FOLDER = "UTKFace"
UTKFACE_WILD_FOLDERS: tuple[str, ...] = ("part1", "part2", "part3")
FFHQ_FOLDERS: tuple[str, ...] = ("thumbnails128x128", "images1024x1024")
CELEBA_IMAGE_FOLDER = "img_align_celeba"
CELEBA_IDENTITY_FILE = "identity_CelebA.txt"
CELEBA_ATTRIBUTE_FILE = "list_attr_celeba.txt"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
CELEBA_PARTITIONS: dict[str, int] = {"train": 0, "val": 1, "test": 2}


# ---------------------------------------------------------------------------------------------
# UTKFace file names
# ---------------------------------------------------------------------------------------------


class UTKFaceName(NamedTuple):
    """Labels parsed from a UTKFace file name, -1 where unknown.

    Attributes:
        age: Age in years, 1 to 116.
        gender: 0 male, 1 female.
        race: 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others.
        rule: ``None`` for a name of the standard form, otherwise the reason (a
            :data:`~simclr_lightning.data.index.REASON_EFFECTS` key) of the rule that was applied.
    """

    age: int
    gender: int
    race: int
    rule: str | None


_UNLABELED_PATTERN = UTKFaceName(-1, -1, -1, "utkface_name_pattern")
_UNLABELED_RANGE = UTKFaceName(-1, -1, -1, "utkface_label_out_of_range")


def parse_utkface_name(name: str) -> UTKFaceName:
    """Parse age, gender and race from a UTKFace file name.

    Only the base name counts: the part after the last ``/`` or ``\\``, whatever the platform.
    The suffix ``.jpg.chip.jpg`` (aligned crops), ``.chip.jpg``, ``.jpg``, ``.jpeg`` or ``.png``
    is removed, case-insensitively, and the rest is split on ``_``. The rules, in order:

    - ``AGE_GENDER_RACE_DATETIME`` with decimal fields is the standard form (``rule`` is
      ``None``). A date-time that is not 17 digits is accepted (``utkface_unusual_timestamp``).
    - Characters after the date-time digits, such as a space or a letter before the extension or
      ``jpg`` with its dot missing, are ignored (``utkface_stray_character``).
    - Three fields whose third has at least 8 digits are ``AGE_GENDER_DATETIME``: the race is
      missing, so age and gender are kept and race is -1 (``utkface_missing_race``).
    - Three fields whose third is a single digit are ``AGE_GENDER_RACE`` without a date-time,
      and all three labels are kept (``utkface_missing_timestamp``).
    - Any other shape, an empty field or a label field that is not a decimal number gives no
      labels (``utkface_name_pattern``).
    - An age outside 1-116, a gender outside 0-1 or a race outside 0-4 gives no labels at all
      (``utkface_label_out_of_range``), because such a name is likely misparsed.

    Args:
        name: File name or path.

    Returns:
        The labels, -1 where unknown, and the rule applied.
    """
    base = re.split(r"[\\/]", name)[-1]
    stem = base
    lowered = base.lower()
    for suffix in _UTKFACE_SUFFIXES:
        if lowered.endswith(suffix):
            stem = base[: -len(suffix)]
            break

    fields = stem.split("_")
    if len(fields) == 4:
        return _parse_utkface_fields(fields[0], fields[1], fields[2], fields[3])
    if len(fields) == 3:
        third = fields[2]
        if _DIGITS.fullmatch(third) and len(third) >= _UTKFACE_MIN_TIMESTAMP_DIGITS:
            return _parse_utkface_fields(fields[0], fields[1], None, third)
        if _DIGITS.fullmatch(third) and len(third) == 1:
            return _parse_utkface_fields(fields[0], fields[1], third, None)
    return _UNLABELED_PATTERN


def _parse_utkface_fields(
    age_field: str, gender_field: str, race_field: str | None, timestamp_field: str | None
) -> UTKFaceName:
    label_fields = [age_field, gender_field] + ([race_field] if race_field is not None else [])
    if not all(_DIGITS.fullmatch(field) for field in label_fields):
        return _UNLABELED_PATTERN

    rule: str | None = None
    if timestamp_field is None:
        rule = "utkface_missing_timestamp"
    else:
        match = _TIMESTAMP.fullmatch(timestamp_field)
        if match is None:
            return _UNLABELED_PATTERN
        digits, stray = match.groups()
        if stray:
            rule = "utkface_stray_character"
        elif len(digits) != _UTKFACE_TIMESTAMP_DIGITS:
            rule = "utkface_unusual_timestamp"

    age, gender = int(age_field), int(gender_field)
    race = int(race_field) if race_field is not None else -1
    if not _in_range(age, AGE_RANGE) or not _in_range(gender, GENDER_RANGE):
        return _UNLABELED_RANGE
    if race_field is not None and not _in_range(race, RACE_RANGE):
        return _UNLABELED_RANGE
    if race_field is None:
        rule = "utkface_missing_race"
    return UTKFaceName(age, gender, race, rule)


def _in_range(value: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= value <= bounds[1]


# ---------------------------------------------------------------------------------------------
# Folder discovery
# ---------------------------------------------------------------------------------------------


def _list_dir(folder: Path) -> tuple[list[str], list[str]]:
    """Return the sorted names of the files and of the sub-folders of ``folder``."""
    files: list[str] = []
    folders: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                folders.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
    return sorted(files), sorted(folders)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _has_images(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_file() and _is_image_name(entry.name) for entry in entries)


def _find_archives(folders: Sequence[Path], stems: Sequence[str]) -> list[Path]:
    """Return archive files in ``folders`` whose names start with one of ``stems``."""
    found: list[Path] = []
    lowered_stems = [stem.lower() for stem in stems]
    for folder in folders:
        if not folder.is_dir():
            continue
        for name in _list_dir(folder)[0]:
            lowered = name.lower()
            if lowered.endswith(ARCHIVE_SUFFIXES) and lowered.startswith(tuple(lowered_stems)):
                found.append(folder / name)
    return found


def _describe_contents(folder: Path, limit: int = 10) -> str:
    if not folder.is_dir():
        return "nothing (the folder does not exist)"
    files, folders = _list_dir(folder)
    entries = [f"{name}/" for name in folders] + files
    if not entries:
        return "an empty folder"
    shown = ", ".join(entries[:limit])
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return f"{shown}{more}"


def _missing_folder_error(
    dataset: str, root: Path, expected: str, archive_stems: Sequence[str]
) -> FileNotFoundError:
    archives = _find_archives([root, root.parent], archive_stems)
    if archives:
        listed = ", ".join(str(path) for path in archives)
        return FileNotFoundError(
            f"{dataset} root {root} has no extracted images, but the archive(s) {listed} were "
            f"found. Extract them so that {expected} exists (for example "
            f"`tar -xzf ARCHIVE -C {root}` or `unzip ARCHIVE -d {root}`), then pass that root."
        )
    return FileNotFoundError(
        f"{dataset} root {root} does not contain {expected}. Found: {_describe_contents(root)}. "
        f"Pass the {dataset} dataset folder or its parent."
    )


def _descend_nested_copy(folder: Path, skips: SkipReport) -> Path:
    """Follow ``NAME/NAME/...`` while a folder has no images but a sub-folder of its own name."""
    while True:
        if _has_images(folder):
            return folder
        nested = folder / folder.name
        if not nested.is_dir():
            return folder
        message = f"{folder} has no images but contains a nested copy {nested}. Reading it instead."
        logger.info(message)
        skips.note(message)
        folder = nested


def _require_root(dataset: str, root: PathLike, archive_stems: Sequence[str]) -> Path:
    path = Path(root).expanduser().absolute()
    if not path.is_dir():
        if path.exists():
            raise FileNotFoundError(f"{dataset} root {path} is a file, expected a folder.")
        raise _missing_folder_error(dataset, path, "the dataset folder", archive_stems)
    return path


def find_utkface_folders(
    root: PathLike, *, include_wild: bool = False, skips: SkipReport | None = None
) -> list[Path]:
    """Find the UTKFace image folders under ``root``.

    ``root`` may be the aligned ``UTKFace`` folder itself or a folder that contains ``UTKFace/``
    and/or the in-the-wild parts ``part1/`` to ``part3/``. The aligned crops are read when
    present. The in-the-wild parts are read instead when there are no aligned crops, or in
    addition when ``include_wild`` is true. A nested ``UTKFace/UTKFace/`` copy is followed with a
    logged note.

    Raises:
        FileNotFoundError: If no image folder is found, naming any unextracted archive.
    """
    skips = skips if skips is not None else SkipReport()
    path = _require_root("UTKFace", root, (UTKFACE_ALIGNED_FOLDER, *UTKFACE_WILD_FOLDERS))
    aligned: Path | None = None
    if (path / UTKFACE_ALIGNED_FOLDER).is_dir():
        aligned = _descend_nested_copy(path / UTKFACE_ALIGNED_FOLDER, skips)
    else:
        candidate = _descend_nested_copy(path, skips)
        if _has_images(candidate):
            aligned = candidate
    wild = [path / part for part in UTKFACE_WILD_FOLDERS if (path / part).is_dir()]
    wild = [_descend_nested_copy(part, skips) for part in wild]

    folders = [aligned] if aligned is not None and _has_images(aligned) else []
    if include_wild or not folders:
        folders += [part for part in wild if _has_images(part)]
    elif wild:
        skips.note(
            f"Read only the aligned crops in {aligned}; the in-the-wild parts "
            f"{[str(part) for part in wild]} are left out unless include_wild is set."
        )
    if not folders:
        raise _missing_folder_error(
            "UTKFace",
            path,
            "UTKFace/*.jpg.chip.jpg or part1/ .. part3/ with *.jpg",
            (UTKFACE_ALIGNED_FOLDER, *UTKFACE_WILD_FOLDERS),
        )
    return folders


def find_ffhq_folder(
    root: PathLike,
    *,
    variant: Literal["thumbnails128x128", "images1024x1024"] | None = None,
    skips: SkipReport | None = None,
) -> Path:
    """Find the FFHQ image folder under ``root``.

    ``root`` may be the ``thumbnails128x128`` or ``images1024x1024`` folder itself or their
    parent. With ``variant=None`` the thumbnails are preferred when both exist, because they have
    64 times fewer pixels to decode.

    Raises:
        FileNotFoundError: If no FFHQ image folder is found, naming any unextracted archive.
        ValueError: If ``variant`` is not one of the two FFHQ folder names.
    """
    if variant is not None and variant not in FFHQ_FOLDERS:
        raise ValueError(f"variant must be one of {FFHQ_FOLDERS} or None, got {variant!r}.")
    skips = skips if skips is not None else SkipReport()
    path = _require_root("FFHQ", root, FFHQ_FOLDERS)
    wanted = (variant,) if variant is not None else FFHQ_FOLDERS
    if path.name in wanted:
        return _descend_nested_copy(path, skips)
    present = [name for name in wanted if (path / name).is_dir()]
    if present:
        if len(present) > 1:
            skips.note(f"Both {present} exist under {path}; reading {present[0]}.")
        return _descend_nested_copy(path / present[0], skips)
    _, subfolders = _list_dir(path)
    if variant is None and (_has_images(path) or any(_DIGITS.fullmatch(n) for n in subfolders)):
        return path
    expected = " or ".join(f"{name}/NNNNN/NNNNN.png" for name in wanted)
    raise _missing_folder_error("FFHQ", path, expected, wanted)


class CelebAFiles(NamedTuple):
    """Locations of the CelebA image folder and annotation files (``None`` when absent)."""

    images: Path
    identity: Path | None
    attributes: Path | None
    partition: Path | None


def find_celeba_files(root: PathLike, *, skips: SkipReport | None = None) -> CelebAFiles:
    """Find the CelebA aligned image folder and annotation files under ``root``.

    ``root`` may be the folder that contains ``img_align_celeba/`` and the annotation files, the
    official Google Drive layout (``Img/img_align_celeba/``, ``Anno/``, ``Eval/``) or the
    ``img_align_celeba`` folder itself, with the annotation files next to it.

    Raises:
        FileNotFoundError: If the image folder is not found, naming any unextracted archive.
    """
    skips = skips if skips is not None else SkipReport()
    path = _require_root("CelebA", root, (CELEBA_IMAGE_FOLDER, "celeba"))
    candidates = [path / CELEBA_IMAGE_FOLDER, path / "Img" / CELEBA_IMAGE_FOLDER]
    images = next((candidate for candidate in candidates if candidate.is_dir()), None)
    if images is None and (path.name == CELEBA_IMAGE_FOLDER or _has_images(path)):
        images = path
    if images is None:
        raise _missing_folder_error(
            "CelebA", path, f"{CELEBA_IMAGE_FOLDER}/NNNNNN.jpg", (CELEBA_IMAGE_FOLDER, "celeba")
        )
    images = _descend_nested_copy(images, skips)

    search = [path, path / "Anno", path / "Eval"]
    if images == path or images.parent != path:
        search += [images.parent, images.parent / "Anno", images.parent / "Eval"]

    def find(name: str) -> Path | None:
        return next((folder / name for folder in search if (folder / name).is_file()), None)

    return CelebAFiles(
        images,
        find(CELEBA_IDENTITY_FILE),
        find(CELEBA_ATTRIBUTE_FILE),
        find(CELEBA_PARTITION_FILE),
    )


# ---------------------------------------------------------------------------------------------
# Checking and hashing
# ---------------------------------------------------------------------------------------------


def inspect_images(
    paths: Sequence[str],
    *,
    description: str = "Checking images",
    num_threads: int | None = None,
    progress: bool = True,
) -> list[ImageCheck]:
    """Decode and hash every file in ``paths`` with a thread pool, in the order given.

    Args:
        paths: Files to check.
        description: Label of the progress bar, shown on rank zero for large trees.
        num_threads: Worker threads, or ``None`` for ``min(32, cpu_count + 4)``.
        progress: Show the progress bar. False hides it for every tree size.
    """
    if not paths:
        return []
    # Lightning sets rank_zero_only.rank from the launcher's environment when it is imported.
    is_rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    show_progress = progress and is_rank_zero and len(paths) >= PROGRESS_MIN_IMAGES
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        results = pool.map(inspect_image, paths)
        return list(tqdm(results, total=len(paths), desc=description, disable=not show_progress))


def _check_files(
    paths: list[str],
    skips: SkipReport,
    description: str,
    num_threads: int | None,
    progress: bool = True,
) -> tuple[list[int], list[str]]:
    """Return the positions and hashes of the readable files, counting the others in ``skips``."""
    kept: list[int] = []
    hashes: list[str] = []
    for position, check in enumerate(
        inspect_images(paths, description=description, num_threads=num_threads, progress=progress)
    ):
        if check.reason is None:
            kept.append(position)
            hashes.append(check.content_hash)
        else:
            skips.add(check.reason, paths[position])
            logger.debug("Skipping %s (%s): %s", paths[position], check.reason, check.detail)
    return kept, hashes


def _image_files(folder: Path, skips: SkipReport) -> list[str]:
    """Return the image files directly in ``folder``, counting other files as ignored."""
    files, _ = _list_dir(folder)
    images: list[str] = []
    for name in files:
        if _is_image_name(name):
            images.append(str(folder / name))
        else:
            skips.add("ignored_extension", str(folder / name))
    return images


def _log_summary(dataset: str, index: FaceIndex, skips: SkipReport) -> None:
    if skips.counts:
        details = ", ".join(f"{reason}: {count}" for reason, count in sorted(skips.counts.items()))
        rank_zero_info(f"{dataset}: indexed {len(index)} images ({details}).")
    else:
        rank_zero_info(f"{dataset}: indexed {len(index)} images.")


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def read_utkface(
    root: PathLike,
    *,
    include_wild: bool = False,
    num_threads: int | None = None,
    progress: bool = True,
) -> tuple[FaceIndex, SkipReport]:
    """Index UTKFace images with the labels parsed from their names.

    Names are parsed by :func:`parse_utkface_name`, and each non-standard name is counted under
    its rule. Files that fail to decode are left out and counted by reason. Byte-identical
    duplicates stay in the index with equal content hashes, and the splits group them.

    Args:
        root: The ``UTKFace`` folder or its parent (see :func:`find_utkface_folders`).
        include_wild: Also read the in-the-wild ``part1/`` to ``part3/`` when aligned crops exist.
        num_threads: Threads for decoding, ``None`` for the executor's default.
        progress: Show a progress bar on rank zero while a large tree is checked.

    Returns:
        The index, sorted by path, and the skip report.
    """
    skips = SkipReport()
    paths: list[str] = []
    for folder in find_utkface_folders(root, include_wild=include_wild, skips=skips):
        paths += _image_files(folder, skips)

    kept, hashes = _check_files(paths, skips, "Checking UTKFace", num_threads, progress)
    ages, genders, races = [], [], []
    for position in kept:
        parsed = parse_utkface_name(paths[position])
        if parsed.rule is not None:
            skips.add(parsed.rule, os.path.basename(paths[position]))
        ages.append(parsed.age)
        genders.append(parsed.gender)
        races.append(parsed.race)

    index = FaceIndex(
        paths=[paths[position] for position in kept],
        source=SOURCE_UTKFACE,
        age=np.asarray(ages, dtype=np.int16),
        gender=np.asarray(genders, dtype=np.int8),
        race=np.asarray(races, dtype=np.int8),
        content_hash=hashes,
    )
    _log_summary("UTKFace", index, skips)
    return index, skips


def read_ffhq(
    root: PathLike,
    *,
    variant: Literal["thumbnails128x128", "images1024x1024"] | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> tuple[FaceIndex, SkipReport]:
    """Index FFHQ images, which carry no labels.

    Images are read from the numbered sub-folders (``00000/`` to ``69000/``) and from the image
    folder itself, so a flat copy works too.

    Args:
        root: An FFHQ image folder or its parent (see :func:`find_ffhq_folder`).
        variant: ``"thumbnails128x128"``, ``"images1024x1024"`` or ``None`` to prefer thumbnails.
        num_threads: Threads for decoding, ``None`` for the executor's default.
        progress: Show a progress bar on rank zero while a large tree is checked.

    Returns:
        The index, sorted by path, and the skip report.
    """
    skips = SkipReport()
    folder = find_ffhq_folder(root, variant=variant, skips=skips)
    paths = _image_files(folder, skips)
    for name in _list_dir(folder)[1]:
        paths += _image_files(folder / name, skips)
    paths.sort()

    kept, hashes = _check_files(paths, skips, "Checking FFHQ", num_threads, progress)
    index = FaceIndex(
        paths=[paths[position] for position in kept], source=SOURCE_FFHQ, content_hash=hashes
    )
    _log_summary("FFHQ", index, skips)
    return index, skips


def read_celeba(
    root: PathLike,
    *,
    one_per_identity: bool = True,
    seed: int = 0,
    partition: Literal["train", "val", "test"] | None = None,
    gender_labels: bool = False,
    num_threads: int | None = None,
    progress: bool = True,
) -> tuple[FaceIndex, SkipReport]:
    """Index CelebA aligned images with their identities and, optionally, gender labels.

    Annotation rows that name an image not in the folder are counted per file
    (``celeba_identity_missing_image`` and so on) and are not an error, so a partial copy of
    the images works with the full annotation files.

    Args:
        root: Folder with ``img_align_celeba/`` and the annotation files (see
            :func:`find_celeba_files`).
        one_per_identity: Keep one image per identity, chosen at random with ``seed`` among the
            readable images of that identity. Images without an identity row count as their
            own identity. Needs ``identity_CelebA.txt``.
        seed: Seed of the per-identity choice.
        partition: Keep only the official ``"train"``, ``"val"`` or ``"test"`` partition of
            ``list_eval_partition.txt``, or ``None`` for all images.
        gender_labels: Read gender from the ``Male`` attribute of ``list_attr_celeba.txt``
            (1 gives 0 male, -1 gives 1 female).
        num_threads: Threads for decoding, ``None`` for the executor's default.
        progress: Show a progress bar on rank zero while a large tree is checked.

    Returns:
        The index, sorted by path, and the skip report.

    Raises:
        FileNotFoundError: If the image folder or an annotation file the options need is missing.
        ValueError: If ``partition`` is not a partition name or ``list_attr_celeba.txt`` has no
            ``Male`` column.
    """
    if partition is not None and partition not in CELEBA_PARTITIONS:
        raise ValueError(
            f"partition must be one of {tuple(CELEBA_PARTITIONS)} or None, got {partition!r}."
        )
    skips = SkipReport()
    files = find_celeba_files(root, skips=skips)
    names = [os.path.basename(path) for path in _image_files(files.images, skips)]
    present = set(names)

    identities = _read_celeba_identities(files, present, one_per_identity, skips)
    if partition is not None:
        names = _filter_celeba_partition(files, names, present, partition, skips)
    genders = _read_celeba_genders(files, present, skips) if gender_labels else {}

    identity_of = np.array([identities.get(name, -1) for name in names], dtype=np.int64)
    if files.identity is not None:
        for name in names:
            if name not in identities:
                skips.add("celeba_no_identity", name)

    paths = [str(files.images / name) for name in names]
    if one_per_identity:
        kept, hashes = _choose_one_per_identity(
            paths, identity_of, seed, skips, num_threads, progress
        )
    else:
        kept, hashes = _check_files(paths, skips, "Checking CelebA", num_threads, progress)

    gender_of = np.full(len(kept), -1, dtype=np.int8)
    if gender_labels:
        for row, position in enumerate(kept):
            value = genders.get(names[position])
            if value is None:
                skips.add("celeba_no_gender", names[position])
            else:
                gender_of[row] = value

    index = FaceIndex(
        paths=[paths[position] for position in kept],
        source=SOURCE_CELEBA,
        identity=identity_of[np.asarray(kept, dtype=np.int64)],
        gender=gender_of,
        content_hash=hashes,
    )
    _log_summary("CelebA", index, skips)
    return index, skips


def _read_annotation_rows(
    path: Path,
    parse: Callable[[list[str]], int | None],
    present: set[str],
    reason: str,
    skips: SkipReport,
    header_lines: int = 0,
) -> dict[str, int]:
    """Parse the ``name value...`` rows of a CelebA annotation file for the images in ``present``.

    The first ``header_lines`` lines are skipped. Rows that ``parse`` rejects (it returns
    ``None``) are counted as invalid, and rows of absent images are counted under ``reason``.
    """
    values: dict[str, int] = {}
    missing = 0
    with open(path, encoding="utf-8") as handle:
        # Universal newlines turn the CRLF endings of the official files into "\n", and
        # str.split() without arguments treats a run of spaces as one separator.
        for line_number, line in enumerate(handle, start=1):
            tokens = line.split()
            if line_number <= header_lines or not tokens:
                continue
            value = parse(tokens)
            if value is None:
                skips.add("celeba_annotation_invalid", f"{path.name}:{line_number}: {line.strip()}")
            elif tokens[0] not in present:
                missing += 1
                skips.add(reason, tokens[0] if missing <= skips.max_examples else None)
            else:
                values[tokens[0]] = value
    if missing:
        skips.note(f"{path.name}: {missing} rows name images that are not in the image folder.")
    return values


def _parse_identity(tokens: list[str]) -> int | None:
    if len(tokens) != 2 or not _DIGITS.fullmatch(tokens[1]) or int(tokens[1]) < 1:
        return None
    return int(tokens[1])


def _read_celeba_identities(
    files: CelebAFiles, present: set[str], required: bool, skips: SkipReport
) -> dict[str, int]:
    if files.identity is None:
        if required:
            raise FileNotFoundError(
                f"{CELEBA_IDENTITY_FILE} was not found next to {files.images}, but "
                "one_per_identity=True needs it. Put the file there, or pass "
                "one_per_identity=False (celeba_one_per_identity=False) to use every image."
            )
        skips.note(f"{CELEBA_IDENTITY_FILE} not found: identities are unknown (-1).")
        return {}
    return _read_annotation_rows(
        files.identity, _parse_identity, present, "celeba_identity_missing_image", skips
    )


def _filter_celeba_partition(
    files: CelebAFiles, names: list[str], present: set[str], partition: str, skips: SkipReport
) -> list[str]:
    if files.partition is None:
        raise FileNotFoundError(
            f"{CELEBA_PARTITION_FILE} was not found next to {files.images}, but partition="
            f"{partition!r} needs it. Put the file there, or pass partition=None."
        )

    def parse(tokens: list[str]) -> int | None:
        valid = len(tokens) == 2 and tokens[1] in ("0", "1", "2")
        return int(tokens[1]) if valid else None

    partitions = _read_annotation_rows(
        files.partition, parse, present, "celeba_partition_missing_image", skips
    )
    wanted = CELEBA_PARTITIONS[partition]
    kept: list[str] = []
    for name in names:
        value = partitions.get(name)
        if value is None:
            skips.add("celeba_no_partition", name)
        elif value != wanted:
            skips.add("celeba_other_partition", name)
        else:
            kept.append(name)
    return kept


def _read_celeba_genders(
    files: CelebAFiles, present: set[str], skips: SkipReport
) -> dict[str, int]:
    if files.attributes is None:
        raise FileNotFoundError(
            f"{CELEBA_ATTRIBUTE_FILE} was not found next to {files.images}, but CelebA gender "
            "labels were requested. Put the file there, or turn the labels off: "
            "celeba_gender_labels=False for FaceDataModule, --data.celeba_gender_labels false "
            "for pretrain and finetune, gender_labels=False for read_celeba, or drop "
            "--celeba-gender-labels from prepare."
        )
    with open(files.attributes, encoding="utf-8") as handle:
        count_line = handle.readline().strip()
        header = handle.readline().split()
    if "Male" not in header:
        raise ValueError(
            f"{files.attributes} has no 'Male' column in its second line (found {header[:5]}...). "
            "Expected the CelebA attribute file: a count line, a line of 40 names, then rows."
        )
    column = header.index("Male") + 1
    width = len(header) + 1

    def parse(tokens: list[str]) -> int | None:
        if len(tokens) != width or tokens[column] not in ("1", "-1"):
            return None
        return 0 if tokens[column] == "1" else 1

    genders = _read_annotation_rows(
        files.attributes, parse, present, "celeba_attribute_missing_image", skips, header_lines=2
    )
    if count_line.isdigit():
        skips.note(f"{files.attributes.name}: the count line gives {count_line} rows.")
    return genders


def _choose_one_per_identity(
    paths: list[str],
    identity: np.ndarray,
    seed: int,
    skips: SkipReport,
    num_threads: int | None,
    progress: bool = True,
) -> tuple[list[int], list[str]]:
    """Pick one readable image per identity, trying each identity's images in a seeded order.

    Rounds check the next candidate of every identity that has no readable image yet, so only
    about one image per identity is decoded. Images with identity -1 are their own identity.
    """
    rng = np.random.default_rng(seed)
    groups: list[np.ndarray] = []
    known = identity >= 0
    order = np.argsort(identity, kind="stable")
    sorted_ids = identity[order]
    boundaries = np.flatnonzero(np.diff(sorted_ids)) + 1
    for members in np.split(order, boundaries):
        if members.size and identity[members[0]] >= 0:
            groups.append(members[rng.permutation(members.size)])
    groups += [np.array([position]) for position in np.flatnonzero(~known)]

    chosen: dict[int, tuple[int, str]] = {}
    failed = 0
    attempt = 0
    pending = [group_number for group_number, members in enumerate(groups) if members.size]
    while pending:
        candidates = [int(groups[group_number][attempt]) for group_number in pending]
        checks = inspect_images(
            [paths[position] for position in candidates],
            description=f"Checking CelebA (round {attempt + 1})",
            num_threads=num_threads,
            progress=progress,
        )
        still_pending: list[int] = []
        for group_number, position, check in zip(pending, candidates, checks, strict=True):
            if check.reason is None:
                chosen[group_number] = (position, check.content_hash)
                continue
            skips.add(check.reason, paths[position])
            failed += 1
            if attempt + 1 < groups[group_number].size:
                still_pending.append(group_number)
        pending = still_pending
        attempt += 1

    picked = sorted(chosen.values())
    skips.add("celeba_other_identity_image", count=len(paths) - len(picked) - failed)
    return [position for position, _ in picked], [content_hash for _, content_hash in picked]


def read_face_sources(
    utkface_root: PathLike | None = None,
    ffhq_root: PathLike | None = None,
    celeba_root: PathLike | None = None,
    *,
    celeba_one_per_identity: bool = True,
    celeba_partition: Literal["train", "val", "test"] | None = None,
    celeba_gender_labels: bool = False,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
) -> tuple[FaceIndex, dict[str, SkipReport]]:
    """Read every given dataset root and merge the rows, UTKFace first, then FFHQ, then CelebA.

    ``num_threads`` and ``progress`` are passed to each reader. The other options are those of
    :func:`read_celeba`.

    Returns:
        The merged index and the skip report of each dataset that was read, by source name.

    Raises:
        ValueError: If no root is given.
    """
    if utkface_root is None and ffhq_root is None and celeba_root is None:
        raise ValueError(
            "No dataset root given: pass at least one of utkface_root, ffhq_root or celeba_root."
        )
    parts: list[FaceIndex] = []
    reports: dict[str, SkipReport] = {}
    if utkface_root is not None:
        index, reports["utkface"] = read_utkface(
            utkface_root, num_threads=num_threads, progress=progress
        )
        parts.append(index)
    if ffhq_root is not None:
        index, reports["ffhq"] = read_ffhq(ffhq_root, num_threads=num_threads, progress=progress)
        parts.append(index)
    if celeba_root is not None:
        index, reports["celeba"] = read_celeba(
            celeba_root,
            one_per_identity=celeba_one_per_identity,
            seed=seed,
            partition=celeba_partition,
            gender_labels=celeba_gender_labels,
            num_threads=num_threads,
            progress=progress,
        )
        parts.append(index)
    return FaceIndex.concat(parts), reports


# ---------------------------------------------------------------------------------------------
# Listing fingerprint
# ---------------------------------------------------------------------------------------------


class ListingFingerprint(NamedTuple):
    """Digest of the files that the readers would read, computed from the folder listings alone.

    Attributes:
        digest: Hex BLAKE2b-128 digest of each listed file's path, size and modification time.
        file_count: Number of files listed.
    """

    digest: str
    file_count: int


def fingerprint_face_sources(
    utkface_root: PathLike | None = None,
    ffhq_root: PathLike | None = None,
    celeba_root: PathLike | None = None,
) -> ListingFingerprint:
    """Fingerprint the files that :func:`read_face_sources` reads, without opening any of them.

    The folders are found as the readers find them, and each folder is listed with
    :func:`os.scandir`. The digest covers every listed file (images and the files the readers
    count as ignored) and the CelebA annotation files, by path, size and modification time in
    nanoseconds. So it changes when a file is added, removed, resized or rewritten, but costs one
    ``stat`` per file and no reads. A file rewritten with the same size within the file system's
    timestamp resolution keeps the same digest.

    Raises:
        ValueError: If no root is given.
        FileNotFoundError: If a root has no dataset folder, as the readers raise it.
    """
    if utkface_root is None and ffhq_root is None and celeba_root is None:
        raise ValueError(
            "No dataset root given: pass at least one of utkface_root, ffhq_root or celeba_root."
        )
    digest = hashlib.blake2b(digest_size=16)
    file_count = 0
    if utkface_root is not None:
        digest.update(b"utkface\0")
        for folder in find_utkface_folders(utkface_root):
            file_count += _hash_listing(digest, folder)
    if ffhq_root is not None:
        digest.update(b"ffhq\0")
        folder = find_ffhq_folder(ffhq_root)
        file_count += _hash_listing(digest, folder)
        for name in _list_dir(folder)[1]:
            file_count += _hash_listing(digest, folder / name)
    if celeba_root is not None:
        digest.update(b"celeba\0")
        files = find_celeba_files(celeba_root)
        file_count += _hash_listing(digest, files.images)
        for annotation in (files.identity, files.attributes, files.partition):
            if annotation is not None:
                _hash_entry(digest, str(annotation), os.stat(annotation))
                file_count += 1
    return ListingFingerprint(digest.hexdigest(), file_count)


def _hash_listing(digest: hashlib.blake2b, folder: Path) -> int:
    """Add the path, size and modification time of each file directly in ``folder``."""
    entries: list[tuple[str, os.stat_result]] = []
    with os.scandir(folder) as listing:
        for entry in listing:
            if entry.is_file():
                entries.append((entry.path, entry.stat()))
    entries.sort(key=lambda item: item[0])
    digest.update(str(folder).encode("utf-8", "surrogateescape") + b"/\0")
    for path, stat in entries:
        _hash_entry(digest, path, stat)
    return len(entries)


def _hash_entry(digest: hashlib.blake2b, path: str, stat: os.stat_result) -> None:
    digest.update(path.encode("utf-8", "surrogateescape"))
    digest.update(f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("ascii"))
