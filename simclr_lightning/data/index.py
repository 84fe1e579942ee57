"""The face index: one row per image, stored as compact numpy arrays.

A :class:`FaceIndex` keeps no Python object per sample, so DataLoader workers forked from the main
process share its pages instead of copying them through reference counting.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Dataset names, indexed by the values of :attr:`FaceIndex.source`.
SOURCES: tuple[str, ...] = ("utkface", "ffhq", "celeba")
SOURCE_UTKFACE = 0
SOURCE_FFHQ = 1
SOURCE_CELEBA = 2

#: Race names, indexed by the UTKFace race label.
RACE_NAMES: tuple[str, ...] = ("White", "Black", "Asian", "Indian", "Others")
#: Gender names, indexed by the UTKFace gender label.
GENDER_NAMES: tuple[str, ...] = ("male", "female")

#: Valid label ranges, inclusive. Values outside them are stored as -1 (unknown).
AGE_RANGE = (1, 116)
GENDER_RANGE = (0, 1)
RACE_RANGE = (0, 4)

_FORMAT_VERSION = 1

# Field name -> numpy dtype, in the order they are saved.
_FIELDS: dict[str, str] = {
    "paths": "S",
    "source": "int8",
    "identity": "int64",
    "age": "int16",
    "gender": "int8",
    "race": "int8",
    "content_hash": "S32",
}


def _as_bytes_array(values: Iterable[str | bytes] | np.ndarray, dtype: str) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind == "S":
        return values.astype(dtype) if dtype != "S" else values
    encoded = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    if not encoded:
        return np.zeros(0, dtype="S1" if dtype == "S" else dtype)
    return np.array(encoded, dtype=dtype)


class FaceIndex:
    """Paths, source, identity, labels and content hash of every image, one row each.

    Unknown values are -1. Labels follow UTKFace: gender 0 male, 1 female; race 0 White, 1 Black,
    2 Asian, 3 Indian, 4 Others. Identities are the dataset's own numbers (CelebA's start at 1).

    Args:
        paths: Absolute file paths, as ``str`` or UTF-8 ``bytes``.
        source: Dataset of each row, an index into :data:`SOURCES`.
        identity: Person identity per row, or ``None`` for all unknown.
        age: Age in years per row, or ``None`` for all unknown.
        gender: Gender label per row, or ``None`` for all unknown.
        race: Race label per row, or ``None`` for all unknown.
        content_hash: Hex BLAKE2b-128 digest of each file's bytes, or ``None`` for all empty.

    Raises:
        ValueError: If the arrays differ in length or a source value is not in :data:`SOURCES`.
    """

    def __init__(
        self,
        paths: Sequence[str | bytes] | np.ndarray,
        source: Sequence[int] | np.ndarray | int,
        identity: Sequence[int] | np.ndarray | None = None,
        age: Sequence[int] | np.ndarray | None = None,
        gender: Sequence[int] | np.ndarray | None = None,
        race: Sequence[int] | np.ndarray | None = None,
        content_hash: Sequence[str | bytes] | np.ndarray | None = None,
    ) -> None:
        self.paths = _as_bytes_array(paths, "S")
        count = int(self.paths.shape[0])
        self.source = self._int_column("source", source, "int8", count)
        self.identity = self._int_column("identity", identity, "int64", count)
        self.age = self._int_column("age", age, "int16", count)
        self.gender = self._int_column("gender", gender, "int8", count)
        self.race = self._int_column("race", race, "int8", count)
        if content_hash is None:
            self.content_hash = np.zeros(count, dtype="S32")
        else:
            self.content_hash = _as_bytes_array(content_hash, "S32")
        if self.content_hash.shape != (count,):
            raise ValueError(
                f"content_hash must have one entry per path ({count}), "
                f"got shape {self.content_hash.shape}."
            )
        if count and (self.source.min() < 0 or self.source.max() >= len(SOURCES)):
            raise ValueError(
                f"source values must be indices into {SOURCES} (0 to {len(SOURCES) - 1}), "
                f"got values from {self.source.min()} to {self.source.max()}."
            )

    @staticmethod
    def _int_column(
        name: str, values: Sequence[int] | np.ndarray | int | None, dtype: str, count: int
    ) -> np.ndarray:
        if values is None:
            return np.full(count, -1, dtype=dtype)
        if np.isscalar(values):
            return np.full(count, values, dtype=dtype)
        array = np.asarray(values)
        if array.shape != (count,):
            raise ValueError(
                f"{name} must have one entry per path ({count}), got shape {array.shape}."
            )
        if array.size and array.dtype.kind not in "iub":
            raise ValueError(f"{name} must hold integers, got dtype {array.dtype}.")
        return array.astype(dtype, copy=True)

    @classmethod
    def empty(cls) -> FaceIndex:
        """Return an index with no rows."""
        return cls(paths=[], source=[])

    def __len__(self) -> int:
        return int(self.paths.shape[0])

    def __repr__(self) -> str:
        counts = {name: int((self.source == i).sum()) for i, name in enumerate(SOURCES)}
        return f"FaceIndex(rows={len(self)}, by_source={counts})"

    def path(self, i: int) -> str:
        """Return the path of row ``i`` as ``str``."""
        return self.paths[i].decode("utf-8")

    def hash(self, i: int) -> str:
        """Return the content hash of row ``i`` as a hex ``str``."""
        return self.content_hash[i].decode("ascii")

    def columns(self) -> dict[str, np.ndarray]:
        """Return the seven column arrays by field name (the arrays themselves, not copies)."""
        return {name: getattr(self, name) for name in _FIELDS}

    def subset(self, indices: Sequence[int] | np.ndarray) -> FaceIndex:
        """Return a new index of the rows ``indices`` (row numbers or a boolean mask), in order."""
        selector = np.asarray(indices)
        if selector.dtype == bool:
            if selector.shape != (len(self),):
                raise ValueError(
                    f"A boolean mask must have one entry per row ({len(self)}), "
                    f"got shape {selector.shape}."
                )
        elif selector.size == 0:
            selector = selector.astype(np.int64)
        elif selector.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers or booleans, got dtype {selector.dtype}.")
        return FaceIndex(**{name: column[selector] for name, column in self.columns().items()})

    @classmethod
    def concat(cls, indices: Sequence[FaceIndex]) -> FaceIndex:
        """Return one index with the rows of every index in ``indices``, in order."""
        if not indices:
            return cls.empty()
        merged = {
            name: np.concatenate([getattr(index, name) for index in indices]) for name in _FIELDS
        }
        return cls(**merged)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` as an uncompressed ``.npz`` file (no pickled objects)."""
        arrays: dict[str, Any] = {"format_version": np.array(_FORMAT_VERSION), **self.columns()}
        np.savez(Path(path), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FaceIndex:
        """Read an index written by :meth:`save`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file lacks a field or was written by a newer format version.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Face index file not found: {path}.")
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in _FIELDS if name not in data.files]
            if missing:
                raise ValueError(
                    f"{path} is not a face index: it lacks the fields {missing}. "
                    "Rebuild it with FaceIndex.save."
                )
            version = int(data["format_version"]) if "format_version" in data.files else 1
            if version > _FORMAT_VERSION:
                raise ValueError(
                    f"{path} uses face index format {version}, but this version of the library "
                    f"reads format {_FORMAT_VERSION} or older. Upgrade simclr-lightning."
                )
            return cls(**{name: data[name] for name in _FIELDS})

    def labeled_mask(self) -> np.ndarray:
        """Return a boolean mask of rows with both a known race and a known gender."""
        return (self.race >= 0) & (self.gender >= 0)


@dataclass
class SkipReport:
    """Counts of files and annotation rows left out, or kept with a caveat, by reason.

    Reasons are short snake-case names, and :data:`REASON_EFFECTS` gives the effect of each on
    the data.

    Attributes:
        counts: Number of occurrences per reason.
        examples: Up to ``max_examples`` example paths or names per reason.
        notes: Decisions taken while reading, such as descending into a nested folder.
        max_examples: Number of examples kept per reason.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, reason: str, example: str | None = None, count: int = 1) -> None:
        """Count ``count`` occurrences of ``reason`` and keep ``example`` if there is room."""
        if count <= 0:
            return
        self.counts[reason] = self.counts.get(reason, 0) + count
        if example is not None:
            kept = self.examples.setdefault(reason, [])
            if len(kept) < self.max_examples:
                kept.append(example)

    def note(self, message: str) -> None:
        """Record a decision taken while reading."""
        self.notes.append(message)

    def merge(self, other: SkipReport) -> SkipReport:
        """Add the counts, examples and notes of ``other`` to this report and return it."""
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
        for reason, examples in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(examples[: max(0, self.max_examples - len(kept))])
        self.notes.extend(other.notes)
        return self

    @property
    def total(self) -> int:
        """Sum of the counts over all reasons."""
        return sum(self.counts.values())

    def count(self, reason: str) -> int:
        """Return the count of ``reason``, 0 when it never occurred."""
        return self.counts.get(reason, 0)

    def to_dict(self) -> dict[str, object]:
        """Return the report as plain JSON-serialisable types."""
        return {
            "counts": dict(sorted(self.counts.items())),
            "examples": {reason: list(paths) for reason, paths in sorted(self.examples.items())},
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, content: Mapping[str, Any]) -> SkipReport:
        """Rebuild a report from the output of :meth:`to_dict`.

        Raises:
            ValueError: If ``content`` is not a mapping with a ``counts`` mapping of integers, or
                its ``examples`` or ``notes`` have the wrong type.
        """
        counts = content.get("counts") if isinstance(content, Mapping) else None
        if not isinstance(counts, Mapping):
            raise ValueError(
                f"A skip report needs a 'counts' mapping of reason to count, got {content!r}."
            )
        examples = content.get("examples") or {}
        notes = content.get("notes") or []
        if not isinstance(examples, Mapping) or not isinstance(notes, list):
            raise ValueError(
                "A skip report's 'examples' must be a mapping and its 'notes' a list, got "
                f"{type(examples).__name__} and {type(notes).__name__}."
            )
        report = cls()
        for reason, count in counts.items():
            if isinstance(count, bool) or not isinstance(count, int):
                raise ValueError(f"The count of {reason!r} must be an integer, got {count!r}.")
            report.counts[str(reason)] = count
        for reason, paths in examples.items():
            report.examples[str(reason)] = [str(path) for path in paths]
        report.notes = [str(note) for note in notes]
        return report


