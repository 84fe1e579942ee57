"""Tests of ``simclr-lightning evaluate``: the face protocol and the CIFAR-10 validation."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, utkface_name, write_image

from simclr_lightning.cli import main
from simclr_lightning.data.cifar import CIFAR10_CLASSES, CIFARSplit
from simclr_lightning.data.face_datamodule import FaceDataModule
from simclr_lightning.evaluation import faces
from simclr_lightning.evaluation.cifar import subset_split
from simclr_lightning.evaluation.faces import (
    FaceSeedContext,
    FrozenFeatures,
    frozen_feature_results,
)
from simclr_lightning.evaluation.protocol import (
    FINETUNE_RECIPE,
    METHOD_MAJORITY,
    METHOD_RANDOM_KNN,
    METHOD_RANDOM_PROBE,
    METHOD_SCRATCH,
    METHOD_SIMCLR_FINETUNE,
    METHOD_SIMCLR_KNN,
    METHOD_SIMCLR_PROBE,
    SCRATCH_RECIPE,
    SGD_PROBE_RECIPE,
    LabeledPredictions,
    ProtocolSettings,
    TaskScorer,
    load_simclr_backbone,
    score_predictions,
)
from simclr_lightning.models.simclr import SimCLRModule

FACE_METHODS = (
    METHOD_SIMCLR_PROBE,
    METHOD_SIMCLR_KNN,
    METHOD_SIMCLR_FINETUNE,
    METHOD_RANDOM_PROBE,
    METHOD_RANDOM_KNN,
    METHOD_SCRATCH,
    METHOD_MAJORITY,
)
# Images per (race, gender) cell of the skewed tree: White has the most images and every race
# has at least twice as many male as female images, so both majorities are clear in every split.
MALE_PER_RACE = {0: 9, 1: 6, 2: 6, 3: 6, 4: 6}
FEMALE_PER_RACE = {0: 4, 1: 3, 2: 3, 3: 3, 4: 3}
TINY_RUN = [
    "--image-size",
    "16",
    "--batch-size",
    "8",
    "--num-workers",
    "0",
    "--accelerator",
    "cpu",
    "--finetune-epochs",
    "1",
    "--fairness-min-count",
    "1",
]


def build_skewed_utkface(root: Path) -> Path:
    """Write a UTKFace folder with the cell counts above and return its parent folder."""
    folder = root / "UTKFace"
    stamp = 0
    for race in range(5):
        for gender, counts in ((0, MALE_PER_RACE), (1, FEMALE_PER_RACE)):
            for k in range(counts[race]):
                stamp += 1
                write_image(folder / utkface_name(20 + k, gender, race, stamp), 100 + stamp)
    return root


def save_simclr_checkpoint(path: Path) -> Path:
    """Save an untrained SimCLRModule in the checkpoint layout that Lightning writes."""
    torch.manual_seed(0)
    model = SimCLRModule(backbone="resnet18", projection_dim=16)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save(checkpoint, path)
    return path


def markdown_of(out: Path) -> str:
    return (out / "report.md").read_text(encoding="utf-8")


def summary_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def skewed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_skewed_utkface(tmp_path_factory.mktemp("skewed"))


@pytest.fixture(scope="module")
def two_seed_run(skewed_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the whole protocol once, pretraining included, with two seeds and both tasks."""
    out = tmp_path_factory.mktemp("two_seeds")
    status = main(
        [
            "evaluate",
            "--utkface-root",
            str(skewed_root),
            "--out",
            str(out),
            "--pretrain-epochs",
            "1",
            "--seeds",
            "0",
            "1",
            *TINY_RUN,
        ]
    )
    assert status == 0
    return out


# ---------------------------------------------------------------- end to end


def test_evaluate_report_lists_methods_and_tasks(two_seed_run: Path) -> None:
    markdown = markdown_of(two_seed_run)
    for method in FACE_METHODS:
        for task in ("race", "gender"):
            assert f"## {method}: {task}" in markdown
    assert "## Collapse warnings" in markdown
    assert "## Embeddings" in markdown


def test_evaluate_writes_pngs_and_json(two_seed_run: Path) -> None:
    confusion = sorted(two_seed_run.glob("confusion_*.png"))
    embeddings = sorted(two_seed_run.glob("embedding_*.png"))
    assert len(confusion) == len(FACE_METHODS) * 2
    assert len(embeddings) == 4
    summary = summary_of(two_seed_run)
    assert len(summary["summary"]) == len(FACE_METHODS) * 2
    assert len(summary["results"]) == len(FACE_METHODS) * 2 * 2
    settings = json.loads((two_seed_run / "protocol.json").read_text())["settings"]
    assert settings["seeds"] == [0, 1]


