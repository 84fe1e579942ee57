import json
import math

import numpy as np
import pytest

from simclr_lightning.evaluation.fairness import FairnessReport, fairness_report, fairness_reports

RACES = ["White", "Black", "Asian", "Indian"]

# Gender (0 male, 1 female) predictions grouped by race. By hand:
#   White: true [0, 0, 0, 1], pred [0, 0, 0, 0] -> accuracy 3/4, balanced (1 + 0) / 2 = 0.5
#   Black: true [0, 1, 1],    pred [1, 1, 1]    -> accuracy 2/3, balanced (0 + 1) / 2 = 0.5
#   Asian: true [1, 1],       pred [1, 1]       -> accuracy 1,   balanced 1 (only female present)
#   Indian: no samples. One more row has unknown race (-1).
Y_TRUE = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 0])
Y_PRED = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
RACE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, -1])


@pytest.fixture
def race_report() -> FairnessReport:
    return fairness_report(Y_TRUE, Y_PRED, RACE, RACES, num_classes=2, attribute="race")


def test_fairness_report_group_values(race_report: FairnessReport) -> None:
    white, black, asian, indian = race_report.groups
    assert white.count == 4
    assert white.accuracy == pytest.approx(0.75)
    assert white.balanced_accuracy == pytest.approx(0.5)
    assert black.count == 3
    assert black.accuracy == pytest.approx(2 / 3)
    assert black.balanced_accuracy == pytest.approx(0.5)
    assert asian.accuracy == pytest.approx(1.0)
    assert asian.balanced_accuracy == pytest.approx(1.0)
    assert indian.count == 0
    assert math.isnan(indian.accuracy)


def test_fairness_report_worst_and_gaps(race_report: FairnessReport) -> None:
    assert race_report.worst_group is not None
    assert race_report.worst_group.name == "Black"
    assert race_report.worst_group_accuracy == pytest.approx(2 / 3)
    assert race_report.best_group is not None
    assert race_report.best_group.name == "Asian"
    assert race_report.accuracy_gap == pytest.approx(1 / 3)
    assert race_report.balanced_accuracy_gap == pytest.approx(0.5)


def test_fairness_report_absent_and_unknown(race_report: FairnessReport) -> None:
    assert race_report.absent_groups == ("Indian",)
    assert race_report.unknown_count == 1
    assert [g.name for g in race_report.compared_groups] == ["White", "Black", "Asian"]


def test_fairness_report_min_count_excludes_small() -> None:
    report = fairness_report(Y_TRUE, Y_PRED, RACE, RACES, 2, attribute="race", min_count=3)
    assert [g.name for g in report.compared_groups] == ["White", "Black"]
    assert report.accuracy_gap == pytest.approx(0.75 - 2 / 3)
    assert report.balanced_accuracy_gap == pytest.approx(0.0)
    assert "Groups under 3 samples, not compared: Asian." in report.summary_sentence()


def test_fairness_report_single_group_gap_nan() -> None:
    report = fairness_report([0, 1], [0, 0], [1, 1], ["a", "b"], 2)
    assert report.worst_group_accuracy == pytest.approx(0.5)
    assert math.isnan(report.accuracy_gap)


def test_fairness_report_markdown(race_report: FairnessReport) -> None:
    text = race_report.to_markdown()
    assert "| race | samples | accuracy | balanced accuracy | macro F1 |" in text
    assert "| Black | 3 | 0.6667 | 0.5000 |" in text
    assert "| Indian | 0 | absent | absent | absent |" in text
    assert "Worst group: Black (accuracy 0.6667)." in text
    assert "accuracy 0.3333, balanced accuracy 0.5000" in text
    assert "Samples with unknown race: 1." in text


def test_fairness_report_scalars_and_dict(race_report: FairnessReport) -> None:
    scalars = race_report.scalars("test/race/")
    assert scalars["test/race/accuracy/White"] == pytest.approx(0.75)
    assert "test/race/accuracy/Indian" not in scalars
    assert scalars["test/race/accuracy_gap"] == pytest.approx(1 / 3)
    data = json.loads(json.dumps(race_report.to_dict()))
    assert data["worst_group"] == "Black"
    assert data["groups"][3]["accuracy"] is None


def test_fairness_reports_two_attributes() -> None:
    gender = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    reports = fairness_reports(
        Y_TRUE, Y_PRED, 2, {"race": (RACE, RACES), "gender": (gender, ["male", "female"])}
    )
    assert list(reports) == ["race", "gender"]
    # Gender groups: even rows true [0,0,0,1,1] pred [0,0,1,1,1] -> 4/5; odd rows -> 3/5.
    assert reports["gender"].groups[0].accuracy == pytest.approx(0.8)
    assert reports["gender"].groups[1].accuracy == pytest.approx(0.6)
    assert reports["gender"].unknown_count == 0


@pytest.mark.parametrize(
    ("groups", "names", "match"),
    [
        (np.array([0, 4, 1]), RACES, r"groups \(race\)"),
        (np.array([0, 1]), RACES, "same length"),
        (np.array([0, 1, 0]), [], "empty"),
    ],
)
def test_fairness_report_rejects_invalid(groups: np.ndarray, names: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fairness_report([0, 1, 0], [0, 1, 1], groups, names, 2, attribute="race")
