"""Classification metrics that keep absent classes out of the averages, and a collapse guard.

A class with no samples in the evaluated split (support 0) has no recall and no F1. Averaging it
in as zero would punish the classifier for a flaw of the split, and averaging it in as one would
hide that flaw. :class:`ClassificationReport` therefore marks such a class as absent and reports
its recall and F1 as NaN. Balanced accuracy and macro F1 average over the present classes only,
and the report lists the absent classes by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

LabelArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
Labels = npt.ArrayLike | torch.Tensor

# Defaults of the collapse guard. A head that sends more than 95 % of its predictions to one class
# is treated as collapsed unless that class really makes up more than 95 % of the split.
DEFAULT_MAX_PREDICTION_SHARE = 0.95


def as_label_array(values: Labels, name: str) -> LabelArray:
    """Convert class labels (list, numpy array or tensor) to a 1-D int64 numpy array.

    Raises:
        TypeError: If the values are not integers.
        ValueError: If the values are not one-dimensional.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class labels, got shape {array.shape}.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"{name} must contain integer class labels, got dtype {array.dtype}. "
            "Pass class indices, for example logits.argmax(dim=1), not scores or one-hot rows."
        )
    return array.astype(np.int64, copy=False)


def check_label_range(labels: LabelArray, num_classes: int, name: str) -> None:
    """Raise ValueError if any label lies outside ``[0, num_classes)``."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} must contain labels in [0, {num_classes - 1}] for {num_classes} classes, "
            f"got values from {low} to {high}. Drop rows whose label is unknown (-1) before "
            "computing metrics, or pass the right num_classes."
        )


def resolve_class_names(class_names: Sequence[str] | None, num_classes: int) -> tuple[str, ...]:
    """Return ``class_names`` as a tuple, or ``("0", "1", ...)`` when it is None.

    Raises:
        ValueError: If ``num_classes`` is below 1 or the number of names differs from it.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    if class_names is None:
        return tuple(str(i) for i in range(num_classes))
    names = tuple(str(name) for name in class_names)
    if len(names) != num_classes:
        raise ValueError(
            f"class_names has {len(names)} names but num_classes is {num_classes}; "
            "give one name per class, in class-index order."
        )
    return names


