"""Markdown evaluation reports over methods, tasks and seeds, with their figures.

:func:`write_report` turns a list of :class:`EvaluationResult` (one per method, task and seed)
into ``report.md``, ``summary.json`` and the PNG figures that the markdown links, and returns the
paths so a caller can also log them, for example to Weights & Biases.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from simclr_lightning.evaluation.embedding import (
    ProjectedEmbedding,
    plot_confusion_matrix,
    plot_projected,
)
from simclr_lightning.evaluation.fairness import FairnessReport
from simclr_lightning.evaluation.metrics import (
    ClassificationReport,
    absent_classes_sentence,
    detect_collapse,
    markdown_cell,
    markdown_table,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """Metrics of one method on one task for one seed.

    Attributes:
        method: Evaluation method, for example ``"knn"``, ``"linear probe"`` or ``"fine-tune"``.
        task: Predicted attribute, for example ``"gender"``.
        report: Metrics on the evaluated split.
        seed: Seed of the run, or None for a single unseeded run.
        majority_accuracy: Accuracy of the majority-class baseline on the same split, which
            enables the "does not beat the baseline" collapse check.
        fairness: Per-group reports keyed by grouping attribute.
        warnings: Extra warnings to show next to the collapse checks of :func:`detect_collapse`.
    """

    method: str
    task: str
    report: ClassificationReport
    seed: int | None = None
    majority_accuracy: float | None = None
    fairness: Mapping[str, FairnessReport] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def collapse_warnings(self) -> list[str]:
        """Return the warnings of :func:`detect_collapse` followed by :attr:`warnings`."""
        found = detect_collapse(self.report, self.majority_accuracy)
        return found + [warning for warning in self.warnings if warning not in found]


@dataclass(frozen=True)
class SeedStats:
    """Mean and sample standard deviation (``ddof=1``) of one metric over seeds.

    Attributes:
        mean: Mean over the seeds where the metric is defined, NaN when it is defined in none.
        std: Sample standard deviation, NaN with fewer than two defined values.
        count: Number of seeds where the metric is defined.
    """

    mean: float
    std: float
    count: int

    def format(self, undefined: str = "absent") -> str:
        """Render as ``mean ± std``, just ``mean`` for one value, or ``undefined`` for none."""
        if self.count == 0:
            return undefined
        if math.isnan(self.std):
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} ± {self.std:.4f}"


class _HasScalars(Protocol):
    def scalars(self, prefix: str = "") -> dict[str, float]: ...


def aggregate_seeds(reports: Sequence[_HasScalars]) -> dict[str, SeedStats]:
    """Compute the mean and standard deviation of every metric over several seeds' reports.

    Takes :class:`ClassificationReport` or :class:`FairnessReport` objects and aggregates the keys
    of their ``scalars()``. A metric undefined in some seeds, such as the recall of a class absent
    from one split, is averaged over the seeds where it is defined. ``count`` stores how many.

    Raises:
        ValueError: If ``reports`` is empty.
    """
    if not reports:
        raise ValueError("aggregate_seeds needs at least one report.")
    per_seed = [report.scalars() for report in reports]
    keys = list(dict.fromkeys(key for values in per_seed for key in values))
    stats = {}
    for key in keys:
        values = np.array([values[key] for values in per_seed if key in values], dtype=np.float64)
        std = float(values.std(ddof=1)) if values.size > 1 else math.nan
        stats[key] = SeedStats(float(values.mean()), std, int(values.size))
    return stats


def _missing_stats() -> SeedStats:
    return SeedStats(math.nan, math.nan, 0)


@dataclass(frozen=True)
class ReportFiles:
    """Files written by :func:`write_report`.

    Attributes:
        markdown: Path of ``report.md``.
        summary_json: Path of ``summary.json``: the summary rows and every result as a dict.
        images: Every PNG, keyed ``confusion/<method>/<task>`` or ``embedding/<name>``.
    """

    markdown: Path
    summary_json: Path
    images: dict[str, Path]


def _group_results(
    results: Sequence[EvaluationResult],
) -> dict[tuple[str, str], list[EvaluationResult]]:
    """Group results by ``(method, task)`` in first-seen order, rejecting duplicates."""
    groups: dict[tuple[str, str], list[EvaluationResult]] = {}
    seen: set[tuple[str, str, int | None]] = set()
    for result in results:
        key = (result.method, result.task, result.seed)
        if key in seen:
            raise ValueError(
                f"Two results share method={result.method!r}, task={result.task!r}, "
                f"seed={result.seed!r}; give each run its own seed."
            )
        seen.add(key)
        group = groups.setdefault((result.method, result.task), [])
        if group and group[0].report.class_names != result.report.class_names:
            raise ValueError(
                f"Results for method={result.method!r}, task={result.task!r} have different "
                f"class names: {group[0].report.class_names} and {result.report.class_names}."
            )
        group.append(result)
    return groups


def summary_rows(results: Sequence[EvaluationResult]) -> list[dict[str, object]]:
    """Return one row per method and task, with mean and std over seeds, for tables and JSON."""
    rows: list[dict[str, object]] = []
    for (method, task), group in _group_results(results).items():
        stats = aggregate_seeds([result.report for result in group])
        row: dict[str, object] = {
            "method": method,
            "task": task,
            "seeds": len(group),
            "samples": [result.report.num_samples for result in group],
        }
        for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
            metric_stats = stats.get(metric, _missing_stats())
            row[f"{metric}_mean"] = _json_float(metric_stats.mean)
            row[f"{metric}_std"] = _json_float(metric_stats.std)
        majorities = [r.majority_accuracy for r in group if r.majority_accuracy is not None]
        row["majority_accuracy_mean"] = float(np.mean(majorities)) if majorities else None
        row["warnings"] = sum(len(result.collapse_warnings()) for result in group)
        rows.append(row)
    return rows


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unnamed"


def _value_range(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"


def _seed_label(result: EvaluationResult) -> str:
    return "" if result.seed is None else f", seed {result.seed}"


def _warnings_section(groups: Mapping[tuple[str, str], list[EvaluationResult]]) -> str:
    lines = ["## Collapse warnings", ""]
    for (method, task), group in groups.items():
        for result in group:
            for warning in result.collapse_warnings():
                lines.append(
                    f"> **WARNING ({markdown_cell(method)}, {markdown_cell(task)}"
                    f"{_seed_label(result)})**: {warning}"
                )
                lines.append(">")
    if len(lines) == 2:
        lines.append("No collapse warnings.")
    elif lines[-1] == ">":
        lines.pop()
    return "\n".join(lines)


def _summary_section(results: Sequence[EvaluationResult]) -> str:
    header = [
        "method",
        "task",
        "seeds",
        "samples",
        "accuracy",
        "balanced accuracy",
        "macro F1",
        "majority baseline",
        "warnings",
    ]
    rows = []
    for (method, task), group in _group_results(results).items():
        stats = aggregate_seeds([result.report for result in group])
        majorities = [r.majority_accuracy for r in group if r.majority_accuracy is not None]
        rows.append(
            [
                method,
                task,
                len(group),
                _value_range([result.report.num_samples for result in group]),
                stats.get("accuracy", _missing_stats()).format(),
                stats.get("balanced_accuracy", _missing_stats()).format(),
                stats.get("macro_f1", _missing_stats()).format(),
                f"{np.mean(majorities):.4f}" if majorities else "n/a",
                sum(len(result.collapse_warnings()) for result in group),
            ]
        )
    return "## Summary\n\n" + markdown_table(header, rows)


def _per_class_table(group: Sequence[EvaluationResult]) -> str:
    stats = aggregate_seeds([result.report for result in group])
    class_names = group[0].report.class_names
    rows = []
    for index, name in enumerate(class_names):
        supports = [int(result.report.support[index]) for result in group]
        rows.append(
            [
                name,
                _value_range(supports),
                stats.get(f"precision/{name}", _missing_stats()).format("n/a"),
                stats.get(f"recall/{name}", _missing_stats()).format(),
                stats.get(f"f1/{name}", _missing_stats()).format(),
            ]
        )
    return markdown_table(["class", "support", "precision", "recall", "F1"], rows)


def _fairness_table(attribute: str, reports: Sequence[FairnessReport]) -> str:
    stats = aggregate_seeds(reports)
    rows = []
    for index, group in enumerate(reports[0].groups):
        counts = [report.groups[index].count for report in reports]
        rows.append(
            [
                group.name,
                _value_range(counts),
                stats.get(f"accuracy/{group.name}", _missing_stats()).format(),
                stats.get(f"balanced_accuracy/{group.name}", _missing_stats()).format(),
            ]
        )
    table = markdown_table([attribute, "samples", "accuracy", "balanced accuracy"], rows)
    if len(reports) == 1:
        return table + "\n\n" + reports[0].summary_sentence()
    return table + "\n\n" + _seed_fairness_sentence(attribute, reports, stats)


def _seed_fairness_sentence(
    attribute: str, reports: Sequence[FairnessReport], stats: Mapping[str, SeedStats]
) -> str:
    """Summarise the worst group, gaps, absent groups and unknown rows over several seeds."""
    worst_names = [report.worst_group.name if report.worst_group else "none" for report in reports]
    parts = [
        f"Worst-group accuracy {stats.get('worst_group_accuracy', _missing_stats()).format('n/a')} "
        f"(worst group per seed: {', '.join(worst_names)}).",
        f"Largest accuracy gap {stats.get('accuracy_gap', _missing_stats()).format('n/a')}, "
        "largest balanced-accuracy gap "
        f"{stats.get('balanced_accuracy_gap', _missing_stats()).format('n/a')}.",
    ]
    absent = sorted({name for report in reports for name in report.absent_groups})
    if absent:
        parts.append(f"Groups absent in at least one seed: {', '.join(absent)}.")
    unknown = [report.unknown_count for report in reports]
    if any(unknown):
        parts.append(f"Samples with unknown {attribute}: {_value_range(unknown)}.")
    return " ".join(parts)


def _method_task_section(
    method: str,
    task: str,
    group: Sequence[EvaluationResult],
    out_dir: Path,
    images: dict[str, Path],
    normalized: bool,
) -> str:
    seeds = f" (mean ± std over {len(group)} seeds)" if len(group) > 1 else ""
    parts = [f"## {markdown_cell(method)}: {markdown_cell(task)}", f"### Per-class metrics{seeds}"]
    parts.append(_per_class_table(group))
    absent = [
        name
        for index, name in enumerate(group[0].report.class_names)
        if any(result.report.support[index] == 0 for result in group)
    ]
    if absent:
        parts.append(absent_classes_sentence(absent))

    pooled = ClassificationReport.from_confusion(
        np.stack([result.report.confusion for result in group]).sum(axis=0),
        group[0].report.class_names,
    )
    file_name = f"confusion_{_slug(method)}_{_slug(task)}.png"
    pooled_note = f", summed over {len(group)} seeds" if len(group) > 1 else ""
    images[f"confusion/{method}/{task}"] = plot_confusion_matrix(
        pooled, out_dir / file_name, normalized=normalized, title=f"{method}: {task}{pooled_note}"
    )
    parts.append(f"![Confusion matrix of {method} on {task}{pooled_note}]({file_name})")

    attributes = list(dict.fromkeys(a for result in group for a in result.fairness))
    for attribute in attributes:
        reports = [result.fairness[attribute] for result in group if attribute in result.fairness]
        parts.append(f"### {markdown_cell(task)} metrics within each {markdown_cell(attribute)}")
        parts.append(_fairness_table(attribute, reports))
    return "\n\n".join(parts)


def _embedding_section(
    embeddings: Mapping[str, ProjectedEmbedding], out_dir: Path, images: dict[str, Path]
) -> str:
    parts = ["## Embeddings"]
    for name, embedding in embeddings.items():
        file_name = f"embedding_{_slug(name)}.png"
        images[f"embedding/{name}"] = plot_projected(embedding, out_dir / file_name)
        parts.append(f"![{markdown_cell(embedding.title or name)}]({file_name})")
    return "\n\n".join(parts)


def _result_dict(result: EvaluationResult) -> dict[str, object]:
    return {
        "method": result.method,
        "task": result.task,
        "seed": result.seed,
        "majority_accuracy": result.majority_accuracy,
        "warnings": result.collapse_warnings(),
        "report": result.report.to_dict(),
        "fairness": {name: report.to_dict() for name, report in result.fairness.items()},
    }


def write_report(
    out_dir: str | Path,
    results: Sequence[EvaluationResult],
    title: str = "Evaluation report",
    embeddings: Mapping[str, ProjectedEmbedding] | None = None,
    notes: Sequence[str] = (),
    normalized_confusion: bool = True,
) -> ReportFiles:
    """Write ``report.md``, ``summary.json`` and the figures they reference into ``out_dir``.

    The markdown starts with the collapse warnings and a summary table with one row per method
    and task (mean ± std when several seeds are given). A section per method and task follows,
    with the per-class table, the confusion matrix (counts summed over seeds) and the fairness
    tables. The embedding plots come last.

    Args:
        out_dir: Output folder, created when missing. Existing files of the same names are
            overwritten.
        results: One result per method, task and seed.
        title: Top-level heading.
        embeddings: Projected embeddings to plot, keyed by a name used in the file name.
        notes: Paragraphs placed under the title, for example the checkpoint and split used.
        normalized_confusion: Draw row-normalised confusion matrices instead of counts.

    Raises:
        ValueError: If there is nothing to report, two results share method, task and seed, or
            results of one method and task have different class names.
    """
    embeddings = embeddings or {}
    if not results and not embeddings:
        raise ValueError("write_report needs at least one result or embedding to report.")
    groups = _group_results(results)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}

    sections = [f"# {title}", *notes]
    if results:
        sections.append(_warnings_section(groups))
        sections.append(_summary_section(results))
    for (method, task), group in groups.items():
        sections.append(
            _method_task_section(method, task, group, folder, images, normalized_confusion)
        )
    if embeddings:
        sections.append(_embedding_section(embeddings, folder, images))

    markdown_path = folder / "report.md"
    markdown_path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    summary = {
        "title": title,
        "summary": summary_rows(results),
        "results": [_result_dict(result) for result in results],
        "images": {key: path.name for key, path in images.items()},
    }
    summary_path = folder / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("Wrote evaluation report %s with %d figures", markdown_path, len(images))
    return ReportFiles(markdown_path, summary_path, images)
