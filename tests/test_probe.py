import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.evaluation.probe import (
    balanced_class_weights,
    extract_features,
    fit_logistic_probe,
    knn_predict,
    knn_scores,
)


class _LabeledImages(Dataset):
    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, 4, 4, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor | int]:
        return {
            "image": self.images[index],
            "target": index % 3,
            "race": index % 5,
            "gender": -1,
            "index": index,
        }


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    # Dropout makes train-mode outputs random, so matching outputs prove eval mode was used.
    return nn.Sequential(nn.Conv2d(3, 2, kernel_size=1), nn.Dropout(0.5))


def test_extract_features_matches_backbone() -> None:
    dataset = _LabeledImages(7)
    backbone = _backbone()
    features, targets, extra = extract_features(backbone, DataLoader(dataset, batch_size=3), "cpu")
    backbone.eval()
    with torch.no_grad():
        expected = backbone(dataset.images).flatten(1)
    assert features.shape == (7, 32)
    assert torch.allclose(features, expected)
    assert targets.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert extra["race"].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert extra["gender"].tolist() == [-1] * 7
    assert extra["index"].tolist() == list(range(7))


def test_extract_features_feeds_knn_and_probe() -> None:
    dataset = _LabeledImages(9)
    features, targets, _ = extract_features(_backbone(), DataLoader(dataset, batch_size=4), "cpu")
    # Outputs are ordinary tensors, so callers may modify them or use them with autograd.
    assert not features.is_inference()
    assert knn_predict(features, targets, features, 3, k=1).tolist() == targets.tolist()
    result = fit_logistic_probe(features, targets, features, 3, weight_decay=1e-3)
    assert result.predictions.shape == (9,)


def test_extract_features_restores_mode() -> None:
    backbone = _backbone()
    backbone.train()
    extract_features(backbone, DataLoader(_LabeledImages(2), batch_size=2), "cpu")
    assert backbone.training


def test_extract_features_rejects_pretraining_batch() -> None:
    batches = [{"views": [torch.zeros(1, 3, 4, 4)] * 2, "target": torch.tensor([-1])}]
    with pytest.raises(TypeError, match="labeled batches"):
        extract_features(_backbone(), batches, "cpu")


def test_extract_features_rejects_empty() -> None:
    with pytest.raises(ValueError, match="no batches"):
        extract_features(_backbone(), [], "cpu")


# Bank on the unit circle: cat at angle 0, two dogs at +-53.13 degrees (cosine 0.6 to cat).
BANK = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
BANK_LABELS = torch.tensor([0, 1, 1])
# Twice the cat vector: cosine similarity ignores the length.
QUERY = torch.tensor([[2.0, 0.0]])


def test_knn_scores_hand_values() -> None:
    scores = knn_scores(BANK, BANK_LABELS, QUERY, num_classes=2, k=3, temperature=0.07)
    cat_vote = math.exp(1.0 / 0.07)
    dog_vote = 2 * math.exp(0.6 / 0.07)
    expected = [cat_vote / (cat_vote + dog_vote), dog_vote / (cat_vote + dog_vote)]
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)


def test_knn_predict_low_temperature_favours_nearest() -> None:
    # With T = 0.07 the single nearest cat outweighs two farther dogs.
    prediction = knn_predict(BANK, BANK_LABELS, QUERY, num_classes=2, k=3, temperature=0.07)
    assert prediction.tolist() == [0]


def test_knn_predict_high_temperature_counts_votes() -> None:
    # With T = 10, exp(0.1) = 1.105 for the cat against 2 * exp(0.06) = 2.124 for the dogs.
    prediction = knn_predict(BANK, BANK_LABELS, QUERY, num_classes=2, k=3, temperature=10.0)
    assert prediction.tolist() == [1]


def test_knn_predict_k_larger_than_bank() -> None:
    prediction = knn_predict(BANK, BANK_LABELS, QUERY, num_classes=2, k=50, temperature=10.0)
    assert prediction.tolist() == [1]


def test_knn_scores_chunking_invariant() -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(40, 6, generator=generator)
    labels = torch.randint(0, 4, (40,), generator=generator)
    queries = torch.randn(9, 6, generator=generator)
    whole = knn_scores(bank, labels, queries, 4, k=5)
    chunked = knn_scores(bank, labels, queries, 4, k=5, chunk_size=2)
    assert torch.allclose(whole, chunked)
    assert torch.allclose(whole.sum(dim=1), torch.ones(9))


