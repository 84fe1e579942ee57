"""Tests for the UTKFace name rules and the UTKFace, FFHQ and CelebA readers."""

from __future__ import annotations

import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import CelebATree, UTKFaceTree, write_image

from simclr_lightning.data import sources
from simclr_lightning.data.index import SOURCE_CELEBA, SOURCE_FFHQ, SOURCE_UTKFACE
from simclr_lightning.data.sources import (
    UTKFaceName,
    parse_utkface_name,
    read_celeba,
    read_face_sources,
    read_ffhq,
    read_utkface,
)

# ---------------------------------------------------------------------------------------------
# UTKFace names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("25_0_2_20170116174525125.jpg.chip.jpg", UTKFaceName(25, 0, 2, None)),
        ("1_1_4_20170116174525125.jpg.chip.jpg", UTKFaceName(1, 1, 4, None)),
        ("116_0_0_20170116174525125.jpg.chip.jpg", UTKFaceName(116, 0, 0, None)),
        # In-the-wild parts use .jpg with the same fields.
        ("30_1_3_20170109150557335.jpg", UTKFaceName(30, 1, 3, None)),
        ("30_1_3_20170109150557335.JPG", UTKFaceName(30, 1, 3, None)),
        ("30_1_3_20170109150557335.chip.jpg", UTKFaceName(30, 1, 3, None)),
        # Missing race: age and gender kept.
        ("39_1_20170116174525125.jpg.chip.jpg", UTKFaceName(39, 1, -1, "utkface_missing_race")),
        ("61_1_20170109142408075.jpg.chip.jpg", UTKFaceName(61, 1, -1, "utkface_missing_race")),
        # Missing date-time: all labels kept.
        ("40_0_1.jpg.chip.jpg", UTKFaceName(40, 0, 1, "utkface_missing_timestamp")),
        # Stray characters between the date-time and the extension.
        (
            "44_1_4_20170116235150272 .jpg.chip.jpg",
            UTKFaceName(44, 1, 4, "utkface_stray_character"),
        ),
        (
            "44_1_4_20170116235150272x.jpg.chip.jpg",
            UTKFaceName(44, 1, 4, "utkface_stray_character"),
        ),
        ("55_0_0_20170116232725357jpg.chip.jpg", UTKFaceName(55, 0, 0, "utkface_stray_character")),
        # Date-times of unusual length.
        (
            "26_0_1_2017011617452512.jpg.chip.jpg",
            UTKFaceName(26, 0, 1, "utkface_unusual_timestamp"),
        ),
        ("26_0_1_201701161745.jpg.chip.jpg", UTKFaceName(26, 0, 1, "utkface_unusual_timestamp")),
    ],
)
def test_parse_utkface_name_parsed_rules(name: str, expected: UTKFaceName) -> None:
    assert parse_utkface_name(name) == expected


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("face.jpg.chip.jpg", "utkface_name_pattern"),
        ("53__0_20170116184028385.jpg.chip.jpg", "utkface_name_pattern"),
        ("2a_0_1_20170116184028385.jpg.chip.jpg", "utkface_name_pattern"),
        ("25_0_1_20170116184028385_7.jpg.chip.jpg", "utkface_name_pattern"),
        ("25_0_20.jpg.chip.jpg", "utkface_name_pattern"),
        ("25_0_1_.jpg.chip.jpg", "utkface_name_pattern"),
        ("0_0_1_20170116184028385.jpg.chip.jpg", "utkface_label_out_of_range"),
        ("117_0_1_20170116184028385.jpg.chip.jpg", "utkface_label_out_of_range"),
        ("25_2_1_20170116184028385.jpg.chip.jpg", "utkface_label_out_of_range"),
        ("25_0_5_20170116184028385.jpg.chip.jpg", "utkface_label_out_of_range"),
        ("25_3_20170116184028385.jpg.chip.jpg", "utkface_label_out_of_range"),
    ],
)
def test_parse_utkface_name_unlabeled_rules(name: str, rule: str) -> None:
    assert parse_utkface_name(name) == UTKFaceName(-1, -1, -1, rule)


