import json
import math
from pathlib import Path

import numpy as np
import pytest

from simclr_lightning.evaluation.embedding import ProjectedEmbedding
from simclr_lightning.evaluation.fairness import fairness_report
from simclr_lightning.evaluation.metrics import classification_report
from simclr_lightning.evaluation.report import (
    EvaluationResult,
    SeedStats,
    aggregate_seeds,
    summary_rows,
    write_report,
)

GENDERS = ["male", "female"]
RACES = ["White", "Black", "Asian"]
Y_TRUE = [0, 0, 1, 1]
RACE = [0, 0, 1, 1]
# Sample std (ddof=1) of the two seeds' values 1.0 and 0.5.
TWO_SEED_STD = math.sqrt(2 * 0.25**2)
# Seed 1 of the fixture predicts [0, 0, 1, 0]: accuracy and balanced accuracy 0.75, F1 0.8 for
# male and 2/3 for female. Means and sample stds over seeds 0 and 1, worked out by hand:
ACCURACY = "0.8750 ± 0.1768"
MACRO_F1 = "0.8667 ± 0.1886"


def _result(method: str, y_pred: list[int], seed: int | None, **kwargs: object) -> EvaluationResult:
    report = classification_report(Y_TRUE, y_pred, 2, GENDERS)
    fairness = {"race": fairness_report(Y_TRUE, y_pred, RACE, RACES, 2, attribute="race")}
    return EvaluationResult(method, "gender", report, seed=seed, fairness=fairness, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def results() -> list[EvaluationResult]:
    return [
        # Seed 0 is perfect; seed 1 calls one female sample male.
        _result("linear probe", [0, 0, 1, 1], seed=0),
        _result("linear probe", [0, 0, 1, 0], seed=1),
        # Collapsed: every prediction is "male", and the baseline is 0.5.
        _result("knn", [0, 0, 0, 0], seed=None, majority_accuracy=0.5),
    ]


def test_aggregate_seeds_mean_std() -> None:
    reports = [
        classification_report([0, 1], [0, 1], 2),
        classification_report([0, 1], [0, 0], 2),
    ]
    stats = aggregate_seeds(reports)
    assert stats["accuracy"].mean == pytest.approx(0.75)
    assert stats["accuracy"].std == pytest.approx(TWO_SEED_STD)
    assert stats["accuracy"].count == 2
    # Precision of class 1 is undefined in the second seed, which never predicts it.
    assert stats["precision/1"].count == 1
    assert math.isnan(stats["precision/1"].std)


def test_aggregate_seeds_absent_class_count() -> None:
    reports = [classification_report([0, 1], [0, 1], 3), classification_report([0, 2], [0, 2], 3)]
    stats = aggregate_seeds(reports)
    assert stats["recall/1"].count == 1
    assert stats["recall/0"].count == 2


def test_aggregate_seeds_rejects_empty() -> None:
    with pytest.raises(ValueError, match="at least one report"):
        aggregate_seeds([])


@pytest.mark.parametrize(
    ("stats", "text"),
    [
        (SeedStats(0.75, TWO_SEED_STD, 2), "0.7500 ± 0.3536"),
        (SeedStats(0.5, math.nan, 1), "0.5000"),
        (SeedStats(math.nan, math.nan, 0), "absent"),
    ],
)
def test_seed_stats_format(stats: SeedStats, text: str) -> None:
    assert stats.format() == text


def test_summary_rows_values(results: list[EvaluationResult]) -> None:
    rows = summary_rows(results)
    assert [(row["method"], row["seeds"]) for row in rows] == [("linear probe", 2), ("knn", 1)]
    assert rows[0]["accuracy_mean"] == pytest.approx(0.875)
    assert rows[0]["accuracy_std"] == pytest.approx(0.125 * math.sqrt(2))
    assert rows[1]["accuracy_std"] is None
    assert rows[1]["warnings"] == 3


def test_write_report_markdown(tmp_path: Path, results: list[EvaluationResult]) -> None:
    files = write_report(tmp_path / "out", results, notes=["Checkpoint: tiny.ckpt."])
    text = files.markdown.read_text(encoding="utf-8")
    assert "Checkpoint: tiny.ckpt." in text
    assert text.index("## Collapse warnings") < text.index("## Summary")
    assert "**WARNING (knn, gender)**: All 4 predictions are class 'male'" in text
    assert "does not beat the majority-class baseline 0.5000" in text
    summary = f"| linear probe | gender | 2 | 4 | {ACCURACY} | {ACCURACY} | {MACRO_F1} | n/a | 0 |"
    assert summary in text
    assert "seed 0" not in text
    assert "seed 1" not in text
    assert "| knn | gender | 1 | 4 | 0.5000 | 0.5000 | 0.3333 | 0.5000 | 3 |" in text


def test_write_report_per_class_and_fairness(
    tmp_path: Path, results: list[EvaluationResult]
) -> None:
    text = write_report(tmp_path, results).markdown.read_text(encoding="utf-8")
    assert "### Per-class metrics (mean ± std over 2 seeds)" in text
    # male: precision 1 and 2/3, recall 1 and 1, F1 1 and 0.8.
    assert "| male | 2 | 0.8333 ± 0.2357 | 1.0000 ± 0.0000 | 0.9000 ± 0.1414 |" in text
    assert "### gender metrics within each race" in text
    # Black (both female): accuracy 1 and 0.5.
    assert "| Black | 2 | 0.7500 ± 0.3536 | 0.7500 ± 0.3536 |" in text
    assert "| Asian | 0 | absent | absent |" in text
    # Seed 0 ties White and Black at 1.0 and names the first; seed 1's worst is Black.
    assert "worst group per seed: White, Black" in text
    assert "Groups absent in at least one seed: Asian." in text


def test_write_report_single_seed_sections(tmp_path: Path, results: list[EvaluationResult]) -> None:
    text = write_report(tmp_path, results[2:]).markdown.read_text(encoding="utf-8")
    # The collapsed knn never predicts female, so its precision is undefined rather than absent.
    assert "| female | 2 | n/a | 0.0000 | 0.0000 |" in text
    assert "| Black | 2 | 0.0000 | 0.0000 |" in text
    assert text.count("Worst group: Black (accuracy 0.0000).") == 1
    assert "absent in at least one seed" not in text


def test_write_report_figures(tmp_path: Path, results: list[EvaluationResult]) -> None:
    rng = np.random.default_rng(0)
    embedding = ProjectedEmbedding(rng.normal(size=(6, 2)), np.array([0, 1] * 3), ("m", "f"))
    files = write_report(tmp_path, results, embeddings={"pretrained backbone": embedding})
    assert sorted(files.images) == [
        "confusion/knn/gender",
        "confusion/linear probe/gender",
        "embedding/pretrained backbone",
    ]
    for path in files.images.values():
        assert path.stat().st_size > 1000
    text = files.markdown.read_text(encoding="utf-8")
    assert "(confusion_linear-probe_gender.png)" in text
    assert "(embedding_pretrained-backbone.png)" in text


def test_write_report_summary_json(tmp_path: Path, results: list[EvaluationResult]) -> None:
    files = write_report(tmp_path, results)
    data = json.loads(files.summary_json.read_text(encoding="utf-8"))
    assert data["summary"][0]["accuracy_mean"] == pytest.approx(0.875)
    assert len(data["results"]) == 3
    assert data["results"][2]["warnings"][0].startswith("All 4 predictions")
    assert data["images"]["confusion/knn/gender"] == "confusion_knn_gender.png"


def test_write_report_no_warnings(tmp_path: Path) -> None:
    files = write_report(tmp_path, [_result("fine-tune", [0, 0, 1, 1], seed=0)])
    assert "No collapse warnings." in files.markdown.read_text(encoding="utf-8")


def test_write_report_extra_warnings(tmp_path: Path) -> None:
    result = _result("fine-tune", [0, 0, 1, 1], seed=0, warnings=("Loss was NaN at step 7.",))
    text = write_report(tmp_path, [result]).markdown.read_text(encoding="utf-8")
    assert "**WARNING (fine-tune, gender, seed 0)**: Loss was NaN at step 7." in text


def test_write_report_rejects_duplicate_seed(tmp_path: Path) -> None:
    duplicate = [_result("knn", [0, 0, 1, 1], seed=0), _result("knn", [0, 1, 1, 1], seed=0)]
    with pytest.raises(ValueError, match="seed=0"):
        write_report(tmp_path, duplicate)


def test_write_report_rejects_class_mismatch(tmp_path: Path) -> None:
    other = EvaluationResult("knn", "gender", classification_report([0, 1], [0, 1], 2), seed=1)
    with pytest.raises(ValueError, match="different class names"):
        write_report(tmp_path, [_result("knn", [0, 0, 1, 1], seed=0), other])


def test_write_report_rejects_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one result"):
        write_report(tmp_path, [])


def test_write_report_seed_unknown_groups(tmp_path: Path) -> None:
    report = classification_report(Y_TRUE, Y_TRUE, 2, GENDERS)
    results = [
        EvaluationResult(
            "knn",
            "gender",
            report,
            seed=seed,
            fairness={"race": fairness_report(Y_TRUE, Y_TRUE, race, RACES, 2, "race")},
        )
        for seed, race in enumerate([[0, 0, 1, -1], [0, 1, 2, 2]])
    ]
    text = write_report(tmp_path, results).markdown.read_text(encoding="utf-8")
    assert "Samples with unknown race: 0–1." in text
    assert "| Asian | 0–2 | 1.0000 |" in text
