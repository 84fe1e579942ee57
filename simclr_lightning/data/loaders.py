"""The DataLoader settings every datamodule of this library shares."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    num_workers: int,
    pin_memory: bool = True,
    persistent_workers: bool = True,
) -> DataLoader:
    """Build a DataLoader that pins memory only with CUDA and keeps workers only if it has any.

    Pretraining loaders pass ``drop_last=True`` so that every rank gets batches of equal size.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and num_workers > 0,
    )