@pytest.mark.parametrize(
    "path",
    [
        "/data/UTKFace/25_0_2_20170116174525125.jpg.chip.jpg",
        "C:\\data\\UTKFace\\25_0_2_20170116174525125.jpg.chip.jpg",
        # Only the base name counts, even when a folder looks like a name.
        "/data/99_1_4_x/25_0_2_20170116174525125.jpg.chip.jpg",
        "D:\\99_1_4_20170116174525125\\25_0_2_20170116174525125.jpg.chip.jpg",
    ],
)
def test_parse_utkface_name_uses_base_name(path: str) -> None:
    assert parse_utkface_name(path) == UTKFaceName(25, 0, 2, None)


# ---------------------------------------------------------------------------------------------
# read_utkface
# ---------------------------------------------------------------------------------------------


def test_read_utkface_counts(utkface_tree: UTKFaceTree) -> None:
    index, skips = read_utkface(utkface_tree.root, num_threads=2)

    labeled = index.labeled_mask()
    assert len(index) == utkface_tree.indexed
    assert int(labeled.sum()) == utkface_tree.labeled
    assert dict(Counter(index.race[labeled].tolist())) == utkface_tree.race_counts
    assert dict(Counter(index.gender[labeled].tolist())) == utkface_tree.gender_counts
    assert np.all(index.source == SOURCE_UTKFACE)


def test_read_utkface_skips_broken_files(utkface_tree: UTKFaceTree) -> None:
    index, skips = read_utkface(utkface_tree.root)

    for reason, count in utkface_tree.skipped.items():
        assert skips.count(reason) == count, reason
    indexed_names = {Path(index.path(i)).name for i in range(len(index))}
    assert "1_0_0_20170101000000002.jpg.chip.jpg" not in indexed_names
    assert "3_0_0_20170101000000004.jpg.chip.jpg" not in indexed_names


def test_read_utkface_counts_name_rules(utkface_tree: UTKFaceTree) -> None:
    _, skips = read_utkface(utkface_tree.root)

    assert skips.count("utkface_missing_race") == 1
    assert skips.count("utkface_stray_character") == 1
    assert skips.count("utkface_label_out_of_range") == 1
    assert skips.count("utkface_name_pattern") == 1
    assert skips.examples["utkface_missing_race"] == ["39_1_20170116174525125.jpg.chip.jpg"]


def test_read_utkface_unlabeled_images_stay_indexed(utkface_tree: UTKFaceTree) -> None:
    index, _ = read_utkface(utkface_tree.root)
    rows = {Path(index.path(i)).name: i for i in range(len(index))}

    missing_race = rows["39_1_20170116174525125.jpg.chip.jpg"]
    no_fields = rows["face.jpg.chip.jpg"]
    assert index.race[missing_race] == -1
    assert index.gender[missing_race] == 1
    assert index.age[missing_race] == 39
    assert index.gender[no_fields] == -1


def test_read_utkface_duplicates_share_hash(utkface_tree: UTKFaceTree) -> None:
    index, _ = read_utkface(utkface_tree.root)
    rows = {Path(index.path(i)).name: i for i in range(len(index))}

    first, copy = (rows[name] for name in utkface_tree.duplicate)
    assert index.hash(first) == index.hash(copy)
    assert len(set(index.content_hash.tolist())) == len(index) - 1


def test_read_utkface_paths_absolute_and_sorted(utkface_tree: UTKFaceTree) -> None:
    index, _ = read_utkface(utkface_tree.root)
    paths = [index.path(i) for i in range(len(index))]

    assert all(Path(path).is_absolute() for path in paths)
    assert paths == sorted(paths)


def test_read_utkface_accepts_folder_itself(utkface_tree: UTKFaceTree) -> None:
    from_parent, _ = read_utkface(utkface_tree.root)
    from_folder, _ = read_utkface(utkface_tree.folder)

    assert np.array_equal(from_parent.paths, from_folder.paths)


def test_read_utkface_descends_nested_copy(tmp_path: Path, utkface_tree: UTKFaceTree) -> None:
    outer = tmp_path / "nested" / "UTKFace"
    outer.mkdir(parents=True)
    shutil.move(str(utkface_tree.folder), str(outer / "UTKFace"))

    index, skips = read_utkface(tmp_path / "nested")

    assert len(index) == utkface_tree.indexed
    assert any("nested copy" in note for note in skips.notes)


def test_read_utkface_missing_folder_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist|does not contain"):
        read_utkface(tmp_path / "nowhere")


