"""Map-style datasets that yield the library's pretraining and labeled batch dictionaries.

A file that fails to load at run time (changed or removed after it was indexed) does not stop a
long run: the dataset logs a counted warning and returns the next readable row instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from simclr_lightning.data.gpu_augment import UInt8ImageDataset
from simclr_lightning.data.images import ImageSource

logger = logging.getLogger(__name__)

#: Rows tried after a failed one before the dataset gives up and raises.
MAX_SUBSTITUTIONS = 16
#: Load failures logged one by one in each process before only every 100th is logged.
MAX_LOGGED_FAILURES = 10

# Pillow raises these for files that changed or broke after indexing.
_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)

Item = TypeVar("Item")


class _SubstitutingDataset(Dataset):
    """Base class that loads row ``i`` of an image source, or a deterministic substitute."""

    def __init__(self, images: ImageSource, length: int) -> None:
        if len(images) != length:
            raise ValueError(
                f"The image source has {len(images)} images but the labels have {length} rows. "
                "Pass one label per image."
            )
        self.images = images
        self.failure_count = 0
        self._failed_rows: set[int] = set()

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, i: int) -> tuple[Image.Image, int]:
        """Return the image of row ``i`` and its row number, or those of the next readable row."""
        return self._read(i, self.images.load)

    def _read(self, i: int, read: Callable[[int], Item]) -> tuple[Item, int]:
        """Return ``read(i)`` and ``i``, or ``read`` and the row number of the next readable row.

        Substitutes are the rows ``i + 1``, ``i + 2``, ... (wrapping around), so every epoch and
        every worker picks the same one. Rows that failed once are not retried in this process.
        """
        count = len(self)
        if not 0 <= i < count:
            raise IndexError(f"Row {i} is out of range for a dataset of {count} rows.")
        for step in range(min(count, MAX_SUBSTITUTIONS + 1)):
            row = (i + step) % count
            if row in self._failed_rows:
                continue
            try:
                return read(row), row
            except _LOAD_ERRORS as error:
                self._record_failure(row, error)
        raise RuntimeError(
            f"Row {i} and the {MAX_SUBSTITUTIONS} rows after it failed to load "
            f"({self.failure_count} failures in this process). The image files changed after "
            "indexing: rebuild the index (and the prepared cache, if one is used)."
        )

    def _record_failure(self, row: int, error: BaseException) -> None:
        self._failed_rows.add(row)
        self.failure_count += 1
        if self.failure_count <= MAX_LOGGED_FAILURES or self.failure_count % 100 == 0:
            logger.warning(
                "Failed to load row %d (%s: %s); using the next readable row instead. "
                "%d load failures so far in this process.",
                row,
                type(error).__name__,
                error,
                self.failure_count,
            )


class PretrainDataset(_SubstitutingDataset):
    """Two augmented views of each image, for SimCLR pretraining.

    Items are ``{"views": [Tensor(3, H, W), Tensor(3, H, W)], "target": int}``, where the
    target is the task label or -1 for an unlabeled image.

    Args:
        images: Image source of the pretraining pool.
        targets: Task label per image, -1 when unknown.
        transform: Callable that turns a PIL image into the list of views.
    """

    def __init__(
        self,
        images: ImageSource,
        targets: np.ndarray,
        transform: Callable[[Image.Image], list[Any]],
    ) -> None:
        self.targets = np.asarray(targets, dtype=np.int64)
        super().__init__(images, len(self.targets))
        self.transform = transform

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, row = self._load(i)
        return {"views": self.transform(image), "target": int(self.targets[row])}


class UInt8PretrainDataset(_SubstitutingDataset):
    """Un-augmented uint8 images for SimCLR views built on the device.

    Items are those of :class:`~simclr_lightning.data.gpu_augment.UInt8ImageDataset`,
    ``{"image": uint8 Tensor(3, S, S), "target": int64 scalar}``, with the target of the row
    actually loaded. Sources with a ``load_array`` method, such as a prepared cache, are read
    without a PIL image.

    Args:
        images: Image source of the pretraining pool, at the working size.
        targets: Task label per image, -1 when unknown.
    """

    def __init__(self, images: ImageSource, targets: np.ndarray) -> None:
        self.items = UInt8ImageDataset(images, targets)
        super().__init__(images, len(self.items))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item, _ = self._read(i, self.items.__getitem__)
        return item


class LabeledDataset(_SubstitutingDataset):
    """Single transformed images with their task label, race, gender and row number.

    Items are ``{"image": Tensor(3, H, W), "target": int, "race": int, "gender": int,
    "index": int}``. ``index`` is the row in this dataset, which is the substitute's row when
    the requested file failed to load.

    Args:
        images: Image source of the split.
        targets: Task label per image.
        race: Race label per image, -1 when unknown.
        gender: Gender label per image, -1 when unknown.
        transform: Callable that turns a PIL image into a tensor.
    """

    def __init__(
        self,
        images: ImageSource,
        targets: np.ndarray,
        race: np.ndarray,
        gender: np.ndarray,
        transform: Callable[[Image.Image], Any],
    ) -> None:
        self.targets = np.asarray(targets, dtype=np.int64)
        self.race = np.asarray(race, dtype=np.int64)
        self.gender = np.asarray(gender, dtype=np.int64)
        if not self.targets.shape == self.race.shape == self.gender.shape:
            raise ValueError(
                "targets, race and gender must have one entry per image, got shapes "
                f"{self.targets.shape}, {self.race.shape} and {self.gender.shape}."
            )
        super().__init__(images, len(self.targets))
        self.transform = transform

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, row = self._load(i)
        return {
            "image": self.transform(image),
            "target": int(self.targets[row]),
            "race": int(self.race[row]),
            "gender": int(self.gender[row]),
            "index": row,
        }
