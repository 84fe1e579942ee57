"""CIFAR-10 for validating the SimCLR method before it runs on faces.

Two folder layouts are read:

- the official python release, ``ROOT/cifar-10-batches-py/`` with ``data_batch_1`` ..
  ``data_batch_5``, ``test_batch`` and ``batches.meta`` (the format that
  ``torchvision.datasets.CIFAR10`` downloads);
- an ImageFolder tree, ``ROOT/train/CLASS/*.png|jpg`` and ``ROOT/test/CLASS/...``.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.data.fast_augment import CPUAugment, build_pretrain_transform
from simclr_lightning.data.images import load_rgb
from simclr_lightning.data.loaders import build_loader
from simclr_lightning.data.transforms import (
    SimCLRAugmentation,
    build_eval_transform,
    build_finetune_transform,
)

log = logging.getLogger(__name__)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
PICKLE_FOLDER = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})

Layout = Literal["pickle", "folder"]

# Globals that pickled numpy arrays need, as numpy 1.x and 2.x name them. Any other global in a
# batch file is rejected, because unpickling an arbitrary global can run arbitrary code.
_ALLOWED_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays, lists, dicts and strings and rejects other globals."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"CIFAR-10 batch file contains the global {module}.{name}, which is not part of "
                "the CIFAR-10 format, so the file is rejected."
            )
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR-10 batch file (pickled by Python 2, so strings are decoded as latin-1)."""
    with path.open("rb") as file:
        content = _ArrayUnpickler(file, encoding="latin1").load()
    if not isinstance(content, dict):
        raise ValueError(f"{path} contains a {type(content).__name__}, expected a dict.")
    return content


@dataclass(frozen=True)
class CIFARSplit:
    """Images and labels of one CIFAR-10 split, held in numpy arrays.

    Exactly one of ``arrays`` and ``paths`` is set. Both are numpy arrays rather than lists of
    Python objects, so forked DataLoader workers share them without copying.

    Attributes:
        labels: Class index per image, int64 of shape (N,).
        arrays: Decoded images, uint8 of shape (N, 32, 32, 3), for the pickle layout.
        paths: UTF-8 encoded file paths (dtype ``S``), for the ImageFolder layout.
    """

    labels: np.ndarray
    arrays: np.ndarray | None = None
    paths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Image.Image:
        """Return image ``i`` as an RGB PIL image."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i])
        assert self.paths is not None  # guaranteed by the two readers below
        return load_rgb(self.paths[i].decode("utf-8"))


def detect_layout(root: Path) -> tuple[Layout, Path]:
    """Find which CIFAR-10 layout ``root`` contains.

    Returns:
        The layout name and the folder to read: the ``cifar-10-batches-py`` folder for the
        pickle layout (``root`` itself may be that folder), ``root`` for the ImageFolder layout.

    Raises:
        FileNotFoundError: If ``root`` is missing or contains neither layout.
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 root {root} does not exist or is not a folder. Pass the folder that "
            f"contains {PICKLE_FOLDER}/ or train/ and test/, or set download=True."
        )
    for candidate in (root / PICKLE_FOLDER, root):
        if (candidate / TRAIN_BATCHES[0]).is_file():
            return "pickle", candidate
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder", root
    if (root / ARCHIVE_NAME).is_file():
        raise FileNotFoundError(
            f"{root} contains the archive {ARCHIVE_NAME} but not the extracted folder "
            f"{PICKLE_FOLDER}/. Extract it with `tar -xzf {root / ARCHIVE_NAME} -C {root}`, or "
            "set download=True."
        )
    found = sorted(entry.name for entry in root.iterdir())
    listing = ", ".join(found[:10])
    if len(found) > 10:
        listing += f" and {len(found) - 10} more"
    raise FileNotFoundError(
        f"{root} is not a CIFAR-10 folder: expected {PICKLE_FOLDER}/{TRAIN_BATCHES[0]} (python "
        f"release) or train/CLASS/ and test/CLASS/ (ImageFolder), found: {listing or 'nothing'}."
    )


