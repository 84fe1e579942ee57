"""``simclr-lightning evaluate``: settings, shared stages, scoring, the report and the parser.

The face protocol (race and gender on UTKFace) is in :mod:`simclr_lightning.evaluation.faces`
and the CIFAR-10 validation in :mod:`simclr_lightning.evaluation.cifar`. Both share the settings
and recipes, the trainers, the scoring with collapse checks and fairness tables, and the report
writer of this module. The report folder contains ``report.md``, ``summary.json``,
``protocol.json`` and the PNG figures, and the same numbers, tables and figures go to a W&B run
(offline unless ``WANDB_MODE=online``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from simclr_lightning.data.index import GENDER_NAMES, RACE_NAMES
from simclr_lightning.demo import ROOT_VARIABLES
from simclr_lightning.evaluation.embedding import ProjectedEmbedding, project_2d
from simclr_lightning.evaluation.fairness import FairnessReport, fairness_report
from simclr_lightning.evaluation.metrics import classification_report, majority_baseline
from simclr_lightning.evaluation.report import (
    EvaluationResult,
    ReportFiles,
    summary_rows,
    write_report,
)
from simclr_lightning.loggers import WandbRunLogger
from simclr_lightning.models.backbones import build_backbone
from simclr_lightning.models.checkpoints import load_state_strict, read_simclr_checkpoint
from simclr_lightning.models.finetune import FineTuneModule
from simclr_lightning.models.simclr import SimCLRModule

logger = logging.getLogger(__name__)

DatasetName = Literal["faces", "cifar10"]
LinearProbeKind = Literal["lbfgs", "sgd"]
TASKS: tuple[str, ...] = ("race", "gender")

METHOD_SIMCLR_PROBE = "SimCLR + linear probe"
METHOD_SIMCLR_KNN = "SimCLR + kNN"
METHOD_SIMCLR_FINETUNE = "SimCLR + fine-tuning"
METHOD_RANDOM_PROBE = "random backbone + linear probe"
METHOD_RANDOM_KNN = "random backbone + kNN"
METHOD_SCRATCH = "supervised from scratch"
METHOD_MAJORITY = "majority class"

# Effectively no cap: the frozen-feature loaders must cover every fine-tune and validation image.
NO_IMAGE_CAP = 10**9


@dataclass(frozen=True)
class ClassifierRecipe:
    """Optimisation settings of one ``FineTuneModule`` run.

    Attributes:
        optimizer: ``sgd`` (Nesterov momentum), ``adamw`` or ``lars``.
        lr: Peak learning rate of the classifier.
        backbone_lr_ratio: Encoder learning rate as a fraction of ``lr``.
        weight_decay: Weight decay of the multi-dimensional weights.
        warmup_fraction: Linear warm-up as a fraction of the epochs; a positive fraction gives
            at least one epoch.
        label_smoothing: Cross-entropy label smoothing.
        feature_norm: Standardise the features with a BatchNorm without affine parameters before
            the classifier.
    """

    optimizer: Literal["sgd", "adamw", "lars"]
    lr: float
    backbone_lr_ratio: float
    weight_decay: float
    warmup_fraction: float
    label_smoothing: float = 0.0
    feature_norm: bool = True

    def module_kwargs(self, epochs: int) -> dict[str, Any]:
        """Return the ``FineTuneModule`` arguments of this recipe for a run of ``epochs``."""
        return {
            "optimizer": self.optimizer,
            "lr": self.lr,
            "backbone_lr_ratio": self.backbone_lr_ratio,
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs(epochs),
            "label_smoothing": self.label_smoothing,
            "feature_norm": self.feature_norm,
            # Inverse-frequency weights keep a minority class from being ignored.
            "class_weights": "balanced",
        }

    def warmup_epochs(self, epochs: int) -> float:
        """Return the warm-up in epochs: 0, or between one epoch and the whole run."""
        if self.warmup_fraction <= 0:
            return 0.0
        return min(max(1.0, self.warmup_fraction * epochs), float(epochs))

    def describe(self) -> str:
        """Return the recipe as one line for the report."""
        warmup = "no warm-up"
        if self.warmup_fraction > 0:
            warmup = f"warm-up {self.warmup_fraction:.0%} of the epochs (at least 1)"
        norm = "standardised features" if self.feature_norm else "raw features"
        return (
            f"{self.optimizer}, lr {self.lr:g} (encoder x{self.backbone_lr_ratio:g}), weight "
            f"decay {self.weight_decay:g}, {warmup}, label smoothing {self.label_smoothing:g}, "
            f"{norm}, balanced class weights, cosine decay"
        )


# The pretrained encoder moves 10x slower than the new classifier. SimCLR features are far from
# centred (norm about 30, no negative entry after the last ReLU), and SGD at lr 0.05 on them sent
# all 2,094 validation images to one gender class on UTKFace at 32 px. Standardised features with
# AdamW trained without collapse there (balanced accuracy 0.69 after 3 epochs).
FINETUNE_RECIPE = ClassifierRecipe(
    optimizer="adamw", lr=1e-3, backbone_lr_ratio=0.1, weight_decay=0.05, warmup_fraction=0.1
)
# From scratch every layer trains at the same rate: AdamW at 1e-3 after a linear warm-up. The
# report's collapse checks show whether this baseline learned, so a stalled run is never hidden.
SCRATCH_RECIPE = ClassifierRecipe(
    optimizer="adamw",
    lr=1e-3,
    backbone_lr_ratio=1.0,
    weight_decay=0.05,
    warmup_fraction=0.1,
    label_smoothing=0.1,
)
# A linear probe trained by SGD on frozen, standardised features (the --linear-probe sgd path).
SGD_PROBE_RECIPE = ClassifierRecipe(
    optimizer="sgd", lr=0.1, backbone_lr_ratio=0.0, weight_decay=0.0, warmup_fraction=0.0
)


@dataclass
class ProtocolSettings:
    """Everything one ``evaluate`` run needs; the command-line options map onto these fields.

    Attributes:
        out: Report folder. Runs, checkpoints and W&B files go to sub-folders of it.
        dataset: ``faces`` (the race and gender protocol) or ``cifar10`` (method validation).
        utkface_root: UTKFace folder or its parent; required for ``faces``.
        ffhq_root: FFHQ folder, pretraining only.
        celeba_root: CelebA folder, pretraining only.
        cache_dir: Prepared image cache of the face roots, or ``None`` to decode files.
        cifar_root: CIFAR-10 folder; required for ``cifar10``.
        cifar_classes: Number of CIFAR-10 classes used, the first ones in class-index order.
        cifar_train_per_class: Maximum training images per CIFAR-10 class, ``None`` for all.
        cifar_test_per_class: Maximum test images per CIFAR-10 class, ``None`` for all.
        checkpoint: SimCLR checkpoint to evaluate; ``None`` pretrains one first.
        pretrain_epochs: SimCLR epochs when ``checkpoint`` is ``None``.
        tasks: Face tasks, a subset of ``race`` and ``gender``.
        seeds: Seeds of the splits and of every initialisation; the report gives the mean and
            standard deviation of every metric over them.
        image_size: Image side in pixels; ``None`` is 64 for faces and 32 for CIFAR-10.
        backbone: ResNet name; ``None`` takes the checkpoint's, else ``resnet18``.
        small_stem: 3x3 stem without max pool; ``None`` takes the checkpoint's, else off for
            faces and on for CIFAR-10.
        linear_probe: ``lbfgs`` (logistic regression on extracted features) or ``sgd``
            (``FineTuneModule(protocol="linear")`` for ``probe_epochs``).
        probe_epochs: Epochs of the ``sgd`` linear probe.
        probe_weight_decay: L2 penalty of the ``lbfgs`` probe.
        finetune_epochs: Epochs of SimCLR fine-tuning.
        scratch_epochs: Epochs of the supervised baseline; ``None`` uses ``finetune_epochs``.
        probes_only: Score only the classifiers on frozen features (linear probes and kNN) and
            the majority class, and skip fine-tuning and the supervised baseline. This compares
            checkpoints quickly.
        batch_size: Images per step in every stage.
        num_workers: DataLoader worker processes.
        accelerator: Lightning accelerator of every stage (``auto``, ``cpu``, ``gpu``).
        precision: Lightning precision of every stage, for example ``32-true`` or ``bf16-mixed``.
        knn_k: Neighbours of the kNN classifier.
        embedding_method: ``pca`` or ``tsne`` for the embedding figures.
        embedding_max_points: Validation images drawn in each embedding figure, chosen with the
            first seed when there are more.
        fairness_min_count: Smallest group that enters the worst group and the largest gap.
    """

    out: Path
    dataset: DatasetName = "faces"
    utkface_root: str | None = None
    ffhq_root: str | None = None
    celeba_root: str | None = None
    cache_dir: str | None = None
    cifar_root: str | None = None
    cifar_classes: int = 10
    cifar_train_per_class: int | None = None
    cifar_test_per_class: int | None = None
    checkpoint: str | None = None
    pretrain_epochs: int = 100
    tasks: tuple[str, ...] = TASKS
    seeds: tuple[int, ...] = (0,)
    image_size: int | None = None
    backbone: str | None = None
    small_stem: bool | None = None
    linear_probe: LinearProbeKind = "lbfgs"
    probe_epochs: int = 30
    probe_weight_decay: float = 1e-3
    finetune_epochs: int = 30
    scratch_epochs: int | None = None
    probes_only: bool = False
    batch_size: int = 256
    num_workers: int = 2
    accelerator: str = "auto"
    precision: str = "32-true"
    knn_k: int = 20
    embedding_method: Literal["pca", "tsne"] = "pca"
    embedding_max_points: int = 2000
    fairness_min_count: int = 10

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.tasks = tuple(self.tasks)
        self.seeds = tuple(int(seed) for seed in self.seeds)
        self.validate()

    @property
    def size(self) -> int:
        """Image side in pixels, with the per-dataset default filled in."""
        if self.image_size is not None:
            return self.image_size
        return 32 if self.dataset == "cifar10" else 64

    @property
    def run_group(self) -> str:
        """W&B group of every run of this evaluation."""
        return f"evaluate-{self.out.resolve().name}"

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting and how to fix it."""
        if self.dataset not in ("faces", "cifar10"):
            raise ValueError(f"dataset must be 'faces' or 'cifar10', got {self.dataset!r}.")
        if self.dataset == "faces" and not self.utkface_root:
            raise ValueError(
                "The face protocol needs labeled images: pass --utkface-root (or set "
                "SIMCLR_UTKFACE_ROOT) to the UTKFace folder."
            )
        if self.dataset == "cifar10" and not self.cifar_root:
            raise ValueError("--dataset cifar10 needs --cifar-root, the CIFAR-10 folder.")
        unknown = [task for task in self.tasks if task not in TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}.")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise FileNotFoundError(
                f"Checkpoint {self.checkpoint} not found; pass the last.ckpt of a SimCLR "
                "pretraining run, or leave out --checkpoint to pretrain first."
            )
        if not 2 <= self.cifar_classes <= 10:
            raise ValueError(f"cifar_classes must be in [2, 10], got {self.cifar_classes}.")
        self._validate_counts()

    def _validate_counts(self) -> None:
        counts = {
            "pretrain_epochs": self.pretrain_epochs,
            "probe_epochs": self.probe_epochs,
            "finetune_epochs": self.finetune_epochs,
            "scratch_epochs": self.scratch_epochs or 1,
            "batch_size": self.batch_size,
            "knn_k": self.knn_k,
            "embedding_max_points": self.embedding_max_points,
            "fairness_min_count": self.fairness_min_count,
            "cifar_train_per_class": self.cifar_train_per_class or 1,
            "cifar_test_per_class": self.cifar_test_per_class or 1,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {self.num_workers}.")
        if self.probe_weight_decay < 0:
            raise ValueError(f"probe_weight_decay must be >= 0, got {self.probe_weight_decay}.")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}.")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-serialisable values."""
        values = asdict(self)
        values["out"] = str(self.out)
        values["image_size"] = self.size
        return values


