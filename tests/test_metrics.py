import doctest
import json
import math
import warnings

import numpy as np
import pytest
import torch

from simclr_lightning.evaluation import metrics
from simclr_lightning.evaluation.metrics import (
    ClassificationReport,
    MajorityBaseline,
    classification_report,
    detect_collapse,
    majority_baseline,
)

NAMES = ["cat", "dog", "fox"]


@pytest.fixture
def three_class_report() -> ClassificationReport:
    # Confusion (rows true): cat [2, 1, 0], dog [0, 1, 1], fox [0, 0, 1].
    return classification_report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 3, NAMES)


@pytest.fixture
def absent_fox_report() -> ClassificationReport:
    # fox has no true sample but is predicted once (wrongly).
    return classification_report([0, 0, 1, 1], [0, 1, 1, 2], 3, NAMES)


def test_classification_report_hand_values(three_class_report: ClassificationReport) -> None:
    report = three_class_report
    assert report.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report.support.tolist() == [3, 2, 1]
    assert report.predicted_count.tolist() == [2, 2, 2]
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.recall.tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert report.precision.tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert report.f1.tolist() == pytest.approx([0.8, 0.5, 2 / 3])
    assert report.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert report.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert report.num_samples == 6
    assert report.absent_classes == ()


def test_classification_report_normalized_confusion(
    three_class_report: ClassificationReport,
) -> None:
    normalized = three_class_report.confusion_normalized
    assert normalized[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert normalized[1].tolist() == pytest.approx([0.0, 0.5, 0.5])
    assert normalized.sum(axis=1).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_classification_report_absent_class(absent_fox_report: ClassificationReport) -> None:
    report = absent_fox_report
    assert report.absent_classes == ("fox",)
    assert report.present.tolist() == [True, True, False]
    assert math.isnan(report.recall[2])
    assert math.isnan(report.f1[2])
    # fox was predicted once and wrongly, so its precision is defined and zero.
    assert report.precision[2] == 0.0
    assert report.balanced_accuracy == pytest.approx(0.5)
    assert report.macro_f1 == pytest.approx((2 / 3 + 0.5) / 2)
    assert report.accuracy == pytest.approx(0.5)
    assert np.isnan(report.confusion_normalized[2]).all()


def test_classification_report_never_predicted_class() -> None:
    report = classification_report([0, 0, 1], [0, 0, 0], 2)
    assert math.isnan(report.precision[1])
    assert report.f1[1] == 0.0
    assert report.recall[1] == 0.0
    assert report.macro_f1 == pytest.approx((0.8 + 0.0) / 2)
    assert report.class_names == ("0", "1")


def test_classification_report_matches_sklearn_all_present() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, size=200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, size=200))
    report = classification_report(y_true, y_pred, 4)
    labels = list(range(4))
    expected_confusion = sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels)
    assert report.confusion.tolist() == expected_confusion.tolist()
    expected_balanced = sklearn_metrics.balanced_accuracy_score(y_true, y_pred)
    assert report.balanced_accuracy == pytest.approx(expected_balanced)
    expected_f1 = sklearn_metrics.f1_score(y_true, y_pred, labels=labels, average="macro")
    assert report.macro_f1 == pytest.approx(expected_f1)
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=labels
    )
    assert report.precision.tolist() == pytest.approx(precision.tolist())
    assert report.recall.tolist() == pytest.approx(recall.tolist())
    assert report.f1.tolist() == pytest.approx(f1.tolist())
    assert report.support.tolist() == support.tolist()


def test_classification_report_matches_sklearn_absent_rule(
    absent_fox_report: ClassificationReport,
) -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    y_true, y_pred = [0, 0, 1, 1], [0, 1, 1, 2]
    with warnings.catch_warnings():
        # scikit-learn warns that y_pred contains a class that y_true lacks, then drops that class.
        warnings.simplefilter("ignore", UserWarning)
        expected_balanced = sklearn_metrics.balanced_accuracy_score(y_true, y_pred)
    assert absent_fox_report.balanced_accuracy == pytest.approx(expected_balanced)
    present_f1 = sklearn_metrics.f1_score(y_true, y_pred, labels=[0, 1], average="macro")
    assert absent_fox_report.macro_f1 == pytest.approx(present_f1)
    # Averaging the absent class in as zero, scikit-learn's default with labels=all, is lower.
    all_f1 = sklearn_metrics.f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro")
    assert all_f1 == pytest.approx(7 / 18)
    assert absent_fox_report.macro_f1 > all_f1


def test_classification_report_accepts_tensors() -> None:
    report = classification_report(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2)
    assert report.accuracy == pytest.approx(2 / 3)


