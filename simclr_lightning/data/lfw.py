"""LFW face and non-face crops from scikit-image: the data of ``simclr-lightning demo``."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.data.loaders import build_loader
from simclr_lightning.data.transforms import (
    SimCLRAugmentation,
    build_eval_transform,
    build_simclr_transform,
)

logger = logging.getLogger(__name__)

LFW_CLASS_NAMES = ["non-face", "face"]


def load_lfw_subset() -> tuple[np.ndarray, np.ndarray]:
    """Load scikit-image's ``lfw_subset``: 100 faces and 100 non-faces, 25x25 grayscale.

    The array ships inside scikit-image, so nothing is downloaded.

    Returns:
        RGB images, uint8 of shape (200, 25, 25, 3), and labels (1 face, 0 non-face).
    """
    from skimage.data import lfw_subset

    gray = lfw_subset()  # (200, 25, 25) floats in [0, 1]; faces first
    images = np.repeat((gray * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    labels = np.concatenate([np.ones(100, dtype=np.int64), np.zeros(100, dtype=np.int64)])
    return images, labels


def stratified_halves(
    labels: np.ndarray, train_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split row numbers into a training and a validation part with the same class shares."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(train_fraction * len(rows)))
        train.append(rows[:cut])
        val.append(rows[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class _ArrayDataset(Dataset):
    """Images from a uint8 (N, H, W, 3) array, as pretraining or labeled dict samples."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any, two_views: bool):
        self.images = images
        self.labels = labels
        self.transform = transform
        self.two_views = two_views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = Image.fromarray(self.images[i])
        target = int(self.labels[i])
        if self.two_views:
            return {"views": self.transform(image), "target": target}
        return {
            "image": self.transform(image),
            "target": target,
            "race": -1,
            "gender": -1,
            "index": i,
        }


class LFWDataModule(pl.LightningDataModule):
    """Face / non-face crops of LFW from scikit-image, for the demo and quick checks.

    Args:
        mode: ``pretrain`` yields two SimCLR views of the training images; ``classify`` yields
            labeled images for a linear probe.
        image_size: Side the 25-pixel crops are resized to.
        batch_size: Images per step.
        train_fraction: Share of each class used for training; the rest is validation.
        seed: Seed of the split.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        mode: Literal["pretrain", "classify"] = "pretrain",
        image_size: int = 32,
        batch_size: int = 50,
        train_fraction: float = 0.5,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ("pretrain", "classify"):
            raise ValueError(f"mode must be 'pretrain' or 'classify', got {mode!r}.")
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
        self.save_hyperparameters()
        self.mode = mode
        self.task = "face"
        self.batch_size = batch_size
        self.num_classes = 2
        self.class_names = list(LFW_CLASS_NAMES)
        self._train: Dataset | None = None
        self._val: Dataset | None = None
        self._train_labels = np.empty(0, dtype=np.int64)

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_lfw_subset()
        size = self.hparams["image_size"]
        resized = np.stack(
            [
                np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
                for image in images
            ]
        )
        train_rows, val_rows = stratified_halves(
            labels, self.hparams["train_fraction"], self.hparams["seed"]
        )
        self._train_labels = labels[train_rows]
        evaluation = build_eval_transform(size)
        if self.mode == "pretrain":
            augmentation = SimCLRAugmentation.cifar10(image_size=size)
            self._train = _ArrayDataset(
                resized[train_rows], labels[train_rows], build_simclr_transform(augmentation), True
            )
        else:
            self._train = _ArrayDataset(resized[train_rows], labels[train_rows], evaluation, False)
        self._bank = _ArrayDataset(resized[train_rows], labels[train_rows], evaluation, False)
        self._val = _ArrayDataset(resized[val_rows], labels[val_rows], evaluation, False)
        logger.info(
            "LFW subset: %d training and %d validation images at %d px.",
            len(train_rows),
            len(val_rows),
            size,
        )

    def train_targets(self) -> np.ndarray:
        """Labels of the training images, for class weights."""
        return self._train_labels

    def _loader(self, dataset: Dataset | None, shuffle: bool, drop_last: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call setup() before asking for a dataloader.")
        return build_loader(
            dataset, self.batch_size, shuffle, drop_last, self.hparams["num_workers"]
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train, shuffle=True, drop_last=self.mode == "pretrain")

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.mode == "pretrain":
            return [self._loader(self._bank, False, False), self._loader(self._val, False, False)]
        return self._loader(self._val, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._val, shuffle=False, drop_last=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._val, shuffle=False, drop_last=False)
