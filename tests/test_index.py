"""Tests for FaceIndex and SkipReport."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simclr_lightning.data.index import SOURCES, FaceIndex, SkipReport


def _sample_index() -> FaceIndex:
    return FaceIndex(
        paths=["/data/a.jpg", "/data/é/b.jpg", "/data/c.png"],
        source=[0, 2, 1],
        identity=[-1, 17, -1],
        age=[25, -1, -1],
        gender=[1, 0, -1],
        race=[3, -1, -1],
        content_hash=["0" * 32, "a" * 32, "f" * 32],
    )


def test_face_index_dtypes() -> None:
    index = _sample_index()

    assert index.paths.dtype.kind == "S"
    assert index.source.dtype == np.int8
    assert index.identity.dtype == np.int64
    assert index.age.dtype == np.int16
    assert index.gender.dtype == np.int8
    assert index.race.dtype == np.int8
    assert index.content_hash.dtype == np.dtype("S32")


def test_face_index_defaults_unknown() -> None:
    index = FaceIndex(paths=["/x.jpg", "/y.jpg"], source=1)

    assert index.source.tolist() == [1, 1]
    assert index.race.tolist() == [-1, -1]
    assert index.identity.tolist() == [-1, -1]


def test_face_index_path_decodes_utf8() -> None:
    assert _sample_index().path(1) == "/data/é/b.jpg"


def test_face_index_save_load_roundtrip(tmp_path: Path) -> None:
    index = _sample_index()
    index.save(tmp_path / "index.npz")

    loaded = FaceIndex.load(tmp_path / "index.npz")

    for name, column in index.columns().items():
        assert np.array_equal(getattr(loaded, name), column), name


def test_face_index_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="index file not found"):
        FaceIndex.load(tmp_path / "absent.npz")


def test_face_index_load_rejects_other_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", paths=np.array([b"/a"]))

    with pytest.raises(ValueError, match="is not a face index"):
        FaceIndex.load(tmp_path / "other.npz")


def test_face_index_subset_by_rows_and_mask() -> None:
    index = _sample_index()

    by_rows = index.subset([2, 0])
    by_mask = index.subset(np.array([False, True, False]))

    assert by_rows.path(0) == "/data/c.png"
    assert by_rows.race.tolist() == [-1, 3]
    assert len(by_mask) == 1
    assert by_mask.identity.tolist() == [17]


def test_face_index_subset_empty() -> None:
    assert len(_sample_index().subset([])) == 0


def test_face_index_concat_keeps_order() -> None:
    index = _sample_index()

    merged = FaceIndex.concat([index, index.subset([1])])

    assert len(merged) == 4
    assert merged.path(3) == "/data/é/b.jpg"
    assert merged.source.tolist() == [0, 2, 1, 2]


def test_face_index_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="race must have one entry per path"):
        FaceIndex(paths=["/a", "/b"], source=0, race=[1])


def test_face_index_rejects_unknown_source() -> None:
    with pytest.raises(ValueError, match="source values must be indices"):
        FaceIndex(paths=["/a"], source=[len(SOURCES)])


def test_face_index_labeled_mask() -> None:
    assert _sample_index().labeled_mask().tolist() == [True, False, False]


def test_skip_report_counts_and_examples() -> None:
    report = SkipReport(max_examples=2)
    for name in ["a", "b", "c"]:
        report.add("corrupt", name)
    report.add("empty", count=4)

    assert report.count("corrupt") == 3
    assert report.examples["corrupt"] == ["a", "b"]
    assert report.total == 7
    assert report.count("truncated") == 0


def test_skip_report_merge_and_json() -> None:
    first = SkipReport()
    first.add("empty", "x")
    second = SkipReport()
    second.add("empty", "y")
    second.note("descended into a nested copy")

    merged = first.merge(second)

    assert merged.count("empty") == 2
    assert merged.examples["empty"] == ["x", "y"]
    assert json.loads(json.dumps(merged.to_dict()))["notes"] == ["descended into a nested copy"]


def test_skip_report_from_dict_round_trip() -> None:
    report = SkipReport()
    report.add("corrupt", "a.jpg")
    report.add("empty", count=3)
    report.note("read only the aligned crops")

    rebuilt = SkipReport.from_dict(json.loads(json.dumps(report.to_dict())))

    assert rebuilt.counts == {"corrupt": 1, "empty": 3}
    assert rebuilt.examples == {"corrupt": ["a.jpg"]}
    assert rebuilt.notes == ["read only the aligned crops"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"examples": {}}, "needs a 'counts' mapping"),
        ({"counts": {"empty": "3"}}, "count of 'empty' must be an integer"),
        ({"counts": {}, "notes": "one note"}, "'notes' a list"),
    ],
)
def test_skip_report_from_dict_rejects_bad_content(
    content: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SkipReport.from_dict(content)