def test_from_confusion_pools_runs() -> None:
    first = classification_report([0, 1, 1], [0, 1, 0], 2)
    second = classification_report([0, 0, 1], [1, 0, 1], 2)
    pooled = ClassificationReport.from_confusion(first.confusion + second.confusion)
    direct = classification_report([0, 1, 1, 0, 0, 1], [0, 1, 0, 1, 0, 1], 2)
    assert pooled.accuracy == pytest.approx(direct.accuracy)
    assert pooled.balanced_accuracy == pytest.approx(direct.balanced_accuracy)
    assert pooled.macro_f1 == pytest.approx(direct.macro_f1)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "num_classes", "error", "match"),
    [
        ([0, 1], [0], 2, ValueError, "same length"),
        ([], [], 2, ValueError, "empty"),
        ([0, -1], [0, 1], 2, ValueError, "unknown"),
        ([0, 1], [0, 2], 2, ValueError, r"\[0, 1\]"),
        ([0.0, 1.0], [0, 1], 2, TypeError, "integer"),
        ([[0, 1]], [[0, 1]], 2, ValueError, "1-D"),
        ([0], [0], 0, ValueError, "num_classes"),
    ],
)
def test_classification_report_rejects_invalid(
    y_true: list, y_pred: list, num_classes: int, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        classification_report(y_true, y_pred, num_classes)


def test_classification_report_rejects_wrong_name_count() -> None:
    with pytest.raises(ValueError, match="class_names has 2 names"):
        classification_report([0, 1], [0, 1], 3, ["a", "b"])


def test_from_confusion_rejects_empty() -> None:
    with pytest.raises(ValueError, match="no samples"):
        ClassificationReport.from_confusion(np.zeros((2, 2), dtype=np.int64))


def test_scalars_skip_absent(absent_fox_report: ClassificationReport) -> None:
    scalars = absent_fox_report.scalars("val/")
    assert scalars["val/balanced_accuracy"] == pytest.approx(0.5)
    assert "val/recall/fox" not in scalars
    assert "val/f1/fox" not in scalars
    assert scalars["val/precision/fox"] == 0.0


def test_to_dict_json_serialisable(absent_fox_report: ClassificationReport) -> None:
    data = json.loads(json.dumps(absent_fox_report.to_dict()))
    assert data["absent_classes"] == ["fox"]
    assert data["per_class"]["fox"]["recall"] is None
    assert data["per_class"]["fox"]["present"] is False
    assert data["per_class"]["cat"]["recall"] == pytest.approx(0.5)
    assert data["confusion"] == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]


def test_to_markdown_contains_numbers(three_class_report: ClassificationReport) -> None:
    text = three_class_report.to_markdown()
    assert "| accuracy | 0.6667 |" in text
    assert "| balanced accuracy | 0.7222 |" in text
    assert "| macro F1 | 0.6556 |" in text
    assert "| cat | 3 | 2 | 1.0000 | 0.6667 | 0.8000 |" in text
    assert "| cat | 2 | 1 | 0 |" in text


def test_to_markdown_lists_absent(absent_fox_report: ClassificationReport) -> None:
    text = absent_fox_report.to_markdown(include_confusion=False)
    assert "| fox | 0 | 1 | 0.0000 | absent | absent |" in text
    assert "Absent classes" in text
    assert "Confusion matrix" not in text


def test_majority_baseline_lowest_index_on_tie() -> None:
    baseline = majority_baseline([1, 1, 0, 0, 2], [0, 1, 1, 1])
    assert baseline.majority_class == 0
    assert baseline.accuracy == pytest.approx(0.25)


def test_majority_baseline_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown"):
        majority_baseline([0, -1], [0])


def test_detect_collapse_single_class() -> None:
    report = classification_report([0, 0, 1], [0, 0, 0], 2, ["male", "female"])
    warnings_found = detect_collapse(report, majority_baseline([0, 0, 1], [0, 0, 1]))
    assert len(warnings_found) == 3
    assert "All 3 predictions are class 'male'" in warnings_found[0]
    assert "chance" in warnings_found[1]
    assert "majority-class baseline 0.6667" in warnings_found[2]


def test_detect_collapse_dominant_class() -> None:
    y_true = np.array([0] * 50 + [1] * 50)
    y_pred = np.array([0] * 97 + [1] * 3)
    report = classification_report(y_true, y_pred, 2)
    warnings_found = detect_collapse(report, 0.5)
    assert any("takes 97.0% of predictions but only 50.0%" in w for w in warnings_found)


def test_detect_collapse_accepts_frequent_class() -> None:
    # The split itself is 98 % class 0, so predicting it 98 % of the time is not a collapse.
    y_true = np.array([0] * 98 + [1] * 2)
    report = classification_report(y_true, y_true, 2)
    assert detect_collapse(report, MajorityBaseline(0, 0.98)) == []


def test_detect_collapse_at_baseline() -> None:
    report = classification_report([0, 1, 1, 0], [0, 1, 0, 1], 2)
    warnings_found = detect_collapse(report, majority_accuracy=0.5)
    assert any("does not beat" in w for w in warnings_found)


def test_detect_collapse_rejects_share() -> None:
    report = classification_report([0, 1], [0, 1], 2)
    with pytest.raises(ValueError, match="max_prediction_share"):
        detect_collapse(report, max_prediction_share=1.5)


def test_metrics_docstring_example() -> None:
    result = doctest.testmod(metrics, raise_on_error=False)
    assert result.attempted > 0
    assert result.failed == 0
