"""Tests for the data report."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from simclr_lightning.data.index import FaceIndex, SkipReport
from simclr_lightning.data.report import DataReport, summarize_rows


def _index() -> FaceIndex:
    # Rows: 3 UTKFace (White/male, White/female, Asian/female), 1 FFHQ, 1 CelebA.
    return FaceIndex(
        paths=[f"/d/{i}.jpg" for i in range(5)],
        source=[0, 0, 0, 1, 2],
        gender=[0, 1, 1, -1, -1],
        race=[0, 0, 2, -1, -1],
    )


def _report() -> DataReport:
    skips = SkipReport()
    skips.add("corrupt", "/d/bad.jpg")
    skips.add("corrupt", "/d/bad2.jpg")
    skips.note("descended into a nested copy")
    return DataReport.build(
        _index(),
        mode="pretrain",
        task="race",
        splits={"pretrain": np.arange(5), "finetune": np.array([0, 2]), "val": np.array([1])},
        skipped={"utkface": skips},
        duplicates_removed=1,
        notes=["a note"],
    )


def test_summarize_rows_counts_classes() -> None:
    summary = summarize_rows(_index(), np.arange(5), "race")

    assert summary.count == 5
    assert summary.classes == {
        "White": 2,
        "Black": 0,
        "Asian": 1,
        "Indian": 0,
        "Others": 0,
        "unknown": 2,
    }


def test_summarize_rows_counts_pairs() -> None:
    summary = summarize_rows(_index(), np.arange(5), "race")

    assert summary.pairs["White/male"] == 1
    assert summary.pairs["White/female"] == 1
    assert summary.pairs["Asian/female"] == 1
    assert summary.pairs["Asian/male"] == 0
    assert summary.pairs["unknown/unknown"] == 2
    assert sum(summary.pairs.values()) == 5


def test_summarize_rows_counts_sources() -> None:
    summary = summarize_rows(_index(), np.array([0, 3, 4]), "gender")

    assert summary.sources == {"utkface": 1, "ffhq": 1, "celeba": 1}
    assert summary.classes == {"male": 1, "female": 0, "unknown": 2}


def test_summarize_rows_empty() -> None:
    summary = summarize_rows(_index(), np.zeros(0, dtype=np.int64), "race")

    assert summary.count == 0
    assert sum(summary.pairs.values()) == 0


def test_data_report_to_dict_is_json() -> None:
    data = json.loads(json.dumps(_report().to_dict()))

    assert data["indexed"] == {"utkface": 3, "ffhq": 1, "celeba": 1}
    assert data["splits"]["finetune"]["classes"]["Asian"] == 1
    assert data["skipped"]["utkface"]["counts"] == {"corrupt": 2}
    assert data["duplicates_removed"] == 1


def test_data_report_markdown_tables() -> None:
    markdown = _report().to_markdown()

    assert markdown.startswith("# Data report (pretrain, task race)")
    assert "| White | 2 | 1 | 1 |" in markdown
    assert "| White/female | 1 | 0 | 1 |" in markdown
    assert "| utkface | corrupt | 2 |" in markdown
    assert "- utkface: descended into a nested copy" in markdown
    assert "- a note" in markdown


def test_data_report_markdown_nothing_skipped() -> None:
    report = DataReport.build(_index(), mode="finetune", task="gender", splits={}, skipped={})

    assert "Nothing was skipped." in report.to_markdown()


def test_data_report_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        _report().log()

    assert "indexed utkface 3, ffhq 1, celeba 1" in caplog.text
    assert "finetune: 2 rows" in caplog.text
    assert "skipped in utkface: corrupt 2" in caplog.text
