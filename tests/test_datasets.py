"""Tests for the pretraining and labeled datasets, including run-time load failures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image
from PIL import Image

from simclr_lightning.data.datasets import (
    MAX_SUBSTITUTIONS,
    LabeledDataset,
    PretrainDataset,
    UInt8PretrainDataset,
)
from simclr_lightning.data.images import FileImages
from simclr_lightning.data.index import FaceIndex
from simclr_lightning.data.transforms import (
    SimCLRAugmentation,
    build_eval_transform,
    build_simclr_transform,
)


def _file_images(tmp_path: Path, count: int) -> FileImages:
    paths = [write_image(tmp_path / f"{i}.png", i, "PNG") for i in range(count)]
    return FileImages(FaceIndex([str(path) for path in paths], source=0), 16)


def test_pretrain_dataset_two_views(tmp_path: Path) -> None:
    transform = build_simclr_transform(SimCLRAugmentation(image_size=8))
    dataset = PretrainDataset(_file_images(tmp_path, 3), np.array([2, -1, 0]), transform)

    item = dataset[1]

    assert len(dataset) == 3
    assert len(item["views"]) == 2
    assert item["views"][0].shape == (3, 8, 8)
    assert item["target"] == -1


def test_labeled_dataset_item(tmp_path: Path) -> None:
    dataset = LabeledDataset(
        _file_images(tmp_path, 3),
        targets=np.array([4, 1, 0]),
        race=np.array([4, 1, 0]),
        gender=np.array([0, 1, -1]),
        transform=build_eval_transform(16),
    )

    item = dataset[2]

    assert isinstance(item["image"], torch.Tensor)
    assert item["image"].shape == (3, 16, 16)
    assert item["target"] == 0
    assert item["gender"] == -1
    assert item["index"] == 2


def test_labeled_dataset_substitutes_broken_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = _file_images(tmp_path, 4)
    Path(images.index.path(1)).write_bytes(b"changed after indexing")
    dataset = LabeledDataset(
        images, np.arange(4), np.arange(4), np.zeros(4, dtype=np.int64), build_eval_transform(16)
    )

    with caplog.at_level(logging.WARNING):
        item = dataset[1]
        again = dataset[1]

    # The next row is the deterministic substitute, and it brings its own labels and index.
    assert item["index"] == 2
    assert item["target"] == 2
    assert again["index"] == 2
    assert dataset.failure_count == 1
    assert "Failed to load row 1" in caplog.text


def test_dataset_substitute_wraps_around(tmp_path: Path) -> None:
    images = _file_images(tmp_path, 3)
    Path(images.index.path(2)).unlink()
    dataset = PretrainDataset(images, np.array([7, 8, 9]), lambda image: [image, image])

    assert dataset[2]["target"] == 7


def test_dataset_all_broken_raises(tmp_path: Path) -> None:
    images = _file_images(tmp_path, MAX_SUBSTITUTIONS + 2)
    for i in range(len(images)):
        Path(images.index.path(i)).write_bytes(b"")
    dataset = PretrainDataset(images, np.zeros(len(images)), lambda image: [image])

    with pytest.raises(RuntimeError, match="failed to load"):
        dataset[0]


def test_dataset_rejects_label_count_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one label per image"):
        PretrainDataset(_file_images(tmp_path, 2), np.zeros(3), lambda image: [image])


def test_dataset_index_out_of_range(tmp_path: Path) -> None:
    dataset = PretrainDataset(_file_images(tmp_path, 2), np.zeros(2), lambda image: [image])

    with pytest.raises(IndexError):
        dataset[2]


def test_pretrain_dataset_passes_pil_image(tmp_path: Path) -> None:
    seen: list[Image.Image] = []
    dataset = PretrainDataset(_file_images(tmp_path, 1), np.zeros(1), lambda image: seen + [image])

    views = dataset[0]["views"]

    assert isinstance(views[0], Image.Image)
    assert views[0].size == (16, 16)


def test_uint8_pretrain_dataset_item(tmp_path: Path) -> None:
    images = _file_images(tmp_path, 3)
    dataset = UInt8PretrainDataset(images, np.array([4, -1, 1]))

    item = dataset[2]

    expected = torch.from_numpy(np.array(images.load(2))).permute(2, 0, 1)
    assert item["image"].dtype == torch.uint8
    assert item["image"].shape == (3, 16, 16)
    assert torch.equal(item["image"], expected)
    assert item["target"].dtype == torch.int64
    assert int(item["target"]) == 1


def test_uint8_pretrain_dataset_substitutes_broken_file(tmp_path: Path) -> None:
    images = _file_images(tmp_path, 3)
    Path(images.index.path(0)).write_bytes(b"changed after indexing")
    dataset = UInt8PretrainDataset(images, np.array([5, 6, 7]))

    item = dataset[0]

    assert int(item["target"]) == 6
    assert dataset.failure_count == 1