@dataclass(frozen=True)
class Architecture:
    """Backbone architecture shared by the SimCLR, random and supervised models of a run."""

    backbone: str
    small_stem: bool


@dataclass(frozen=True, eq=False)
class ConstantBaselineResult(EvaluationResult):
    """Result of a predictor that returns one class by design, so no collapse check applies."""

    def collapse_warnings(self) -> list[str]:
        """Return only the explicit :attr:`warnings`; a constant predictor is not a collapse."""
        return list(self.warnings)


@dataclass(frozen=True, eq=False)
class LabeledPredictions:
    """Predicted and true classes of the validation images, with their race and gender.

    Attributes:
        target: True task class per image.
        prediction: Predicted task class per image.
        race: Race label per image, -1 where unknown.
        gender: Gender label per image, -1 where unknown.
    """

    target: np.ndarray
    prediction: np.ndarray
    race: np.ndarray
    gender: np.ndarray


@dataclass
class Progress:
    """Numbered log lines, one per stage, with the time since the evaluation started."""

    total: int
    done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def step(self, text: str) -> None:
        """Log the start of the next stage."""
        self.done += 1
        elapsed = time.perf_counter() - self.started
        logger.info("[stage %d/%d, %.0f s] %s", self.done, self.total, elapsed, text)

    def elapsed(self) -> float:
        """Seconds since the evaluation started."""
        return time.perf_counter() - self.started


