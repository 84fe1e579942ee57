"""Tests for FaceDataModule in pretraining and fine-tuning mode."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CelebATree, UTKFaceTree, utkface_name, write_image

from simclr_lightning.data.face_datamodule import FaceDataModule
from simclr_lightning.data.index import SOURCE_CELEBA
from simclr_lightning.data.sources import read_face_sources
from simclr_lightning.data.splits import unique_by_hash
from simclr_lightning.data.transforms import SimCLRAugmentation

LABELED_KEYS = {"image", "target", "race", "gender", "index"}


def _module(**overrides: Any) -> FaceDataModule:
    arguments: dict[str, Any] = {
        "image_size": 16,
        "batch_size": 4,
        "num_workers": 0,
        "augmentation": SimCLRAugmentation(image_size=16),
        "pin_memory": False,
    }
    arguments.update(overrides)
    return FaceDataModule(**arguments)


@pytest.fixture
def all_roots(
    utkface_tree: UTKFaceTree, ffhq_tree: Path, celeba_tree: CelebATree
) -> dict[str, str]:
    return {
        "utkface_root": str(utkface_tree.root),
        "ffhq_root": str(ffhq_tree),
        "celeba_root": str(celeba_tree.root),
    }


def test_pretrain_pool_merges_and_deduplicates(
    all_roots: dict[str, str], utkface_tree: UTKFaceTree
) -> None:
    module = _module(**all_roots)
    module.setup("fit")

    # UTKFace has one byte-identical copy; FFHQ adds 6 images and CelebA 4 identities.
    expected_pool = utkface_tree.indexed - 1 + 6 + 4
    assert module.rows["pretrain"].size == expected_pool
    assert module.report is not None
    assert module.report.duplicates_removed == 1
    assert module.report.indexed == {"utkface": utkface_tree.indexed, "ffhq": 6, "celeba": 4}


def test_pretrain_train_batch_format(all_roots: dict[str, str]) -> None:
    module = _module(**all_roots)
    module.setup("fit")
    loader = module.train_dataloader()

    batch = next(iter(loader))

    assert len(loader) == module.rows["pretrain"].size // 4
    assert len(batch["views"]) == 2
    assert batch["views"][0].shape == (4, 3, 16, 16)
    assert batch["views"][1].shape == (4, 3, 16, 16)
    assert batch["target"].dtype == torch.int64
    assert batch["target"].shape == (4,)


def test_pretrain_val_loaders_bank_and_query(all_roots: dict[str, str]) -> None:
    module = _module(**all_roots)
    module.setup("fit")

    loaders = module.val_dataloader()
    batch = next(iter(loaders[1]))

    assert isinstance(loaders, list)
    assert len(loaders) == 2
    assert len(loaders[0].dataset) == module.rows["finetune"].size  # type: ignore[arg-type]
    assert len(loaders[1].dataset) == module.rows["val"].size  # type: ignore[arg-type]
    assert set(batch) == LABELED_KEYS
    assert batch["image"].shape == (4, 3, 16, 16)
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_pretrain_online_eval_cap(all_roots: dict[str, str]) -> None:
    module = _module(**all_roots, online_eval_max_images=5)
    module.setup("fit")

    assert module.rows["bank"].size == 5
    assert module.rows["query"].size == 5
    assert np.isin(module.rows["bank"], module.rows["finetune"]).all()


def test_pretrain_online_eval_off(all_roots: dict[str, str]) -> None:
    module = _module(**all_roots, online_eval=False)
    module.setup("fit")

    assert module.val_dataloader() == []


def test_pretrain_without_labels_has_no_val(ffhq_tree: Path) -> None:
    module = _module(ffhq_root=str(ffhq_tree))
    module.setup("fit")

    assert module.val_dataloader() == []
    assert module.report is not None
    assert "No labeled images, so online evaluation is off." in module.report.notes


def test_pretrain_pool_excludes_test_images(all_roots: dict[str, str]) -> None:
    module = _module(**all_roots, val_fraction=0.4, test_fraction=0.3)
    module.setup("fit")
    index = module.index
    assert index is not None

    pool_hashes = set(index.content_hash[module.rows["pretrain"]].tolist())
    test_hashes = set(index.content_hash[module.rows["test"]].tolist())
    assert module.rows["test"].size > 0
    assert not pool_hashes & test_hashes


def test_pretrain_batch_larger_than_pool(ffhq_tree: Path) -> None:
    module = _module(ffhq_root=str(ffhq_tree), batch_size=64)
    module.setup("fit")

    with pytest.raises(ValueError, match="fewer than batch_size=64"):
        module.train_dataloader()


def test_finetune_race_mode(utkface_tree: UTKFaceTree) -> None:
    module = _module(utkface_root=str(utkface_tree.root), mode="finetune")
    module.setup("fit")

    batch = next(iter(module.train_dataloader()))
    split_sizes = module.rows["finetune"].size + module.rows["val"].size

    assert module.num_classes == 5
    assert module.class_names == ["White", "Black", "Asian", "Indian", "Others"]
    assert set(batch) == LABELED_KEYS
    assert split_sizes == utkface_tree.labeled
    assert "pretrain" not in module.rows


def test_finetune_train_targets(utkface_tree: UTKFaceTree) -> None:
    module = _module(utkface_root=str(utkface_tree.root), mode="finetune")

    targets = module.train_targets()
    index = module.index
    assert index is not None

    assert targets.dtype == np.int64
    assert targets.tolist() == index.race[module.rows["finetune"]].tolist()
    assert set(targets.tolist()) == {0, 1, 2, 3, 4}


def test_finetune_gender_with_celeba(
    utkface_tree: UTKFaceTree, celeba_tree: CelebATree, ffhq_tree: Path
) -> None:
    module = _module(
        utkface_root=str(utkface_tree.root),
        celeba_root=str(celeba_tree.root),
        ffhq_root=str(ffhq_tree),
        mode="finetune",
        task="gender",
        celeba_gender_labels=True,
    )
    module.setup("fit")
    index = module.index
    assert index is not None

    labeled = np.concatenate([module.rows["finetune"], module.rows["val"]])
    assert module.num_classes == 2
    assert module.class_names == ["male", "female"]
    assert int((index.source[labeled] == SOURCE_CELEBA).sum()) == 4
    assert module.report is not None
    assert module.report.indexed["ffhq"] == 0


def test_finetune_excludes_conflicting_duplicates(utkface_tree: UTKFaceTree) -> None:
    # Seed 6 is the second White/female image; its copy claims to be male.
    source = utkface_tree.folder / utkface_name(21, 1, 0, 6)
    conflict = utkface_tree.folder / utkface_name(21, 0, 0, 777)
    conflict.write_bytes(source.read_bytes())
    module = _module(utkface_root=str(utkface_tree.root), mode="finetune")
    module.setup("fit")

    split_sizes = module.rows["finetune"].size + module.rows["val"].size
    assert split_sizes == utkface_tree.labeled - 1
    assert module.report is not None
    assert module.report.skipped["utkface"].count("duplicate_label_conflict") == 2


def test_finetune_test_split_and_predict(utkface_tree: UTKFaceTree) -> None:
    module = _module(
        utkface_root=str(utkface_tree.root), mode="finetune", val_fraction=0.4, test_fraction=0.3
    )
    module.setup("fit")

    test_batch = next(iter(module.test_dataloader()))

    assert set(test_batch) == LABELED_KEYS
    assert len(module.predict_dataloader().dataset) == module.rows["test"].size  # type: ignore[arg-type]


def test_finetune_without_test_split_error(utkface_tree: UTKFaceTree) -> None:
    module = _module(utkface_root=str(utkface_tree.root), mode="finetune")
    module.setup("test")

    with pytest.raises(ValueError, match="no test split because test_fraction is 0"):
        module.test_dataloader()


def test_setup_is_deterministic(utkface_tree: UTKFaceTree) -> None:
    first = _module(utkface_root=str(utkface_tree.root), mode="finetune", seed=5)
    second = _module(utkface_root=str(utkface_tree.root), mode="finetune", seed=5)
    first.setup("fit")
    rows_before = first.rows["finetune"].copy()
    first.setup("validate")
    second.setup("fit")

    assert np.array_equal(first.rows["finetune"], rows_before)
    assert np.array_equal(first.rows["finetune"], second.rows["finetune"])
    assert np.array_equal(first.rows["val"], second.rows["val"])


def test_hyperparameters_saved(utkface_tree: UTKFaceTree) -> None:
    module = _module(utkface_root=str(utkface_tree.root), test_fraction=0.0)

    assert module.hparams["image_size"] == 16
    assert module.hparams["utkface_root"] == str(utkface_tree.root)
    assert module.batch_size == 4
    assert module.task == "race"
    assert module.mode == "pretrain"


def test_no_root_error() -> None:
    with pytest.raises(ValueError, match="No dataset root given"):
        _module()


def test_finetune_without_labeled_source_error(ffhq_tree: Path) -> None:
    with pytest.raises(ValueError, match="Fine-tuning needs labeled images"):
        _module(ffhq_root=str(ffhq_tree), mode="finetune")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "train"}, "mode must be 'pretrain' or 'finetune'"),
        ({"task": "age"}, "task must be 'race' or 'gender'"),
        ({"image_size": 4}, "image_size must be an integer of at least 8"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"test_fraction": 0.2}, "must be at most 1"),
        ({"online_eval_max_images": 0}, "online_eval_max_images must be at least 1"),
    ],
)
def test_invalid_arguments(ffhq_tree: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _module(ffhq_root=str(ffhq_tree), **overrides)


def test_dataloader_before_setup_error(ffhq_tree: Path) -> None:
    with pytest.raises(RuntimeError, match="setup"):
        _module(ffhq_root=str(ffhq_tree)).train_dataloader()


def test_missing_folder_error_at_setup(tmp_path: Path) -> None:
    module = _module(utkface_root=str(tmp_path / "absent"))

    with pytest.raises(FileNotFoundError, match="UTKFace root"):
        module.setup("fit")


def _prepare(roots: dict[str, str], out_dir: Path, image_size: int) -> None:
    from simclr_lightning.data.cache import prepare_cache

    merged, _ = read_face_sources(roots["utkface_root"], roots["ffhq_root"], roots["celeba_root"])
    index = merged.subset(unique_by_hash(merged.content_hash))
    prepare_cache(index, out_dir, image_size, num_workers=0, progress=False)


def test_cache_pixels_match_files(
    all_roots: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _prepare(all_roots, tmp_path / "cache", 16)
    from_files = _module(**all_roots)
    from_cache = _module(**all_roots, cache_dir=str(tmp_path / "cache"))

    with caplog.at_level(logging.INFO):
        from_files.setup("predict")
        from_cache.setup("predict")
    file_batch = next(iter(from_files.predict_dataloader()))
    cache_batch = next(iter(from_cache.predict_dataloader()))

    assert "from the prepared cache" in caplog.text
    assert torch.equal(file_batch["image"], cache_batch["image"])


def test_cache_of_other_size_falls_back(
    all_roots: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _prepare(all_roots, tmp_path / "cache", 8)
    module = _module(**all_roots, cache_dir=str(tmp_path / "cache"))

    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="8 px"):
        module.setup("fit")

    assert next(iter(module.train_dataloader()))["views"][0].shape == (4, 3, 16, 16)


def test_cache_missing_images_falls_back(
    all_roots: dict[str, str], tmp_path: Path, utkface_tree: UTKFaceTree
) -> None:
    _prepare(all_roots, tmp_path / "cache", 16)
    write_image(utkface_tree.folder / "50_1_2_20170101000000555.jpg.chip.jpg", 4242)
    module = _module(**all_roots, cache_dir=str(tmp_path / "cache"))

    with pytest.warns(UserWarning, match="it lacks 1 of the"):
        module.setup("fit")


def test_absent_cache_falls_back(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    module = _module(utkface_root=str(utkface_tree.root), cache_dir=str(tmp_path / "nothing"))

    with pytest.warns(UserWarning, match="Not using the prepared cache"):
        module.setup("fit")

    assert module.rows["pretrain"].size == utkface_tree.indexed - 1


@pytest.mark.real_data
def test_real_samples_finetune_splits_keep_every_class(shared_data: Path) -> None:
    module = _module(
        utkface_root=str(shared_data / "utkface"),
        mode="finetune",
        val_fraction=0.5,
        test_fraction=0.2,
    )
    module.setup("fit")
    index = module.index
    assert index is not None

    for name in ("finetune", "val", "test"):
        rows = module.rows[name]
        assert set(index.race[rows].tolist()) == {0, 1, 2, 3, 4}, name
        assert set(index.gender[rows].tolist()) == {0, 1}, name


@pytest.mark.real_data
def test_real_samples_pretrain_pool(shared_data: Path) -> None:
    module = _module(
        utkface_root=str(shared_data / "utkface"),
        ffhq_root=str(shared_data / "ffhq"),
        celeba_root=str(shared_data / "celeba"),
    )
    module.setup("fit")
    assert module.report is not None

    assert module.report.indexed == {"utkface": 3001, "ffhq": 113, "celeba": 200}
    pool = module.rows["pretrain"]
    assert pool.size == 3001 + 113 + 200 - module.report.duplicates_removed
    assert len(module.val_dataloader()) == 2
