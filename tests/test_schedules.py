"""Learning-rate scaling and the warm-up + cosine schedule, alone and inside Trainer runs."""

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.models.schedules import WarmupCosineSchedule, scale_learning_rate
from simclr_lightning.models.simclr import SimCLRModule

# Multipliers of WarmupCosineSchedule(4, 10, 0.1) at steps 0..10, worked out by hand:
# warm-up (s + 1) / 4, then 0.1 + 0.9 * (1 + cos(pi * (s - 4) / 6)) / 2.
PINNED_MULTIPLIERS = {
    0: 0.25,
    1: 0.5,
    3: 1.0,
    4: 1.0,
    5: 0.1 + 0.9 * (1 + math.sqrt(3) / 2) / 2,
    6: 0.775,
    7: 0.55,
    8: 0.325,
    9: 0.1 + 0.9 * (1 - math.sqrt(3) / 2) / 2,
    10: 0.1,
}


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    # Tiny models run faster on one intra-op thread than with threads contending for few cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class _PairedViews(Dataset):
    """Fixed pairs of 8x8 views in the pretraining batch format, without augmentation."""

    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.views = torch.randn(2, count, 3, 8, 8, generator=generator)

    def __len__(self) -> int:
        return self.views.shape[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"views": [self.views[0, index], self.views[1, index]], "target": -1}


class _LearningRateRecorder(pl.Callback):
    """Record the learning rate each training batch runs with, and stop after a given step."""

    def __init__(self, stop_at_step: int | None = None) -> None:
        self.stop_at_step = stop_at_step
        self.learning_rates: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.learning_rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.stop_at_step is not None and trainer.global_step >= self.stop_at_step:
            trainer.should_stop = True


def _tiny_module(**overrides: Any) -> SimCLRModule:
    torch.manual_seed(0)
    arguments: dict[str, Any] = {
        "backbone": "resnet18",
        "small_stem": True,
        "projection_hidden_dim": 16,
        "projection_dim": 8,
        "batch_size_per_device": 4,
        "num_classes": 0,
        "warmup_steps": 2,
    }
    arguments.update(overrides)
    return SimCLRModule(**arguments)


def _trainer(callback: pl.Callback, **overrides: Any) -> pl.Trainer:
    arguments: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "callbacks": [callback],
    }
    arguments.update(overrides)
    return pl.Trainer(**arguments)


def _loader(count: int = 24) -> DataLoader[dict[str, Tensor]]:
    return DataLoader(_PairedViews(count), batch_size=4, drop_last=True)


@pytest.mark.parametrize(
    ("rule", "base_lr", "batch", "expected"),
    [
        ("linear", 0.3, 256, 0.3),
        ("linear", 0.3, 4096, 4.8),
        ("linear", 0.3, 64, 0.075),
        ("sqrt", 0.075, 256, 1.2),
        ("sqrt", 0.075, 4096, 4.8),
        ("sqrt", 0.1, 9, 0.3),
        ("none", 0.05, 1024, 0.05),
    ],
)
def test_scale_learning_rate_rules(rule: str, base_lr: float, batch: int, expected: float) -> None:
    assert scale_learning_rate(base_lr, batch, rule) == pytest.approx(expected)  # type: ignore[arg-type]


def test_scale_learning_rate_rejects_zero_batch() -> None:
    with pytest.raises(ValueError, match="global_batch_size must be positive, got 0"):
        scale_learning_rate(0.3, 0, "linear")


def test_scale_learning_rate_rejects_unknown_rule() -> None:
    with pytest.raises(ValueError, match="Unknown lr_scaling 'log'"):
        scale_learning_rate(0.3, 256, "log")  # type: ignore[arg-type]


def test_global_batch_size_counts_devices_and_accumulation() -> None:
    module = _tiny_module(batch_size_per_device=32)
    # 2 devices x 2 nodes = world size 4, 3 accumulation steps: 32 * 4 * 3 images per step.
    module.trainer = SimpleNamespace(world_size=4, accumulate_grad_batches=3)  # type: ignore[assignment]
    assert module.global_batch_size() == 384


def test_global_batch_size_reads_datamodule() -> None:
    module = _tiny_module(batch_size_per_device=None)
    module.trainer = SimpleNamespace(  # type: ignore[assignment]
        world_size=2, accumulate_grad_batches=1, datamodule=SimpleNamespace(batch_size=48)
    )
    assert module.global_batch_size() == 96


