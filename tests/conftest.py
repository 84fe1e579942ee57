"""Shared fixtures: tiny fake UTKFace, FFHQ and CelebA trees, and the real samples when present."""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclr_lightning.data import sources
from simclr_lightning.data.images import ImageCheck, inspect_image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: Side of the generated fixture images, in pixels.
FIXTURE_SIZE = 16
#: Generated UTKFace images per (race, gender) pair with a standard name.
IMAGES_PER_PAIR = 4


def image_bytes(
    seed: int, fmt: str = "JPEG", size: tuple[int, int] = (FIXTURE_SIZE, FIXTURE_SIZE)
) -> bytes:
    """Return an encoded image of random pixels, different for every ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def write_image(
    path: Path, seed: int, fmt: str = "JPEG", size: tuple[int, int] | None = None
) -> Path:
    """Write an image of random pixels to ``path`` and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt, size or (FIXTURE_SIZE, FIXTURE_SIZE)))
    return path


def utkface_name(age: int, gender: int, race: int, stamp: int) -> str:
    """Return a standard aligned-crop UTKFace name with a 17-digit date-time."""
    return f"{age}_{gender}_{race}_{20170101000000000 + stamp}.jpg.chip.jpg"


@dataclass
class UTKFaceTree:
    """A generated UTKFace folder and the facts the tests check against.

    Attributes:
        root: Parent folder that contains ``UTKFace/``.
        folder: The ``UTKFace/`` folder itself.
        labeled: Number of indexed files with race and gender labels.
        indexed: Number of files that decode and are indexed.
        race_counts: Labeled rows per race label.
        gender_counts: Labeled rows per gender label.
        skipped: Expected skip reasons and counts of broken or ignored files.
        duplicate: Names of the byte-identical pair with equal labels.
    """

    root: Path
    folder: Path
    labeled: int
    indexed: int
    race_counts: dict[int, int]
    gender_counts: dict[int, int]
    skipped: dict[str, int] = field(default_factory=dict)
    duplicate: tuple[str, str] = ("", "")