def test_read_utkface_empty_folder_lists_contents(tmp_path: Path) -> None:
    (tmp_path / "utk").mkdir()
    (tmp_path / "utk" / "README.md").write_text("readme")

    with pytest.raises(FileNotFoundError, match="Found: README.md"):
        read_utkface(tmp_path / "utk")


def test_read_utkface_unextracted_archive_error(tmp_path: Path) -> None:
    root = tmp_path / "utkface"
    root.mkdir()
    (root / "UTKFace.tar.gz").write_bytes(b"\x1f\x8b")

    with pytest.raises(FileNotFoundError, match=r"UTKFace\.tar\.gz.*Extract"):
        read_utkface(root)


def test_read_utkface_archive_next_to_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "UTKFace.tar.gz").write_bytes(b"\x1f\x8b")

    with pytest.raises(FileNotFoundError, match=r"UTKFace\.tar\.gz"):
        read_utkface(tmp_path / "UTKFace")


def test_read_utkface_wild_parts(tmp_path: Path) -> None:
    write_image(tmp_path / "wild" / "part1" / "30_1_3_20170109150557335.jpg", 1)
    write_image(tmp_path / "wild" / "part2" / "31_0_2_20170109150557336.jpg", 2)

    index, _ = read_utkface(tmp_path / "wild")

    assert len(index) == 2
    assert index.race.tolist() == [3, 2]


def test_read_utkface_include_wild(tmp_path: Path, utkface_tree: UTKFaceTree) -> None:
    write_image(utkface_tree.root / "part1" / "30_1_3_20170109150557335.jpg", 77)

    aligned_only, skips = read_utkface(utkface_tree.root)
    with_wild, _ = read_utkface(utkface_tree.root, include_wild=True)

    assert len(aligned_only) == utkface_tree.indexed
    assert len(with_wild) == utkface_tree.indexed + 1
    assert any("in-the-wild" in note for note in skips.notes)


# ---------------------------------------------------------------------------------------------
# read_ffhq
# ---------------------------------------------------------------------------------------------


def test_read_ffhq_thumbnails(ffhq_tree: Path) -> None:
    index, skips = read_ffhq(ffhq_tree)

    names = [Path(index.path(i)).name for i in range(len(index))]
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png", "01000.png", "01001.png"]
    assert np.all(index.source == SOURCE_FFHQ)
    assert np.all(index.race == -1)
    assert skips.total == 0


def test_read_ffhq_accepts_image_folder(ffhq_tree: Path) -> None:
    index, _ = read_ffhq(ffhq_tree / "thumbnails128x128")

    assert len(index) == 6


def test_read_ffhq_prefers_thumbnails(ffhq_tree: Path) -> None:
    write_image(ffhq_tree / "images1024x1024" / "00000" / "00000.png", 1, "PNG")

    index, skips = read_ffhq(ffhq_tree)
    large, _ = read_ffhq(ffhq_tree, variant="images1024x1024")

    assert len(index) == 6
    assert len(large) == 1
    assert any("reading thumbnails128x128" in note for note in skips.notes)


def test_read_ffhq_skips_broken_png(ffhq_tree: Path) -> None:
    (ffhq_tree / "thumbnails128x128" / "00000" / "00004.png").write_bytes(b"")

    index, skips = read_ffhq(ffhq_tree)

    assert len(index) == 6
    assert skips.count("empty") == 1


def test_read_ffhq_archive_error(tmp_path: Path) -> None:
    (tmp_path / "ffhq").mkdir()
    (tmp_path / "ffhq" / "thumbnails128x128.zip").write_bytes(b"PK")

    with pytest.raises(FileNotFoundError, match=r"thumbnails128x128\.zip"):
        read_ffhq(tmp_path / "ffhq")


def test_read_ffhq_bad_variant(ffhq_tree: Path) -> None:
    with pytest.raises(ValueError, match="variant must be one of"):
        read_ffhq(ffhq_tree, variant="thumbs")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# read_celeba
# ---------------------------------------------------------------------------------------------


def _names(index_paths: np.ndarray) -> list[str]:
    return [Path(path.decode()).name for path in index_paths]


def test_read_celeba_all_images_with_identities(celeba_tree: CelebATree) -> None:
    index, skips = read_celeba(celeba_tree.root, one_per_identity=False)

    names = _names(index.paths)
    assert names == sorted(celeba_tree.identities)
    assert index.identity.tolist() == [celeba_tree.identities[name] for name in names]
    assert np.all(index.source == SOURCE_CELEBA)
    assert np.all(index.gender == -1)


