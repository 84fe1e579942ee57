"""The face protocol of ``simclr-lightning evaluate``: race and gender on UTKFace.

For each seed, the labeled UTKFace images are split once (30 % fine-tune, 70 % validation,
stratified by race x gender). Every method below is trained on the fine-tune part and scored on
the validation part, for race and for gender:

1. SimCLR + linear probe: a multinomial logistic regression fitted by L-BFGS on frozen backbone
   features (:func:`~simclr_lightning.evaluation.probe.fit_logistic_probe`, deterministic), or,
   with ``--linear-probe sgd``, ``FineTuneModule(protocol="linear")`` trained with SGD.
2. SimCLR + kNN: the weighted kNN vote of
   :func:`~simclr_lightning.evaluation.probe.knn_predict` on the same frozen features.
3. SimCLR + fine-tuning: ``FineTuneModule(protocol="finetune")`` from the checkpoint.
4. Random backbone + linear probe and + kNN: the same two classifiers on a randomly initialised
   backbone of the same architecture, initialised from the seed of the run.
5. Supervised from scratch: ``FineTuneModule`` without a checkpoint, trained end to end.
6. Majority class: the most frequent class of the fine-tune part, always predicted.

Without ``--checkpoint``, SimCLR is first pretrained on the merged UTKFace + FFHQ + CelebA pool.
With ``--probes-only``, methods 3 and 5 are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from simclr_lightning.data.face_datamodule import FaceDataModule
from simclr_lightning.data.index import GENDER_NAMES, RACE_NAMES
from simclr_lightning.evaluation.embedding import ProjectedEmbedding
from simclr_lightning.evaluation.probe import extract_features, fit_logistic_probe, knn_predict
from simclr_lightning.evaluation.protocol import (
    FINETUNE_RECIPE,
    METHOD_MAJORITY,
    METHOD_RANDOM_KNN,
    METHOD_RANDOM_PROBE,
    METHOD_SCRATCH,
    METHOD_SIMCLR_FINETUNE,
    METHOD_SIMCLR_KNN,
    METHOD_SIMCLR_PROBE,
    NO_IMAGE_CAP,
    SCRATCH_RECIPE,
    SGD_PROBE_RECIPE,
    Architecture,
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
    train_and_predict,
    warmup_epochs,
    write_protocol_report,
)
from simclr_lightning.evaluation.report import EvaluationResult, ReportFiles
from simclr_lightning.models.finetune import FineTuneModule
from simclr_lightning.models.simclr import SimCLRModule


@dataclass(frozen=True, eq=False)
class FrozenFeatures:
    """Backbone features of the fine-tune and validation images, with their race and gender.

    Attributes:
        train: Features of the fine-tune images ``(N, D)``.
        val: Features of the validation images ``(M, D)``.
        train_labels: ``race`` and ``gender`` of the fine-tune images.
        val_labels: ``race`` and ``gender`` of the validation images.
    """

    train: Tensor
    val: Tensor
    train_labels: dict[str, np.ndarray]
    val_labels: dict[str, np.ndarray]

    def val_predictions(self, task: str, prediction: np.ndarray) -> LabeledPredictions:
        """Pair predictions of the validation images with their labels."""
        labels = self.val_labels
        return LabeledPredictions(labels[task], prediction, labels["race"], labels["gender"])


def face_datamodule(
    settings: ProtocolSettings,
    mode: str,
    task: str,
    seed: int,
    unlabeled_roots: bool = False,
    **kwargs: Any,
) -> FaceDataModule:
    """Build the FaceDataModule of one stage; every stage of a seed shares its labeled split.

    Args:
        settings: The evaluation settings.
        mode: ``pretrain`` or ``finetune``.
        task: ``race`` or ``gender``.
        seed: Seed of the split.
        unlabeled_roots: Also read the FFHQ and CelebA roots (the pretraining pool).
        kwargs: Further ``FaceDataModule`` arguments.
    """
    return FaceDataModule(
        utkface_root=settings.utkface_root,
        ffhq_root=settings.ffhq_root if unlabeled_roots else None,
        celeba_root=settings.celeba_root if unlabeled_roots else None,
        mode=mode,  # type: ignore[arg-type]
        task=task,  # type: ignore[arg-type]
        image_size=settings.size,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        seed=seed,
        cache_dir=settings.cache_dir,
        **kwargs,
    )


def pretrain_faces(settings: ProtocolSettings) -> Path:
    """Pretrain SimCLR on the merged face pool with the first seed and return the checkpoint."""
    seed = settings.seeds[0]
    pl.seed_everything(seed, workers=True, verbose=False)
    datamodule = face_datamodule(
        settings, "pretrain", "race", seed, unlabeled_roots=True, online_eval_max_images=1000
    )
    model = SimCLRModule(
        backbone=settings.backbone or "resnet18",
        small_stem=bool(settings.small_stem),
        projection_dim=128,
        # 0.2 lies between the SimCLR paper's 0.1 (ImageNet, batches of 4096) and 0.5 (CIFAR-10).
        # It is a choice for batches of a few hundred images, not a value from the paper.
        temperature=0.2,
        optimizer="lars",
        # Square-root scaling, 0.075 * sqrt(batch): the SimCLR paper's rule for small batches.
        base_lr=0.075,
        lr_scaling="sqrt",
        weight_decay=1e-6,
        warmup_epochs=warmup_epochs(settings.pretrain_epochs),
    )
    return fit_simclr(settings, datamodule, model, "pretrain-simclr-faces")


def frozen_features(
    backbone: nn.Module, loaders: Sequence[Any], device: torch.device
) -> FrozenFeatures:
    """Extract features of the fine-tune (bank) and validation (query) loaders."""
    backbone = backbone.to(device)
    train, _, train_extra = extract_features(backbone, loaders[0], device)
    val, _, val_extra = extract_features(backbone, loaders[1], device)
    backbone.cpu()

    def labels(extra: dict[str, Tensor]) -> dict[str, np.ndarray]:
        return {key: extra[key].numpy() for key in ("race", "gender")}

    return FrozenFeatures(train, val, labels(train_extra), labels(val_extra))


def feature_loaders(settings: ProtocolSettings, seed: int, reference: FaceDataModule) -> list[Any]:
    """Return the fine-tune and validation loaders with the evaluation transform.

    A labeled-only pretraining-mode FaceDataModule yields exactly these as its online-evaluation
    ``[bank, query]`` loaders. Its split is checked against the fine-tuning datamodule's.
    """
    datamodule = face_datamodule(
        settings, "pretrain", "race", seed, online_eval_max_images=NO_IMAGE_CAP
    )
    datamodule.setup("fit")
    index, reference_index = datamodule.index, reference.index
    if index is None or reference_index is None:
        raise RuntimeError("Both FaceDataModules must be set up before their splits compare.")
    for part, reference_part in (("bank", "finetune"), ("query", "val")):
        if part not in datamodule.rows:
            raise ValueError(f"Seed {seed}: the labeled images could not be split; see the log.")
        hashes = index.content_hash[datamodule.rows[part]]
        expected = reference_index.content_hash[reference.rows[reference_part]]
        if not np.array_equal(hashes, expected):
            raise RuntimeError(
                f"Seed {seed}: the frozen-feature {part} images differ from the {reference_part} "
                "split of the fine-tuning datamodule, so the methods would not share one split."
            )
    return list(datamodule.val_dataloader())


def probe_predictions(
    settings: ProtocolSettings, features: FrozenFeatures, task: str, num_classes: int
) -> np.ndarray:
    """Fit the L-BFGS logistic probe on the fine-tune features and predict the validation ones."""
    result = fit_logistic_probe(
        features.train,
        torch.from_numpy(features.train_labels[task]),
        features.val,
        num_classes,
        weight_decay=settings.probe_weight_decay,
        max_iter=1000,
        class_weight="balanced",
    )
    return result.predictions.cpu().numpy().astype(np.int64)


@dataclass
class FaceSeedContext:
    """Shared inputs of every task of one seed: checkpoint, architecture, split and features."""

    seed: int
    checkpoint: str
    architecture: Architecture
    features: dict[str, FrozenFeatures]
    datamodules: dict[str, FaceDataModule]


def sgd_probe_predictions(
    settings: ProtocolSettings, context: FaceSeedContext, task: str, simclr: bool
) -> LabeledPredictions:
    """Train ``FineTuneModule(protocol="linear")`` on a frozen SimCLR or random backbone."""
    pl.seed_everything(context.seed, workers=True, verbose=False)
    architecture = {} if simclr else asdict(context.architecture)
    model = FineTuneModule(
        checkpoint_path=context.checkpoint if simclr else None,
        protocol="linear",
        **architecture,
        **SGD_PROBE_RECIPE.module_kwargs(settings.probe_epochs),
    )
    name = f"probe-{'simclr' if simclr else 'random'}-{task}-seed{context.seed}"
    return train_and_predict(
        settings, context.datamodules[task], model, name, settings.probe_epochs
    )


def frozen_feature_results(
    settings: ProtocolSettings, context: FaceSeedContext, task: str, score: TaskScorer
) -> list[EvaluationResult]:
    """Score the linear probe and the kNN classifier on the SimCLR and the random backbone."""
    results = []
    num_classes = context.datamodules[task].num_classes
    backbones = (
        ("simclr", METHOD_SIMCLR_PROBE, METHOD_SIMCLR_KNN),
        ("random", METHOD_RANDOM_PROBE, METHOD_RANDOM_KNN),
    )
    for key, probe_method, knn_method in backbones:
        features = context.features[key]
        if settings.linear_probe == "lbfgs":
            prediction = probe_predictions(settings, features, task, num_classes)
            predictions = features.val_predictions(task, prediction)
        else:
            predictions = sgd_probe_predictions(settings, context, task, simclr=key == "simclr")
        results.append(score(probe_method, predictions))
        knn = knn_predict(
            features.train,
            torch.from_numpy(features.train_labels[task]),
            features.val,
            num_classes,
            k=settings.knn_k,
        )
        results.append(score(knn_method, features.val_predictions(task, knn.numpy())))
    return results


def trained_results(
    settings: ProtocolSettings,
    context: FaceSeedContext,
    task: str,
    score: TaskScorer,
    progress: Progress,
) -> list[EvaluationResult]:
    """Fine-tune the SimCLR backbone and train the supervised baseline from scratch."""
    seed, datamodule = context.seed, context.datamodules[task]
    epochs = settings.finetune_epochs
    progress.step(f"Seed {seed}, {task}: fine-tuning SimCLR for {epochs} epochs")
    pl.seed_everything(seed, workers=True, verbose=False)
    finetune = FineTuneModule(
        checkpoint_path=context.checkpoint,
        protocol="finetune",
        **FINETUNE_RECIPE.module_kwargs(epochs),
    )
    name = f"finetune-simclr-{task}-seed{seed}"
    results = [
        score(
            METHOD_SIMCLR_FINETUNE, train_and_predict(settings, datamodule, finetune, name, epochs)
        )
    ]

    epochs = settings.scratch_epochs or settings.finetune_epochs
    progress.step(f"Seed {seed}, {task}: supervised training from scratch for {epochs} epochs")
    pl.seed_everything(seed, workers=True, verbose=False)
    scratch = FineTuneModule(
        protocol="finetune",
        **asdict(context.architecture),
        **SCRATCH_RECIPE.module_kwargs(epochs),
    )
    name = f"scratch-{task}-seed{seed}"
    results.append(
        score(METHOD_SCRATCH, train_and_predict(settings, datamodule, scratch, name, epochs))
    )
    return results


def evaluate_face_task(
    settings: ProtocolSettings, context: FaceSeedContext, task: str, progress: Progress
) -> list[EvaluationResult]:
    """Score every method of the protocol on one task for one seed."""
    datamodule = context.datamodules[task]
    features = context.features["simclr"]
    truth = features.val_predictions(task, features.val_labels[task])
    majority, majority_accuracy = majority_predictions(datamodule.train_targets(), truth)
    score = TaskScorer(
        task,
        context.seed,
        tuple(datamodule.class_names),
        majority_accuracy,
        settings.fairness_min_count,
    )
    progress.step(f"Seed {context.seed}, {task}: linear probes ({settings.linear_probe}) and kNN")
    results = frozen_feature_results(settings, context, task, score)
    if not settings.probes_only:
        results.extend(trained_results(settings, context, task, score, progress))
    results.append(score(METHOD_MAJORITY, majority, constant=True))
    return results


def face_seed_context(
    settings: ProtocolSettings,
    checkpoint: str,
    simclr_backbone: nn.Module,
    architecture: Architecture,
    seed: int,
) -> FaceSeedContext:
    """Split the labeled images with ``seed`` and extract the frozen features of both backbones."""
    datamodules = {
        task: face_datamodule(settings, "finetune", task, seed) for task in settings.tasks
    }
    for datamodule in datamodules.values():
        datamodule.setup("fit")
    reference = datamodules[settings.tasks[0]]
    loaders = feature_loaders(settings, seed, reference)
    device = resolve_device(settings.accelerator)
    features = {
        "simclr": frozen_features(simclr_backbone, loaders, device),
        "random": frozen_features(random_backbone(architecture, seed), loaders, device),
    }
    return FaceSeedContext(seed, checkpoint, architecture, features, datamodules)


def face_embeddings(
    settings: ProtocolSettings, context: FaceSeedContext
) -> dict[str, ProjectedEmbedding]:
    """Project the validation features of both backbones, coloured by each task's label."""
    embeddings = {}
    for task in settings.tasks:
        names = RACE_NAMES if task == "race" else GENDER_NAMES
        for key, label in (("simclr", "SimCLR"), ("random", "random")):
            features = context.features[key]
            title = f"{label} backbone features of the validation images, coloured by {task}"
            embeddings[f"{key}-{task}"] = embedding_of(
                features.val, features.val_labels[task], names, title, settings
            )
    return embeddings


