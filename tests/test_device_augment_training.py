"""Training with the views built on the device from uint8 batches."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from simclr_lightning.data.gpu_augment import UInt8ImageDataset
from simclr_lightning.data.transforms import SimCLRAugmentation
from simclr_lightning.models.simclr import SimCLRModule


def test_gpu_augment_builds_views_after_transfer() -> None:
    module = SimCLRModule(
        backbone="resnet18",
        gpu_augment=True,
        device_augmentation=SimCLRAugmentation(image_size=16),
        batch_size_per_device=4,
        num_classes=0,
    )
    module.batch_augment = module._build_batch_augment(None)
    batch = {
        "image": torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8),
        "target": torch.full((4,), -1),
    }
    augmented = module.on_after_batch_transfer(batch, 0)
    assert [tuple(view.shape) for view in augmented["views"]] == [(4, 3, 16, 16)] * 2
    assert augmented["views"][0].dtype == torch.float32
    assert not torch.equal(augmented["views"][0], augmented["views"][1])


def test_gpu_augment_takes_settings_as_dict() -> None:
    # LightningCLI passes --model.device_augmentation.* as a dict.
    module = SimCLRModule(
        gpu_augment=True,
        device_augmentation={"image_size": 24, "cj_hue": 0.0, "blur_sigma": [0.2, 1.0]},
        num_classes=0,
    )
    augment = module._build_batch_augment(None)
    expected = SimCLRAugmentation(image_size=24, cj_hue=0.0, blur_sigma=(0.2, 1.0))
    assert augment.augmentation == expected


def test_gpu_augment_without_any_size_error() -> None:
    module = SimCLRModule(gpu_augment=True, num_classes=0)
    with pytest.raises(ValueError, match="found no image size"):
        module._build_batch_augment(None)


def test_gpu_augment_leaves_float_batches() -> None:
    module = SimCLRModule(
        backbone="resnet18",
        gpu_augment=True,
        device_augmentation=SimCLRAugmentation(image_size=16),
        num_classes=0,
    )
    module.batch_augment = module._build_batch_augment(None)
    batch = {"image": torch.zeros(2, 3, 16, 16), "target": torch.zeros(2, dtype=torch.long)}
    assert module.on_after_batch_transfer(batch, 0) is batch


def test_gpu_augment_trains_under_trainer() -> None:
    pl.seed_everything(0)
    images = np.random.default_rng(0).integers(0, 256, (16, 20, 20, 3), dtype=np.uint8)
    loader = DataLoader(UInt8ImageDataset(images), batch_size=8, drop_last=True)
    module = SimCLRModule(
        backbone="resnet18",
        gpu_augment=True,
        device_augmentation=SimCLRAugmentation(image_size=16),
        batch_size_per_device=8,
        num_classes=0,
        warmup_steps=1,
    )
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