def test_read_celeba_identities_are_one_based(celeba_tree: CelebATree) -> None:
    index, _ = read_celeba(celeba_tree.root, one_per_identity=False)

    assert sorted(set(index.identity.tolist())) == [1, 2, 3, 4]


def test_read_celeba_counts_rows_of_missing_images(celeba_tree: CelebATree) -> None:
    _, skips = read_celeba(celeba_tree.root, one_per_identity=False)

    assert skips.count("celeba_identity_missing_image") == celeba_tree.missing_rows
    assert skips.examples["celeba_identity_missing_image"][0] == "000013.jpg"
    assert skips.count("celeba_annotation_invalid") == 0


def test_read_celeba_one_per_identity(celeba_tree: CelebATree) -> None:
    index, skips = read_celeba(celeba_tree.root, seed=0)

    assert len(index) == 4
    assert sorted(index.identity.tolist()) == [1, 2, 3, 4]
    assert skips.count("celeba_other_identity_image") == 8
    for name, identity in zip(_names(index.paths), index.identity.tolist(), strict=True):
        assert celeba_tree.identities[name] == identity


def test_read_celeba_one_per_identity_is_seeded(celeba_tree: CelebATree) -> None:
    first, _ = read_celeba(celeba_tree.root, seed=3)
    again, _ = read_celeba(celeba_tree.root, seed=3)
    picks = {tuple(_names(read_celeba(celeba_tree.root, seed=s)[0].paths)) for s in range(8)}

    assert np.array_equal(first.paths, again.paths)
    # Eight seeds over 3**4 possible choices give more than one distinct choice.
    assert len(picks) > 1


def test_read_celeba_replaces_broken_choice(celeba_tree: CelebATree) -> None:
    chosen, _ = read_celeba(celeba_tree.root, seed=0)
    broken = Path(chosen.path(0))
    broken.write_bytes(b"")

    index, skips = read_celeba(celeba_tree.root, seed=0)

    assert len(index) == 4
    assert broken.name not in _names(index.paths)
    assert skips.count("empty") == 1
    assert skips.count("celeba_other_identity_image") == 7


def test_read_celeba_gender_labels(celeba_tree: CelebATree) -> None:
    index, _ = read_celeba(celeba_tree.root, one_per_identity=False, gender_labels=True)

    names = _names(index.paths)
    assert index.gender.tolist() == [celeba_tree.genders[name] for name in names]
    assert set(index.gender.tolist()) == {0, 1}


def test_read_celeba_partition(celeba_tree: CelebATree) -> None:
    index, skips = read_celeba(celeba_tree.root, one_per_identity=False, partition="val")

    assert _names(index.paths) == ["000009.jpg", "000010.jpg"]
    assert skips.count("celeba_other_partition") == 10
    assert skips.count("celeba_partition_missing_image") == celeba_tree.missing_rows


def test_read_celeba_invalid_rows_counted(celeba_tree: CelebATree) -> None:
    identity_file = celeba_tree.root / "identity_CelebA.txt"
    identity_file.write_bytes(identity_file.read_bytes() + b"000021.jpg zero\r\n000022.jpg 0\r\n")

    _, skips = read_celeba(celeba_tree.root, one_per_identity=False)

    assert skips.count("celeba_annotation_invalid") == 2


def test_read_celeba_image_without_identity(celeba_tree: CelebATree) -> None:
    write_image(celeba_tree.root / "img_align_celeba" / "300000.jpg", 1)

    index, skips = read_celeba(celeba_tree.root)

    assert skips.count("celeba_no_identity") == 1
    assert len(index) == 5
    assert "300000.jpg" in _names(index.paths)


def test_read_celeba_missing_identity_file(celeba_tree: CelebATree) -> None:
    (celeba_tree.root / "identity_CelebA.txt").unlink()

    with pytest.raises(FileNotFoundError, match="one_per_identity=False"):
        read_celeba(celeba_tree.root)
    index, _ = read_celeba(celeba_tree.root, one_per_identity=False)
    assert np.all(index.identity == -1)


def test_read_celeba_missing_attribute_file(celeba_tree: CelebATree) -> None:
    (celeba_tree.root / "list_attr_celeba.txt").unlink()

    with pytest.raises(FileNotFoundError) as raised:
        read_celeba(celeba_tree.root, gender_labels=True)

    assert "celeba_gender_labels=False" in str(raised.value)
    assert "--data.celeba_gender_labels false" in str(raised.value)