def test_knn_scores_small_temperature_finite() -> None:
    scores = knn_scores(BANK, BANK_LABELS, QUERY, num_classes=2, k=3, temperature=1e-3)
    assert torch.isfinite(scores).all()
    assert scores[0, 0].item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("labels", "k", "temperature", "match"),
    [
        (torch.tensor([0, 1, -1]), 3, 0.07, "unknown labels"),
        (torch.tensor([0, 1]), 3, 0.07, r"shape \(3,\)"),
        (BANK_LABELS, 0, 0.07, "k=0"),
        (BANK_LABELS, 3, 0.0, "temperature=0.0"),
    ],
)
def test_knn_scores_rejects_invalid(labels: Tensor, k: int, temperature: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        knn_scores(BANK, labels, QUERY, 2, k=k, temperature=temperature)


def test_knn_scores_rejects_dimension_mismatch() -> None:
    with pytest.raises(ValueError, match="same backbone"):
        knn_scores(BANK, BANK_LABELS, torch.zeros(1, 3), 2)


def _clusters(
    num_per_class: int, spread: float, seed: int, num_features: int = 5
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    centres = torch.cat([centres, torch.zeros(3, num_features - 2)], dim=1)
    labels = torch.arange(3).repeat_interleave(num_per_class)
    noise = spread * torch.randn(len(labels), num_features, generator=generator)
    return centres[labels] + noise, labels


def test_fit_logistic_probe_separable() -> None:
    train_x, train_y = _clusters(20, spread=0.5, seed=0)
    val_x, val_y = _clusters(10, spread=0.5, seed=1)
    result = fit_logistic_probe(train_x, train_y, val_x, num_classes=3)
    assert torch.equal(result.predictions, val_y)
    assert result.converged
    assert result.probabilities.shape == (30, 3)
    assert torch.allclose(result.probabilities.sum(dim=1), torch.ones(30))
    assert torch.equal(result.probe.predict(train_x), train_y)


def test_fit_logistic_probe_deterministic() -> None:
    train_x, train_y = _clusters(10, spread=2.0, seed=0)
    first = fit_logistic_probe(train_x, train_y, train_x, 3, weight_decay=0.01)
    second = fit_logistic_probe(train_x, train_y, train_x, 3, weight_decay=0.01)
    assert torch.equal(first.probe.weight, second.probe.weight)
    assert torch.equal(first.probabilities, second.probabilities)


def test_fit_logistic_probe_under_inference_mode() -> None:
    train_x, train_y = _clusters(10, spread=0.5, seed=0)
    with torch.inference_mode():
        inference_x = train_x.clone()
        result = fit_logistic_probe(inference_x, train_y.clone(), inference_x, 3)
    assert torch.equal(result.predictions, train_y)


def _sklearn_probabilities(
    x: Tensor, y: Tensor, weight_decay: float, class_weight: str | None
) -> np.ndarray:
    linear_model = pytest.importorskip("sklearn.linear_model")
    array = x.double().numpy()
    standardized = (array - array.mean(axis=0)) / array.std(axis=0)
    model = linear_model.LogisticRegression(
        C=1.0 / (weight_decay * len(array)), tol=1e-10, max_iter=10_000, class_weight=class_weight
    )
    model.fit(standardized, y.numpy())
    return model.predict_proba(standardized)


@pytest.mark.parametrize(
    ("class_weight", "dtype", "tolerance"),
    [
        (None, torch.float64, 1e-5),
        ("balanced", torch.float64, 1e-5),
        (None, torch.float32, 5e-4),
    ],
)
def test_fit_logistic_probe_matches_sklearn(
    class_weight: str | None, dtype: torch.dtype, tolerance: float
) -> None:
    # Overlapping, imbalanced clusters, so the penalty and the class weights both matter.
    train_x, train_y = _clusters(30, spread=3.0, seed=0)
    keep = torch.cat([torch.arange(0, 30), torch.arange(30, 45), torch.arange(60, 70)])
    train_x, train_y = train_x[keep], train_y[keep]
    expected = _sklearn_probabilities(train_x, train_y, 0.05, class_weight)
    result = fit_logistic_probe(
        train_x,
        train_y,
        train_x,
        3,
        weight_decay=0.05,
        class_weight=class_weight,  # type: ignore[arg-type]
        dtype=dtype,
    )
    difference = np.abs(result.probabilities.double().numpy() - expected).max()
    assert difference < tolerance


def test_balanced_class_weights_hand_values() -> None:
    # N = 4 over 2 present classes: 4 / (2 * 3) for class 0, 4 / (2 * 1) for class 1.
    weights = balanced_class_weights(torch.tensor([0, 0, 0, 1]), num_classes=3)
    assert weights.tolist() == pytest.approx([2 / 3, 2.0, 0.0])


def test_balanced_class_weights_match_sklearn() -> None:
    class_weight = pytest.importorskip("sklearn.utils.class_weight")
    labels = np.array([0, 0, 0, 1, 2, 2])
    expected = class_weight.compute_class_weight("balanced", classes=np.arange(3), y=labels)
    weights = balanced_class_weights(torch.from_numpy(labels), 3)
    assert weights.tolist() == pytest.approx(expected.tolist())


@pytest.mark.parametrize(
    ("keyword", "value", "match"),
    [
        ("weight_decay", -1.0, "weight_decay"),
        ("max_iter", 0, "max_iter"),
        ("class_weight", "inverse", "class_weight"),
    ],
)
def test_fit_logistic_probe_rejects_invalid(keyword: str, value: object, match: str) -> None:
    train_x, train_y = _clusters(2, spread=0.5, seed=0)
    with pytest.raises(ValueError, match=match):
        fit_logistic_probe(train_x, train_y, train_x, 3, **{keyword: value})  # type: ignore[arg-type]


def test_fit_logistic_probe_rejects_feature_mismatch() -> None:
    train_x, train_y = _clusters(2, spread=0.5, seed=0)
    with pytest.raises(ValueError, match="val_x has 4 features"):
        fit_logistic_probe(train_x, train_y, train_x[:, :4], 3)
