"""2-D projections of embeddings and the PNG figures of the evaluation report.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` rendered by the Agg canvas, so they
never touch pyplot's global state or need a display.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from lightning.pytorch.utilities import rank_zero_info
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from simclr_lightning.evaluation.metrics import ClassificationReport, Labels, as_label_array

log = logging.getLogger(__name__)

ProjectionMethod = Literal["pca", "tsne"]
UNKNOWN_LABEL = -1
_UNKNOWN_COLOUR = "#9e9e9e"


@dataclass(frozen=True, eq=False)
class ProjectedEmbedding:
    """Embeddings projected to 2-D, with the label of each point, ready for :func:`plot_embedding`.

    Attributes:
        points: Array of shape ``(N, 2)``.
        labels: Class index of each point, -1 where unknown.
        class_names: One name per class index.
        title: Figure title.
    """

    points: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    class_names: tuple[str, ...]
    title: str = ""


def _as_float_matrix(values: npt.ArrayLike | torch.Tensor, name: str) -> npt.NDArray[np.float64]:
    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {matrix.shape}.")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} contain NaN or infinite values; check the backbone output.")
    return matrix


def _as_matrix(embeddings: npt.ArrayLike | torch.Tensor) -> npt.NDArray[np.float64]:
    matrix = _as_float_matrix(embeddings, "embeddings")
    if matrix.shape[0] < 2:
        raise ValueError(f"embeddings need at least 2 rows to project, got {matrix.shape[0]}.")
    return matrix


def pca_project(embeddings: npt.ArrayLike | torch.Tensor, num_components: int = 2) -> np.ndarray:
    """Project centred embeddings on their top principal components, computed by SVD.

    Each component's sign is fixed so that its largest-magnitude loading is positive, which makes
    the output independent of the SVD routine's sign choice. When ``D < num_components`` the
    missing columns are zero.

    Returns:
        Array of shape ``(N, num_components)``.
    """
    matrix = _as_matrix(embeddings)
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    components = components[:num_components]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]

    projected = np.zeros((matrix.shape[0], num_components), dtype=np.float64)
    projected[:, : len(components)] = centred @ components.T
    return projected


def tsne_project(
    embeddings: npt.ArrayLike | torch.Tensor, seed: int = 0, perplexity: float = 30.0
) -> np.ndarray:
    """Embed in 2-D with scikit-learn's t-SNE (PCA initialisation, seeded).

    scikit-learn requires ``perplexity < N``. A larger value is lowered to ``(N - 1) / 3`` with a
    log line, so small evaluation sets still plot.

    Raises:
        ModuleNotFoundError: If scikit-learn is not installed.
    """
    try:
        from sklearn.manifold import TSNE
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "t-SNE needs scikit-learn, which is not installed. Install it with "
            "`pip install scikit-learn`, or use method='pca'."
        ) from error
    matrix = _as_matrix(embeddings)
    if perplexity <= 0:
        raise ValueError(f"perplexity must be positive, got {perplexity}.")
    if perplexity >= matrix.shape[0]:
        lowered = max((matrix.shape[0] - 1) / 3.0, 1.0)
        rank_zero_info(
            f"t-SNE perplexity {perplexity} is not below the {matrix.shape[0]} points; "
            f"using {lowered:.2f}."
        )
        perplexity = lowered
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(matrix), dtype=np.float64)


def project_2d(
    embeddings: npt.ArrayLike | torch.Tensor,
    method: ProjectionMethod = "pca",
    seed: int = 0,
    perplexity: float = 30.0,
) -> np.ndarray:
    """Project ``(N, D)`` embeddings to ``(N, 2)`` with PCA (always available) or t-SNE.

    Args:
        embeddings: Array or tensor of shape ``(N, D)``.
        method: ``"pca"`` or ``"tsne"``. t-SNE needs scikit-learn and costs roughly
            O(N log N) per iteration, so subsample large sets before calling it.
        seed: Random state of t-SNE. PCA is deterministic.
        perplexity: t-SNE perplexity.

    Raises:
        ValueError: If ``method`` is unknown or the embeddings are not a finite ``(N, D)`` array.
    """
    if method == "pca":
        return pca_project(embeddings, num_components=2)
    if method == "tsne":
        return tsne_project(embeddings, seed=seed, perplexity=perplexity)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}.")


def _class_colour(index: int, num_classes: int) -> tuple[float, float, float, float]:
    palette = "tab10" if num_classes <= 10 else "tab20"
    colour_map = colormaps[palette]
    return tuple(colour_map(index % colour_map.N))  # type: ignore[return-value]


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure: Figure, path: str | Path) -> Path:
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png")
    log.debug("Wrote figure %s", output)
    return output


def plot_embedding(
    points: npt.ArrayLike | torch.Tensor,
    labels: Labels,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Write a PNG scatter plot of 2-D points, coloured by label, with a legend of class names.

    Points labelled -1 are drawn in grey as "unknown".

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: If ``points`` is not ``(N, 2)``, the lengths differ or a label is out of range.
    """
    coordinates = _as_float_matrix(points, "points")
    if coordinates.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {coordinates.shape}; project first.")
    label_array = as_label_array(labels, "labels")
    if label_array.size != coordinates.shape[0]:
        raise ValueError(
            f"labels has {label_array.size} entries for {coordinates.shape[0]} points."
        )
    names = list(class_names)
    if label_array.size and (label_array.min() < UNKNOWN_LABEL or label_array.max() >= len(names)):
        raise ValueError(
            f"labels must be in [-1, {len(names) - 1}] for {len(names)} class names, got values "
            f"from {label_array.min()} to {label_array.max()}."
        )

    figure = _new_figure(7.0, 6.0)
    axes = figure.add_subplot()
    marker_size = max(2.0, min(30.0, 3000.0 / max(len(label_array), 1)))
    x, y = coordinates[:, 0], coordinates[:, 1]
    unknown = label_array == UNKNOWN_LABEL
    if unknown.any():
        axes.scatter(x[unknown], y[unknown], s=marker_size, color=_UNKNOWN_COLOUR, label="unknown")
    for index, name in enumerate(names):
        mask = label_array == index
        if mask.any():
            colour = _class_colour(index, len(names))
            axes.scatter(x[mask], y[mask], s=marker_size, color=colour, label=name)
    axes.legend(loc="best", fontsize="small", markerscale=max(1.0, 10.0 / marker_size))
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    return _save_figure(figure, path)