def face_notes(
    settings: ProtocolSettings, checkpoint: str, architecture: Architecture, splits: list[str]
) -> list[str]:
    """Describe the checkpoint, the split and every method's recipe for the report."""
    probe = (
        "multinomial logistic regression on standardised frozen features, fitted by L-BFGS "
        f"(weight decay {settings.probe_weight_decay:g}, balanced class weights)"
        if settings.linear_probe == "lbfgs"
        else f"FineTuneModule(protocol='linear'), {settings.probe_epochs} epochs: "
        + SGD_PROBE_RECIPE.describe()
    )
    scratch_epochs = settings.scratch_epochs or settings.finetune_epochs
    lines = [
        f"- Checkpoint: `{checkpoint}` ({architecture.backbone}, small stem "
        f"{architecture.small_stem}); images {settings.size} px; batch {settings.batch_size}.",
        "- Split: for each seed the labeled UTKFace images are split 30 % fine-tune / 70 % "
        "validation, stratified by race x gender. Every method trains on the fine-tune part and "
        "is scored on the validation part. " + " ".join(splits),
        f"- Linear probe: {probe}. The random backbone has the same architecture, initialised "
        "from the run's seed.",
        f"- kNN: cosine similarity between frozen features, the {settings.knn_k} nearest "
        "fine-tune images (all of them when there are fewer), votes weighted by "
        "exp(similarity / 0.07) and not by class frequency.",
    ]
    if settings.probes_only:
        lines.append("- Fine-tuning and the supervised baseline were skipped (`--probes-only`).")
    else:
        lines += [
            f"- Fine-tuning ({settings.finetune_epochs} epochs): {FINETUNE_RECIPE.describe()}.",
            f"- Supervised from scratch ({scratch_epochs} epochs): {SCRATCH_RECIPE.describe()}.",
        ]
    lines += [
        "- Majority class: the most frequent class of the fine-tune part, predicted for every "
        "image. It is constant by design, so the collapse checks skip it.",
        f"- Fairness tables compare groups of at least {settings.fairness_min_count} images.",
    ]
    return ["## Protocol", "\n".join(lines)]