# ---------------------------------------------------------------- trainers and backbones


def resolve_device(accelerator: str) -> torch.device:
    """Return the device that feature extraction uses for a Lightning ``accelerator`` name."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class EpochProgress(Callback):
    """Log one line per training epoch: the stage, the epoch, the time and the latest metrics."""

    METRICS = ("train/loss", "val/knn_top1", "val/probe_top1")

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        values = [f"{key} {float(metrics[key]):.4f}" for key in self.METRICS if key in metrics]
        logger.info(
            "%s: epoch %d/%d done after %.0f s%s",
            self.name,
            trainer.current_epoch + 1,
            trainer.max_epochs,
            time.perf_counter() - self.started,
            "".join(f", {value}" for value in values),
        )


def stage_trainer(settings: ProtocolSettings, epochs: int, name: str, **kwargs: Any) -> pl.Trainer:
    """Build the Trainer of one stage, logging to its own W&B run in the evaluation's group."""
    run_logger = WandbRunLogger(
        save_dir=str(settings.out / "runs"),
        name=name,
        job_type=name.split("-")[0],
        group=settings.run_group,
    )
    return pl.Trainer(
        max_epochs=epochs,
        accelerator=settings.accelerator,
        devices=1,
        precision=settings.precision,  # type: ignore[arg-type]
        logger=run_logger,
        log_every_n_steps=10,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[EpochProgress(name), *kwargs.pop("callbacks", [])],
        **kwargs,
    )