def test_global_batch_size_unknown_raises() -> None:
    module = _tiny_module(batch_size_per_device=None)
    module.trainer = SimpleNamespace(  # type: ignore[assignment]
        world_size=1, accumulate_grad_batches=1, datamodule=None
    )
    with pytest.raises(ValueError, match="batch size is unknown"):
        module.global_batch_size()


def test_configure_optimizers_peak_lr_scaled() -> None:
    module = _tiny_module(batch_size_per_device=64, lr_scaling="sqrt", base_lr=0.075)
    module.trainer = SimpleNamespace(  # type: ignore[assignment]
        world_size=2, accumulate_grad_batches=2, estimated_stepping_batches=50, max_epochs=5
    )
    optimizer = module.configure_optimizers()["optimizer"]
    # Global batch 64 * 2 * 2 = 256, so the peak is 0.075 * 16 = 1.2.
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(1.2)


@pytest.mark.parametrize("step", sorted(PINNED_MULTIPLIERS))
def test_warmup_cosine_pinned_steps(step: int) -> None:
    schedule = WarmupCosineSchedule(warmup_steps=4, total_steps=10, final_ratio=0.1)
    assert schedule(step) == pytest.approx(PINNED_MULTIPLIERS[step], abs=1e-12)


def test_warmup_cosine_first_step_nonzero() -> None:
    schedule = WarmupCosineSchedule(warmup_steps=1000, total_steps=5000)
    assert schedule(0) == pytest.approx(1e-3)


def test_warmup_cosine_stays_final_after_end() -> None:
    schedule = WarmupCosineSchedule(warmup_steps=4, total_steps=10, final_ratio=0.1)
    assert schedule(50) == pytest.approx(0.1)


def test_warmup_cosine_without_warmup_starts_at_peak() -> None:
    schedule = WarmupCosineSchedule(warmup_steps=0, total_steps=4)
    assert schedule(0) == 1.0
    assert schedule(2) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("warmup", "total", "final", "message"),
    [
        (0, 0, 0.0, "total_steps must be positive"),
        (11, 10, 0.0, "warmup_steps must be in"),
        (-1, 10, 0.0, "warmup_steps must be in"),
        (0, 10, 1.5, "final_ratio must be in"),
    ],
)
def test_warmup_cosine_rejects_invalid(warmup: int, total: int, final: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WarmupCosineSchedule(warmup, total, final)


def test_trainer_lr_follows_schedule_per_step() -> None:
    recorder = _LearningRateRecorder()
    _trainer(recorder, max_steps=6).fit(_tiny_module(), _loader())

    # Peak 0.3 * 4 / 256, a warm-up of 2 steps, then a cosine over 4 steps down to 0.
    peak = 0.3 * 4 / 256
    expected = [0.5, 1.0, 1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2]
    assert recorder.learning_rates == pytest.approx([peak * m for m in expected], rel=1e-9)


def test_trainer_lr_steps_per_optimizer_step() -> None:
    recorder = _LearningRateRecorder()
    trainer = _trainer(recorder, max_steps=3, accumulate_grad_batches=2)
    trainer.fit(_tiny_module(), _loader())

    # Global batch 4 * 2 = 8. The 3 optimizer steps span 6 batches, so the lr changes every 2.
    peak = 0.3 * 8 / 256
    expected = [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert recorder.learning_rates == pytest.approx([peak * m for m in expected], rel=1e-9)


@pytest.mark.slow
def test_trainer_resume_continues_schedule(tmp_path: Path) -> None:
    uninterrupted = _LearningRateRecorder()
    _trainer(uninterrupted, max_steps=6).fit(_tiny_module(), _loader())

    first_half = _LearningRateRecorder(stop_at_step=3)
    trainer = _trainer(first_half, max_steps=6)
    trainer.fit(_tiny_module(), _loader())
    checkpoint = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(checkpoint)

    second_half = _LearningRateRecorder()
    resumed = _trainer(second_half, max_steps=6)
    resumed.fit(_tiny_module(), _loader(), ckpt_path=checkpoint)

    assert len(first_half.learning_rates) == 3
    assert resumed.global_step == 6
    resumed_rates = first_half.learning_rates + second_half.learning_rates
    assert resumed_rates == pytest.approx(uninterrupted.learning_rates, rel=1e-12)