def test_evaluate_two_seeds_give_mean_std(two_seed_run: Path) -> None:
    markdown = markdown_of(two_seed_run)
    assert "mean ± std over 2 seeds" in markdown
    rows = summary_of(two_seed_run)["summary"]
    assert all(row["seeds"] == 2 for row in rows)
    probe = next(r for r in rows if r["method"] == METHOD_SIMCLR_PROBE and r["task"] == "race")
    assert probe["accuracy_std"] is not None


def test_evaluate_fairness_uses_other_attribute(two_seed_run: Path) -> None:
    markdown = markdown_of(two_seed_run)
    assert "### gender metrics within each race" in markdown
    assert "### race metrics within each gender" in markdown
    assert "Worst-group accuracy" in markdown


def test_evaluate_pretrains_and_logs_wandb(two_seed_run: Path) -> None:
    assert (two_seed_run / "checkpoints" / "pretrain-simclr-faces" / "last.ckpt").is_file()
    offline_runs = list((two_seed_run / "runs" / "wandb").glob("offline-run-*"))
    # Pretraining, 2 seeds x 2 tasks x (fine-tuning + scratch), and the summary run.
    assert len(offline_runs) == 1 + 2 * 2 * 2 + 1


@pytest.mark.parametrize("task", ["race", "gender"])
def test_majority_baseline_matches_split_counts(
    two_seed_run: Path, skewed_root: Path, task: str
) -> None:
    summary = summary_of(two_seed_run)
    for seed in (0, 1):
        datamodule = FaceDataModule(
            utkface_root=str(skewed_root), mode="finetune", task=task, seed=seed, image_size=16
        )
        datamodule.setup("fit")
        assert datamodule.index is not None
        labels = datamodule.index.race if task == "race" else datamodule.index.gender
        finetune_counts = np.bincount(labels[datamodule.rows["finetune"]])
        val_labels = labels[datamodule.rows["val"]]
        # The split keeps the cell proportions, so White (race 0) and male (gender 0) lead it.
        assert int(finetune_counts.argmax()) == 0
        expected = int((val_labels == 0).sum()) / val_labels.size
        result = next(
            r
            for r in summary["results"]
            if r["method"] == METHOD_MAJORITY and r["task"] == task and r["seed"] == seed
        )
        assert result["report"]["accuracy"] == pytest.approx(expected)
        assert result["majority_accuracy"] == pytest.approx(expected)
        assert result["warnings"] == []


