"""Weights & Biases logging that works with no account and no network."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

logger = logging.getLogger(__name__)


def resolve_wandb_offline(offline: bool | None) -> bool:
    """Decide whether a W&B run is offline.

    ``offline=None`` runs online only when ``WANDB_MODE=online`` is set. Every other case runs
    offline, so a job never waits on the network or prompts for a login. ``WANDB_MODE=disabled``
    is left to wandb itself.
    """
    if offline is not None:
        return offline
    return os.environ.get("WANDB_MODE", "").strip().lower() != "online"


class WandbRunLogger(WandbLogger):
    """``WandbLogger`` that runs offline unless asked otherwise and reports where the run is.

    Args:
        project: W&B project, which is also the folder under ``save_dir`` that contains each
            run's folder.
        name: Display name of the run.
        save_dir: Root folder of the runs. Each run writes ``save_dir/project/RUN_ID/`` (its
            checkpoints and resolved config) and ``save_dir/wandb/`` (wandb's own files).
        offline: ``True`` or ``False`` forces the mode; ``None`` runs online only when the
            environment sets ``WANDB_MODE=online``.
        log_model: Upload checkpoints as W&B artifacts (online runs only).
        tags: W&B tags of the run.
        group: W&B group of the run, e.g. one group per seed sweep.
        job_type: W&B job type, e.g. ``pretrain`` or ``finetune``.
        kwargs: Further arguments of ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "simclr-lightning",
        name: str | None = None,
        save_dir: str = "runs",
        offline: bool | None = None,
        log_model: bool = False,
        tags: list[str] | None = None,
        group: str | None = None,
        job_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        is_offline = resolve_wandb_offline(offline)
        if is_offline:
            # Also stops wandb from checking for updates or an API key over the network.
            os.environ.setdefault("WANDB_MODE", "offline")
            # announce() logs where the run is and how to sync it; wandb's own banner and
            # end-of-run summary would repeat that on every run.
            os.environ.setdefault("WANDB_SILENT", "true")
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            project=project,
            name=name,
            save_dir=save_dir,
            offline=is_offline,
            log_model=False if is_offline else log_model,
            tags=tags,
            group=group,
            job_type=job_type,
            **kwargs,
        )
        self._is_offline = is_offline
        self._announced = False

    @property
    def run_dir(self) -> Path:
        """The run's own folder, ``save_dir/project/RUN_ID``, where checkpoints go."""
        return Path(self.save_dir or ".") / str(self.name) / str(self.version)

    @property
    def wandb_dir(self) -> Path | None:
        """The folder wandb writes the run to, which ``wandb sync`` takes."""
        experiment = self.experiment
        run_dir = getattr(experiment, "dir", None)
        return Path(run_dir).parent if run_dir else None

    def announce(self) -> None:
        """Log, once, where the run is and how to upload an offline run."""
        if self._announced:
            return
        self._announced = True
        wandb_dir = self.wandb_dir
        if self._is_offline:
            rank_zero_info(
                f"W&B run {self.version} is offline in {wandb_dir}; upload it later with: "
                f"wandb sync {wandb_dir}"
            )
        else:
            rank_zero_info(f"W&B run {self.version} is online: {self.experiment.url}")
        rank_zero_info(f"Run folder (checkpoints, config): {self.run_dir}")


def run_dir_of(trainer: Any) -> Path:
    """Return the current run's folder: the W&B run folder, else the logger's or trainer's."""
    run_logger = getattr(trainer, "logger", None)
    if isinstance(run_logger, WandbRunLogger):
        return run_logger.run_dir
    if run_logger is not None and getattr(run_logger, "log_dir", None):
        return Path(run_logger.log_dir)
    return Path(trainer.default_root_dir)
