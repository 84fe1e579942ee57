"""Pretrain SimCLR and fine-tune a classifier from Python, with a plain ``lightning.Trainer``.

With no dataset folder it runs on the LFW face / non-face crops bundled with scikit-image:

    python examples/pretrain_finetune.py --epochs 20

With UTKFace (and optionally FFHQ and CelebA for pretraining) it learns race or gender:

    python examples/pretrain_finetune.py --utkface-root ~/data/UTKFace --task gender
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from simclr_lightning import FaceDataModule, FineTuneModule, LFWDataModule, SimCLRModule


def build_data(args: argparse.Namespace, mode: str) -> pl.LightningDataModule:
    """Build the pretraining or labeled datamodule for the requested data."""
    if args.utkface_root is None:
        return LFWDataModule("pretrain" if mode == "pretrain" else "classify", batch_size=50)
    return FaceDataModule(
        utkface_root=args.utkface_root,
        ffhq_root=args.ffhq_root,
        celeba_root=args.celeba_root,
        mode=mode,
        task=args.task,
        image_size=64,
        batch_size=64,
        num_workers=2,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utkface-root")
    parser.add_argument("--ffhq-root")
    parser.add_argument("--celeba-root")
    parser.add_argument("--task", choices=("race", "gender"), default="race")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--output", default="runs/example")
    args = parser.parse_args()
    pl.seed_everything(0)

    # 1. SimCLR pretraining: lightly's augmentations, NT-Xent and LARS.
    simclr = SimCLRModule(backbone="resnet18", temperature=0.2, lr_scaling="sqrt", base_lr=0.3)
    checkpoint = ModelCheckpoint(dirpath=Path(args.output) / "pretrain", save_last=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
    )
    trainer.fit(simclr, datamodule=build_data(args, "pretrain"))

    # 2. Linear probe on the frozen backbone; the projection head is dropped.
    classifier = FineTuneModule(checkpoint_path=checkpoint.last_model_path, protocol="linear")
    trainer = pl.Trainer(
        max_epochs=max(args.epochs // 2, 1),
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(classifier, datamodule=build_data(args, "finetune"))
    report = classifier.last_reports["val"].report
    print(report.to_markdown(include_confusion=True))


if __name__ == "__main__":
    main()