def read_pickle_split(folder: Path, train: bool) -> CIFARSplit:
    """Read the train batches or the test batch of the python release in ``folder``.

    Raises:
        FileNotFoundError: If a batch file or ``batches.meta`` is missing.
        ValueError: If a file lacks the release's keys, shapes or class names.
    """
    _check_pickle_class_names(folder / META_FILE)
    names = TRAIN_BATCHES if train else (TEST_BATCH,)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks the CIFAR-10 batch files {', '.join(missing)}. Re-extract "
            f"{ARCHIVE_NAME} or set download=True."
        )
    arrays: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for name in names:
        data, batch_labels = _read_batch(folder / name)
        arrays.append(data)
        labels.append(batch_labels)
    images = np.concatenate(arrays).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return CIFARSplit(labels=np.concatenate(labels), arrays=np.ascontiguousarray(images))


def _check_pickle_class_names(meta_path: Path) -> None:
    if not meta_path.is_file():
        raise FileNotFoundError(f"CIFAR-10 metadata file {meta_path} is missing.")
    label_names = _unpickle(meta_path).get("label_names")
    if label_names is None or tuple(label_names) != CIFAR10_CLASSES:
        raise ValueError(
            f"{meta_path} lists label_names {label_names}, expected the CIFAR-10 classes "
            f"{list(CIFAR10_CLASSES)}."
        )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise ValueError(
            f"{path} has keys {sorted(batch)}, expected 'data' and 'labels' as in the CIFAR-10 "
            "python release."
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: 'data' has dtype {data.dtype} and shape {data.shape}, expected uint8 of "
            "shape (N, 3072)."
        )
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(labels)} labels for {len(data)} images.")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(f"{path}: labels must be in [0, 9], got [{labels.min()}, {labels.max()}].")
    return data, labels


def read_folder_split(folder: Path) -> CIFARSplit:
    """Read one split of the ImageFolder layout, ``folder/CLASS/*.png|jpg``.

    Class folders must be named after the CIFAR-10 classes, so labels match the python release.
    Files with other suffixes are skipped with a logged count.

    Raises:
        ValueError: If a class folder is missing or unknown, or the split has no images.
    """
    class_dirs = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if tuple(class_dirs) != CIFAR10_CLASSES:
        raise ValueError(
            f"{folder} has class folders {class_dirs}, expected exactly the CIFAR-10 classes "
            f"{list(CIFAR10_CLASSES)}."
        )
    paths: list[str] = []
    labels: list[int] = []
    skipped = 0
    for label, class_name in enumerate(CIFAR10_CLASSES):
        for file in sorted((folder / class_name).iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(file.resolve()))
                labels.append(label)
            else:
                skipped += 1
    if skipped:
        log.warning("Skipped %d entries in %s that are not .png or .jpg files.", skipped, folder)
    if not paths:
        raise ValueError(f"{folder} contains no .png or .jpg images in its class folders.")
    encoded = np.array([path.encode("utf-8") for path in paths], dtype=np.bytes_)
    return CIFARSplit(labels=np.array(labels, dtype=np.int64), paths=encoded)