def finish_run(trainer: pl.Trainer) -> None:
    """Close the trainer's W&B run so the next stage starts a run of its own."""
    if isinstance(trainer.logger, WandbRunLogger):
        trainer.logger.announce()
        trainer.logger.experiment.finish()


def warmup_epochs(epochs: int) -> float:
    """Return the SimCLR warm-up: 10 epochs as in the SimCLR paper, or 10 % of a shorter run."""
    return min(10.0, 0.1 * epochs)


def fit_simclr(
    settings: ProtocolSettings, datamodule: pl.LightningDataModule, model: SimCLRModule, name: str
) -> Path:
    """Pretrain ``model`` for ``settings.pretrain_epochs`` and return its ``last.ckpt``."""
    folder = settings.out / "checkpoints" / name
    checkpoint = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0)
    epochs = settings.pretrain_epochs
    trainer = stage_trainer(
        settings,
        epochs,
        name,
        callbacks=[checkpoint],
        check_val_every_n_epoch=max(epochs // 5, 1),
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    finish_run(trainer)
    last = Path(checkpoint.last_model_path)
    if not last.is_file():
        raise RuntimeError(f"Pretraining wrote no checkpoint; expected one in {folder}.")
    logger.info("SimCLR checkpoint: %s (reuse it with --checkpoint)", last)
    return last


def load_simclr_backbone(
    checkpoint: str | Path, settings: ProtocolSettings
) -> tuple[nn.Module, Architecture]:
    """Build the checkpoint's backbone with its weights, rejecting a contradicting setting."""
    weights = read_simclr_checkpoint(checkpoint)
    architecture = Architecture(
        str(weights.hparams.get("backbone", "resnet18")),
        bool(weights.hparams.get("small_stem", False)),
    )
    for name in ("backbone", "small_stem"):
        requested = getattr(settings, name)
        stored = getattr(architecture, name)
        if requested is not None and requested != stored:
            raise ValueError(
                f"--{name.replace('_', '-')} {requested} contradicts the checkpoint "
                f"{checkpoint}, which was trained with {name}={stored}. Leave it unset."
            )
    backbone, _ = build_backbone(architecture.backbone, architecture.small_stem)
    load_state_strict(backbone, weights.backbone, "backbone")
    return backbone, architecture


def random_backbone(architecture: Architecture, seed: int) -> nn.Module:
    """Build a randomly initialised backbone from ``seed``, the rule every method follows."""
    pl.seed_everything(seed, workers=True, verbose=False)
    backbone, _ = build_backbone(architecture.backbone, architecture.small_stem)
    return backbone


def collect_predictions(outputs: Sequence[Mapping[str, Tensor]] | None) -> LabeledPredictions:
    """Concatenate the ``FineTuneModule.predict_step`` outputs of a validation pass."""
    if not outputs:
        raise RuntimeError("The prediction pass returned no batches; the split is empty.")

    def column(key: str) -> np.ndarray:
        return torch.cat([batch[key] for batch in outputs]).cpu().numpy().astype(np.int64)

    return LabeledPredictions(
        column("target"), column("prediction"), column("race"), column("gender")
    )


def train_and_predict(
    settings: ProtocolSettings,
    datamodule: pl.LightningDataModule,
    model: FineTuneModule,
    name: str,
    epochs: int,
) -> LabeledPredictions:
    """Train ``model`` on the fine-tune split, then predict every validation image once."""
    trainer = stage_trainer(settings, epochs, name, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    outputs = trainer.predict(model, dataloaders=datamodule.val_dataloader())
    finish_run(trainer)
    return collect_predictions(outputs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- scoring


def other_attribute(task: str) -> str | None:
    """Return the attribute whose groups a task is compared across (race for gender, and back)."""
    return {"race": "gender", "gender": "race"}.get(task)


def group_fairness(
    task: str, predictions: LabeledPredictions, num_classes: int, min_count: int
) -> dict[str, FairnessReport]:
    """Score a task within each group of the other attribute, when that attribute is known."""
    attribute = other_attribute(task)
    if attribute is None:
        return {}
    groups = predictions.race if attribute == "race" else predictions.gender
    if not bool((groups >= 0).any()):
        return {}
    names = RACE_NAMES if attribute == "race" else GENDER_NAMES
    report = fairness_report(
        predictions.target,
        predictions.prediction,
        groups,
        names,
        num_classes,
        attribute=attribute,
        min_count=min_count,
    )
    return {attribute: report}


def score_predictions(
    method: str,
    task: str,
    seed: int,
    predictions: LabeledPredictions,
    class_names: Sequence[str],
    majority_accuracy: float,
    min_count: int,
    constant: bool = False,
) -> EvaluationResult:
    """Turn validation predictions into an :class:`EvaluationResult` and log its warnings."""
    report = classification_report(
        predictions.target, predictions.prediction, len(class_names), class_names
    )
    fairness = group_fairness(task, predictions, len(class_names), min_count)
    result_class = ConstantBaselineResult if constant else EvaluationResult
    result = result_class(
        method, task, report, seed=seed, majority_accuracy=majority_accuracy, fairness=fairness
    )
    for warning in result.collapse_warnings():
        rank_zero_warn(f"Collapse ({method}, {task}, seed {seed}): {warning}", stacklevel=2)
    logger.info(
        "%s, %s, seed %d: accuracy %.4f, balanced accuracy %.4f, macro F1 %.4f",
        method,
        task,
        seed,
        report.accuracy,
        report.balanced_accuracy,
        report.macro_f1,
    )
    return result


@dataclass(frozen=True)
class TaskScorer:
    """Scores every method of one task and seed against the same majority baseline."""

    task: str
    seed: int
    class_names: tuple[str, ...]
    majority_accuracy: float
    min_count: int

    def __call__(
        self, method: str, predictions: LabeledPredictions, constant: bool = False
    ) -> EvaluationResult:
        return score_predictions(
            method,
            self.task,
            self.seed,
            predictions,
            self.class_names,
            self.majority_accuracy,
            self.min_count,
            constant=constant,
        )


def majority_predictions(
    train_targets: np.ndarray, predictions: LabeledPredictions
) -> tuple[LabeledPredictions, float]:
    """Return the majority-class predictor's validation predictions and its accuracy."""
    baseline = majority_baseline(train_targets, predictions.target)
    constant = np.full_like(predictions.target, baseline.majority_class)
    labeled = LabeledPredictions(predictions.target, constant, predictions.race, predictions.gender)
    return labeled, baseline.accuracy


def embedding_of(
    features: Tensor,
    labels: np.ndarray,
    class_names: Sequence[str],
    title: str,
    settings: ProtocolSettings,
) -> ProjectedEmbedding:
    """Project features to 2-D for a figure, drawing at most ``embedding_max_points`` of them."""
    rows = np.arange(len(labels))
    if rows.size > settings.embedding_max_points:
        rng = np.random.default_rng([settings.seeds[0], 2])
        rows = np.sort(rng.choice(rows.size, settings.embedding_max_points, replace=False))
    points = project_2d(
        features[torch.from_numpy(rows)], settings.embedding_method, seed=settings.seeds[0]
    )
    return ProjectedEmbedding(points, labels[rows], tuple(class_names), title)


# ---------------------------------------------------------------- the report


def collapse_lines(results: Sequence[EvaluationResult]) -> list[tuple[str, str, int | None, str]]:
    """Return ``(method, task, seed, warning)`` for every collapse warning of ``results``."""
    return [
        (result.method, result.task, result.seed, warning)
        for result in results
        for warning in result.collapse_warnings()
    ]


def write_protocol_report(
    settings: ProtocolSettings,
    results: Sequence[EvaluationResult],
    embeddings: Mapping[str, ProjectedEmbedding],
    notes: Sequence[str],
    title: str,
    extra: Mapping[str, Any],
) -> ReportFiles:
    """Write the report folder and ``protocol.json``, log the warnings and log it all to W&B."""
    files = write_report(settings.out, results, title=title, embeddings=embeddings, notes=notes)
    warnings = collapse_lines(results)
    for method, task, seed, warning in warnings:
        logger.warning("COLLAPSE WARNING (%s, %s, seed %s): %s", method, task, seed, warning)
    if warnings:
        logger.warning(
            "%d collapse warnings; they are listed at the top of %s.", len(warnings), files.markdown
        )
    protocol = {
        "settings": settings.to_dict(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "collapse_warnings": [list(line) for line in warnings],
        **extra,
    }
    protocol_path = settings.out / "protocol.json"
    protocol_path.write_text(json.dumps(protocol, indent=2) + "\n", encoding="utf-8")
    log_report_to_wandb(settings, results, files)
    logger.info("Report: %s (summary %s)", files.markdown, files.summary_json)
    return files


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def summary_scalars(results: Sequence[EvaluationResult]) -> dict[str, float]:
    """Return the mean and std of each summary metric as ``TASK/METHOD/METRIC`` scalars."""
    scalars: dict[str, float] = {}
    for row in summary_rows(results):
        prefix = f"{row['task']}/{_slug(str(row['method']))}"
        for key, value in row.items():
            if isinstance(value, float) and math.isfinite(value):
                scalars[f"{prefix}/{key}"] = value
    return scalars


def fairness_rows(results: Sequence[EvaluationResult]) -> list[list[Any]]:
    """Return one table row per method, task, seed, grouping attribute and group."""
    rows = []
    for result in results:
        for attribute, report in result.fairness.items():
            for group in report.groups:
                rows.append(
                    [
                        result.method,
                        result.task,
                        result.seed,
                        attribute,
                        group.name,
                        group.count,
                        None if math.isnan(group.accuracy) else group.accuracy,
                        None if math.isnan(group.balanced_accuracy) else group.balanced_accuracy,
                    ]
                )
    return rows


def log_report_to_wandb(
    settings: ProtocolSettings, results: Sequence[EvaluationResult], files: ReportFiles
) -> None:
    """Log the summary scalars, the summary, fairness and warning tables, and every PNG."""
    run = WandbRunLogger(
        save_dir=str(settings.out / "runs"),
        name=f"evaluate-{settings.dataset}-summary",
        job_type="evaluate",
        group=settings.run_group,
    )
    run.log_hyperparams(settings.to_dict())
    run.log_metrics(summary_scalars(results))

    rows = summary_rows(results)
    columns = [key for key in rows[0] if key != "samples"]
    run.log_table("summary", columns=columns, data=[[row[key] for key in columns] for row in rows])
    fairness_columns = [
        "method",
        "task",
        "seed",
        "attribute",
        "group",
        "samples",
        "accuracy",
        "balanced_accuracy",
    ]
    run.log_table("fairness", columns=fairness_columns, data=fairness_rows(results))

    warning_rows = [list(line) for line in collapse_lines(results)]
    run.log_table(
        "collapse_warnings", columns=["method", "task", "seed", "warning"], data=warning_rows
    )

    for key, path in files.images.items():
        run.log_image(key=f"figures/{key}", images=[str(path)])
    run.announce()
    run.experiment.finish()


# ---------------------------------------------------------------- the command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simclr-lightning evaluate",
        description="Run the SimCLR evaluation protocol and write a report folder: a linear "
        "probe and kNN on frozen SimCLR features and on a random backbone, SimCLR fine-tuning, a "
        "supervised baseline and the majority class, for race and gender on UTKFace (or the "
        "probes and kNN on CIFAR-10).",
    )
    parser.add_argument("--out", required=True, help="report folder (created when missing)")
    parser.add_argument("--dataset", choices=("faces", "cifar10"), default="faces")
    for option, variable in ROOT_VARIABLES.items():
        parser.add_argument(
            "--" + option.replace("_", "-"),
            default=os.environ.get(variable),
            help=f"dataset folder (default: ${variable})",
        )
    parser.add_argument("--cache-dir", help="prepared image cache of the face roots")

    parser.add_argument("--cifar-root", help="CIFAR-10 folder (python release or ImageFolder)")
    parser.add_argument("--cifar-classes", type=int, default=10, help="first N CIFAR-10 classes")
    parser.add_argument("--cifar-train-per-class", type=int, help="max training images per class")
    parser.add_argument("--cifar-test-per-class", type=int, help="max test images per class")

    start = parser.add_mutually_exclusive_group()
    start.add_argument("--checkpoint", help="SimCLR checkpoint to evaluate instead of pretraining")
    start.add_argument("--pretrain-epochs", type=int, default=100, help="SimCLR pretraining epochs")

    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of the splits")
    parser.add_argument("--image-size", type=int, help="image side in pixels (faces 64, CIFAR 32)")
    parser.add_argument("--backbone", help="ResNet name (default: the checkpoint's, or resnet18)")
    parser.add_argument(
        "--small-stem",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="3x3 stem without max pool (default: the checkpoint's; off for faces, on for CIFAR)",
    )
    _add_training_options(parser)
    return parser


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--linear-probe", choices=("lbfgs", "sgd"), default="lbfgs")
    parser.add_argument("--probe-epochs", type=int, default=30, help="epochs of the sgd probe")
    parser.add_argument(
        "--probe-weight-decay", type=float, default=1e-3, help="L2 penalty of the lbfgs probe"
    )
    parser.add_argument("--finetune-epochs", type=int, default=30, help="SimCLR fine-tuning epochs")
    parser.add_argument("--scratch-epochs", type=int, help="supervised epochs (default: finetune)")
    parser.add_argument(
        "--probes-only",
        action="store_true",
        help="score only the frozen-feature classifiers (linear probes, kNN) and the majority "
        "class, which compares checkpoints quickly",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per step")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator")
    parser.add_argument("--precision", default="32-true", help="Lightning precision")
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN classifier")
    parser.add_argument("--embedding-method", choices=("pca", "tsne"), default="pca")
    parser.add_argument("--embedding-max-points", type=int, default=2000)
    parser.add_argument(
        "--fairness-min-count", type=int, default=10, help="smallest group compared"
    )


def settings_from_args(argv: Sequence[str]) -> ProtocolSettings:
    """Parse ``evaluate`` arguments into :class:`ProtocolSettings`."""
    args = vars(_parser().parse_args(list(argv)))
    args["tasks"] = tuple(args["tasks"])
    args["seeds"] = tuple(args["seeds"])
    return ProtocolSettings(**args)


def evaluate_main(argv: Sequence[str]) -> int:
    """Run ``simclr-lightning evaluate`` with ``argv`` and return the exit status."""
    settings = settings_from_args(argv)
    settings.out.mkdir(parents=True, exist_ok=True)
    logger.info("Evaluation (%s) into %s", settings.dataset, settings.out)
    if settings.dataset == "cifar10":
        from simclr_lightning.evaluation.cifar import run_cifar_protocol

        run_cifar_protocol(settings)
    else:
        from simclr_lightning.evaluation.faces import run_face_protocol

        run_face_protocol(settings)
    return 0
