"""Per-group metrics: how a classifier's accuracy varies across the values of another attribute.

For example, gender accuracy within each race (task ``gender``, groups from ``race``) or race
accuracy within each gender. Rows whose group is unknown (-1) are counted and left out of the
groups. Groups with no samples are reported as absent and never enter the worst-group accuracy or
the gaps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from simclr_lightning.evaluation.metrics import (
    Labels,
    as_label_array,
    check_label_range,
    classification_report,
    markdown_table,
)

UNKNOWN_GROUP = -1


@dataclass(frozen=True)
class GroupMetrics:
    """Metrics of the samples of one group. Every metric is NaN when the group has no samples.

    Attributes:
        name: Group name, for example ``"Asian"``.
        count: Number of samples in the group.
        accuracy: Fraction of correct predictions within the group.
        balanced_accuracy: Mean recall over the task classes present within the group.
        macro_f1: Mean F1 over the task classes present within the group.
    """

    name: str
    count: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float

    @property
    def present(self) -> bool:
        """Whether the group has at least one sample."""
        return self.count > 0


@dataclass(frozen=True)
class FairnessReport:
    """Per-group metrics of one classifier, with the worst group and the largest gaps.

    Attributes:
        attribute: Name of the grouping attribute, for example ``"race"``.
        groups: One row per group value, in group-index order, absent groups included.
        unknown_count: Number of samples whose group is unknown (-1).
        min_count: Smallest group size that counts towards the worst group and the gaps.
    """

    attribute: str
    groups: tuple[GroupMetrics, ...]
    unknown_count: int
    min_count: int

    @property
    def compared_groups(self) -> tuple[GroupMetrics, ...]:
        """Groups with at least ``min_count`` samples; only these enter the worst group and gaps."""
        return tuple(group for group in self.groups if group.count >= max(self.min_count, 1))

    @property
    def absent_groups(self) -> tuple[str, ...]:
        """Names of the groups with no samples."""
        return tuple(group.name for group in self.groups if not group.present)

    @property
    def worst_group(self) -> GroupMetrics | None:
        """Compared group with the lowest accuracy (the first one on ties), or None."""
        compared = self.compared_groups
        return min(compared, key=lambda group: group.accuracy) if compared else None

    @property
    def best_group(self) -> GroupMetrics | None:
        """Compared group with the highest accuracy (the first one on ties), or None."""
        compared = self.compared_groups
        return max(compared, key=lambda group: group.accuracy) if compared else None

    @property
    def worst_group_accuracy(self) -> float:
        """Accuracy of :attr:`worst_group`, or NaN when no group is compared."""
        worst = self.worst_group
        return worst.accuracy if worst is not None else math.nan

    @property
    def accuracy_gap(self) -> float:
        """Accuracy range (max minus min) over compared groups; NaN with fewer than two."""
        return self._gap([group.accuracy for group in self.compared_groups])

    @property
    def balanced_accuracy_gap(self) -> float:
        """Balanced-accuracy range over compared groups; NaN with fewer than two."""
        return self._gap([group.balanced_accuracy for group in self.compared_groups])

    @staticmethod
    def _gap(values: Sequence[float]) -> float:
        return max(values) - min(values) if len(values) > 1 else math.nan

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Return the defined values as a flat ``name -> float`` dict for a metric logger.

        Keys are ``accuracy/<group>``, ``balanced_accuracy/<group>``, ``worst_group_accuracy``,
        ``accuracy_gap`` and ``balanced_accuracy_gap``, each after ``prefix``.
        """
        values: dict[str, float] = {}
        for group in self.groups:
            values[f"accuracy/{group.name}"] = group.accuracy
            values[f"balanced_accuracy/{group.name}"] = group.balanced_accuracy
        values["worst_group_accuracy"] = self.worst_group_accuracy
        values["accuracy_gap"] = self.accuracy_gap
        values["balanced_accuracy_gap"] = self.balanced_accuracy_gap
        return {prefix + key: value for key, value in values.items() if not math.isnan(value)}

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-serialisable dict, with None for undefined values."""

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        worst = self.worst_group
        return {
            "attribute": self.attribute,
            "unknown_count": self.unknown_count,
            "min_count": self.min_count,
            "groups": [
                {
                    "name": group.name,
                    "count": group.count,
                    "accuracy": clean(group.accuracy),
                    "balanced_accuracy": clean(group.balanced_accuracy),
                    "macro_f1": clean(group.macro_f1),
                }
                for group in self.groups
            ],
            "absent_groups": list(self.absent_groups),
            "worst_group": worst.name if worst is not None else None,
            "worst_group_accuracy": clean(self.worst_group_accuracy),
            "accuracy_gap": clean(self.accuracy_gap),
            "balanced_accuracy_gap": clean(self.balanced_accuracy_gap),
        }

    def to_markdown(self) -> str:
        """Render the per-group table and the worst-group line as markdown."""
        rows = []
        for group in self.groups:
            if group.present:
                rows.append(
                    [
                        group.name,
                        group.count,
                        f"{group.accuracy:.4f}",
                        f"{group.balanced_accuracy:.4f}",
                        f"{group.macro_f1:.4f}",
                    ]
                )
            else:
                rows.append([group.name, 0, "absent", "absent", "absent"])
        header = [self.attribute, "samples", "accuracy", "balanced accuracy", "macro F1"]
        return markdown_table(header, rows) + "\n\n" + self.summary_sentence() + "\n"

    def summary_sentence(self) -> str:
        """Describe the worst group, the gaps, absent groups and unknown rows in one paragraph."""
        worst = self.worst_group
        if worst is None:
            parts = [f"No {self.attribute} group has at least {self.min_count} samples."]
        else:
            parts = [f"Worst group: {worst.name} (accuracy {worst.accuracy:.4f})."]
            if not math.isnan(self.accuracy_gap):
                parts.append(
                    f"Largest gap between groups: accuracy {self.accuracy_gap:.4f}, "
                    f"balanced accuracy {self.balanced_accuracy_gap:.4f}."
                )
        if self.absent_groups:
            parts.append(f"Absent groups (no samples): {', '.join(self.absent_groups)}.")
        small = [g.name for g in self.groups if g.present and g.count < self.min_count]
        if small:
            parts.append(
                f"Groups under {self.min_count} samples, not compared: {', '.join(small)}."
            )
        if self.unknown_count:
            parts.append(f"Samples with unknown {self.attribute}: {self.unknown_count}.")
        return " ".join(parts)


def fairness_report(
    y_true: Labels,
    y_pred: Labels,
    groups: Labels,
    group_names: Sequence[str],
    num_classes: int,
    attribute: str = "group",
    min_count: int = 1,
) -> FairnessReport:
    """Compute accuracy, balanced accuracy and macro F1 within each group of ``groups``.

    Args:
        y_true: True task class of each sample.
        y_pred: Predicted task class of each sample.
        groups: Group index of each sample, -1 where the group is unknown.
        group_names: One name per group index.
        num_classes: Number of task classes.
        attribute: Name of the grouping attribute, used in tables and messages.
        min_count: Smallest group size that enters the worst group and the gaps. Smaller groups
            are still listed. Raise it when tiny groups make the gap mostly noise.

    Raises:
        TypeError: If any labels are not integers.
        ValueError: If the arrays differ in length or hold out-of-range values.
    """
    true = as_label_array(y_true, "y_true")
    pred = as_label_array(y_pred, "y_pred")
    group_index = as_label_array(groups, "groups")
    if not true.shape == pred.shape == group_index.shape:
        raise ValueError(
            "y_true, y_pred and groups must have the same length, got "
            f"{true.size}, {pred.size} and {group_index.size}."
        )
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}.")
    if len(group_names) == 0:
        raise ValueError(f"group_names for {attribute!r} is empty; give one name per group index.")
    names = tuple(str(name) for name in group_names)
    check_label_range(true, num_classes, "y_true")
    check_label_range(pred, num_classes, "y_pred")
    known = group_index != UNKNOWN_GROUP
    check_label_range(group_index[known], len(names), f"groups ({attribute})")

    rows = tuple(
        _group_metrics(name, true[group_index == g], pred[group_index == g], num_classes)
        for g, name in enumerate(names)
    )
    return FairnessReport(attribute, rows, int((~known).sum()), min_count)


def _group_metrics(name: str, true: np.ndarray, pred: np.ndarray, num_classes: int) -> GroupMetrics:
    if true.size == 0:
        return GroupMetrics(name, 0, math.nan, math.nan, math.nan)
    report = classification_report(true, pred, num_classes)
    return GroupMetrics(
        name, int(true.size), report.accuracy, report.balanced_accuracy, report.macro_f1
    )


def fairness_reports(
    y_true: Labels,
    y_pred: Labels,
    num_classes: int,
    groupings: Mapping[str, tuple[Labels, Sequence[str]]],
    min_count: int = 1,
) -> dict[str, FairnessReport]:
    """Run :func:`fairness_report` once per grouping attribute.

    Args:
        y_true: True task class of each sample.
        y_pred: Predicted task class of each sample.
        num_classes: Number of task classes.
        groupings: ``attribute -> (group index per sample, group names)``, for example
            ``{"race": (batch_race, race_names)}``.
        min_count: Passed to :func:`fairness_report`.
    """
    return {
        attribute: fairness_report(
            y_true, y_pred, values, names, num_classes, attribute=attribute, min_count=min_count
        )
        for attribute, (values, names) in groupings.items()
    }