def build_utkface_tree(root: Path) -> UTKFaceTree:
    """Write 40 standard images (4 per race x gender pair) plus one file of each hard case."""
    folder = root / "UTKFace"
    folder.mkdir(parents=True)
    seed = 0
    race_counts = {race: 0 for race in range(5)}
    gender_counts = {0: 0, 1: 0}
    for race in range(5):
        for gender in range(2):
            for k in range(IMAGES_PER_PAIR):
                seed += 1
                write_image(folder / utkface_name(20 + k, gender, race, seed), seed)
                race_counts[race] += 1
                gender_counts[gender] += 1

    # A byte-identical copy with the same labels under another date-time.
    first = utkface_name(20, 0, 0, 1)
    copy = utkface_name(30, 0, 0, 999)
    (folder / copy).write_bytes((folder / first).read_bytes())
    race_counts[0] += 1
    gender_counts[0] += 1

    # Names that break the pattern: missing race (unlabeled), stray character (parsed).
    write_image(folder / "39_1_20170116174525125.jpg.chip.jpg", 1001)
    write_image(folder / "44_1_4_20170116235150272 .jpg.chip.jpg", 1002)
    race_counts[4] += 1
    gender_counts[1] += 1
    # Labels out of range and a name without fields: indexed for pretraining, unlabeled.
    write_image(folder / "0_0_0_20170101000000001.jpg.chip.jpg", 1003)
    write_image(folder / "face.jpg.chip.jpg", 1004)

    # Broken files, which are left out of the index.
    (folder / "1_0_0_20170101000000002.jpg.chip.jpg").write_bytes(b"")
    (folder / "2_0_0_20170101000000003.jpg.chip.jpg").write_bytes(b"this is a text file")
    truncated = image_bytes(1005)
    (folder / "3_0_0_20170101000000004.jpg.chip.jpg").write_bytes(truncated[: len(truncated) // 2])
    (folder / "notes.txt").write_text("not an image")

    labeled = sum(race_counts.values())
    return UTKFaceTree(
        root=root,
        folder=folder,
        labeled=labeled,
        indexed=labeled + 3,
        race_counts=race_counts,
        gender_counts=gender_counts,
        skipped={"empty": 1, "not_an_image": 1, "truncated": 1, "ignored_extension": 1},
        duplicate=(first, copy),
    )


@pytest.fixture
def utkface_tree(tmp_path: Path) -> UTKFaceTree:
    """A tiny UTKFace tree at ``tmp_path/utkface``."""
    return build_utkface_tree(tmp_path / "utkface")


@pytest.fixture
def ffhq_tree(tmp_path: Path) -> Path:
    """A tiny FFHQ tree: ``ffhq/thumbnails128x128/{00000,01000}/NNNNN.png``, 6 images."""
    folder = tmp_path / "ffhq" / "thumbnails128x128"
    for number in [0, 1, 2, 3, 1000, 1001]:
        write_image(
            folder / f"{number // 1000 * 1000:05d}" / f"{number:05d}.png", 5000 + number, "PNG"
        )
    return tmp_path / "ffhq"


@dataclass
class CelebATree:
    """A generated CelebA folder.

    Attributes:
        root: Folder with ``img_align_celeba/`` and the three annotation files.
        identities: Identity of each present image, by file name.
        genders: Gender label (0 male, 1 female) of each present image, by file name.
        partitions: Official partition (0 train, 1 val, 2 test) of each present image.
        missing_rows: Annotation rows per file whose image is absent.
    """

    root: Path
    identities: dict[str, int]
    genders: dict[str, int]
    partitions: dict[str, int]
    missing_rows: int


ATTRIBUTE_NAMES = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Male", "Smiling"]


def build_celeba_tree(root: Path) -> CelebATree:
    """Write 12 images of 4 identities (3 each) and CRLF annotation files with 20 rows each.

    Rows 13 to 20 name images that are not present, like a partial copy of the full set.
    """
    images = root / "img_align_celeba"
    identities: dict[str, int] = {}
    genders: dict[str, int] = {}
    partitions: dict[str, int] = {}
    identity_lines, attribute_lines, partition_lines = [], [], []
    for number in range(1, 21):
        name = f"{number:06d}.jpg"
        identity = (number - 1) % 4 + 1  # 1-based, as in identity_CelebA.txt
        male = 1 if identity in (1, 2) else -1
        if number <= 8:
            partition = 0
        elif number <= 10:
            partition = 1
        else:
            partition = 2
        identity_lines.append(f"{name} {identity}")
        # Width-2 fields joined by one space give runs of two spaces before each "1".
        values = [-1, 1, male, -1]
        attribute_lines.append(f"{name} " + " ".join(f"{value:2d}" for value in values))
        partition_lines.append(f"{name} {partition}")
        if number <= 12:
            write_image(images / name, 9000 + number, size=(14, 18))
            identities[name] = identity
            genders[name] = 0 if male == 1 else 1
            partitions[name] = partition
    (root / "identity_CelebA.txt").write_bytes(("\r\n".join(identity_lines) + "\r\n").encode())
    header = f"20\r\n{' '.join(ATTRIBUTE_NAMES)} \r\n"
    (root / "list_attr_celeba.txt").write_bytes(
        (header + "\r\n".join(attribute_lines) + "\r\n").encode()
    )
    (root / "list_eval_partition.txt").write_bytes(("\r\n".join(partition_lines) + "\r\n").encode())
    return CelebATree(root, identities, genders, partitions, missing_rows=8)


@pytest.fixture
def celeba_tree(tmp_path: Path) -> CelebATree:
    """A tiny CelebA tree at ``tmp_path/celeba``."""
    return build_celeba_tree(tmp_path / "celeba")


@pytest.fixture
def shared_data() -> Path:
    """The real dataset samples next to the repository, or skip when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"The real dataset samples are not at {SHARED_DATA}.")
    return SHARED_DATA


class InspectCounter:
    """Counter of the ``inspect_image`` calls made by the source readers."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, path: str) -> ImageCheck:
        with self._lock:
            self.calls += 1
        return inspect_image(path)


@pytest.fixture
def inspect_counter(monkeypatch: pytest.MonkeyPatch) -> InspectCounter:
    """Count the images that the source readers decode during a test."""
    counter = InspectCounter()
    monkeypatch.setattr(sources, "inspect_image", counter)
    return counter
