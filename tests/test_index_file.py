"""Tests for the listing fingerprint and the face index file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CelebATree, InspectCounter, UTKFaceTree, write_image

from simclr_lightning.data import index_file
from simclr_lightning.data.index import FaceIndex, SkipReport
from simclr_lightning.data.index_file import (
    CACHE_FACE_INDEX_FILE,
    CACHE_KEY_FIELD,
    INDEX_FOLDER_NAME,
    FaceIndexRequest,
    candidate_index_dirs,
    find_index_file,
    index_file_paths,
    index_from_cache,
    load_or_build_face_index,
    read_index_file,
    remove_superseded_index_files,
    write_index_file,
)
from simclr_lightning.data.sources import fingerprint_face_sources, read_face_sources
from simclr_lightning.data.splits import unique_by_hash


def _request(utkface_tree: UTKFaceTree) -> FaceIndexRequest:
    return FaceIndexRequest.create(utkface_tree.root)


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------


def test_fingerprint_counts_listed_files(
    utkface_tree: UTKFaceTree, ffhq_tree: Path, celeba_tree: CelebATree
) -> None:
    fingerprint = fingerprint_face_sources(utkface_tree.root, ffhq_tree, celeba_tree.root)

    # UTKFace: every decodable file, the 3 broken ones and notes.txt. FFHQ: 6 images.
    # CelebA: 12 images and 3 annotation files.
    utkface_files = utkface_tree.indexed + 3 + 1
    assert fingerprint.file_count == utkface_files + 6 + 12 + 3
    assert len(fingerprint.digest) == 32


def test_fingerprint_reads_no_file(
    utkface_tree: UTKFaceTree,
    ffhq_tree: Path,
    celeba_tree: CelebATree,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[str] = []
    real_open = open

    def recording_open(path: object, *args: object, **kwargs: object) -> object:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", recording_open)
    fingerprint_face_sources(utkface_tree.root, ffhq_tree, celeba_tree.root)

    assert opened == []


@pytest.mark.parametrize("change", ["add", "remove", "resize", "touch"])
def test_fingerprint_changes_with_files(utkface_tree: UTKFaceTree, change: str) -> None:
    before = fingerprint_face_sources(utkface_tree.root)
    target = utkface_tree.folder / utkface_tree.duplicate[1]
    if change == "add":
        write_image(utkface_tree.folder / "60_1_3_20170101000000321.jpg.chip.jpg", 321)
    elif change == "remove":
        target.unlink()
    elif change == "resize":
        target.write_bytes(target.read_bytes() + b"\0")
    else:
        stat = target.stat()
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    assert fingerprint_face_sources(utkface_tree.root).digest != before.digest


def test_fingerprint_ignores_unread_folders(utkface_tree: UTKFaceTree) -> None:
    before = fingerprint_face_sources(utkface_tree.root)
    write_image(utkface_tree.root / "part1" / "20_0_0_20170101000000001.jpg", 77)
    (utkface_tree.root / "README.txt").write_text("notes next to the dataset")

    # The aligned crops exist, so the in-the-wild part is not read and not listed.
    assert fingerprint_face_sources(utkface_tree.root) == before


def test_fingerprint_missing_root_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="UTKFace root"):
        fingerprint_face_sources(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------
# Request and key
# ---------------------------------------------------------------------------------------------


def test_request_resolves_roots(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(utkface_tree.root)

    request = FaceIndexRequest.create(link)

    assert request.utkface_root == str(utkface_tree.root.resolve())
    assert request.roots() == [str(utkface_tree.root.resolve())]


def test_request_drops_unused_options(utkface_tree: UTKFaceTree) -> None:
    plain = FaceIndexRequest.create(utkface_tree.root)
    with_options = FaceIndexRequest.create(
        utkface_tree.root, celeba_one_per_identity=False, celeba_gender_labels=True, seed=9
    )

    assert with_options == plain


def test_request_keeps_seed_of_celeba_choice(celeba_tree: CelebATree) -> None:
    all_images = FaceIndexRequest.create(celeba_root=celeba_tree.root, seed=3)
    one_each = FaceIndexRequest.create(
        celeba_root=celeba_tree.root, celeba_one_per_identity=True, seed=3
    )
    every_image = FaceIndexRequest.create(
        celeba_root=celeba_tree.root, celeba_one_per_identity=False, seed=3
    )

    assert all_images.seed == 3
    assert one_each.seed == 3
    assert every_image.seed == 0


def test_request_no_root_error() -> None:
    with pytest.raises(ValueError, match="No dataset root given"):
        FaceIndexRequest.create()


@pytest.mark.parametrize(
    "options",
    [
        {"celeba_one_per_identity": False},
        {"seed": 1},
        {"celeba_partition": "train"},
        {"celeba_gender_labels": True},
    ],
)
def test_key_changes_with_options(celeba_tree: CelebATree, options: dict[str, object]) -> None:
    base = FaceIndexRequest.create(celeba_root=celeba_tree.root)
    changed = FaceIndexRequest.create(celeba_root=celeba_tree.root, **options)  # type: ignore[arg-type]
    fingerprint = base.fingerprint()

    assert changed.key(fingerprint) != base.key(fingerprint)


def test_key_is_stable(utkface_tree: UTKFaceTree) -> None:
    first = _request(utkface_tree)
    second = _request(utkface_tree)

    assert first.key(first.fingerprint()) == second.key(second.fingerprint())


# ---------------------------------------------------------------------------------------------
# Index files
# ---------------------------------------------------------------------------------------------


def _built(utkface_tree: UTKFaceTree) -> tuple[FaceIndexRequest, FaceIndex, dict[str, SkipReport]]:
    request = _request(utkface_tree)
    index, skipped = request.read()
    return request, index, skipped


def test_index_file_round_trip(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    request, index, skipped = _built(utkface_tree)
    fingerprint = request.fingerprint()
    key = request.key(fingerprint)

    written = write_index_file(tmp_path / "store", key, request, fingerprint, index, skipped, 1.5)
    stored = read_index_file(tmp_path / "store", key)

    assert written == index_file_paths(tmp_path / "store", key)[0]
    assert stored.origin == "index file"
    for name, column in index.columns().items():
        assert np.array_equal(stored.index.columns()[name], column), name
    assert stored.skipped["utkface"].to_dict() == skipped["utkface"].to_dict()
    assert sorted(path.name for path in (tmp_path / "store").iterdir()) == [
        f"face_index-{key}.json",
        f"face_index-{key}.npz",
    ]


def test_index_file_records_build(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    request, index, skipped = _built(utkface_tree)
    fingerprint = request.fingerprint()
    key = request.key(fingerprint)
    write_index_file(tmp_path, key, request, fingerprint, index, skipped, 2.0)

    content = json.loads(index_file_paths(tmp_path, key)[1].read_text())

    assert content["key"] == key
    assert content["rows"] == utkface_tree.indexed
    assert content["listed_files"] == fingerprint.file_count
    assert content["request"]["utkface_root"] == str(utkface_tree.root.resolve())
    assert content["build_seconds"] == 2.0


def test_read_index_file_other_key_error(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    request, index, skipped = _built(utkface_tree)
    fingerprint = request.fingerprint()
    key = request.key(fingerprint)
    write_index_file(tmp_path, key, request, fingerprint, index, skipped, 1.0)
    other = "0" * 32
    for source, target in zip(
        index_file_paths(tmp_path, key), index_file_paths(tmp_path, other), strict=True
    ):
        source.rename(target)

    with pytest.raises(ValueError, match="belongs to key"):
        read_index_file(tmp_path, other)


def test_find_index_file_skips_damaged(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    request, index, skipped = _built(utkface_tree)
    fingerprint = request.fingerprint()
    key = request.key(fingerprint)
    write_index_file(tmp_path, key, request, fingerprint, index, skipped, 1.0)
    index_file_paths(tmp_path, key)[0].write_bytes(b"not a zip file")

    with pytest.warns(UserWarning, match="Ignoring the face index file"):
        found = find_index_file([tmp_path], key)

    assert found is None


def test_load_or_build_writes_then_reads(
    utkface_tree: UTKFaceTree, tmp_path: Path, inspect_counter: InspectCounter
) -> None:
    request = _request(utkface_tree)

    built = load_or_build_face_index(request, index_dir=tmp_path / "store")
    calls_to_build = inspect_counter.calls
    loaded = load_or_build_face_index(request, index_dir=tmp_path / "store")

    # Every listed file ending in an image extension is decoded once, notes.txt is not.
    assert calls_to_build == utkface_tree.indexed + 3
    assert inspect_counter.calls == calls_to_build
    assert built.origin == "built"
    assert loaded.origin == "index file"
    assert loaded.path == built.path
    assert np.array_equal(loaded.index.content_hash, built.index.content_hash)


def test_new_listing_deletes_superseded_file(
    utkface_tree: UTKFaceTree, celeba_tree: CelebATree, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    request = _request(utkface_tree)
    other = FaceIndexRequest.create(utkface_tree.root, celeba_root=celeba_tree.root)
    first = load_or_build_face_index(request, index_dir=store)
    other_options = load_or_build_face_index(other, index_dir=store)
    write_image(utkface_tree.folder / "30_1_2_20170109150557335.jpg.chip.jpg", seed=77)

    second = load_or_build_face_index(request, index_dir=store)

    assert first.path is not None
    assert second.path is not None
    assert other_options.path is not None
    assert second.path != first.path
    assert not first.path.exists()
    assert not first.path.with_suffix(".json").exists()
    # The file of the other options stays: switching back to them reads it.
    expected = {other_options.path.name, second.path.name}
    expected |= {name.replace(".npz", ".json") for name in expected}
    assert {path.name for path in store.iterdir()} == expected


def test_remove_superseded_skips_damaged_and_current(
    utkface_tree: UTKFaceTree, tmp_path: Path
) -> None:
    request, index, skipped = _built(utkface_tree)
    fingerprint = request.fingerprint()
    current = write_index_file(tmp_path, "a" * 32, request, fingerprint, index, skipped, 1.0)
    old = write_index_file(tmp_path, "b" * 32, request, fingerprint, index, skipped, 1.0)
    (tmp_path / "face_index-cccc.json").write_text("not json", encoding="utf-8")

    assert remove_superseded_index_files(tmp_path, "a" * 32, request) == 1

    assert current.exists()
    assert not old.exists()
    assert (tmp_path / "face_index-cccc.json").exists()


def test_failed_delete_keeps_json_for_next_time(
    utkface_tree: UTKFaceTree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    request, index, skipped = _built(utkface_tree)
    fingerprint = request.fingerprint()
    write_index_file(tmp_path, "a" * 32, request, fingerprint, index, skipped, 1.0)
    old_npz = write_index_file(tmp_path, "b" * 32, request, fingerprint, index, skipped, 1.0)
    unlink = Path.unlink

    def failing_unlink(path: Path, missing_ok: bool = False) -> None:
        if path == old_npz:
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, missing_ok=missing_ok)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", failing_unlink)
        assert remove_superseded_index_files(tmp_path, "a" * 32, request) == 0
    assert old_npz.exists()
    assert old_npz.with_suffix(".json").exists()

    assert remove_superseded_index_files(tmp_path, "a" * 32, request) == 1
    assert not old_npz.exists()
    assert not old_npz.with_suffix(".json").exists()


def test_load_or_build_logs_steps(
    utkface_tree: UTKFaceTree, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    request = _request(utkface_tree)

    with caplog.at_level(logging.INFO):
        load_or_build_face_index(request, index_dir=tmp_path)
        load_or_build_face_index(request, index_dir=tmp_path)

    assert "Listed" in caplog.text
    assert f"Built the face index ({utkface_tree.indexed} images)" in caplog.text
    assert "Read the face index" in caplog.text


def test_default_index_dirs(utkface_tree: UTKFaceTree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    request = _request(utkface_tree)

    folders = candidate_index_dirs(request, None)

    assert folders == [
        utkface_tree.root.resolve().parent / INDEX_FOLDER_NAME,
        Path("/somewhere/cache/simclr-lightning/face_index"),
    ]


def test_read_only_parent_uses_user_dir(
    utkface_tree: UTKFaceTree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    root = datasets / "utkface"
    utkface_tree.root.rename(root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    datasets.chmod(0o555)
    try:
        stored = load_or_build_face_index(FaceIndexRequest.create(root))
    finally:
        datasets.chmod(0o755)

    assert stored.path is not None
    assert stored.path.parent == tmp_path / "user-cache" / "simclr-lightning" / "face_index"
    assert not (datasets / INDEX_FOLDER_NAME).exists()


def test_unwritable_index_dir_warns(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o555)
    try:
        with pytest.warns(UserWarning, match="could not be saved"):
            stored = load_or_build_face_index(_request(utkface_tree), index_dir=store)
    finally:
        store.chmod(0o755)

    assert stored.origin == "built"
    assert stored.path is None
    assert list(store.iterdir()) == []


def test_listing_change_during_build_not_saved(
    utkface_tree: UTKFaceTree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_and_add_file(*args: object, **kwargs: object) -> object:
        result = read_face_sources(*args, **kwargs)  # type: ignore[arg-type]
        write_image(utkface_tree.folder / "61_0_1_20170101000000654.jpg.chip.jpg", 654)
        return result

    monkeypatch.setattr(index_file, "read_face_sources", read_and_add_file)

    with pytest.warns(UserWarning, match="changed while they were indexed"):
        stored = load_or_build_face_index(_request(utkface_tree), index_dir=tmp_path / "store")

    assert stored.path is None
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------------------------
# Index from a prepared cache
# ---------------------------------------------------------------------------------------------


def _prepare_cache(request: FaceIndexRequest, cache_dir: Path) -> None:
    """Cache one row per content hash and store the full index next to it, as prepare does."""
    from simclr_lightning.data.cache import prepare_cache

    merged, reports = request.read()
    index = merged.subset(unique_by_hash(merged.content_hash))
    prepare_cache(index, cache_dir, 16, num_workers=0, progress=False)
    merged.save(cache_dir / CACHE_FACE_INDEX_FILE)
    skips = {name: report.to_dict() for name, report in reports.items()}
    (cache_dir / "prepare_report.json").write_text(json.dumps({"skips": skips}))


def _record_key(cache_dir: Path, key: str) -> None:
    meta_path = cache_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta[CACHE_KEY_FIELD] = key
    meta_path.write_text(json.dumps(meta))


def test_index_from_cache_with_key(
    utkface_tree: UTKFaceTree, tmp_path: Path, inspect_counter: InspectCounter
) -> None:
    request = _request(utkface_tree)
    _prepare_cache(request, tmp_path / "cache")
    key = request.key(request.fingerprint())
    _record_key(tmp_path / "cache", key)
    calls_before = inspect_counter.calls

    stored = load_or_build_face_index(
        request, index_dir=tmp_path / "store", cache_dir=tmp_path / "cache"
    )

    assert stored.origin == "prepared cache"
    assert inspect_counter.calls == calls_before
    # The full index keeps the byte-identical copy that the cached pixels store once.
    assert len(stored.index) == utkface_tree.indexed
    assert stored.index.paths.tolist() == request.read()[0].paths.tolist()
    assert stored.skipped["utkface"].count("empty") == 1
    assert not (tmp_path / "store").exists()


def test_index_from_cache_other_key(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    request = _request(utkface_tree)
    _prepare_cache(request, tmp_path / "cache")
    _record_key(tmp_path / "cache", "f" * 32)

    found = index_from_cache(tmp_path / "cache", request.key(request.fingerprint()))

    assert found is None


def test_index_from_cache_without_key(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    request = _request(utkface_tree)
    _prepare_cache(request, tmp_path / "cache")

    found = index_from_cache(tmp_path / "cache", request.key(request.fingerprint()))

    assert found is None


def test_index_from_cache_without_full_index(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    request = _request(utkface_tree)
    key = request.key(request.fingerprint())
    _prepare_cache(request, tmp_path / "cache")
    _record_key(tmp_path / "cache", key)
    (tmp_path / "cache" / CACHE_FACE_INDEX_FILE).unlink()

    found = index_from_cache(tmp_path / "cache", key)

    assert found is None


def test_index_from_cache_uncached_image(utkface_tree: UTKFaceTree, tmp_path: Path) -> None:
    request = _request(utkface_tree)
    key = request.key(request.fingerprint())
    _prepare_cache(request, tmp_path / "cache")
    _record_key(tmp_path / "cache", key)
    full = FaceIndex.load(tmp_path / "cache" / CACHE_FACE_INDEX_FILE)
    hashes = full.content_hash.copy()
    hashes[0] = b"0" * 32
    FaceIndex(full.paths, full.source, content_hash=hashes).save(
        tmp_path / "cache" / CACHE_FACE_INDEX_FILE
    )

    with pytest.warns(UserWarning, match="1 of its"):
        found = index_from_cache(tmp_path / "cache", key)

    assert found is None