#: Effect of each skip reason on the data. Readers may add reasons not listed here.
REASON_EFFECTS: dict[str, str] = {
    "empty": "file left out: it has 0 bytes",
    "not_an_image": "file left out: not an image format Pillow reads",
    "truncated": "file left out: the image data ends early",
    "corrupt": "file left out: the image fails to decode",
    "too_large": "file left out: over Pillow's decompression-bomb pixel limit",
    "unreadable": "file left out: it could not be opened or read",
    "ignored_extension": "file left out: not an image file extension",
    "utkface_name_pattern": "image kept unlabeled: the name does not match AGE_GENDER_RACE_DATE",
    "utkface_label_out_of_range": "image kept unlabeled: age, gender or race out of range",
    "utkface_missing_race": "image kept with age and gender but no race: the name has 3 fields",
    "utkface_missing_timestamp": "labels parsed: the name has no date-time field",
    "utkface_stray_character": "labels parsed: stray characters after the date-time were ignored",
    "utkface_unusual_timestamp": "labels parsed: the date-time field is not 17 digits",
    "duplicate_label_conflict": (
        "image kept for pretraining only: a byte-identical copy has another race or gender"
    ),
    "celeba_identity_missing_image": "identity row ignored: its image is not in the folder",
    "celeba_partition_missing_image": "partition row ignored: its image is not in the folder",
    "celeba_attribute_missing_image": "attribute row ignored: its image is not in the folder",
    "celeba_annotation_invalid": "annotation row ignored: it cannot be parsed",
    "celeba_no_identity": "image kept as its own identity: identity_CelebA.txt has no row for it",
    "celeba_no_partition": "image left out: list_eval_partition.txt has no row for it",
    "celeba_no_gender": "image kept unlabeled: list_attr_celeba.txt has no row for it",
    "celeba_other_identity_image": "image left out: another image of the identity was chosen",
    "celeba_other_partition": "image left out: it belongs to another evaluation partition",
}
