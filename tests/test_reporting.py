"""Validation metrics, the collapse guard and the confusion picture of FineTuneModule."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.models.finetune import FineTuneModule


class _Labeled(Dataset):
    """Eight 8x8 images whose labels are 0, 0, 0, 0, 0, 0, 1, 1."""

    targets = [0, 0, 0, 0, 0, 0, 1, 1]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, object]:
        image = torch.full((3, 8, 8), float(i))
        return {"image": image, "target": self.targets[i], "race": i % 5, "gender": i % 2}


def _validate(module: FineTuneModule, tmp_path: Path) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, DataLoader(_Labeled(), batch_size=4))


def _module_predicting(class_index: int) -> FineTuneModule:
    module = FineTuneModule(
        num_classes=2, class_names=["no", "yes"], backbone="resnet18", protocol="linear"
    )
    assert module.classifier is not None
    with torch.no_grad():
        module.classifier.weight.zero_()
        module.classifier.bias.copy_(torch.tensor([0.0, 0.0]))
        module.classifier.bias[class_index] = 10.0
    return module


def test_validation_logs_metrics_by_hand(tmp_path: Path) -> None:
    module = _module_predicting(0)
    _validate(module, tmp_path)
    report = module.last_reports["val"].report
    # Every prediction is class 0: 6 of 8 right; recall 1 for "no" and 0 for "yes".
    assert report.accuracy == pytest.approx(6 / 8)
    assert report.balanced_accuracy == pytest.approx(0.5)
    assert report.recall.tolist() == [1.0, 0.0]
    assert report.confusion.tolist() == [[6, 0], [2, 0]]


def test_collapse_guard_warns_on_one_class(tmp_path: Path) -> None:
    module = _module_predicting(1)
    with pytest.warns(UserWarning, match="val: "):
        _validate(module, tmp_path)
    warnings = module.last_reports["val"].warnings
    assert warnings
    assert any("one class" in message or "yes" in message for message in warnings)


def test_fairness_groups_and_confusion_picture(tmp_path: Path) -> None:
    module = _module_predicting(0)
    _validate(module, tmp_path)
    result = module.last_reports["val"]
    assert set(result.fairness) == {"race", "gender"}
    gender = result.fairness["gender"]
    # Even rows (gender 0) hold labels 0, 0, 0, 1 -> accuracy 3/4; odd rows 0, 0, 0, 1 -> 3/4.
    assert [group.accuracy for group in gender.groups] == pytest.approx([0.75, 0.75])
    assert result.confusion_png is not None
    assert result.confusion_png.is_file()
    assert result.confusion_png.stat().st_size > 0
