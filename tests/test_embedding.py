from pathlib import Path

import numpy as np
import pytest
import torch

from simclr_lightning.evaluation.embedding import (
    ProjectedEmbedding,
    pca_project,
    plot_confusion_matrix,
    plot_embedding,
    plot_projected,
    project_2d,
)
from simclr_lightning.evaluation.metrics import classification_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _two_clusters(num_per_cluster: int = 15) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    first = rng.normal(0.0, 0.1, size=(num_per_cluster, 8))
    second = rng.normal(3.0, 0.1, size=(num_per_cluster, 8))
    labels = np.array([0] * num_per_cluster + [1] * num_per_cluster)
    return np.concatenate([first, second]), labels


def test_pca_project_axis_aligned() -> None:
    # Variance 4.5 along x and 0.5 along y, so x is the first component and y the second.
    points = np.array([[3.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    projected = pca_project(points + 5.0)
    assert projected.shape == (4, 2)
    assert projected[:, 0].tolist() == pytest.approx([3.0, -3.0, 0.0, 0.0], abs=1e-9)
    assert projected[:, 1].tolist() == pytest.approx([0.0, 0.0, 1.0, -1.0], abs=1e-9)


def test_pca_project_sign_fixed() -> None:
    points = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    mirrored = pca_project(-points)
    # Mirroring the data mirrors the rows, not the sign convention of the components.
    assert mirrored[0].tolist() == pytest.approx([-3.0, 0.0], abs=1e-9)
    assert mirrored[2].tolist() == pytest.approx([0.0, -1.0], abs=1e-9)


def test_pca_project_one_dimension_pads() -> None:
    projected = pca_project(torch.tensor([[1.0], [3.0]]))
    assert projected[:, 0].tolist() == pytest.approx([-1.0, 1.0])
    assert projected[:, 1].tolist() == [0.0, 0.0]


def test_project_2d_tsne_seeded() -> None:
    pytest.importorskip("sklearn")
    embeddings, _ = _two_clusters()
    first = project_2d(embeddings, method="tsne", seed=3, perplexity=50.0)
    second = project_2d(embeddings, method="tsne", seed=3, perplexity=50.0)
    assert first.shape == (30, 2)
    assert np.isfinite(first).all()
    assert np.array_equal(first, second)


@pytest.mark.parametrize(
    ("embeddings", "method", "match"),
    [
        (np.zeros((4, 3)), "umap", "'pca' or 'tsne'"),
        (np.zeros(4), "pca", r"\(N, D\)"),
        (np.zeros((1, 3)), "pca", "at least 2 rows"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "pca", "NaN"),
    ],
)
def test_project_2d_rejects_invalid(embeddings: np.ndarray, method: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        project_2d(embeddings, method=method)  # type: ignore[arg-type]


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_embedding_writes_png(tmp_path: Path) -> None:
    embeddings, labels = _two_clusters()
    labels[0] = -1
    path = plot_embedding(
        pca_project(embeddings), labels, ["male", "female"], tmp_path / "sub" / "emb.png"
    )
    assert path == tmp_path / "sub" / "emb.png"
    _assert_png(path)


def test_plot_projected_writes_png(tmp_path: Path) -> None:
    embeddings, labels = _two_clusters(5)
    embedding = ProjectedEmbedding(pca_project(embeddings), labels, ("a", "b"), "title")
    _assert_png(plot_projected(embedding, tmp_path / "projected.png"))


@pytest.mark.parametrize(
    ("points", "labels", "match"),
    [
        (np.zeros((3, 3)), [0, 0, 0], r"\(N, 2\)"),
        (np.zeros((3, 2)), [0, 0], "3 points"),
        (np.zeros((3, 2)), [0, 2, 0], r"\[-1, 1\]"),
    ],
)
def test_plot_embedding_rejects_invalid(
    tmp_path: Path, points: np.ndarray, labels: list, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        plot_embedding(points, labels, ["a", "b"], tmp_path / "x.png")


@pytest.mark.parametrize("normalized", [True, False])
def test_plot_confusion_matrix_writes_png(tmp_path: Path, normalized: bool) -> None:
    report = classification_report([0, 0, 1, 1], [0, 1, 1, 2], 3, ["cat", "dog", "fox"])
    path = plot_confusion_matrix(report, tmp_path / "confusion.png", normalized=normalized)
    _assert_png(path)