def test_collapsed_probe_shows_warning(
    skewed_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def always_male(settings: Any, features: Any, task: str, num_classes: int) -> np.ndarray:
        return np.zeros(len(features.val), dtype=np.int64)

    monkeypatch.setattr(faces, "probe_predictions", always_male)
    checkpoint = save_simclr_checkpoint(tmp_path / "simclr.ckpt")
    out = tmp_path / "report"
    argv = ["evaluate", "--utkface-root", str(skewed_root), "--out", str(out)]
    status = main([*argv, "--checkpoint", str(checkpoint), "--tasks", "gender", *TINY_RUN])
    assert status == 0
    markdown = markdown_of(out)
    warnings_section = markdown.split("## Summary")[0]
    assert f"**WARNING ({METHOD_SIMCLR_PROBE}, gender, seed 0)**" in warnings_section
    assert "predictions are class 'male'" in warnings_section
    assert f"**WARNING ({METHOD_MAJORITY}" not in warnings_section


def test_probes_only_skips_the_trained_methods(
    skewed_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("--probes-only trained a classifier")

    monkeypatch.setattr(faces, "train_and_predict", no_training)
    checkpoint = save_simclr_checkpoint(tmp_path / "simclr.ckpt")
    out = tmp_path / "report"
    argv = ["evaluate", "--utkface-root", str(skewed_root), "--out", str(out), "--probes-only"]
    status = main([*argv, "--checkpoint", str(checkpoint), "--tasks", "race", *TINY_RUN])
    assert status == 0
    markdown = markdown_of(out)
    for method in (METHOD_SIMCLR_PROBE, METHOD_SIMCLR_KNN, METHOD_RANDOM_KNN, METHOD_MAJORITY):
        assert f"## {method}: race" in markdown
    for method in (METHOD_SIMCLR_FINETUNE, METHOD_SCRATCH):
        assert f"## {method}: race" not in markdown
    assert "skipped (`--probes-only`)" in markdown


# ---------------------------------------------------------------- units


def test_settings_reject_missing_utkface(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--utkface-root"):
        ProtocolSettings(out=tmp_path)


def test_settings_reject_duplicate_seeds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seeds must be distinct"):
        ProtocolSettings(out=tmp_path, utkface_root="faces", seeds=(1, 1))


def test_settings_reject_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tasks must be"):
        ProtocolSettings(out=tmp_path, utkface_root="faces", tasks=("age",))


def test_settings_reject_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        ProtocolSettings(out=tmp_path, utkface_root="faces", checkpoint=str(tmp_path / "x.ckpt"))


def test_settings_default_image_size(tmp_path: Path) -> None:
    faces = ProtocolSettings(out=tmp_path, utkface_root="faces")
    cifar = ProtocolSettings(out=tmp_path, dataset="cifar10", cifar_root="cifar")
    assert faces.size == 64
    assert cifar.size == 32


def test_recipe_warmup_epochs() -> None:
    assert SCRATCH_RECIPE.warmup_epochs(30) == pytest.approx(3.0)
    assert SCRATCH_RECIPE.warmup_epochs(5) == pytest.approx(1.0)
    assert SCRATCH_RECIPE.warmup_epochs(1) == pytest.approx(1.0)
    assert SGD_PROBE_RECIPE.warmup_epochs(30) == 0.0


def test_recipe_finetune_standardises_features() -> None:
    kwargs = FINETUNE_RECIPE.module_kwargs(3)
    # SGD on raw SimCLR features predicted one gender for every image; see FINETUNE_RECIPE.
    assert kwargs["feature_norm"] is True
    assert kwargs["optimizer"] == "adamw"
    assert kwargs["backbone_lr_ratio"] == pytest.approx(0.1)


def test_recipe_scratch_trains_every_layer() -> None:
    kwargs = SCRATCH_RECIPE.module_kwargs(10)
    assert kwargs["backbone_lr_ratio"] == 1.0
    assert kwargs["class_weights"] == "balanced"
    assert kwargs["optimizer"] == "adamw"


def test_checkpoint_architecture_conflict_raises(tmp_path: Path) -> None:
    checkpoint = save_simclr_checkpoint(tmp_path / "simclr.ckpt")
    settings = ProtocolSettings(
        out=tmp_path, utkface_root="faces", checkpoint=str(checkpoint), backbone="resnet34"
    )
    with pytest.raises(ValueError, match="contradicts the checkpoint"):
        load_simclr_backbone(checkpoint, settings)


def test_checkpoint_backbone_weights_load(tmp_path: Path) -> None:
    checkpoint = save_simclr_checkpoint(tmp_path / "simclr.ckpt")
    settings = ProtocolSettings(out=tmp_path, utkface_root="faces", checkpoint=str(checkpoint))
    backbone, architecture = load_simclr_backbone(checkpoint, settings)
    stored = torch.load(checkpoint, weights_only=False)["state_dict"]["backbone.conv1.weight"]
    assert architecture.backbone == "resnet18"
    assert torch.equal(backbone.conv1.weight, stored)


def _predictions(target: list[int], prediction: list[int], race: list[int]) -> LabeledPredictions:
    return LabeledPredictions(
        np.array(target), np.array(prediction), np.array(race), np.full(len(target), -1)
    )


def test_frozen_feature_knn_follows_the_nearest_images(tmp_path: Path) -> None:
    # Gender is the sign of the first SimCLR feature, so SimCLR kNN is always right. Each random
    # validation feature equals one training feature of the other gender, so random kNN is wrong.
    train_gender = np.array([0, 0, 0, 1, 1, 1])
    val_gender = np.array([0, 1, 1, 0])
    signs = torch.tensor([-1.0, 1.0])
    simclr = FrozenFeatures(
        torch.stack([signs[g] * torch.tensor([1.0, 0.1 * k]) for k, g in enumerate(train_gender)]),
        torch.stack([signs[g] * torch.tensor([1.0, 0.0]) for g in val_gender]),
        {"race": np.zeros(6, dtype=np.int64), "gender": train_gender},
        {"race": np.zeros(4, dtype=np.int64), "gender": val_gender},
    )
    # Each validation image sits on top of one training image of the other gender.
    random_val = torch.eye(6)[[3, 0, 1, 4]]
    random = FrozenFeatures(torch.eye(6), random_val, simclr.train_labels, simclr.val_labels)
    features = {"simclr": simclr, "random": random}
    datamodules = {"gender": SimpleNamespace(num_classes=2)}
    context = FaceSeedContext(0, "unused", None, features, datamodules)  # type: ignore[arg-type]
    settings = ProtocolSettings(out=tmp_path, utkface_root=str(tmp_path), knn_k=1)
    score = TaskScorer("gender", 0, ("male", "female"), 0.5, 1)
    results = {r.method: r for r in frozen_feature_results(settings, context, "gender", score)}
    assert results[METHOD_SIMCLR_KNN].report.accuracy == pytest.approx(1.0)
    assert results[METHOD_RANDOM_KNN].report.accuracy == pytest.approx(0.0)


def test_score_gender_groups_by_race() -> None:
    # Race 0: both correct. Race 1: one of two correct.
    predictions = _predictions([0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1])
    result = score_predictions("probe", "gender", 0, predictions, ("male", "female"), 0.5, 1)
    groups = result.fairness["race"].groups
    assert list(result.fairness) == ["race"]
    assert groups[0].accuracy == pytest.approx(1.0)
    assert groups[1].accuracy == pytest.approx(0.5)
    assert result.fairness["race"].accuracy_gap == pytest.approx(0.5)


def test_score_constant_baseline_skips_collapse() -> None:
    predictions = _predictions([0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1])
    names = ("male", "female")
    collapsed = score_predictions("probe", "gender", 0, predictions, names, 0.5, 1)
    baseline = score_predictions("majority", "gender", 0, predictions, names, 0.5, 1, True)
    assert collapsed.collapse_warnings()
    assert baseline.collapse_warnings() == []


# ---------------------------------------------------------------- CIFAR-10


def test_subset_split_caps_each_class() -> None:
    labels = np.repeat(np.arange(10), 5)
    # Every pixel of image i has the value i, so a kept image names its source row.
    arrays = np.repeat(np.arange(50, dtype=np.uint8), 4 * 4 * 3).reshape(50, 4, 4, 3)
    subset = subset_split(CIFARSplit(labels=labels, arrays=arrays), 3, 2, seed=0)
    assert subset.arrays is not None
    source_rows = subset.arrays[:, 0, 0, 0].astype(np.int64)
    assert np.bincount(subset.labels).tolist() == [2, 2, 2]
    assert subset.arrays.shape == (6, 4, 4, 3)
    assert labels[source_rows].tolist() == subset.labels.tolist()
    assert len(set(source_rows.tolist())) == 6


def build_cifar_folder(root: Path, train_per_class: int, test_per_class: int) -> Path:
    """Write a CIFAR-10 ImageFolder tree of random 16-pixel JPEGs."""
    seed = 0
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name in CIFAR10_CLASSES:
            for k in range(count):
                seed += 1
                write_image(root / split / name / f"{k:04d}.jpg", seed)
    return root


def test_cifar_protocol_runs_on_fake_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = build_cifar_folder(tmp_path / "cifar", train_per_class=6, test_per_class=3)
    out = tmp_path / "report"
    argv = ["evaluate", "--dataset", "cifar10", "--cifar-root", str(root), "--out", str(out)]
    options = ["--cifar-classes", "3", "--pretrain-epochs", "1", "--knn-k", "5", *TINY_RUN]
    assert main([*argv, *options]) == 0
    rows = summary_of(out)["summary"]
    methods = {row["method"] for row in rows}
    assert "SimCLR + kNN" in methods
    assert "random backbone + kNN" in methods
    assert METHOD_SIMCLR_PROBE in methods
    majority = next(row for row in rows if row["method"] == METHOD_MAJORITY)
    # 3 test images in each of 3 classes: always predicting one class is right 3 times of 9.
    assert majority["accuracy_mean"] == pytest.approx(1 / 3)
    assert all(row["samples"] == [9] for row in rows)
    assert (out / "embedding_simclr-cifar10.png").is_file()


@pytest.mark.slow
@pytest.mark.real_data
def test_cifar_protocol_real_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = SHARED_DATA / "cifar10-jpg"
    if not root.is_dir():
        pytest.skip(f"The CIFAR-10 samples are not at {root}.")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "report"
    argv = ["evaluate", "--dataset", "cifar10", "--cifar-root", str(root), "--out", str(out)]
    options = [
        "--cifar-classes",
        "3",
        "--cifar-train-per-class",
        "30",
        "--cifar-test-per-class",
        "15",
        "--pretrain-epochs",
        "1",
        *TINY_RUN,
    ]
    assert main([*argv, *options]) == 0
    rows = summary_of(out)["summary"]
    assert len(rows) == 5
    assert all(row["samples"] == [45] for row in rows)
    majority = next(row for row in rows if row["method"] == METHOD_MAJORITY)
    assert majority["accuracy_mean"] == pytest.approx(1 / 3)
