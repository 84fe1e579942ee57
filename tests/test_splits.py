"""Tests for the seeded, stratified, duplicate-aware labeled split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simclr_lightning.data.splits import (
    conflicting_label_mask,
    group_by_hash,
    split_labeled,
    unique_by_hash,
    validate_fractions,
)


def _hashes(count: int) -> np.ndarray:
    return np.array([f"{i:032x}".encode() for i in range(count)], dtype="S32")


def _balanced(per_pair: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return race, gender and unique hashes with ``per_pair`` rows per (race, gender) pair."""
    race = np.repeat(np.arange(5), 2 * per_pair)
    gender = np.tile(np.repeat(np.arange(2), per_pair), 5)
    return race, gender, _hashes(race.size)


def test_group_by_hash_numbers_by_first_appearance() -> None:
    hashes = np.array([b"b", b"a", b"b", b"c", b"a"], dtype="S32")

    assert group_by_hash(hashes).tolist() == [0, 1, 0, 2, 1]


def test_group_by_hash_empty_hashes_never_merge() -> None:
    hashes = np.array([b"", b"x", b""], dtype="S32")

    assert group_by_hash(hashes).tolist() == [0, 1, 2]


def test_unique_by_hash_keeps_first_rows() -> None:
    hashes = np.array([b"b", b"a", b"b", b"c", b"a"], dtype="S32")

    assert unique_by_hash(hashes).tolist() == [0, 1, 3]


def test_conflicting_label_mask() -> None:
    hashes = np.array([b"a", b"a", b"b", b"b", b"c"], dtype="S32")
    race = np.array([1, 1, 2, 2, 0])
    gender = np.array([0, 0, 0, 1, 1])

    assert conflicting_label_mask(race, gender, hashes).tolist() == [
        False,
        False,
        True,
        True,
        False,
    ]


def test_split_labeled_default_fractions() -> None:
    race, gender, hashes = _balanced(10)

    split = split_labeled(race, gender, hashes, seed=0)

    # 10 groups per pair: 0.3 * 10 = 3 fine-tune and 7 validation, for each of the 10 pairs.
    assert split.finetune.size == 30
    assert split.val.size == 70
    assert split.test.size == 0
    assert split.unused.size == 0


def test_split_labeled_parts_are_disjoint_and_cover() -> None:
    race, gender, hashes = _balanced(10)

    split = split_labeled(
        race, gender, hashes, finetune_fraction=0.2, val_fraction=0.5, test_fraction=0.3
    )
    parts = [split.finetune, split.val, split.test, split.unused]

    assert sum(part.size for part in parts) == race.size
    assert np.unique(np.concatenate(parts)).size == race.size


def test_split_labeled_stratifies_each_pair() -> None:
    race, gender, hashes = _balanced(20)

    split = split_labeled(race, gender, hashes, finetune_fraction=0.25, val_fraction=0.75)

    for race_label in range(5):
        for gender_label in range(2):
            in_pair = (race[split.finetune] == race_label) & (
                gender[split.finetune] == gender_label
            )
            # 0.25 * 20 groups = 5 per pair.
            assert int(in_pair.sum()) == 5, (race_label, gender_label)


def test_split_labeled_same_on_every_call() -> None:
    race, gender, hashes = _balanced(10)

    first = split_labeled(race, gender, hashes, seed=7)
    second = split_labeled(race, gender, hashes, seed=7)

    assert np.array_equal(first.finetune, second.finetune)
    assert np.array_equal(first.val, second.val)


def test_split_labeled_seed_changes_split() -> None:
    race, gender, hashes = _balanced(10)

    first = split_labeled(race, gender, hashes, seed=0)
    second = split_labeled(race, gender, hashes, seed=1)

    assert not np.array_equal(first.finetune, second.finetune)


def test_split_labeled_ignores_global_random_state() -> None:
    race, gender, hashes = _balanced(10)

    np.random.seed(1)
    first = split_labeled(race, gender, hashes)
    np.random.seed(2)
    second = split_labeled(race, gender, hashes)

    assert np.array_equal(first.finetune, second.finetune)