def confusion_counts(y_true: LabelArray, y_pred: LabelArray, num_classes: int) -> LabelArray:
    """Count ``(true, predicted)`` pairs into a ``(num_classes, num_classes)`` matrix."""
    flat = y_true * num_classes + y_pred
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _safe_divide(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
    """Divide element-wise, returning NaN where the denominator is zero."""
    result = np.full(numerator.shape, np.nan, dtype=np.float64)
    np.divide(numerator, denominator, out=result, where=denominator > 0)
    return result


def _nanmean_or_nan(values: FloatArray) -> float:
    """Return the mean of the finite values, or NaN when there are none (without a warning)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _format_value(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def markdown_cell(text: object) -> str:
    """Escape a value for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render a GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(markdown_cell(cell) for cell in header) + " |"]
    lines.append("|" + "---|" * len(header))
    for row in rows:
        lines.append("| " + " | ".join(markdown_cell(cell) for cell in row) + " |")
    return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class ClassificationReport:
    """Metrics of one classifier on one split, computed from its confusion matrix.

    Build it with :func:`classification_report` or :meth:`from_confusion`. Per-class arrays are
    indexed by class. NaN marks a value that is undefined: recall and F1 of an absent class
    (support 0), and precision of a class that was never predicted.

    Attributes:
        class_names: One name per class, in class-index order.
        confusion: Counts with true classes as rows and predicted classes as columns.
        support: Number of samples of each true class.
        predicted_count: Number of predictions of each class.
        precision: ``tp / (tp + fp)`` per class.
        recall: ``tp / (tp + fn)`` per class.
        f1: ``2 tp / (2 tp + fp + fn)`` per class. A present class that is never predicted has
            F1 0, the same value scikit-learn gives with ``zero_division=0``.
        accuracy: Fraction of correct predictions.
        balanced_accuracy: Mean recall over the present classes.
        macro_f1: Mean F1 over the present classes.
    """

    class_names: tuple[str, ...]
    confusion: LabelArray
    support: LabelArray
    predicted_count: LabelArray
    precision: FloatArray
    recall: FloatArray
    f1: FloatArray
    accuracy: float
    balanced_accuracy: float
    macro_f1: float

    @classmethod
    def from_confusion(
        cls, confusion: npt.ArrayLike, class_names: Sequence[str] | None = None
    ) -> ClassificationReport:
        """Compute every metric from a square confusion matrix (rows true, columns predicted).

        Summing the confusion matrices of several runs on the same split and passing the sum here
        gives the pooled metrics of those runs.

        Raises:
            ValueError: If the matrix is not square, has negative entries or counts no samples.
        """
        counts = np.asarray(confusion)
        if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
            raise ValueError(f"confusion must be a square matrix, got shape {counts.shape}.")
        if counts.size and (counts.min() < 0 or not np.issubdtype(counts.dtype, np.integer)):
            raise ValueError("confusion must contain non-negative integer counts.")
        counts = counts.astype(np.int64)
        names = resolve_class_names(class_names, counts.shape[0])
        total = int(counts.sum())
        if total == 0:
            raise ValueError(
                "confusion counts no samples, so no metric is defined; evaluate a non-empty split."
            )

        true_positive = np.diag(counts).astype(np.float64)
        support = counts.sum(axis=1)
        predicted_count = counts.sum(axis=0)
        precision = _safe_divide(true_positive, predicted_count.astype(np.float64))
        recall = _safe_divide(true_positive, support.astype(np.float64))

        # F1 is undefined for absent classes even when they were predicted (then 2tp+fp+fn > 0).
        f1 = _safe_divide(2 * true_positive, (support + predicted_count).astype(np.float64))
        f1[support == 0] = np.nan
        return cls(
            class_names=names,
            confusion=counts,
            support=support,
            predicted_count=predicted_count,
            precision=precision,
            recall=recall,
            f1=f1,
            accuracy=float(true_positive.sum() / total),
            balanced_accuracy=_nanmean_or_nan(recall),
            macro_f1=_nanmean_or_nan(f1),
        )

    @property
    def num_classes(self) -> int:
        """Number of classes of the task, present or not."""
        return len(self.class_names)

    @property
    def num_samples(self) -> int:
        """Number of evaluated samples."""
        return int(self.support.sum())

    @property
    def present(self) -> npt.NDArray[np.bool_]:
        """Mask of the classes with at least one sample in the split."""
        return self.support > 0

    @property
    def absent_classes(self) -> tuple[str, ...]:
        """Names of the classes with no sample in the split."""
        return tuple(name for i, name in enumerate(self.class_names) if not self.present[i])

    @property
    def confusion_normalized(self) -> FloatArray:
        """Confusion matrix with each row divided by its support. Rows of absent classes are NaN."""
        support = self.support.astype(np.float64)[:, None]
        return _safe_divide(
            self.confusion.astype(np.float64), np.broadcast_to(support, self.confusion.shape)
        )

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Return the defined metrics as a flat ``name -> float`` dict for a metric logger.

        Keys are ``accuracy``, ``balanced_accuracy``, ``macro_f1`` and ``precision/<class>``,
        ``recall/<class>``, ``f1/<class>``, each after ``prefix``. Undefined values are left out.
        """
        values = {
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
        }
        for i, name in enumerate(self.class_names):
            values[f"precision/{name}"] = float(self.precision[i])
            values[f"recall/{name}"] = float(self.recall[i])
            values[f"f1/{name}"] = float(self.f1[i])
        return {prefix + key: value for key, value in values.items() if not math.isnan(value)}

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-serialisable dict of every metric, with None for undefined values."""

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        per_class = {
            name: {
                "support": int(self.support[i]),
                "predicted": int(self.predicted_count[i]),
                "precision": clean(self.precision[i]),
                "recall": clean(self.recall[i]),
                "f1": clean(self.f1[i]),
                "present": bool(self.present[i]),
            }
            for i, name in enumerate(self.class_names)
        }
        return {
            "num_samples": self.num_samples,
            "accuracy": clean(self.accuracy),
            "balanced_accuracy": clean(self.balanced_accuracy),
            "macro_f1": clean(self.macro_f1),
            "absent_classes": list(self.absent_classes),
            "class_names": list(self.class_names),
            "per_class": per_class,
            "confusion": self.confusion.tolist(),
        }

    def per_class_markdown(self) -> str:
        """Render the per-class table: support, predictions, precision, recall and F1."""
        rows = []
        for i, name in enumerate(self.class_names):
            absent = not self.present[i]
            rows.append(
                [
                    name,
                    int(self.support[i]),
                    int(self.predicted_count[i]),
                    _format_value(float(self.precision[i])),
                    "absent" if absent else _format_value(float(self.recall[i])),
                    "absent" if absent else _format_value(float(self.f1[i])),
                ]
            )
        header = ["class", "support", "predicted", "precision", "recall", "F1"]
        return markdown_table(header, rows)

    def confusion_markdown(self) -> str:
        """Render the confusion counts as a table, true classes as rows."""
        header = ["true \\ predicted", *self.class_names]
        rows = [[name, *self.confusion[i].tolist()] for i, name in enumerate(self.class_names)]
        return markdown_table(header, rows)

    def to_markdown(self, include_confusion: bool = True) -> str:
        """Render the summary, per-class and (optionally) confusion tables as markdown."""
        summary = markdown_table(
            ["metric", "value"],
            [
                ["samples", self.num_samples],
                ["accuracy", _format_value(self.accuracy)],
                ["balanced accuracy", _format_value(self.balanced_accuracy)],
                ["macro F1", _format_value(self.macro_f1)],
            ],
        )
        parts = [summary, self.per_class_markdown()]
        if self.absent_classes:
            parts.append(absent_classes_sentence(self.absent_classes))
        if include_confusion:
            parts.append("Confusion matrix (rows: true class, columns: predicted class):")
            parts.append(self.confusion_markdown())
        return "\n\n".join(parts) + "\n"


