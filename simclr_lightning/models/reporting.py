"""Turning collected predictions into logged metrics, collapse warnings and pictures."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from simclr_lightning.evaluation.fairness import FairnessReport, fairness_reports
from simclr_lightning.evaluation.metrics import (
    ClassificationReport,
    classification_report,
    detect_collapse,
)

if TYPE_CHECKING:
    from simclr_lightning.models.finetune import FineTuneModule

logger = logging.getLogger(__name__)

RACE_NAMES = ("White", "Black", "Asian", "Indian", "Others")
GENDER_NAMES = ("male", "female")


@dataclass
class SplitResult:
    """Metrics of one evaluation pass over a split."""

    report: ClassificationReport
    fairness: dict[str, FairnessReport] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    confusion_png: Path | None = None


def log_classification(
    module: FineTuneModule, split: str, arrays: dict[str, np.ndarray]
) -> SplitResult:
    """Log accuracy, balanced accuracy, macro F1, per-class recall and the confusion matrix.

    Args:
        module: The module whose ``log``, trainer, ``num_classes`` and ``class_names()`` are
            used.
        split: ``val`` or ``test``, the prefix of every logged name.
        arrays: ``prediction`` and ``target`` of every sample, and ``race`` / ``gender`` when
            the batches carried them (-1 where unknown).
    """
    num_classes = module.num_classes
    names = module.class_names()
    report = classification_report(arrays["target"], arrays["prediction"], num_classes, names)
    for name, value in report.scalars(prefix=f"{split}/").items():
        if "/precision/" in name or "/f1/" in name:
            continue
        module.log(name, value, sync_dist=False)
    predicted = dict(zip(names, report.predicted_count.tolist(), strict=True))
    rank_zero_info(
        f"{split} epoch {module.trainer.current_epoch}: accuracy {report.accuracy:.4f}, "
        f"balanced accuracy {report.balanced_accuracy:.4f}, macro F1 {report.macro_f1:.4f}, "
        f"predictions per class {predicted}"
    )
    result = SplitResult(report=report)
    result.fairness = _group_reports(arrays, num_classes)
    majority_accuracy = None
    if module.majority_class is not None:
        majority_accuracy = float(np.mean(arrays["target"] == module.majority_class))
    result.warnings = detect_collapse(report, majority_accuracy)
    for message in result.warnings:
        rank_zero_warn(f"{split}: {message}", stacklevel=2)
    if module.trainer.is_global_zero:
        result.confusion_png = _save_confusion(module, split, report)
    return result


def _group_reports(arrays: dict[str, np.ndarray], num_classes: int) -> dict[str, FairnessReport]:
    groupings: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {}
    for attribute, names in (("race", RACE_NAMES), ("gender", GENDER_NAMES)):
        values = arrays.get(attribute)
        if values is not None and bool((values >= 0).any()):
            groupings[attribute] = (values, names)
    if not groupings:
        return {}
    return fairness_reports(arrays["target"], arrays["prediction"], num_classes, groupings)


def _save_confusion(
    module: pl.LightningModule, split: str, report: ClassificationReport
) -> Path | None:
    """Write the normalised confusion matrix as a PNG in the run folder and log it to W&B."""
    from simclr_lightning.evaluation.embedding import plot_confusion_matrix
    from simclr_lightning.loggers import run_dir_of

    trainer: Any = module.trainer
    path = run_dir_of(trainer) / f"confusion_{split}_epoch{trainer.current_epoch:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(report, path, normalized=True)
    log_image = getattr(trainer.logger, "log_image", None)
    if log_image is not None:
        try:
            log_image(key=f"{split}/confusion_matrix", images=[str(path)], step=trainer.global_step)
        except (OSError, ValueError, RuntimeError) as error:
            logger.warning("Could not log %s to the logger: %s", path, error)
    return path
