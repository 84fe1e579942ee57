"""representation_health on embeddings whose statistics are worked out by hand."""

import math

import pytest
import torch

from simclr_lightning.models.health import representation_health


def test_health_collapsed_embeddings() -> None:
    # All 8 embeddings are the same unit vector, so every similarity is exactly 1.
    z = torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1)
    health = representation_health(z, z.clone())

    assert health["z_std"].item() == 0.0
    assert health["z_std_ratio"].item() == 0.0
    assert health["pos_cosine"].item() == pytest.approx(1.0)
    assert health["neg_cosine"].item() == pytest.approx(1.0)
    # argmax breaks ties by the first index: row 0 picks row 1, every other row picks row 0.
    # Only row 4, whose positive is row 0, is right, so 1 of 8 rows.
    assert health["contrastive_top1"].item() == pytest.approx(1 / 8)


def test_health_orthogonal_embeddings() -> None:
    # Image i is the basis vector e_i in both views.
    z = torch.eye(3)
    health = representation_health(z, z.clone())

    # Each dimension contains two ones among six rows: mean 1/3, unbiased variance
    # (2 * (2/3)^2 + 4 * (1/3)^2) / 5 = 4/15.
    assert health["z_std"].item() == pytest.approx(math.sqrt(4 / 15), rel=1e-6)
    assert health["z_std_ratio"].item() == pytest.approx(math.sqrt(4 / 15 * 3), rel=1e-6)
    assert health["pos_cosine"].item() == pytest.approx(1.0)
    assert health["neg_cosine"].item() == pytest.approx(0.0)
    assert health["contrastive_top1"].item() == pytest.approx(1.0)


def test_health_cosines_by_hand() -> None:
    # Normalised: a0 = (1, 0), a1 = (0, 1), b0 = (0.6, 0.8), b1 = (1, 2) / sqrt(5).
    z0 = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    z1 = torch.tensor([[3.0, 4.0], [1.0, 2.0]])
    health = representation_health(z0, z1)

    root5 = math.sqrt(5)
    # Positive pairs a0.b0 = 0.6 and a1.b1 = 2 / sqrt(5).
    assert health["pos_cosine"].item() == pytest.approx((0.6 + 2 / root5) / 2, rel=1e-6)
    # Cross-view negatives a0.b1 = 1 / sqrt(5) and a1.b0 = 0.8. Same-view pairs do not count.
    assert health["neg_cosine"].item() == pytest.approx((1 / root5 + 0.8) / 2, rel=1e-6)
    # a0 and a1 find their positives, but b0 and b1 are closest to each other
    # (b0.b1 = 11 / (5 sqrt 5) = 0.984), so 2 of 4 rows are right.
    assert health["contrastive_top1"].item() == pytest.approx(0.5)


def test_health_single_pair_has_no_negatives() -> None:
    health = representation_health(torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 1.0]]))
    assert math.isnan(health["neg_cosine"].item())
    assert health["pos_cosine"].item() == pytest.approx(0.8, rel=1e-6)


def test_health_ignores_gradients() -> None:
    generator = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 3, generator=generator, requires_grad=True)
    health = representation_health(z0, torch.randn(4, 3, generator=generator))
    assert not health["pos_cosine"].requires_grad
