"""``simclr-lightning demo``: pretrain, probe and compare with a random backbone, on a CPU."""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from simclr_lightning.loggers import WandbRunLogger
from simclr_lightning.models.finetune import FineTuneModule
from simclr_lightning.models.reporting import SplitResult
from simclr_lightning.models.simclr import SimCLRModule

logger = logging.getLogger(__name__)

ROOT_VARIABLES = {
    "utkface_root": "SIMCLR_UTKFACE_ROOT",
    "ffhq_root": "SIMCLR_FFHQ_ROOT",
    "celeba_root": "SIMCLR_CELEBA_ROOT",
}


@dataclass
class DemoSettings:
    """Scale of a demo run; the defaults finish in a few minutes on 2 CPU cores."""

    output: Path
    pretrain_epochs: int = 60
    probe_epochs: int = 20
    image_size: int = 32
    batch_size: int = 50
    seed: int = 0
    task: str = "race"


@dataclass
class DemoResult:
    """Validation metrics of one probed backbone."""

    method: str
    result: SplitResult


class EpochProgress(pl.Callback):
    """Log a one-line summary every ``every`` epochs, for runs without a progress bar."""

    def __init__(self, stage: str, every: int) -> None:
        self.stage = stage
        self.every = max(every, 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every and epoch != trainer.max_epochs:
            return
        metrics = trainer.callback_metrics
        shown = ", ".join(
            f"{name} {float(metrics[name]):.3f}"
            for name in ("train/loss", "train/z_std_ratio", "val/knn_top1")
            if name in metrics
        )
        logger.info("%s epoch %d/%d: %s", self.stage, epoch, trainer.max_epochs, shown)


def _finish_run(trainer: pl.Trainer) -> None:
    """Close the trainer's W&B run so the next stage starts a run of its own."""
    if isinstance(trainer.logger, WandbRunLogger):
        trainer.logger.announce()
        trainer.logger.experiment.finish()


def _trainer(settings: DemoSettings, epochs: int, job_type: str, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=WandbRunLogger(save_dir=str(settings.output), job_type=job_type, name=job_type),
        log_every_n_steps=1,
        enable_model_summary=False,
        enable_progress_bar=False,
        **kwargs,
    )


def pretrain(settings: DemoSettings, datamodule: pl.LightningDataModule) -> Path:
    """Pretrain SimCLR on ``datamodule`` and return the path of the last checkpoint."""
    model = SimCLRModule(
        backbone="resnet18",
        projection_dim=64,
        temperature=0.2,
        optimizer="lars",
        base_lr=0.3,
        lr_scaling="sqrt",
        weight_decay=1e-6,
        warmup_epochs=10,
    )
    checkpoint = ModelCheckpoint(save_last=True, save_top_k=0)
    progress = EpochProgress("pretraining", max(settings.pretrain_epochs // 10, 1))
    trainer = _trainer(
        settings,
        settings.pretrain_epochs,
        "demo-pretrain",
        callbacks=[checkpoint, progress],
        check_val_every_n_epoch=max(settings.pretrain_epochs // 5, 1),
    )
    trainer.fit(model, datamodule=datamodule)
    _finish_run(trainer)
    last = Path(checkpoint.last_model_path)
    if not last.is_file():
        raise RuntimeError(f"Pretraining wrote no checkpoint; expected {last}.")
    return last


def probe(
    settings: DemoSettings, datamodule: pl.LightningDataModule, checkpoint: Path | None
) -> SplitResult:
    """Fit a linear probe on a pretrained (or, with ``None``, random) backbone."""
    pl.seed_everything(settings.seed, workers=True, verbose=False)
    model = FineTuneModule(
        checkpoint_path=str(checkpoint) if checkpoint else None,
        backbone=None if checkpoint else "resnet18",
        protocol="linear",
        optimizer="sgd",
        lr=0.1,
        weight_decay=0.0,
        warmup_epochs=0,
        class_weights="balanced",
    )
    name = "demo-probe-simclr" if checkpoint else "demo-probe-random"
    trainer = _trainer(
        settings,
        settings.probe_epochs,
        name,
        enable_checkpointing=False,
        check_val_every_n_epoch=settings.probe_epochs,
    )
    trainer.fit(model, datamodule=datamodule)
    _finish_run(trainer)
    return model.last_reports["val"]


def run_demo(settings: DemoSettings, roots: dict[str, str | None]) -> list[DemoResult]:
    """Run the demo on the LFW crops, or on face datasets when any root is given."""
    pl.seed_everything(settings.seed, workers=True, verbose=False)
    pretrain_data, probe_data = _datamodules(settings, roots)
    started = time.perf_counter()
    checkpoint = pretrain(settings, pretrain_data)
    logger.info("Pretraining took %.0f s; checkpoint %s", time.perf_counter() - started, checkpoint)
    return [
        DemoResult("SimCLR + linear probe", probe(settings, probe_data, checkpoint)),
        DemoResult("random backbone + linear probe", probe(settings, probe_data, None)),
    ]


def _datamodules(
    settings: DemoSettings, roots: dict[str, str | None]
) -> tuple[pl.LightningDataModule, pl.LightningDataModule]:
    if not any(roots.values()):
        from simclr_lightning.data.lfw import LFWDataModule

        common = {"image_size": settings.image_size, "batch_size": settings.batch_size}
        return LFWDataModule("pretrain", **common), LFWDataModule("classify", **common)
    from simclr_lightning.data.face_datamodule import FaceDataModule

    task: Literal["race", "gender"] = "gender" if settings.task == "gender" else "race"

    def face_data(mode: Literal["pretrain", "finetune"]) -> FaceDataModule:
        return FaceDataModule(
            utkface_root=roots.get("utkface_root"),
            ffhq_root=roots.get("ffhq_root"),
            celeba_root=roots.get("celeba_root"),
            mode=mode,
            task=task,
            image_size=settings.image_size,
            batch_size=settings.batch_size,
            num_workers=2,
            seed=settings.seed,
        )

    return face_data("pretrain"), face_data("finetune")


def format_results(results: Sequence[DemoResult]) -> str:
    """Render the results as a fixed-width table."""
    header = f"{'method':<34} {'accuracy':>9} {'balanced':>9} {'macro F1':>9}"
    lines = [header, "-" * len(header)]
    for item in results:
        report = item.result.report
        lines.append(
            f"{item.method:<34} {report.accuracy:>9.3f} {report.balanced_accuracy:>9.3f} "
            f"{report.macro_f1:>9.3f}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simclr-lightning demo",
        description="Pretrain SimCLR, fit a linear probe and compare it with a random backbone. "
        "Without dataset roots it uses the LFW face / non-face crops bundled with scikit-image.",
    )
    parser.add_argument(
        "--output", default="runs/demo", help="folder for runs (default: %(default)s)"
    )
    parser.add_argument("--pretrain-epochs", type=int, default=60, help="SimCLR epochs")
    parser.add_argument("--probe-epochs", type=int, default=20, help="linear-probe epochs")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=50, help="images per step")
    parser.add_argument("--seed", type=int, default=0, help="seed of splits and initialisation")
    parser.add_argument("--task", choices=("race", "gender"), default="race", help="face-data task")
    for option, variable in ROOT_VARIABLES.items():
        parser.add_argument(
            "--" + option.replace("_", "-"),
            default=os.environ.get(variable),
            help=f"dataset folder (default: ${variable})",
        )
    return parser


def demo_main(argv: Sequence[str]) -> int:
    """Run ``simclr-lightning demo`` with ``argv`` and log the results table."""
    args = _parser().parse_args(list(argv))
    settings = DemoSettings(
        output=Path(args.output),
        pretrain_epochs=args.pretrain_epochs,
        probe_epochs=args.probe_epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        seed=args.seed,
        task=args.task,
    )
    roots = {option: getattr(args, option) for option in ROOT_VARIABLES}
    started = time.perf_counter()
    results = run_demo(settings, roots)
    logger.info("\n%s\n", format_results(results))
    for item in results:
        for message in item.result.warnings:
            logger.warning("%s: %s", item.method, message)
        if item.result.confusion_png:
            logger.info("Confusion matrix (%s): %s", item.method, item.result.confusion_png)
    logger.info("W&B runs (offline unless WANDB_MODE=online): %s", settings.output / "wandb")
    logger.info("Upload them with: wandb sync %s/wandb/offline-run-*", settings.output)
    logger.info("Demo finished in %.0f s.", time.perf_counter() - started)
    return 0
