"""Tests for the CIFAR-10 readers and CIFAR10DataModule, on fake data written in tmp_path."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_lightning.data import cifar
from simclr_lightning.data.cifar import (
    CIFAR10_CLASSES,
    CIFAR10DataModule,
    detect_layout,
    read_folder_split,
    read_pickle_split,
    stratified_subset,
)

REAL_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg"
PER_CLASS_PER_BATCH = 2  # 5 train batches -> 100 train images, test batch -> 20 test images


def _fake_batch(start: int, count: int) -> dict[str, object]:
    """Build a batch whose image i has red = (y * 32 + x) % 256, green = start + i, blue = 7."""
    red = np.arange(1024) % 256
    data = np.empty((count, 3072), dtype=np.uint8)
    for i in range(count):
        data[i, :1024] = red
        data[i, 1024:2048] = (start + i) % 256
        data[i, 2048:] = 7
    labels = [i % 10 for i in range(count)]
    return {"batch_label": "fake", "data": data, "labels": labels}


def _write_pickle_release(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    count = 10 * PER_CLASS_PER_BATCH
    for b, name in enumerate(cifar.TRAIN_BATCHES):
        with (folder / name).open("wb") as file:
            pickle.dump(_fake_batch(b * count, count), file, protocol=2)
    with (folder / "test_batch").open("wb") as file:
        pickle.dump(_fake_batch(200, count), file, protocol=2)
    with (folder / "batches.meta").open("wb") as file:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_vis": 3072}, file, protocol=2)
    return folder


def _write_image_folder(root: Path, train_per_class: int = 3, test_per_class: int = 2) -> Path:
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CIFAR10_CLASSES):
            class_dir = root / split / name
            class_dir.mkdir(parents=True)
            for k in range(per_class):
                pixels = np.full((32, 32, 3), label * 20 + k, dtype=np.uint8)
                suffix = ".png" if k % 2 == 0 else ".jpg"
                Image.fromarray(pixels).save(class_dir / f"{k:04d}{suffix}")
    return root


@pytest.fixture()
def pickle_root(tmp_path: Path) -> Path:
    _write_pickle_release(tmp_path)
    return tmp_path


def _module(root: Path, **kwargs: object) -> CIFAR10DataModule:
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("num_workers", 0)
    dm = CIFAR10DataModule(str(root), **kwargs)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def test_detect_layout_pickle_release(pickle_root: Path) -> None:
    layout, folder = detect_layout(pickle_root)
    assert layout == "pickle"
    assert folder == pickle_root / "cifar-10-batches-py"


def test_detect_layout_batches_folder_itself(pickle_root: Path) -> None:
    layout, folder = detect_layout(pickle_root / "cifar-10-batches-py")
    assert layout == "pickle"
    assert folder == pickle_root / "cifar-10-batches-py"


def test_detect_layout_image_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    assert detect_layout(tmp_path) == ("folder", tmp_path)


def test_detect_layout_archive_not_extracted(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not really gzip")
    with pytest.raises(FileNotFoundError, match="not the extracted folder cifar-10-batches-py"):
        detect_layout(tmp_path)


def test_detect_layout_wrong_folder_lists_entries(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="found: notes.txt, photos"):
        detect_layout(tmp_path)


def test_detect_layout_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_layout(tmp_path / "absent")


def test_read_pickle_split_channels_last(pickle_root: Path) -> None:
    split = read_pickle_split(pickle_root / "cifar-10-batches-py", train=True)
    assert split.arrays is not None
    assert split.arrays.shape == (100, 32, 32, 3)
    # At y=3, x=5 the red plane is (3 * 32 + 5) % 256 = 101, and green is the image number.
    assert split.arrays[42, 3, 5, 0] == 101
    assert split.arrays[42, 3, 5, 1] == 42
    assert split.arrays[42, 3, 5, 2] == 7
    assert split.labels[42] == 2


def test_read_pickle_split_test_batch(pickle_root: Path) -> None:
    split = read_pickle_split(pickle_root / "cifar-10-batches-py", train=False)
    assert len(split) == 20
    assert split.load(0).getpixel((0, 0)) == (0, 200, 7)


def test_read_pickle_split_missing_batch(pickle_root: Path) -> None:
    (pickle_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        read_pickle_split(pickle_root / "cifar-10-batches-py", train=True)


def test_read_pickle_split_wrong_label_names(pickle_root: Path) -> None:
    meta = pickle_root / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": ["a", "b"]}, protocol=2))
    with pytest.raises(ValueError, match="expected the CIFAR-10 classes"):
        read_pickle_split(pickle_root / "cifar-10-batches-py", train=True)


def test_read_pickle_split_wrong_shape(pickle_root: Path) -> None:
    bad = {"data": np.zeros((4, 100), dtype=np.uint8), "labels": [0, 1, 2, 3]}
    (pickle_root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match=r"expected uint8 of shape \(N, 3072\)"):
        read_pickle_split(pickle_root / "cifar-10-batches-py", train=False)


class _CallsGetcwd:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (os.getcwd, ())


def test_read_pickle_split_rejects_foreign_global(pickle_root: Path) -> None:
    payload = {"data": _CallsGetcwd(), "labels": [0]}
    (pickle_root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(payload))
    with pytest.raises(pickle.UnpicklingError, match="not part of the CIFAR-10 format"):
        read_pickle_split(pickle_root / "cifar-10-batches-py", train=False)


def test_read_pickle_split_newest_protocol(pickle_root: Path) -> None:
    batch = _fake_batch(0, 20)
    with (pickle_root / "cifar-10-batches-py" / "test_batch").open("wb") as file:
        pickle.dump(batch, file, protocol=pickle.HIGHEST_PROTOCOL)
    split = read_pickle_split(pickle_root / "cifar-10-batches-py", train=False)
    assert split.arrays is not None
    assert split.arrays[19, 0, 0, 1] == 19


def test_read_folder_split_labels_follow_class_order(tmp_path: Path) -> None:
    _write_image_folder(tmp_path)
    (tmp_path / "train" / "cat" / "README.txt").write_text("not an image")
    split = read_folder_split(tmp_path / "train")
    assert len(split) == 30
    assert split.labels.tolist() == [label for label in range(10) for _ in range(3)]
    # Class "bird" (label 2), file 0001.jpg has the value 2 * 20 + 1 = 41 (JPEG may shift by 1).
    pixel = split.load(7).getpixel((16, 16))
    assert abs(pixel[0] - 41) <= 2


def test_read_folder_split_unknown_class(tmp_path: Path) -> None:
    _write_image_folder(tmp_path)
    (tmp_path / "train" / "truck").rename(tmp_path / "train" / "lorry")
    with pytest.raises(ValueError, match=r"class folders \[.*'lorry'"):
        read_folder_split(tmp_path / "train")


def test_stratified_subset_equal_classes() -> None:
    labels = np.repeat(np.arange(10), 30)
    rows = stratified_subset(labels, 30, seed=0)
    assert len(rows) == 30
    assert np.bincount(labels[rows], minlength=10).tolist() == [3] * 10


def test_stratified_subset_largest_remainder() -> None:
    # Shares of 4 rows: class 0 gets 6*4/9 = 2.67, class 1 gets 3*4/9 = 1.33, so 3 and 1.
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    rows = stratified_subset(labels, 4, seed=3)
    assert np.bincount(labels[rows]).tolist() == [3, 1]


def test_stratified_subset_seeded() -> None:
    labels = np.repeat(np.arange(5), 40)
    first = stratified_subset(labels, 50, seed=1)
    assert np.array_equal(first, stratified_subset(labels, 50, seed=1))
    assert not np.array_equal(first, stratified_subset(labels, 50, seed=2))


def test_stratified_subset_all_rows_when_count_large() -> None:
    labels = np.array([1, 0, 1])
    assert stratified_subset(labels, 10, seed=0).tolist() == [0, 1, 2]


def test_datamodule_attributes_after_init(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(str(tmp_path), batch_size=16, num_workers=0)
    assert dm.num_classes == 10
    assert dm.class_names[0] == "airplane"
    assert dm.task == "cifar10"
    assert dm.mode == "pretrain"
    assert dm.batch_size == 16
    assert dm.hparams.batch_size == 16
    assert dm.augmentation.blur_prob == 0.0
    assert dm.augmentation.cj_strength == 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "finetune"}, "mode must be 'pretrain' or 'classify'"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"train_fraction": 0.0}, r"train_fraction must be in \(0, 1\]"),
        ({"num_workers": -1}, "num_workers must be 0 or more"),
        ({"online_eval_max_images": 0}, "online_eval_max_images must be at least 1"),
        (
            {"image_size": 64},
            "augmentation.image_size is 32 but the datamodule's image_size is 64",
        ),
    ],
)
def test_datamodule_rejects_invalid_arguments(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    if "image_size" in kwargs:
        kwargs = {**kwargs, "augmentation": cifar.SimCLRAugmentation.cifar10(32)}
    with pytest.raises(ValueError, match=message):
        CIFAR10DataModule(str(tmp_path), **kwargs)  # type: ignore[arg-type]


def test_datamodule_pretrain_batch_format(pickle_root: Path) -> None:
    dm = _module(pickle_root)
    batch = next(iter(dm.train_dataloader()))
    views = batch["views"]
    assert len(views) == 2
    assert views[0].shape == (8, 3, 32, 32)
    assert views[1].shape == (8, 3, 32, 32)
    assert views[0].dtype == torch.float32
    assert batch["target"].dtype == torch.int64
    assert not torch.equal(views[0], views[1])


def test_datamodule_pretrain_drops_last_batch(pickle_root: Path) -> None:
    dm = _module(pickle_root, batch_size=32)
    assert len(dm.train_dataloader()) == 3  # 100 // 32


def test_datamodule_train_fraction_hides_targets(pickle_root: Path) -> None:
    dm = _module(pickle_root, batch_size=100, train_fraction=0.1)
    batch = next(iter(dm.train_dataloader()))
    labeled = batch["target"][batch["target"] >= 0]
    assert len(labeled) == 10
    assert sorted(labeled.tolist()) == list(range(10))


def test_datamodule_online_eval_loaders(pickle_root: Path) -> None:
    dm = _module(pickle_root, online_eval_max_images=20)
    bank, query = dm.val_dataloader()
    bank_batches = list(bank)
    query_batches = list(query)
    assert sum(len(b["target"]) for b in bank_batches) == 20
    assert sum(len(b["target"]) for b in query_batches) == 20
    first = bank_batches[0]
    assert first["image"].shape == (8, 3, 32, 32)
    assert first["race"].tolist() == [-1] * 8
    assert first["gender"].tolist() == [-1] * 8
    bank_index = torch.cat([b["index"] for b in bank_batches])
    bank_target = torch.cat([b["target"] for b in bank_batches])
    # Fake labels are row % 10, so each index must carry that label.
    assert torch.equal(bank_target, bank_index % 10)
    assert torch.bincount(bank_target, minlength=10).tolist() == [2] * 10


def test_datamodule_online_eval_uses_labeled_rows(pickle_root: Path) -> None:
    dm = _module(pickle_root, train_fraction=0.2)
    bank, _ = dm.val_dataloader()
    bank_index = torch.cat([b["index"] for b in bank])
    assert dm.labeled_rows is not None
    assert bank_index.tolist() == dm.labeled_rows.tolist()


def test_datamodule_online_eval_off(pickle_root: Path) -> None:
    dm = _module(pickle_root, online_eval=False)
    assert dm.val_dataloader() == []


def test_datamodule_classify_loaders(pickle_root: Path) -> None:
    dm = _module(pickle_root, mode="classify", train_fraction=0.5)
    train_batches = list(dm.train_dataloader())
    assert sum(len(b["target"]) for b in train_batches) == 50
    assert set(train_batches[0]) == {"image", "target", "race", "gender", "index"}
    val = dm.val_dataloader()
    assert not isinstance(val, list)
    assert len(val.dataset) == 20
    predict_index = torch.cat([b["index"] for b in dm.predict_dataloader()])
    assert predict_index.tolist() == list(range(20))


def test_datamodule_batch_larger_than_train_split(pickle_root: Path) -> None:
    dm = CIFAR10DataModule(str(pickle_root), batch_size=512, num_workers=0)
    with pytest.raises(ValueError, match="fewer than batch_size=512"):
        dm.setup("fit")


def test_datamodule_loaders_before_setup(pickle_root: Path) -> None:
    dm = CIFAR10DataModule(str(pickle_root), batch_size=8, num_workers=0)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


def test_datamodule_setup_runs_once(pickle_root: Path) -> None:
    dm = _module(pickle_root, train_fraction=0.3)
    rows = dm.labeled_rows
    dm.setup("validate")
    assert dm.labeled_rows is rows


def test_datamodule_download_only_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, bool, bool]] = []

    def fake_cifar10(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))

    monkeypatch.setattr("torchvision.datasets.CIFAR10", fake_cifar10)
    CIFAR10DataModule(str(tmp_path), num_workers=0).prepare_data()
    assert calls == []
    CIFAR10DataModule(str(tmp_path), num_workers=0, download=True).prepare_data()
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]


def test_datamodule_setup_never_downloads(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(str(tmp_path), num_workers=0, download=True)
    with pytest.raises(FileNotFoundError, match="not a CIFAR-10 folder"):
        dm.setup("fit")


def test_datamodule_image_folder_with_workers(tmp_path: Path) -> None:
    _write_image_folder(tmp_path)
    dm = _module(tmp_path, batch_size=10, num_workers=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["views"][0].shape == (10, 3, 32, 32)
    bank, query = dm.val_dataloader()
    assert len(bank.dataset) == 30
    assert len(query.dataset) == 20


def test_datamodule_real_sample() -> None:
    if not REAL_CIFAR.is_dir():
        pytest.skip(f"real CIFAR-10 sample not found at {REAL_CIFAR}")
    dm = _module(REAL_CIFAR, batch_size=16, online_eval_max_images=100)
    assert dm.train_split is not None
    assert dm.test_split is not None
    assert len(dm.train_split) == 3000
    assert len(dm.test_split) == 1000
    assert np.bincount(dm.train_split.labels).tolist() == [300] * 10
    batch = next(iter(dm.train_dataloader()))
    assert batch["views"][0].shape == (16, 3, 32, 32)
    bank, query = dm.val_dataloader()
    assert len(bank.dataset) == 100
    assert len(query.dataset) == 100
