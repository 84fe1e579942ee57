"""Tests of the LFW demo data."""

from __future__ import annotations

import numpy as np
import pytest

from simclr_lightning.data.lfw import LFWDataModule, load_lfw_subset, stratified_halves


def test_load_lfw_subset_shapes_and_labels() -> None:
    images, labels = load_lfw_subset()
    assert images.shape == (200, 25, 25, 3)
    assert images.dtype == np.uint8
    assert labels.tolist() == [1] * 100 + [0] * 100


def test_stratified_halves_disjoint_balanced_seeded() -> None:
    labels = np.array([0] * 10 + [1] * 30)
    train, val = stratified_halves(labels, 0.5, seed=3)
    again_train, _ = stratified_halves(labels, 0.5, seed=3)
    assert set(train).isdisjoint(val)
    assert len(train) + len(val) == 40
    assert np.bincount(labels[train]).tolist() == [5, 15]
    assert train.tolist() == again_train.tolist()


def test_lfw_datamodule_batches() -> None:
    pretrain = LFWDataModule("pretrain", image_size=16, batch_size=8)
    pretrain.setup("fit")
    batch = next(iter(pretrain.train_dataloader()))
    assert [view.shape for view in batch["views"]] == [(8, 3, 16, 16), (8, 3, 16, 16)]
    assert len(pretrain.val_dataloader()) == 2

    classify = LFWDataModule("classify", image_size=16, batch_size=8)
    classify.setup("fit")
    labeled = next(iter(classify.val_dataloader()))
    assert labeled["image"].shape == (8, 3, 16, 16)
    assert set(labeled["target"].tolist()) <= {0, 1}
    assert classify.train_targets().shape == (100,)


def test_lfw_datamodule_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="train_fraction"):
        LFWDataModule(train_fraction=1.0)