def test_read_celeba_accepts_image_folder(celeba_tree: CelebATree) -> None:
    index, _ = read_celeba(celeba_tree.root / "img_align_celeba", one_per_identity=False)

    assert index.identity.tolist()[0] == 1
    assert len(index) == 12


def test_read_celeba_archive_error(tmp_path: Path) -> None:
    (tmp_path / "celeba").mkdir()
    (tmp_path / "celeba" / "img_align_celeba.zip").write_bytes(b"PK")

    with pytest.raises(FileNotFoundError, match=r"img_align_celeba\.zip.*unzip"):
        read_celeba(tmp_path / "celeba")


def test_read_celeba_bad_partition(celeba_tree: CelebATree) -> None:
    with pytest.raises(ValueError, match="partition must be one of"):
        read_celeba(celeba_tree.root, partition="validation")  # type: ignore[arg-type]


def test_read_face_sources_merges_in_order(
    utkface_tree: UTKFaceTree, ffhq_tree: Path, celeba_tree: CelebATree
) -> None:
    index, reports = read_face_sources(utkface_tree.root, ffhq_tree, celeba_tree.root)

    assert len(index) == utkface_tree.indexed + 6 + 4
    assert sorted(reports) == ["celeba", "ffhq", "utkface"]
    assert index.source.tolist() == sorted(index.source.tolist(), key=[0, 1, 2].index)


def test_read_face_sources_progress_flag(
    utkface_tree: UTKFaceTree,
    celeba_tree: CelebATree,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sources, "PROGRESS_MIN_IMAGES", 1)

    read_face_sources(utkface_tree.root, celeba_root=celeba_tree.root, progress=True)
    stderr_with_bar = capsys.readouterr().err
    read_face_sources(utkface_tree.root, celeba_root=celeba_tree.root, progress=False)
    stderr_without_bar = capsys.readouterr().err

    assert "Checking UTKFace" in stderr_with_bar
    assert "Checking CelebA" in stderr_with_bar
    assert "Checking" not in stderr_without_bar


def test_read_face_sources_requires_a_root() -> None:
    with pytest.raises(ValueError, match="No dataset root given"):
        read_face_sources()


# ---------------------------------------------------------------------------------------------
# Real samples
# ---------------------------------------------------------------------------------------------


@pytest.mark.real_data
def test_real_utkface_sample_counts(shared_data: Path) -> None:
    index, skips = read_utkface(shared_data / "utkface")

    labeled = index.labeled_mask()
    assert len(index) == 3001
    assert int(labeled.sum()) == 2998
    assert [int((index.race[labeled] == race).sum()) for race in range(5)] == [
        1275,
        572,
        434,
        503,
        214,
    ]
    assert [int((index.gender[labeled] == gender).sum()) for gender in range(2)] == [1567, 1431]
    assert skips.count("utkface_missing_race") == 3


@pytest.mark.real_data
def test_real_celeba_sample_counts(shared_data: Path) -> None:
    index, skips = read_celeba(shared_data / "celeba", one_per_identity=False)
    chosen, _ = read_celeba(shared_data / "celeba", seed=0)

    assert len(index) == 1000
    assert len(set(index.identity.tolist())) == 200
    assert skips.count("celeba_identity_missing_image") == 202599 - 1000
    assert len(chosen) == 200
    assert len(set(chosen.identity.tolist())) == 200


@pytest.mark.real_data
def test_real_celeba_sample_gender_labels(shared_data: Path) -> None:
    index, skips = read_celeba(shared_data / "celeba", gender_labels=True)

    assert np.all(index.gender >= 0)
    assert skips.count("celeba_attribute_missing_image") == 202599 - 1000


@pytest.mark.real_data
def test_real_ffhq_sample_counts(shared_data: Path) -> None:
    index, skips = read_ffhq(shared_data / "ffhq")

    assert len(index) == 113
    assert skips.total == 0


def test_read_utkface_leaves_warning_filters_alone(utkface_tree: UTKFaceTree) -> None:
    filters_before = list(warnings.filters)

    for _ in range(3):
        read_utkface(utkface_tree.root, num_threads=8)

    assert warnings.filters == filters_before