def split_sentence(context: FaceSeedContext) -> str:
    """Return the sizes of one seed's split as a sentence."""
    features = context.features["simclr"]
    return (
        f"Seed {context.seed}: {len(features.train)} fine-tune and {len(features.val)} "
        "validation images."
    )


def run_face_protocol(settings: ProtocolSettings) -> ReportFiles:
    """Run the face protocol for every seed and task and write the report folder."""
    per_seed = 1 + len(settings.tasks) * (1 if settings.probes_only else 3)
    progress = Progress(int(settings.checkpoint is None) + len(settings.seeds) * per_seed + 1)
    checkpoint = settings.checkpoint
    if checkpoint is None:
        progress.step(f"Pretraining SimCLR for {settings.pretrain_epochs} epochs")
        checkpoint = str(pretrain_faces(settings))
    simclr_backbone, architecture = load_simclr_backbone(checkpoint, settings)
    results: list[EvaluationResult] = []
    embeddings: dict[str, ProjectedEmbedding] = {}
    splits: list[str] = []
    for seed in settings.seeds:
        progress.step(f"Seed {seed}: splitting and extracting frozen features")
        context = face_seed_context(settings, checkpoint, simclr_backbone, architecture, seed)
        splits.append(split_sentence(context))
        if not embeddings:
            embeddings = face_embeddings(settings, context)
        for task in settings.tasks:
            results.extend(evaluate_face_task(settings, context, task, progress))
    progress.step("Writing the report")
    notes = face_notes(settings, checkpoint, architecture, splits)
    extra = {"checkpoint": checkpoint, "elapsed_seconds": round(progress.elapsed(), 1)}
    title = f"SimCLR evaluation protocol: {' and '.join(settings.tasks)} on UTKFace"
    return write_protocol_report(settings, results, embeddings, notes, title, extra)
