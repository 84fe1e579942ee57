"""Restoring FineTuneModule checkpoints and rejecting checkpoints of the wrong kind."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.models.finetune import FineTuneModule
from simclr_lightning.models.simclr import SimCLRModule


class _Images(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, object]:
        generator = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, 16, 16, generator=generator), "target": i % 2}


def _trainer(tmp_path: Path) -> pl.Trainer:
    return pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture
def simclr_checkpoint(tmp_path: Path) -> Path:
    module = SimCLRModule(backbone="resnet18", small_stem=True, num_classes=0)
    path = tmp_path / "pretrain" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture
def finetune_checkpoint(tmp_path: Path, simclr_checkpoint: Path) -> Path:
    module = FineTuneModule(str(simclr_checkpoint), num_classes=2)
    trainer = _trainer(tmp_path)
    trainer.fit(module, DataLoader(_Images(), batch_size=4))
    path = tmp_path / "finetune.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_empty_checkpoint_path_rejected() -> None:
    with pytest.raises(ValueError, match="empty string"):
        FineTuneModule(checkpoint_path="", num_classes=2)


def test_finetune_checkpoint_rejected_as_pretrained(finetune_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="is a FineTuneModule checkpoint"):
        FineTuneModule(str(finetune_checkpoint), num_classes=2)


def test_image_file_rejected_as_checkpoint(tmp_path: Path) -> None:
    picture = tmp_path / "face.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        FineTuneModule(str(picture), num_classes=2)


def test_missing_pretrained_without_stored_architecture(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        FineTuneModule(str(tmp_path / "missing.ckpt"), num_classes=2)


def test_restore_after_pretrained_checkpoint_moved(
    tmp_path: Path, simclr_checkpoint: Path, finetune_checkpoint: Path
) -> None:
    shutil.rmtree(simclr_checkpoint.parent)
    expected = torch.load(finetune_checkpoint, map_location="cpu", weights_only=False)
    with pytest.warns(UserWarning, match="not found"):
        restored = FineTuneModule.load_from_checkpoint(finetune_checkpoint)
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, expected["state_dict"][name]), name
    assert restored.hparams["small_stem"] is True


def test_validate_with_ckpt_path_after_move(
    tmp_path: Path, simclr_checkpoint: Path, finetune_checkpoint: Path
) -> None:
    shutil.rmtree(simclr_checkpoint.parent)
    stored = torch.load(finetune_checkpoint, map_location="cpu", weights_only=False)
    with pytest.warns(UserWarning, match="not found"):
        module = FineTuneModule(**stored["hyper_parameters"])
    trainer = _trainer(tmp_path)
    trainer.validate(module, DataLoader(_Images(), batch_size=4), ckpt_path=finetune_checkpoint)
    assert torch.equal(module.classifier.weight, stored["state_dict"]["classifier.weight"])


def test_fit_with_moved_pretrained_raises(
    tmp_path: Path, simclr_checkpoint: Path, finetune_checkpoint: Path
) -> None:
    shutil.rmtree(simclr_checkpoint.parent)
    stored = torch.load(finetune_checkpoint, map_location="cpu", weights_only=False)
    with pytest.warns(UserWarning, match="not found"):
        module = FineTuneModule(**stored["hyper_parameters"])
    with pytest.raises(FileNotFoundError, match="no FineTuneModule checkpoint restores"):
        _trainer(tmp_path).fit(module, DataLoader(_Images(), batch_size=4))