def absent_classes_sentence(names: Sequence[str]) -> str:
    """Return the markdown sentence that lists absent classes."""
    return (
        "Absent classes (no samples in this split, left out of balanced accuracy and macro F1): "
        + ", ".join(markdown_cell(name) for name in names)
        + "."
    )


def classification_report(
    y_true: Labels,
    y_pred: Labels,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> ClassificationReport:
    """Compute accuracy, balanced accuracy, macro F1, per-class metrics and the confusion matrix.

    Args:
        y_true: True class index of each sample.
        y_pred: Predicted class index of each sample.
        num_classes: Number of classes of the task, including classes absent from this split.
        class_names: One name per class. Defaults to the class indices as strings.

    Raises:
        TypeError: If the labels are not integers.
        ValueError: If the arrays differ in length, are empty or hold labels outside
            ``[0, num_classes)``.

    Example:
        >>> report = classification_report([0, 0, 1], [0, 1, 1], 3, ["cat", "dog", "fox"])
        >>> round(report.balanced_accuracy, 4), report.absent_classes
        (0.75, ('fox',))
    """
    names = resolve_class_names(class_names, num_classes)
    true = as_label_array(y_true, "y_true")
    pred = as_label_array(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(
            f"y_true and y_pred must have the same length, got {true.size} and {pred.size}."
        )
    if true.size == 0:
        raise ValueError("y_true is empty; metrics need at least one evaluated sample.")
    check_label_range(true, num_classes, "y_true")
    check_label_range(pred, num_classes, "y_pred")
    return ClassificationReport.from_confusion(confusion_counts(true, pred, num_classes), names)


@dataclass(frozen=True)
class MajorityBaseline:
    """Accuracy of always predicting the most frequent training class.

    Attributes:
        majority_class: Most frequent class of the training labels (the lowest index on ties).
        accuracy: Fraction of evaluation labels equal to ``majority_class``.
    """

    majority_class: int
    accuracy: float


def majority_baseline(y_train: Labels, y_eval: Labels) -> MajorityBaseline:
    """Score the constant predictor that always returns the most frequent class of ``y_train``.

    Raises:
        ValueError: If either array is empty or contains negative labels.
    """
    train = as_label_array(y_train, "y_train")
    evaluated = as_label_array(y_eval, "y_eval")
    for name, labels in (("y_train", train), ("y_eval", evaluated)):
        if labels.size == 0:
            raise ValueError(f"{name} is empty; the majority baseline needs at least one label.")
        if labels.min() < 0:
            raise ValueError(
                f"{name} contains negative labels (min {int(labels.min())}); drop rows whose "
                "label is unknown (-1) first."
            )
    majority = int(np.bincount(train).argmax())
    return MajorityBaseline(majority, float(np.mean(evaluated == majority)))


def detect_collapse(
    report: ClassificationReport,
    majority_accuracy: float | MajorityBaseline | None = None,
    max_prediction_share: float = DEFAULT_MAX_PREDICTION_SHARE,
) -> list[str]:
    """Return one warning per sign that a classifier collapsed; an empty list means none found.

    Four checks each add a warning:

    - every prediction falls on one class while the split has several;
    - one class takes more than ``max_prediction_share`` of the predictions while its share of
      the samples is below that;
    - balanced accuracy is at or below chance, one over the number of present classes;
    - accuracy does not beat ``majority_accuracy``, when that is given.

    Args:
        report: Metrics of the classifier.
        majority_accuracy: Accuracy of the majority-class predictor on the same split, as a float
            or the result of :func:`majority_baseline`.
        max_prediction_share: Largest share of predictions one class may take, in (0, 1].

    Raises:
        ValueError: If ``max_prediction_share`` is outside (0, 1].
    """
    if not 0.0 < max_prediction_share <= 1.0:
        raise ValueError(f"max_prediction_share must be in (0, 1], got {max_prediction_share}.")
    if isinstance(majority_accuracy, MajorityBaseline):
        majority_accuracy = majority_accuracy.accuracy

    warnings = _prediction_share_warnings(report, max_prediction_share)
    num_present = int(report.present.sum())
    if num_present > 1 and report.balanced_accuracy <= 1.0 / num_present:
        warnings.append(
            f"Balanced accuracy {report.balanced_accuracy:.4f} is at or below chance "
            f"(1/{num_present} = {1.0 / num_present:.4f} for {num_present} present classes)."
        )
    if majority_accuracy is not None and report.accuracy <= majority_accuracy:
        warnings.append(
            f"Accuracy {report.accuracy:.4f} does not beat the majority-class baseline "
            f"{majority_accuracy:.4f}."
        )
    return warnings


def _prediction_share_warnings(report: ClassificationReport, max_share: float) -> list[str]:
    """Warn when one class takes (nearly) every prediction but not (nearly) every sample."""
    total = report.num_samples
    top = int(report.predicted_count.argmax())
    name = report.class_names[top]
    predicted_share = report.predicted_count[top] / total
    true_share = report.support[top] / total
    if int(report.present.sum()) > 1 and report.predicted_count[top] == total:
        return [
            f"All {total} predictions are class '{name}', but the split contains "
            f"{int(report.present.sum())} classes."
        ]
    if predicted_share > max_share and true_share < max_share:
        return [
            f"Class '{name}' takes {predicted_share:.1%} of predictions but only {true_share:.1%} "
            f"of samples (limit {max_share:.0%})."
        ]
    return []
