"""CIFAR-10 validation of the method: SimCLR pretraining, then a linear probe and kNN accuracy.

Both classifiers run on frozen features of the SimCLR backbone and of a randomly initialised
backbone of the same architecture. Features of the labeled training images (evaluation
transform) train them, and the test images score them. After a full-length pretraining run, a
SimCLR backbone that does not clearly beat the random one points to a problem in pretraining
rather than to a property of faces.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from simclr_lightning.data.cifar import (
    CIFAR10_CLASSES,
    CIFAR10DataModule,
    CIFARSplit,
    stratified_subset,
)
from simclr_lightning.evaluation.embedding import ProjectedEmbedding
from simclr_lightning.evaluation.probe import extract_features, fit_logistic_probe, knn_predict
from simclr_lightning.evaluation.protocol import (
    METHOD_MAJORITY,
    METHOD_RANDOM_KNN,
    METHOD_RANDOM_PROBE,
    METHOD_SIMCLR_KNN,
    METHOD_SIMCLR_PROBE,
    NO_IMAGE_CAP,
    LabeledPredictions,
    Progress,
    ProtocolSettings,
    TaskScorer,
    embedding_of,
    fit_simclr,
    load_simclr_backbone,
    majority_predictions,
    random_backbone,
    resolve_device,
    warmup_epochs,
    write_protocol_report,
)
from simclr_lightning.evaluation.report import EvaluationResult, ReportFiles
from simclr_lightning.models.simclr import SimCLRModule

logger = logging.getLogger(__name__)

TASK = "cifar10"


def subset_split(
    split: CIFARSplit, num_classes: int, per_class: int | None, seed: int
) -> CIFARSplit:
    """Keep the images of classes ``0 .. num_classes - 1``, at most ``per_class`` of each.

    The kept images of each class are drawn with ``seed`` and keep their file order.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(num_classes):
        rows = np.flatnonzero(split.labels == label)
        if per_class is not None and rows.size > per_class:
            rows = np.sort(rng.permutation(rows)[:per_class])
        chosen.append(rows)
    rows = np.concatenate(chosen).astype(np.int64)
    return CIFARSplit(
        labels=split.labels[rows],
        arrays=None if split.arrays is None else np.ascontiguousarray(split.arrays[rows]),
        paths=None if split.paths is None else split.paths[rows],
    )


