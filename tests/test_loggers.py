"""Tests of the offline-first W&B logger."""

from __future__ import annotations

from pathlib import Path

import pytest

from simclr_lightning.loggers import WandbRunLogger, resolve_wandb_offline


@pytest.mark.parametrize(
    ("environment", "requested", "expected"),
    [
        (None, None, True),
        ("offline", None, True),
        ("online", None, False),
        (" ONLINE ", None, False),
        ("disabled", None, True),
        ("online", True, True),
        (None, False, False),
    ],
)
def test_resolve_wandb_offline_cases(
    monkeypatch: pytest.MonkeyPatch, environment: str | None, requested: bool | None, expected: bool
) -> None:
    if environment is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", environment)
    assert resolve_wandb_offline(requested) is expected


def test_wandb_run_logger_offline_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_logger = WandbRunLogger(save_dir=str(tmp_path), name="unit")
    try:
        run_logger.log_metrics({"train/loss": 1.5}, step=0)
        assert run_logger.run_dir == tmp_path / "simclr-lightning" / str(run_logger.version)
        wandb_dir = run_logger.wandb_dir
        assert wandb_dir is not None
        assert wandb_dir.parent == tmp_path / "wandb"
        assert wandb_dir.name.startswith("offline-run-")
    finally:
        run_logger.experiment.finish()