def plot_projected(embedding: ProjectedEmbedding, path: str | Path) -> Path:
    """Write :func:`plot_embedding` for a :class:`ProjectedEmbedding`."""
    return plot_embedding(
        embedding.points, embedding.labels, embedding.class_names, path, title=embedding.title
    )


def plot_confusion_matrix(
    report: ClassificationReport,
    path: str | Path,
    normalized: bool = True,
    title: str = "",
) -> Path:
    """Write a PNG heat map of the confusion matrix, true classes as rows.

    Args:
        report: Metrics whose confusion matrix is drawn.
        path: Output PNG path. Parent folders are created.
        normalized: Draw row-normalised fractions (recall on the diagonal) instead of counts.
            Rows of absent classes are blank and labelled "absent".
        title: Figure title.

    Returns:
        The path of the written PNG.
    """
    values = report.confusion_normalized if normalized else report.confusion.astype(np.float64)
    size = max(4.0, 0.6 * report.num_classes + 2.5)
    figure = _new_figure(size + 1.0, size)
    axes = figure.add_subplot()
    upper = 1.0 if normalized else max(float(report.confusion.max()), 1.0)
    image = axes.imshow(np.ma.masked_invalid(values), cmap="Blues", vmin=0.0, vmax=upper)
    figure.colorbar(image, ax=axes, fraction=0.046)
    if report.num_classes <= 20:
        _annotate_cells(axes, values, report, normalized, upper)

    ticks = np.arange(report.num_classes)
    axes.set_xticks(ticks, labels=report.class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, labels=report.class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(
        title or ("confusion matrix (row-normalised)" if normalized else "confusion matrix")
    )
    return _save_figure(figure, path)


def _annotate_cells(
    axes: Axes, values: np.ndarray, report: ClassificationReport, normalized: bool, upper: float
) -> None:
    for row in range(report.num_classes):
        if not report.present[row]:
            axes.text(
                report.num_classes / 2 - 0.5, row, "absent", ha="center", va="center", color="gray"
            )
            continue
        for column in range(report.num_classes):
            value = values[row, column]
            text = f"{value:.2f}" if normalized else str(int(value))
            colour = "white" if not math.isnan(value) and value > upper / 2 else "black"
            axes.text(column, row, text, ha="center", va="center", color=colour, fontsize="small")