class CIFAR10SubsetDataModule(CIFAR10DataModule):
    """``CIFAR10DataModule`` over the first ``num_classes`` classes, with per-class image caps.

    Class indices stay those of CIFAR-10, which are ``0 .. num_classes - 1`` for the kept classes,
    so ``class_names`` and ``num_classes`` describe the subset.

    Args:
        root: CIFAR-10 folder, as for ``CIFAR10DataModule``.
        num_classes: Number of classes kept, from 2 to 10.
        train_per_class: Maximum training images per class, ``None`` for all.
        test_per_class: Maximum test images per class, ``None`` for all.
        kwargs: Further ``CIFAR10DataModule`` arguments.
    """

    def __init__(
        self,
        root: str,
        num_classes: int = 10,
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        if not 2 <= num_classes <= len(CIFAR10_CLASSES):
            raise ValueError(f"num_classes must be in [2, 10], got {num_classes}.")
        for name, value in (
            ("train_per_class", train_per_class),
            ("test_per_class", test_per_class),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 or None, got {value}.")
        self.num_classes = num_classes
        self.class_names = list(CIFAR10_CLASSES[:num_classes])
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class

    def setup(self, stage: str | None = None) -> None:
        """Read both splits, keep the chosen classes and images, and choose the labeled rows."""
        if self.train_split is not None:
            return
        super().setup(stage)
        assert self.train_split is not None and self.test_split is not None  # set by super()
        train = subset_split(self.train_split, self.num_classes, self.train_per_class, self.seed)
        test = subset_split(self.test_split, self.num_classes, self.test_per_class, self.seed)
        labeled_count = max(round(self.train_fraction * len(train)), 1)
        self.labeled_rows = stratified_subset(train.labels, labeled_count, self.seed)
        self.train_split, self.test_split = train, test
        rank_zero_info(
            f"CIFAR-10 subset: classes {', '.join(self.class_names)}; {len(train)} train "
            f"images ({len(self.labeled_rows)} labeled) and {len(test)} test images."
        )
        if self.mode == "pretrain" and len(train) < self.batch_size:
            raise ValueError(
                f"The CIFAR-10 subset has {len(train)} training images, fewer than "
                f"batch_size={self.batch_size}, so the pretraining loader (drop_last=True) would "
                "yield no batch. Lower batch_size or raise the per-class cap."
            )


def cifar_datamodule(settings: ProtocolSettings) -> CIFAR10SubsetDataModule:
    """Build the pretraining-mode datamodule whose online-evaluation loaders cover every image."""
    assert settings.cifar_root is not None  # checked by ProtocolSettings.validate
    return CIFAR10SubsetDataModule(
        settings.cifar_root,
        num_classes=settings.cifar_classes,
        train_per_class=settings.cifar_train_per_class,
        test_per_class=settings.cifar_test_per_class,
        mode="pretrain",
        image_size=settings.size,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        seed=settings.seeds[0],
        online_eval_max_images=NO_IMAGE_CAP,
    )


def pretrain_cifar(settings: ProtocolSettings, datamodule: CIFAR10SubsetDataModule) -> Path:
    """Pretrain SimCLR with the CIFAR-10 settings and return the checkpoint."""
    pl.seed_everything(settings.seeds[0], workers=True, verbose=False)
    model = SimCLRModule(
        backbone=settings.backbone or "resnet18",
        # The 3x3 stem without max pool of the SimCLR paper's CIFAR-10 runs (appendix B.9).
        small_stem=True if settings.small_stem is None else settings.small_stem,
        projection_dim=128,
        temperature=0.5,  # the SimCLR paper's best temperature on CIFAR-10
        optimizer="lars",
        base_lr=0.075,  # square-root scaling, the SimCLR paper's rule for small batches
        lr_scaling="sqrt",
        weight_decay=1e-6,
        warmup_epochs=warmup_epochs(settings.pretrain_epochs),
        # Lightning logs the model's and the datamodule's hyper-parameters together and rejects
        # names they share with different values, so this one repeats the datamodule's.
        num_classes=datamodule.num_classes,
    )
    return fit_simclr(settings, datamodule, model, "pretrain-simclr-cifar10")


def backbone_results(
    settings: ProtocolSettings,
    backbone: nn.Module,
    loaders: list[Any],
    methods: tuple[str, str],
    score: TaskScorer,
) -> tuple[list[EvaluationResult], torch.Tensor, np.ndarray]:
    """Score the linear probe and kNN of one frozen backbone; also return the test features."""
    device = resolve_device(settings.accelerator)
    backbone = backbone.to(device)
    train_x, train_y, _ = extract_features(backbone, loaders[0], device)
    test_x, test_y, _ = extract_features(backbone, loaders[1], device)
    backbone.cpu()
    num_classes = len(score.class_names)
    probe = fit_logistic_probe(
        train_x,
        train_y,
        test_x,
        num_classes,
        weight_decay=settings.probe_weight_decay,
        max_iter=1000,
    )
    knn = knn_predict(train_x, train_y, test_x, num_classes, k=settings.knn_k)
    target = test_y.numpy()
    unknown = np.full_like(target, -1)
    results = [
        score(method, LabeledPredictions(target, prediction.numpy(), unknown, unknown))
        for method, prediction in zip(methods, (probe.predictions, knn), strict=True)
    ]
    return results, test_x, target


def cifar_notes(settings: ProtocolSettings, checkpoint: str, train: int, test: int) -> list[str]:
    """Describe the checkpoint, the subset and the classifiers for the report."""
    lines = [
        f"- Checkpoint: `{checkpoint}`; images {settings.size} px; seed {settings.seeds[0]}.",
        f"- Data: the first {settings.cifar_classes} CIFAR-10 classes; {train} training images "
        f"train the classifiers and {test} test images score them.",
        "- Linear probe: multinomial logistic regression on standardised frozen features, fitted "
        f"by L-BFGS (weight decay {settings.probe_weight_decay:g}).",
        f"- kNN: cosine similarity, the {settings.knn_k} nearest training images (all of them "
        "when there are fewer), votes weighted by exp(similarity / 0.07).",
        "- The random backbone has the same architecture, initialised from the seed.",
    ]
    return ["## Protocol", "\n".join(lines)]


def run_cifar_protocol(settings: ProtocolSettings) -> ReportFiles:
    """Pretrain (unless given a checkpoint), probe both backbones and write the report folder."""
    seed = settings.seeds[0]
    if len(settings.seeds) > 1:
        rank_zero_warn(
            f"CIFAR-10 validation pretrains once and runs with the first seed ({seed}) only.",
            stacklevel=2,
        )
    progress = Progress(int(settings.checkpoint is None) + 3)
    datamodule = cifar_datamodule(settings)
    checkpoint = settings.checkpoint
    if checkpoint is None:
        progress.step(f"Pretraining SimCLR on CIFAR-10 for {settings.pretrain_epochs} epochs")
        checkpoint = str(pretrain_cifar(settings, datamodule))
    datamodule.setup("fit")
    loaders = list(datamodule.val_dataloader())
    simclr, architecture = load_simclr_backbone(checkpoint, settings)
    train_targets = datamodule.train_split.labels[datamodule.labeled_rows]  # type: ignore[union-attr]
    test_targets = datamodule.test_split.labels  # type: ignore[union-attr]
    unknown = np.full_like(test_targets, -1)
    truth = LabeledPredictions(test_targets, test_targets, unknown, unknown)
    majority, majority_accuracy = majority_predictions(train_targets, truth)
    score = TaskScorer(TASK, seed, tuple(datamodule.class_names), majority_accuracy, 1)

    results: list[EvaluationResult] = []
    embeddings: dict[str, ProjectedEmbedding] = {}
    backbones = (
        ("SimCLR", simclr, (METHOD_SIMCLR_PROBE, METHOD_SIMCLR_KNN)),
        ("random", random_backbone(architecture, seed), (METHOD_RANDOM_PROBE, METHOD_RANDOM_KNN)),
    )
    for label, backbone, methods in backbones:
        progress.step(f"{label} backbone: features, linear probe and kNN")
        found, test_x, target = backbone_results(settings, backbone, loaders, methods, score)
        results.extend(found)
        title = f"{label} backbone features of the test images, coloured by class"
        embeddings[f"{label.lower()}-{TASK}"] = embedding_of(
            test_x, target, datamodule.class_names, title, settings
        )
    results.append(score(METHOD_MAJORITY, majority, constant=True))
    progress.step("Writing the report")
    notes = cifar_notes(settings, checkpoint, len(train_targets), len(test_targets))
    extra = {"checkpoint": checkpoint, "elapsed_seconds": round(progress.elapsed(), 1)}
    title = "SimCLR validation on CIFAR-10: linear probe and kNN"
    return write_protocol_report(settings, results, embeddings, notes, title, extra)