def test_split_labeled_keeps_duplicates_together() -> None:
    race, gender, hashes = _balanced(6)
    # Give every row a twin: rows 2k and 2k+1 are byte-identical.
    hashes = np.repeat(_hashes(race.size // 2), 2)

    for seed in range(5):
        split = split_labeled(
            race,
            gender,
            hashes,
            finetune_fraction=0.3,
            val_fraction=0.4,
            test_fraction=0.3,
            seed=seed,
        )
        for part in split.parts().values():
            partners = part ^ 1
            assert np.isin(partners, part).all(), seed


def test_split_labeled_small_fraction_keeps_every_class() -> None:
    race, gender, hashes = _balanced(30)

    split = split_labeled(
        race, gender, hashes, finetune_fraction=0.01, val_fraction=0.1, test_fraction=0.01
    )

    for part in split.parts().values():
        assert set(race[part].tolist()) == {0, 1, 2, 3, 4}
        assert set(gender[part].tolist()) == {0, 1}


def test_split_labeled_repairs_class_coverage() -> None:
    # Race 4 has three groups (two male, one female): each pair alone is too small for three
    # parts, but the race as a whole can give one group to each part.
    race, gender, hashes = _balanced(6)
    keep = ~((race == 4) & (np.arange(race.size) % 6 >= 2))
    keep &= ~((race == 4) & (gender == 1) & (np.arange(race.size) % 6 >= 1))
    race, gender, hashes = race[keep], gender[keep], hashes[keep]
    assert int((race == 4).sum()) == 3

    split = split_labeled(
        race, gender, hashes, finetune_fraction=0.3, val_fraction=0.4, test_fraction=0.3
    )

    for part in split.parts().values():
        assert 4 in race[part].tolist()
        assert set(gender[part].tolist()) == {0, 1}


def test_split_labeled_class_too_small_error() -> None:
    race, gender, hashes = _balanced(4)
    keep = ~((race == 4) & (np.arange(race.size) % 8 != 0))
    race, gender, hashes = race[keep], gender[keep], hashes[keep]

    with pytest.raises(ValueError, match=r"race class 4 \(Others\) has 1 labeled image group"):
        split_labeled(race, gender, hashes)


def test_split_labeled_missing_class_error() -> None:
    race, gender, hashes = _balanced(4)
    keep = race != 2

    with pytest.raises(ValueError, match=r"race class 2 \(Asian\) has 0"):
        split_labeled(race[keep], gender[keep], hashes[keep])


def test_split_labeled_duplicates_count_once_for_coverage() -> None:
    race, gender, hashes = _balanced(4)
    others = np.flatnonzero(race == 4)
    hashes[others] = hashes[others[0]]

    with pytest.raises(ValueError, match="has 1 labeled image group"):
        split_labeled(race, gender, hashes)


def test_split_labeled_without_required_races() -> None:
    gender = np.array([0, 0, 0, 1, 1, 1])
    race = np.full(6, -1)

    split = split_labeled(race, gender, _hashes(6), required_races=())

    assert set(gender[split.val].tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.0, 0.7, 0.0), "finetune_fraction must be greater than 0"),
        ((1.5, 0.0, 0.0), r"finetune_fraction must be in \[0, 1\]"),
        ((0.3, -0.1, 0.0), r"val_fraction must be in \[0, 1\]"),
        ((0.3, 0.7, 0.2), "must be at most 1"),
    ],
)
def test_validate_fractions_errors(fractions: tuple[float, float, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_fractions(*fractions)


def test_split_labeled_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="1-D arrays of one length"):
        split_labeled(np.zeros(3), np.zeros(2), _hashes(3))


@pytest.mark.real_data
@pytest.mark.parametrize(
    "fractions", [(0.3, 0.7, 0.0), (0.01, 0.7, 0.0), (0.1, 0.7, 0.2), (0.01, 0.09, 0.01)]
)
def test_real_utkface_splits_keep_every_class(
    shared_data: Path, fractions: tuple[float, float, float]
) -> None:
    from simclr_lightning.data.sources import read_utkface

    index, _ = read_utkface(shared_data / "utkface")
    labeled = index.subset(index.labeled_mask())

    split = split_labeled(
        labeled.race,
        labeled.gender,
        labeled.content_hash,
        finetune_fraction=fractions[0],
        val_fraction=fractions[1],
        test_fraction=fractions[2],
    )

    for name, part in split.parts().items():
        if fractions[("finetune", "val", "test").index(name)] == 0:
            continue
        assert set(labeled.race[part].tolist()) == {0, 1, 2, 3, 4}, name
        assert set(labeled.gender[part].tolist()) == {0, 1}, name
        part_hashes = set(labeled.content_hash[part].tolist())
        for other_name, other in split.parts().items():
            if other_name != name:
                assert not part_hashes & set(labeled.content_hash[other].tolist())