def stratified_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Choose ``count`` rows with each class's share of the rows kept, seeded.

    A class with ``n_class`` of the ``n`` rows gets ``floor(count * n_class / n)`` rows, and the
    rows left over go to the classes with the largest remainders (lowest class index first on
    ties).

    Returns:
        Sorted row indices, int64. All rows when ``count >= len(labels)``.
    """
    total = len(labels)
    if count >= total:
        return np.arange(total, dtype=np.int64)
    classes, class_counts = np.unique(labels, return_counts=True)
    exact = class_counts * count / total
    quotas = np.floor(exact).astype(np.int64)
    leftover = count - int(quotas.sum())
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[:leftover]] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(labels == cls))[:quota]
        for cls, quota in zip(classes, quotas, strict=True)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


class _TwoViewDataset(Dataset):
    """Pretraining samples: two augmented views and the label, or -1 where it is hidden."""

    def __init__(self, split: CIFARSplit, transform: Callable, targets: np.ndarray) -> None:
        self.split = split
        self.transform = transform
        self.targets = targets

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"views": self.transform(self.split.load(i)), "target": int(self.targets[i])}


class _LabeledDataset(Dataset):
    """Labeled samples for the rows ``rows`` of a split, in the library's labeled batch format."""

    def __init__(self, split: CIFARSplit, rows: np.ndarray, transform: Callable) -> None:
        self.split = split
        self.rows = rows
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.rows[i])
        return {
            "image": self.transform(self.split.load(row)),
            "target": int(self.split.labels[row]),
            "race": -1,
            "gender": -1,
            "index": row,
        }


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 in the library's batch formats, from the python release or an ImageFolder tree.

    In ``pretrain`` mode the training loader yields two SimCLR views per image (by default the
    CIFAR-10 settings of Chen et al. 2020, SimCLR: 32 px, no blur, colour-jitter strength 0.5), and
    ``val_dataloader`` returns ``[bank_loader, query_loader]`` for online kNN or linear
    evaluation: labeled training images and test images, both with the evaluation transform. In
    ``classify`` mode every loader yields labeled batches, training with a light crop-and-flip
    augmentation. Test and predict loaders read the test split in both modes.

    Args:
        root: Folder that contains ``cifar-10-batches-py/`` or ``train/`` and ``test/`` class
            folders, or the ``cifar-10-batches-py`` folder itself.
        mode: ``"pretrain"`` or ``"classify"``.
        image_size: Side of the images fed to the model, in pixels.
        batch_size: Images per batch on each device.
        num_workers: DataLoader worker processes per loader.
        train_fraction: Fraction of the training labels kept, as a seeded stratified subset, for
            semi-supervised runs. In ``pretrain`` mode all training images are still used, and
            the images outside the subset get target -1.
        seed: Seed for the labeled subset and the online-evaluation subsets.
        download: Download the python release into ``root`` in ``prepare_data`` when it is
            missing. Nothing is downloaded otherwise.
        augmentation: SimCLR augmentation settings; defaults to
            ``SimCLRAugmentation.cifar10()``. An unset ``augmentation.image_size`` becomes
            ``image_size``, and a different one is an error.
        online_eval: Return the bank and query loaders from ``val_dataloader`` in ``pretrain``
            mode. When false, ``val_dataloader`` returns ``[]``.
        online_eval_max_images: Maximum images in each online-evaluation loader, chosen as a
            seeded stratified subset.
        pin_memory: Pin batches in page-locked memory when CUDA is available.
        persistent_workers: Keep workers alive between epochs when ``num_workers > 0``.
        cpu_augment: Transform of the two pretraining views: ``"lightly"`` (lightly's
            ``SimCLRTransform``) or ``"fast"`` (uint8 views from
            :class:`~simclr_lightning.data.fast_augment.FastSimCLRTransform`, which
            ``SimCLRModule`` normalises on the device).
    """

    def __init__(
        self,
        root: str,
        mode: Literal["pretrain", "classify"] = "pretrain",
        image_size: int = 32,
        batch_size: int = 512,
        num_workers: int = 4,
        train_fraction: float = 1.0,
        seed: int = 0,
        download: bool = False,
        augmentation: SimCLRAugmentation | None = None,
        online_eval: bool = True,
        online_eval_max_images: int = 5000,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        cpu_augment: CPUAugment = "lightly",
    ) -> None:
        super().__init__()
        if cpu_augment not in ("lightly", "fast"):
            raise ValueError(f"cpu_augment must be 'lightly' or 'fast', got {cpu_augment!r}.")

        _check_arguments(mode, image_size, batch_size, num_workers, train_fraction)
        if online_eval_max_images < 1:
            raise ValueError(
                f"online_eval_max_images must be at least 1, got {online_eval_max_images}."
            )
        augmentation = (augmentation or SimCLRAugmentation.cifar10()).for_size(image_size)

        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.mode = mode
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_fraction = train_fraction
        self.seed = seed
        self.download = download
        self.augmentation = augmentation
        self.online_eval = online_eval
        self.online_eval_max_images = online_eval_max_images
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers

        self.task = "cifar10"
        self.num_classes = len(CIFAR10_CLASSES)
        self.class_names = list(CIFAR10_CLASSES)

        self.train_split: CIFARSplit | None = None
        self.test_split: CIFARSplit | None = None
        self.labeled_rows: np.ndarray | None = None

    def prepare_data(self) -> None:
        """Download the python release into ``root`` when ``download=True``, else do nothing."""
        if not self.download:
            return
        from torchvision.datasets import CIFAR10

        rank_zero_info(f"Downloading CIFAR-10 into {self.root} unless it is already there.")
        for train in (True, False):
            CIFAR10(str(self.root), train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Read both splits and choose the labeled subset. Later calls reuse the first result."""
        if self.train_split is not None:
            return
        layout, folder = detect_layout(self.root)
        if layout == "pickle":
            train_split = read_pickle_split(folder, train=True)
            test_split = read_pickle_split(folder, train=False)
        else:
            train_split = read_folder_split(folder / "train")
            test_split = read_folder_split(folder / "test")
        labeled_count = round(self.train_fraction * len(train_split))
        self.labeled_rows = stratified_subset(train_split.labels, max(labeled_count, 1), self.seed)
        self.train_split, self.test_split = train_split, test_split
        rank_zero_info(
            f"CIFAR-10 ({layout} layout at {folder}): {len(train_split)} train images, "
            f"{len(self.labeled_rows)} of them labeled, {len(test_split)} test images."
        )
        if self.mode == "pretrain" and len(train_split) < self.batch_size:
            raise ValueError(
                f"The CIFAR-10 train split has {len(train_split)} images, fewer than "
                f"batch_size={self.batch_size}, so the pretraining loader (drop_last=True) would "
                "yield no batch. Lower batch_size."
            )

    def train_dataloader(self) -> DataLoader:
        """Build the pretraining loader (two views) or the labeled training loader."""
        train_split, labeled_rows = self._require_setup()
        if self.mode == "pretrain":
            targets = np.full(len(train_split), -1, dtype=np.int64)
            targets[labeled_rows] = train_split.labels[labeled_rows]
            transform = build_pretrain_transform(self.augmentation, self.hparams["cpu_augment"])
            dataset: Dataset = _TwoViewDataset(train_split, transform, targets)
            return self._loader(dataset, shuffle=True, drop_last=True)
        transform = build_finetune_transform(self.image_size)
        dataset = _LabeledDataset(train_split, labeled_rows, transform)
        return self._loader(dataset, shuffle=True, drop_last=False)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Build ``[bank_loader, query_loader]`` in pretrain mode, else the test-split loader.

        NOTE: CIFAR-10 has no validation split, so validation in ``classify`` mode reads the test
        split. Any choice made by validation score is then tuned on the test set.
        """
        train_split, labeled_rows = self._require_setup()
        if self.mode == "classify":
            return self.test_dataloader()
        if not self.online_eval:
            return []
        cap = self.online_eval_max_images
        seed = self.seed
        bank_rows = labeled_rows[stratified_subset(train_split.labels[labeled_rows], cap, seed)]
        query_rows = stratified_subset(self._test_split().labels, cap, seed)
        return [
            self._eval_loader(train_split, bank_rows),
            self._eval_loader(self._test_split(), query_rows),
        ]

    def test_dataloader(self) -> DataLoader:
        """Build the labeled loader over the whole test split."""
        test_split = self._test_split()
        return self._eval_loader(test_split, np.arange(len(test_split), dtype=np.int64))

    def predict_dataloader(self) -> DataLoader:
        """Build the labeled loader over the whole test split, as ``test_dataloader`` does."""
        return self.test_dataloader()

    def _require_setup(self) -> tuple[CIFARSplit, np.ndarray]:
        if self.train_split is None or self.labeled_rows is None:
            raise RuntimeError("CIFAR10DataModule.setup() must run before the loaders are built.")
        return self.train_split, self.labeled_rows

    def _test_split(self) -> CIFARSplit:
        self._require_setup()
        assert self.test_split is not None  # set together with train_split in setup
        return self.test_split

    def _eval_loader(self, split: CIFARSplit, rows: np.ndarray) -> DataLoader:
        dataset = _LabeledDataset(split, rows, build_eval_transform(self.image_size))
        return self._loader(dataset, shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return build_loader(
            dataset,
            self.batch_size,
            shuffle,
            drop_last,
            self.num_workers,
            self.pin_memory,
            self.persistent_workers,
        )


def _check_arguments(
    mode: str, image_size: int, batch_size: int, num_workers: int, train_fraction: float
) -> None:
    if mode not in ("pretrain", "classify"):
        raise ValueError(f"mode must be 'pretrain' or 'classify', got {mode!r}.")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}.")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}.")
