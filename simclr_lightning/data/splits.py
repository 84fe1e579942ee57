"""Seeded, stratified splits of labeled faces that keep byte-identical duplicates together.

The split is a pure function of its inputs and the seed (a local ``numpy.random.Generator``, no
global state), so every rank of a distributed run and every call of ``setup`` get the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simclr_lightning.data.index import GENDER_NAMES, RACE_NAMES

#: Names of the split parts, in the order fractions are given.
PART_NAMES: tuple[str, ...] = ("finetune", "val", "test")

_FRACTION_TOLERANCE = 1e-9
_UNUSED = -1


@dataclass(frozen=True)
class LabeledSplit:
    """Row numbers of each part of a labeled split, sorted ascending.

    Attributes:
        finetune: Rows used to train the classifier.
        val: Validation rows.
        test: Test rows, empty when no test fraction was requested.
        unused: Labeled rows left out because the fractions sum to less than 1.
    """

    finetune: np.ndarray
    val: np.ndarray
    test: np.ndarray
    unused: np.ndarray

    def parts(self) -> dict[str, np.ndarray]:
        """Return the three parts by name (``finetune``, ``val``, ``test``)."""
        return {"finetune": self.finetune, "val": self.val, "test": self.test}


def group_by_hash(content_hash: np.ndarray) -> np.ndarray:
    """Return a group number per row so that rows with equal content hashes share a number.

    Groups are numbered in order of first appearance. Rows with an empty hash never merge.
    """
    hashes = np.asarray(content_hash)
    count = hashes.shape[0]
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    _, inverse = np.unique(hashes, return_inverse=True)
    keys = inverse.reshape(-1).astype(np.int64)
    # Give every row without a hash its own key, past the range of the real hashes.
    empty = hashes == hashes.dtype.type()
    keys = np.where(empty, keys.max() + 1 + np.arange(count), keys)
    _, first_row, key_group = np.unique(keys, return_index=True, return_inverse=True)
    # Renumber the groups by the row where each first appears.
    rank = np.empty(first_row.size, dtype=np.int64)
    rank[np.argsort(first_row, kind="stable")] = np.arange(first_row.size)
    return rank[key_group.reshape(-1)]


def unique_by_hash(content_hash: np.ndarray) -> np.ndarray:
    """Return the sorted rows that keep the first occurrence of each content hash."""
    groups = group_by_hash(content_hash)
    _, first = np.unique(groups, return_index=True)
    return np.sort(first)


def conflicting_label_mask(
    race: np.ndarray, gender: np.ndarray, content_hash: np.ndarray
) -> np.ndarray:
    """Return a mask of rows whose byte-identical copies carry a different race or gender.

    The same pixels cannot have two true labels, so such groups are unreliable for training and
    for evaluation alike.
    """
    groups = group_by_hash(content_hash)
    if groups.size == 0:
        return np.zeros(0, dtype=bool)
    # One integer per (race, gender) pair; -1 labels map to distinct keys as well.
    key = (np.asarray(race, dtype=np.int64) + 1) * 8 + (np.asarray(gender, dtype=np.int64) + 1)
    lowest = np.full(int(groups.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    highest = np.full(int(groups.max()) + 1, np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(lowest, groups, key)
    np.maximum.at(highest, groups, key)
    return (lowest != highest)[groups]


def split_labeled(
    race: np.ndarray,
    gender: np.ndarray,
    content_hash: np.ndarray,
    *,
    finetune_fraction: float = 0.3,
    val_fraction: float = 0.7,
    test_fraction: float = 0.0,
    seed: int = 0,
    required_races: Sequence[int] = tuple(range(len(RACE_NAMES))),
    required_genders: Sequence[int] = tuple(range(len(GENDER_NAMES))),
) -> LabeledSplit:
    """Split labeled rows into fine-tune, validation and test parts, stratified by race x gender.

    Rows with the same content hash form one group, and a group always lands in one part. Each
    (race, gender) stratum is shuffled with ``seed`` and divided by the fractions with
    largest-remainder rounding, so every part gets at least one group of a stratum that has
    enough groups. A final pass moves single groups so that every required race and gender
    appears in every part with a non-zero fraction. Rows past the sum of the fractions are left
    unused, which gives labeled fractions such as 1 % (``finetune_fraction=0.01``).

    Args:
        race: Race label per row, -1 when unknown.
        gender: Gender label per row, -1 when unknown.
        content_hash: Content hash per row (see :class:`~simclr_lightning.data.index.FaceIndex`).
        finetune_fraction: Fraction of each stratum's groups for fine-tuning, in (0, 1].
        val_fraction: Fraction for validation, in [0, 1].
        test_fraction: Fraction for testing, in [0, 1].
        seed: Seed of the shuffle.
        required_races: Race labels that every part must contain.
        required_genders: Gender labels that every part must contain.

    Returns:
        The row numbers of each part.

    Raises:
        ValueError: If a fraction is out of range, the fractions sum to more than 1, the arrays
            differ in length, or a required class has fewer groups than there are parts.
    """
    fractions = validate_fractions(finetune_fraction, val_fraction, test_fraction)
    race = np.asarray(race, dtype=np.int64)
    gender = np.asarray(gender, dtype=np.int64)
    hashes = np.asarray(content_hash)
    if not race.shape == gender.shape == hashes.shape or race.ndim != 1:
        raise ValueError(
            "race, gender and content_hash must be 1-D arrays of one length, got shapes "
            f"{race.shape}, {gender.shape} and {hashes.shape}."
        )

    groups = group_by_hash(hashes)
    group_count = int(groups.max()) + 1 if groups.size else 0
    first_row = np.full(group_count, len(groups), dtype=np.int64)
    np.minimum.at(first_row, groups, np.arange(len(groups)))
    group_race = race[first_row]
    group_gender = gender[first_row]

    active = [part for part, fraction in enumerate(fractions) if fraction > 0]
    _check_coverage_possible(group_race, required_races, RACE_NAMES, "race", active)
    _check_coverage_possible(group_gender, required_genders, GENDER_NAMES, "gender", active)

    assignment = _assign_strata(group_race, group_gender, fractions, active, seed)
    _repair_coverage(assignment, group_race, group_gender, required_races, required_genders, active)

    row_part = assignment[groups]
    return LabeledSplit(
        finetune=np.flatnonzero(row_part == 0),
        val=np.flatnonzero(row_part == 1),
        test=np.flatnonzero(row_part == 2),
        unused=np.flatnonzero(row_part == _UNUSED),
    )


def validate_fractions(finetune: float, val: float, test: float) -> tuple[float, float, float]:
    """Return the three split fractions after checking their ranges and their sum.

    Raises:
        ValueError: If a fraction is outside [0, 1], ``finetune`` is 0 or the sum exceeds 1.
    """
    for name, value in (("finetune_fraction", finetune), ("val_fraction", val)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}.")
    if not 0.0 <= test <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test}.")
    if finetune <= 0.0:
        raise ValueError(f"finetune_fraction must be greater than 0, got {finetune}.")
    total = finetune + val + test
    if total > 1.0 + _FRACTION_TOLERANCE:
        raise ValueError(
            f"finetune_fraction + val_fraction + test_fraction must be at most 1, got "
            f"{finetune} + {val} + {test} = {total:g}. Lower val_fraction to make room for "
            "the test part (for example 0.3 / 0.5 / 0.2)."
        )
    return finetune, val, test


def _check_coverage_possible(
    group_labels: np.ndarray,
    required: Sequence[int],
    names: Sequence[str],
    attribute: str,
    active: list[int],
) -> None:
    for label in required:
        available = int((group_labels == label).sum())
        if available < len(active):
            parts = ", ".join(PART_NAMES[part] for part in active)
            raise ValueError(
                f"{attribute} class {label} ({names[label]}) has {available} labeled image "
                f"group(s) (byte-identical duplicates count once), but the {len(active)} parts "
                f"{parts} each need at least one. Add labeled images of this class, or use "
                "fewer parts (test_fraction=0)."
            )


def _largest_remainder(total: int, fractions: Sequence[float]) -> np.ndarray:
    """Split ``total`` into counts proportional to ``fractions`` plus a last, unused share."""
    shares = np.asarray([*fractions, max(0.0, 1.0 - sum(fractions))], dtype=np.float64) * total
    counts = np.floor(shares + _FRACTION_TOLERANCE).astype(np.int64)
    remainders = shares - counts
    # Ties go to the earlier part, so the result does not depend on floating-point noise.
    for position in np.argsort(-remainders, kind="stable")[: total - int(counts.sum())]:
        counts[position] += 1
    return counts


def _assign_strata(
    group_race: np.ndarray,
    group_gender: np.ndarray,
    fractions: Sequence[float],
    active: list[int],
    seed: int,
) -> np.ndarray:
    """Return the part of every group (``-1`` for unused), stratum by stratum."""
    rng = np.random.default_rng(seed)
    assignment = np.full(group_race.size, _UNUSED, dtype=np.int64)
    strata = sorted(set(zip(group_race.tolist(), group_gender.tolist(), strict=True)))
    for race_label, gender_label in strata:
        members = np.flatnonzero((group_race == race_label) & (group_gender == gender_label))
        members = members[rng.permutation(members.size)]
        counts = _largest_remainder(members.size, fractions)
        if members.size >= len(active):
            _give_each_active_part_one(counts, active)
        start = 0
        for part, count in enumerate(counts[: len(fractions)]):
            assignment[members[start : start + count]] = part
            start += count
    return assignment


def _give_each_active_part_one(counts: np.ndarray, active: list[int]) -> None:
    unused = len(counts) - 1
    for part in active:
        if counts[part] > 0:
            continue
        donor = unused if counts[unused] > 0 else int(np.argmax(counts[: len(counts) - 1]))
        counts[donor] -= 1
        counts[part] += 1


def _repair_coverage(
    assignment: np.ndarray,
    group_race: np.ndarray,
    group_gender: np.ndarray,
    required_races: Sequence[int],
    required_genders: Sequence[int],
    active: list[int],
) -> None:
    """Move single groups until every active part contains every required race and gender."""
    checks = [(group_race, label) for label in required_races]
    checks += [(group_gender, label) for label in required_genders]
    # Each move fixes one missing (part, class) pair, and at most a few can break again.
    for _ in range(4 * len(checks) * max(1, len(active)) + 1):
        missing = _first_missing(assignment, checks, active)
        if missing is None:
            return
        part, labels, label = missing
        candidates = np.flatnonzero(labels == label)
        unused = candidates[assignment[candidates] == _UNUSED]
        if unused.size:
            assignment[unused[-1]] = part
            continue
        assignment[_choose_donor_group(assignment, candidates, checks, active)] = part
    if _first_missing(assignment, checks, active) is not None:
        raise RuntimeError("Could not place every required class in every split part.")


def _first_missing(
    assignment: np.ndarray, checks: list[tuple[np.ndarray, int]], active: list[int]
) -> tuple[int, np.ndarray, int] | None:
    for labels, label in checks:
        for part in active:
            if not np.any((labels == label) & (assignment == part)):
                return part, labels, label
    return None


def _choose_donor_group(
    assignment: np.ndarray,
    candidates: np.ndarray,
    checks: list[tuple[np.ndarray, int]],
    active: list[int],
) -> int:
    """Return a group of the missing class whose move leaves its own part covered, if one exists."""
    part_counts = {part: int((assignment[candidates] == part).sum()) for part in active}
    fallback = -1
    for part in sorted(active, key=lambda p: -part_counts[p]):
        if part_counts[part] < 2:
            continue
        for group in candidates[assignment[candidates] == part][::-1]:
            fallback = int(group) if fallback < 0 else fallback
            if _still_covered_without(assignment, int(group), checks):
                return int(group)
    return fallback


def _still_covered_without(
    assignment: np.ndarray, group: int, checks: list[tuple[np.ndarray, int]]
) -> bool:
    part = assignment[group]
    for labels, label in checks:
        if labels[group] != label:
            continue
        others = (labels == label) & (assignment == part)
        if int(others.sum()) < 2:
            return False
    return True
