"""End-to-end test of ``simclr-lightning demo`` at a tiny scale."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from simclr_lightning.cli import main


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="simclr_lightning")
    status = main(
        [
            "demo",
            "--output",
            str(tmp_path),
            "--pretrain-epochs",
            "2",
            "--probe-epochs",
            "2",
            "--image-size",
            "16",
        ]
    )
    assert status == 0
    text = caplog.text
    assert "SimCLR + linear probe" in text
    assert "random backbone + linear probe" in text
    assert "wandb sync" in text
    pictures = list(tmp_path.glob("simclr-lightning/*/confusion_val_*.png"))
    assert len(pictures) == 2
    assert list(tmp_path.glob("simclr-lightning/*/checkpoints/last.ckpt"))
