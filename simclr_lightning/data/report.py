"""The data report: what was indexed, how it was split, and what was skipped.

:class:`FaceDataModule` builds one in ``setup`` and keeps it as ``datamodule.report``, so a run
can save the exact data it trained on next to its checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from simclr_lightning.data.index import (
    GENDER_NAMES,
    RACE_NAMES,
    REASON_EFFECTS,
    SOURCES,
    FaceIndex,
    SkipReport,
)

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"


@dataclass
class SplitSummary:
    """Counts of one split.

    Attributes:
        count: Number of rows.
        sources: Rows per source name.
        classes: Rows per class name of the task (``"unknown"`` for rows without a label).
        pairs: Rows per ``"race/gender"`` pair, such as ``"Asian/female"``.
    """

    count: int
    sources: dict[str, int]
    classes: dict[str, int]
    pairs: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as plain JSON-serialisable types."""
        return {
            "count": self.count,
            "sources": dict(self.sources),
            "classes": dict(self.classes),
            "pairs": dict(self.pairs),
        }


def _label_name(value: int, names: tuple[str, ...]) -> str:
    return names[value] if 0 <= value < len(names) else UNKNOWN


def _count_names(values: np.ndarray, names: tuple[str, ...]) -> dict[str, int]:
    counts = {name: 0 for name in names}
    labels, label_counts = np.unique(values, return_counts=True)
    for label, label_count in zip(labels.tolist(), label_counts.tolist(), strict=True):
        name = _label_name(int(label), names)
        counts[name] = counts.get(name, 0) + int(label_count)
    return counts


def summarize_rows(index: FaceIndex, rows: np.ndarray, task: str) -> SplitSummary:
    """Count the rows ``rows`` of ``index`` by source, by task class and by (race, gender) pair.

    Args:
        index: The index the rows belong to.
        rows: Row numbers of ``index``.
        task: ``"race"`` or ``"gender"``, which picks the class names.
    """
    rows = np.asarray(rows, dtype=np.int64)
    race = index.race[rows]
    gender = index.gender[rows]
    class_names = RACE_NAMES if task == "race" else GENDER_NAMES
    classes = _count_names(race if task == "race" else gender, class_names)

    pairs = {f"{r}/{g}": 0 for r in RACE_NAMES for g in GENDER_NAMES}
    if rows.size:
        stacked = np.stack([race.astype(np.int64), gender.astype(np.int64)], axis=1)
        unique_pairs, pair_counts = np.unique(stacked, axis=0, return_counts=True)
        for (race_value, gender_value), pair_count in zip(
            unique_pairs.tolist(), pair_counts.tolist(), strict=True
        ):
            race_name = _label_name(race_value, RACE_NAMES)
            name = f"{race_name}/{_label_name(gender_value, GENDER_NAMES)}"
            pairs[name] = pairs.get(name, 0) + int(pair_count)

    sources = _count_names(index.source[rows], SOURCES)
    return SplitSummary(int(rows.size), sources, classes, pairs)


