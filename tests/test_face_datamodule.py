"""Tests for FaceDataModule in pretraining and fine-tuning mode."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import CelebATree, InspectCounter, UTKFaceTree, utkface_name, write_image

from simclr_lightning.data.face_datamodule import FaceDataModule
from simclr_lightning.data.index import SOURCE_CELEBA
from simclr_lightning.data.sources import read_face_sources
from simclr_lightning.data.splits import unique_by_hash
from simclr_lightning.data.transforms import SimCLRAugmentation
from simclr_lightning.models.simclr import SimCLRModule

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


def test_augmentation_takes_the_image_size(ffhq_tree: Path) -> None:
    dm = _module(
        ffhq_root=str(ffhq_tree), image_size=48, augmentation=SimCLRAugmentation(cj_hue=0.0)
    )
    assert dm.augmentation.image_size == 48
    assert dm.augmentation.cj_hue == 0.0
    dm.setup("fit")
    views = next(iter(dm.train_dataloader()))["views"]
    assert views[0].shape[-2:] == (48, 48)


def test_augmentation_of_another_size_error(ffhq_tree: Path) -> None:
    with pytest.raises(ValueError, match="augmentation.image_size is 128 but the datamodule's"):
        _module(ffhq_root=str(ffhq_tree), image_size=64, augmentation=SimCLRAugmentation(128))


def test_dataloader_before_setup_error(ffhq_tree: Path) -> None:
    with pytest.raises(RuntimeError, match="setup"):
        _module(ffhq_root=str(ffhq_tree)).train_dataloader()


def test_missing_folder_error_at_setup(tmp_path: Path) -> None:
    module = _module(utkface_root=str(tmp_path / "absent"))

    with pytest.raises(FileNotFoundError, match="UTKFace root"):
        module.setup("fit")


# ---------------------------------------------------------------------------------------------
# Index file
# ---------------------------------------------------------------------------------------------


def _index_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("face_index-*"))


def test_prepare_data_writes_index_once(
    all_roots: dict[str, str], tmp_path: Path, inspect_counter: InspectCounter
) -> None:
    store = tmp_path / "store"
    _module(**all_roots, index_dir=str(store)).prepare_data()
    calls_to_build = inspect_counter.calls
    _module(**all_roots, index_dir=str(store)).prepare_data()

    assert calls_to_build > 0
    assert inspect_counter.calls == calls_to_build
    assert len(_index_files(store)) == 2
    assert _index_files(store)[0].endswith(".json")
    assert _index_files(store)[1].endswith(".npz")


def test_setup_after_prepare_decodes_nothing(
    all_roots: dict[str, str],
    tmp_path: Path,
    inspect_counter: InspectCounter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _module(**all_roots, index_dir=str(tmp_path / "store")).prepare_data()
    calls_after_prepare = inspect_counter.calls
    module = _module(**all_roots, index_dir=str(tmp_path / "store"))

    with caplog.at_level(logging.INFO):
        module.setup("fit")

    assert inspect_counter.calls == calls_after_prepare
    assert "Read the face index" in caplog.text
    assert module.rows["pretrain"].size > 0


def test_setup_builds_missing_index(
    utkface_tree: UTKFaceTree, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = _module(utkface_root=str(utkface_tree.root), index_dir=str(tmp_path / "store"))

    with caplog.at_level(logging.INFO):
        module.setup("fit")

    assert "No face index file" in caplog.text
    assert "Built the face index" in caplog.text
    assert len(_index_files(tmp_path / "store")) == 2


def test_default_index_dir_next_to_root(utkface_tree: UTKFaceTree) -> None:
    _module(utkface_root=str(utkface_tree.root)).prepare_data()

    # utkface_tree.root is tmp_path / "utkface", so its parent is tmp_path.
    folder = utkface_tree.root.parent / "simclr-lightning-index"
    assert len(_index_files(folder)) == 2


def _change_utkface(utkface_tree: UTKFaceTree, change: str) -> None:
    target = utkface_tree.folder / utkface_name(22, 1, 2, 23)
    if change == "add":
        write_image(utkface_tree.folder / utkface_name(70, 1, 3, 888), 888)
    elif change == "remove":
        target.unlink()
    else:
        # Same size, new bytes: only the new modification time changes the listing fingerprint.
        stat = target.stat()
        target.write_bytes(bytes(reversed(target.read_bytes())))
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("change", ["add", "remove", "rewrite"])
def test_index_rebuilt_after_file_change(
    utkface_tree: UTKFaceTree, tmp_path: Path, inspect_counter: InspectCounter, change: str
) -> None:
    store = tmp_path / "store"
    first = _module(utkface_root=str(utkface_tree.root), index_dir=str(store))
    first.setup("fit")
    calls_before = inspect_counter.calls
    first_files = _index_files(store)

    _change_utkface(utkface_tree, change)
    second = _module(utkface_root=str(utkface_tree.root), index_dir=str(store))
    second.setup("fit")
    assert first.index is not None
    assert second.index is not None

    assert inspect_counter.calls > calls_before
    # The new listing's file replaces the old one of the same roots and options.
    second_files = _index_files(store)
    assert len(second_files) == 2
    assert not set(second_files) & set(first_files)
    expected_rows = {"add": 1, "remove": -1, "rewrite": -1}[change]
    # The reversed bytes are no longer a JPEG, so the rewritten file is left out.
    assert len(second.index) == len(first.index) + expected_rows


@pytest.mark.parametrize(
    "options",
    [
        {"celeba_one_per_identity": False},
        {"seed": 3},
        {"celeba_partition": "train"},
        {"task": "gender", "celeba_gender_labels": True},
    ],
)
def test_index_rebuilt_after_option_change(
    celeba_tree: CelebATree,
    tmp_path: Path,
    inspect_counter: InspectCounter,
    options: dict[str, Any],
) -> None:
    store = str(tmp_path / "store")
    _module(celeba_root=str(celeba_tree.root), index_dir=store).prepare_data()
    calls_before = inspect_counter.calls

    _module(celeba_root=str(celeba_tree.root), index_dir=store, **options).prepare_data()

    assert inspect_counter.calls > calls_before
    assert len(_index_files(tmp_path / "store")) == 4


def test_index_kept_after_split_option_change(
    utkface_tree: UTKFaceTree, tmp_path: Path, inspect_counter: InspectCounter
) -> None:
    store = str(tmp_path / "store")
    _module(utkface_root=str(utkface_tree.root), index_dir=store).prepare_data()
    calls_before = inspect_counter.calls

    # The seed and the fractions change the split, not the index of a UTKFace-only request.
    changed = _module(
        utkface_root=str(utkface_tree.root), index_dir=store, seed=4, val_fraction=0.5
    )
    changed.setup("fit")

    assert inspect_counter.calls == calls_before
    assert len(_index_files(tmp_path / "store")) == 2


def test_index_rebuilt_when_deleted(
    utkface_tree: UTKFaceTree, tmp_path: Path, inspect_counter: InspectCounter
) -> None:
    store = tmp_path / "store"
    _module(utkface_root=str(utkface_tree.root), index_dir=str(store)).prepare_data()
    calls_before = inspect_counter.calls
    for path in store.glob("face_index-*"):
        path.unlink()

    module = _module(utkface_root=str(utkface_tree.root), index_dir=str(store))
    module.setup("fit")

    assert inspect_counter.calls == 2 * calls_before
    assert len(_index_files(store)) == 2


def test_loaded_index_gives_identical_splits(all_roots: dict[str, str], tmp_path: Path) -> None:
    options: dict[str, Any] = {"val_fraction": 0.4, "test_fraction": 0.3, "seed": 2}
    built = _module(**all_roots, index_dir=str(tmp_path / "store"), **options)
    built.setup("fit")
    loaded = _module(**all_roots, index_dir=str(tmp_path / "store"), **options)
    loaded.setup("fit")
    assert built.report is not None
    assert loaded.report is not None

    assert set(loaded.rows) == set(built.rows)
    for name, rows in built.rows.items():
        assert np.array_equal(loaded.rows[name], rows), name
    assert loaded.report.to_dict() == built.report.to_dict()


def _prepare_with_cli(roots: dict[str, str], out_dir: Path) -> None:
    """Build a 16-pixel cache of ``roots`` with ``simclr-lightning prepare``."""
    from simclr_lightning.data.cache import prepare_main

    arguments = ["--out", str(out_dir), "--image-size", "16", "--workers", "0", "--no-progress"]
    for name, root in roots.items():
        arguments += ["--" + name.replace("_", "-"), root]
    assert prepare_main(arguments) == 0


def test_setup_takes_index_from_matching_cache(
    all_roots: dict[str, str], tmp_path: Path, inspect_counter: InspectCounter
) -> None:
    _prepare_with_cli(all_roots, tmp_path / "cache")
    calls_before = inspect_counter.calls

    module = _module(
        **all_roots, index_dir=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache")
    )
    module.setup("fit")

    assert inspect_counter.calls == calls_before
    assert not (tmp_path / "store").exists()
    assert module.report is not None
    # The index keeps the UTKFace copy, and the pool drops it as it does without a cache.
    assert module.report.duplicates_removed == 1
    assert any("prepared cache" in note for note in module.report.notes)


def test_cache_splits_match_file_splits(
    all_roots: dict[str, str], utkface_tree: UTKFaceTree, tmp_path: Path
) -> None:
    # A copy with other labels puts a conflicting pair next to the equal-label pair of the tree.
    conflict_copy = utkface_tree.folder / utkface_name(21, 0, 3, 998)
    conflict_copy.write_bytes((utkface_tree.folder / utkface_name(21, 1, 2, 22)).read_bytes())
    options: dict[str, Any] = {"val_fraction": 0.5, "test_fraction": 0.2}
    _prepare_with_cli(all_roots, tmp_path / "cache")

    from_files = _module(**all_roots, index_dir=str(tmp_path / "files"), **options)
    from_files.setup("fit")
    from_cache = _module(**all_roots, cache_dir=str(tmp_path / "cache"), **options)
    from_cache.setup("fit")
    finetune = _module(
        utkface_root=all_roots["utkface_root"],
        mode="finetune",
        index_dir=str(tmp_path / "files"),
        **options,
    )
    finetune.setup("fit")
    assert from_files.index is not None
    assert from_cache.index is not None
    assert finetune.index is not None

    assert from_cache.index.paths.tolist() == from_files.index.paths.tolist()
    assert set(from_cache.rows) == set(from_files.rows)
    for name, rows in from_files.rows.items():
        assert np.array_equal(from_cache.rows[name], rows), name
    test_hashes = set(finetune.index.content_hash[finetune.rows["test"]].tolist())
    pool_hashes = set(from_cache.index.content_hash[from_cache.rows["pretrain"]].tolist())
    assert test_hashes
    assert not test_hashes & pool_hashes
    for first, second in (("finetune", "val"), ("finetune", "test"), ("val", "test")):
        first_hashes = set(from_cache.index.content_hash[from_cache.rows[first]].tolist())
        second_hashes = set(from_cache.index.content_hash[from_cache.rows[second]].tolist())
        assert not first_hashes & second_hashes, (first, second)


# ---------------------------------------------------------------------------------------------
# Device augmentation
# ---------------------------------------------------------------------------------------------


def test_augment_on_device_batch_format(all_roots: dict[str, str], tmp_path: Path) -> None:
    module = _module(**all_roots, index_dir=str(tmp_path / "store"), augment_on_device=True)
    module.setup("fit")

    batch = next(iter(module.train_dataloader()))

    assert set(batch) == {"image", "target"}
    assert batch["image"].dtype == torch.uint8
    assert batch["image"].shape == (4, 3, 16, 16)
    assert batch["target"].dtype == torch.int64
    assert batch["target"].shape == (4,)
    assert module.augmentation == SimCLRAugmentation(image_size=16)


def test_augment_on_device_pixels_match_cache(all_roots: dict[str, str], tmp_path: Path) -> None:
    from simclr_lightning.data.cache import PreparedCache

    _prepare(all_roots, tmp_path / "cache", 16)
    module = _module(
        **all_roots,
        index_dir=str(tmp_path / "store"),
        cache_dir=str(tmp_path / "cache"),
        augment_on_device=True,
    )
    module.setup("fit")
    index = module.index
    assert index is not None

    dataset = module.train_dataloader().dataset
    first_row = int(module.rows["pretrain"][0])
    cache = PreparedCache.open(tmp_path / "cache")
    cache_row = int(np.flatnonzero(cache.index.content_hash == index.content_hash[first_row])[0])
    item = dataset[0]

    expected = torch.from_numpy(np.array(cache.images[cache_row])).permute(2, 0, 1)
    assert torch.equal(item["image"], expected)
    assert int(item["target"]) == int(index.race[first_row])


def test_augment_on_device_keeps_val_loaders(all_roots: dict[str, str], tmp_path: Path) -> None:
    module = _module(**all_roots, index_dir=str(tmp_path / "store"), augment_on_device=True)
    module.setup("fit")
    loaders = module.val_dataloader()
    assert isinstance(loaders, list)

    batch = next(iter(loaders[0]))

    assert set(batch) == LABELED_KEYS
    assert batch["image"].dtype == torch.float32


def test_augment_on_device_trains_one_step(all_roots: dict[str, str], tmp_path: Path) -> None:
    pl.seed_everything(0)
    data = _module(
        **all_roots, index_dir=str(tmp_path / "store"), augment_on_device=True, online_eval=False
    )
    model = SimCLRModule(
        backbone="resnet18",
        small_stem=True,
        gpu_augment=True,
        num_classes=0,
        warmup_steps=1,
    )
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )

    trainer.fit(model, datamodule=data)

    assert trainer.global_step == 1
    assert model.batch_augment is not None
    assert model.batch_augment.augmentation == data.augmentation
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_augment_on_device_needs_gpu_augment(all_roots: dict[str, str], tmp_path: Path) -> None:
    data = _module(
        **all_roots, index_dir=str(tmp_path / "store"), augment_on_device=True, online_eval=False
    )
    model = SimCLRModule(backbone="resnet18", small_stem=True, num_classes=0)
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )

    with pytest.raises(ValueError, match="gpu_augment=False"):
        trainer.fit(model, datamodule=data)


def test_augment_on_device_ignored_in_finetune(utkface_tree: UTKFaceTree) -> None:
    with pytest.warns(UserWarning, match="ignored in fine-tuning mode"):
        module = _module(
            utkface_root=str(utkface_tree.root), mode="finetune", augment_on_device=True
        )
    module.setup("fit")

    batch = next(iter(module.train_dataloader()))

    assert module.augment_on_device is False
    assert batch["image"].dtype == torch.float32


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
def test_real_samples_finetune_splits_keep_every_class(shared_data: Path, tmp_path: Path) -> None:
    module = _module(
        utkface_root=str(shared_data / "utkface"),
        index_dir=str(tmp_path),
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
def test_real_samples_pretrain_pool(shared_data: Path, tmp_path: Path) -> None:
    module = _module(
        utkface_root=str(shared_data / "utkface"),
        ffhq_root=str(shared_data / "ffhq"),
        celeba_root=str(shared_data / "celeba"),
        index_dir=str(tmp_path),
    )
    module.setup("fit")
    assert module.report is not None

    assert module.report.indexed == {"utkface": 3001, "ffhq": 113, "celeba": 200}
    pool = module.rows["pretrain"]
    assert pool.size == 3001 + 113 + 200 - module.report.duplicates_removed
    assert len(module.val_dataloader()) == 2


@pytest.mark.real_data
def test_real_samples_warm_setup_decodes_nothing(
    shared_data: Path, tmp_path: Path, inspect_counter: InspectCounter
) -> None:
    roots = {
        "utkface_root": str(shared_data / "utkface"),
        "ffhq_root": str(shared_data / "ffhq"),
        "celeba_root": str(shared_data / "celeba"),
        "index_dir": str(tmp_path),
    }
    cold = _module(**roots)
    cold.prepare_data()
    cold.setup("fit")
    calls_to_build = inspect_counter.calls
    warm = _module(**roots)
    warm.setup("fit")

    # One decode per UTKFace and FFHQ file, and per chosen CelebA image (200 identities).
    assert calls_to_build == 3001 + 113 + 200
    assert inspect_counter.calls == calls_to_build
    for name, rows in cold.rows.items():
        assert np.array_equal(warm.rows[name], rows), name