@dataclass
class DataReport:
    """Counts by source, by class and by (race, gender) pair per split, and skipped files.

    Attributes:
        mode: ``"pretrain"`` or ``"finetune"``.
        task: ``"race"`` or ``"gender"``.
        indexed: Images indexed per source, before removing duplicates.
        duplicates_removed: Rows dropped from the pretraining pool as byte-identical copies.
        splits: Summary of each split by name (``pretrain``, ``finetune``, ``val``, ``test``,
            and the online-evaluation ``bank`` and ``query`` sets).
        skipped: Skip report of each source that was read.
        notes: Decisions that change the data, in plain sentences.
    """

    mode: str
    task: str
    indexed: dict[str, int]
    duplicates_removed: int = 0
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    skipped: dict[str, SkipReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        index: FaceIndex,
        *,
        mode: str,
        task: str,
        splits: Mapping[str, np.ndarray],
        skipped: Mapping[str, SkipReport],
        duplicates_removed: int = 0,
        notes: list[str] | None = None,
    ) -> DataReport:
        """Build the report of ``index`` and of the row sets in ``splits`` (rows of ``index``)."""
        return cls(
            mode=mode,
            task=task,
            indexed=_count_names(index.source, SOURCES),
            duplicates_removed=duplicates_removed,
            splits={name: summarize_rows(index, rows, task) for name, rows in splits.items()},
            skipped=dict(skipped),
            notes=list(notes or []),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-serialisable types."""
        return {
            "mode": self.mode,
            "task": self.task,
            "indexed": dict(self.indexed),
            "duplicates_removed": self.duplicates_removed,
            "splits": {name: summary.to_dict() for name, summary in self.splits.items()},
            "skipped": {name: skips.to_dict() for name, skips in self.skipped.items()},
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        """Return the report as a Markdown document with one table per section."""
        lines = [f"# Data report ({self.mode}, task {self.task})", ""]
        lines += ["## Indexed images by source", ""]
        lines += _table(["source", "images"], [[name, n] for name, n in self.indexed.items()])
        lines += ["", f"Byte-identical duplicates removed from the pool: {self.duplicates_removed}"]
        lines += self._markdown_splits()
        lines += self._markdown_skips()
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def _markdown_splits(self) -> list[str]:
        if not self.splits:
            return []
        names = list(self.splits)
        lines = ["", "## Splits", ""]
        lines += _table(["", *names], [["rows", *(self.splits[n].count for n in names)]])
        class_names = list(next(iter(self.splits.values())).classes)
        lines += ["", f"### Rows by {self.task}", ""]
        rows = [[c, *(self.splits[n].classes.get(c, 0) for n in names)] for c in class_names]
        lines += _table([self.task, *names], rows)
        pair_names = list(next(iter(self.splits.values())).pairs)
        lines += ["", "### Rows by race/gender pair", ""]
        rows = [[p, *(self.splits[n].pairs.get(p, 0) for n in names)] for p in pair_names]
        lines += _table(["race/gender", *names], rows)
        lines += ["", "### Rows by source", ""]
        rows = [[s, *(self.splits[n].sources.get(s, 0) for n in names)] for s in SOURCES]
        lines += _table(["source", *names], rows)
        return lines

    def _markdown_skips(self) -> list[str]:
        lines = ["", "## Skipped or caveated files by reason", ""]
        rows: list[list[object]] = []
        for source, skips in self.skipped.items():
            for reason, count in sorted(skips.counts.items()):
                examples = ", ".join(skips.examples.get(reason, [])[:3])
                effect = REASON_EFFECTS.get(reason, "")
                rows.append([source, reason, count, effect, examples])
        if not rows:
            return lines + ["Nothing was skipped."]
        lines += _table(["source", "reason", "count", "effect", "examples"], rows)
        notes = [f"- {source}: {note}" for source, s in self.skipped.items() for note in s.notes]
        return lines + (["", *notes] if notes else [])

    def log(self) -> None:
        """Log a summary of the report on rank zero."""
        indexed = ", ".join(f"{name} {count}" for name, count in self.indexed.items() if count)
        rank_zero_info(f"Data ({self.mode}, task {self.task}): indexed {indexed or 'nothing'}.")
        for name, summary in self.splits.items():
            classes = ", ".join(f"{c} {n}" for c, n in summary.classes.items())
            rank_zero_info(f"  {name}: {summary.count} rows ({classes}).")
        for source, skips in self.skipped.items():
            if skips.counts:
                counts = ", ".join(f"{r} {n}" for r, n in sorted(skips.counts.items()))
                rank_zero_info(f"  skipped in {source}: {counts}.")
        for note in self.notes:
            rank_zero_info(f"  note: {note}")


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [str(cell).replace("|", "\\|") for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
