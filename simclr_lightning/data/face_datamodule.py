"""``FaceDataModule``: UTKFace, FFHQ and CelebA for SimCLR pretraining and fine-tuning."""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.data.datasets import LabeledDataset, PretrainDataset, UInt8PretrainDataset
from simclr_lightning.data.fast_augment import CPUAugment, build_pretrain_transform
from simclr_lightning.data.images import FileImages, ImageSource, subset_images
from simclr_lightning.data.index import (
    GENDER_NAMES,
    RACE_NAMES,
    SOURCE_CELEBA,
    SOURCE_UTKFACE,
    SOURCES,
    FaceIndex,
    SkipReport,
)
from simclr_lightning.data.index_file import FaceIndexRequest, load_or_build_face_index
from simclr_lightning.data.loaders import build_loader
from simclr_lightning.data.report import DataReport
from simclr_lightning.data.splits import (
    LabeledSplit,
    conflicting_label_mask,
    split_labeled,
    unique_by_hash,
    validate_fractions,
)
from simclr_lightning.data.transforms import (
    SimCLRAugmentation,
    build_eval_transform,
    build_finetune_transform,
)

logger = logging.getLogger(__name__)

Mode = Literal["pretrain", "finetune"]
Task = Literal["race", "gender"]
Partition = Literal["train", "val", "test"]


class FaceDataModule(LightningDataModule):
    """Face images for SimCLR pretraining (``mode="pretrain"``) or fine-tuning (``"finetune"``).

    ``prepare_data``, which Lightning runs once per node before ``setup``, reads the dataset roots
    (see :mod:`simclr_lightning.data.sources`) and saves the face index in an index file (see
    :mod:`simclr_lightning.data.index_file`), unless an index file of the same roots, options and
    file listing exists. ``setup`` then reads that file on every rank, or builds the index itself
    when the file is missing. It splits the labeled rows with
    :func:`~simclr_lightning.data.splits.split_labeled` and builds the datasets. The split is seeded
    and identical on every rank and every call. Nothing is downloaded.

    Labeled rows are the UTKFace images with both a race and a gender label, plus, for the gender
    task with ``celeba_gender_labels=True``, the CelebA images with a gender label.

    In pretraining mode the training pool is every indexed image of every source, with each
    content hash kept once (the UTKFace copy first, so its labels win). Images of the test split
    are left out of the pool so that test results never come from images seen in pretraining.
    Validation images stay in the pool, where SimCLR trains on them without their labels.
    ``val_dataloader`` returns ``[bank_loader, query_loader]`` for online evaluation: the bank
    is the fine-tuning split and the query set is the validation split, each with the
    evaluation transform. It returns ``[]`` when there are no labeled rows or ``online_eval``
    is false.

    In fine-tuning mode only labeled rows are read. The training loader uses the light
    fine-tuning augmentation, and the validation, test and predict loaders use the evaluation
    transform.

    With ``augment_on_device=True`` in pretraining mode, the training loader yields un-augmented
    batches ``{"image": uint8 Tensor(B, 3, S, S), "target": LongTensor(B)}`` at
    ``S = image_size``, which ``SimCLRModule(gpu_augment=True)`` turns into the two views on the
    device with the settings in ``augmentation``.

    Args:
        utkface_root: UTKFace folder or its parent.
        ffhq_root: FFHQ ``thumbnails128x128`` or ``images1024x1024`` folder or their parent. Used
            in pretraining mode only.
        celeba_root: Folder with ``img_align_celeba/`` and the CelebA annotation files.
        mode: ``"pretrain"`` or ``"finetune"``.
        task: Label predicted and reported: ``"race"`` (5 classes) or ``"gender"`` (2 classes).
        image_size: Side of the square that every image is centre-cropped and resized to before
            augmentation, in pixels.
        batch_size: Batch size per device.
        num_workers: DataLoader worker processes.
        finetune_fraction: Fraction of the labeled rows in the fine-tuning split.
        val_fraction: Fraction of the labeled rows in the validation split.
        test_fraction: Fraction of the labeled rows in the test split (0 for none).
        seed: Seed of the split, of the CelebA per-identity choice and of the online-evaluation
            subsets.
        celeba_one_per_identity: Keep one CelebA image per identity.
        celeba_partition: Keep only this official CelebA partition, or ``None`` for all.
        celeba_gender_labels: Read CelebA gender from the ``Male`` attribute, to enlarge the
            labeled set of the gender task.
        cache_dir: Prepared cache folder to read pixels from instead of decoding files. Files are
            read when the cache is missing, incomplete, of another image size or lacks images.
            The face index is taken from the cache when the cache records the same index key.
            It is the full index, byte-identical copies included, so the splits and the
            pretraining pool are the same with and without the cache.
        index_dir: Folder of the face index files. ``None`` uses a ``simclr-lightning-index``
            folder next to the first root when that is writable, else
            ``~/.cache/simclr-lightning/face_index`` (``$XDG_CACHE_HOME`` when set).
        augmentation: SimCLR augmentation settings, or ``None`` for lightly's defaults. An unset
            ``augmentation.image_size`` becomes ``image_size``, and a different one is an error.
        online_eval: Build the online-evaluation loaders in pretraining mode.
        online_eval_max_images: Maximum number of images in each of the bank and query sets, drawn
            with ``seed`` when a split is larger.
        pin_memory: Pin batches in page-locked memory when CUDA is available.
        persistent_workers: Keep workers alive between epochs when ``num_workers > 0``.
        augment_on_device: In pretraining mode, yield uint8 training batches for the device
            augmentation of ``SimCLRModule(gpu_augment=True)`` instead of augmented views. Ignored,
            with a warning, in fine-tuning mode.
        cpu_augment: Transform that makes the two pretraining views in the DataLoader workers:
            ``"lightly"`` (lightly's ``SimCLRTransform``, float32 normalised views) or ``"fast"``
            (:class:`~simclr_lightning.data.fast_augment.FastSimCLRTransform`, uint8 views that
            ``SimCLRModule`` normalises on the device). Both draw from the same distributions.

    Raises:
        ValueError: If no root is given, fine-tuning has no labeled source, or an argument is out
            of range.
    """

    def __init__(
        self,
        utkface_root: str | None = None,
        ffhq_root: str | None = None,
        celeba_root: str | None = None,
        mode: Mode = "pretrain",
        task: Task = "race",
        image_size: int = 128,
        batch_size: int = 256,
        num_workers: int = 4,
        finetune_fraction: float = 0.3,
        val_fraction: float = 0.7,
        test_fraction: float = 0.0,
        seed: int = 0,
        celeba_one_per_identity: bool = True,
        celeba_partition: Partition | None = None,
        celeba_gender_labels: bool = False,
        cache_dir: str | None = None,
        augmentation: SimCLRAugmentation | None = None,
        online_eval: bool = True,
        online_eval_max_images: int = 2000,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        index_dir: str | None = None,
        augment_on_device: bool = False,
        cpu_augment: CPUAugment = "lightly",
    ) -> None:
        super().__init__()
        if cpu_augment not in ("lightly", "fast"):
            raise ValueError(f"cpu_augment must be 'lightly' or 'fast', got {cpu_augment!r}.")
        _check_arguments(
            utkface_root, ffhq_root, celeba_root, mode, task, image_size, batch_size, num_workers
        )
        validate_fractions(finetune_fraction, val_fraction, test_fraction)
        if celeba_partition is not None and celeba_partition not in ("train", "val", "test"):
            raise ValueError(
                "celeba_partition must be 'train', 'val', 'test' or None, "
                f"got {celeba_partition!r}."
            )
        if online_eval_max_images < 1:
            raise ValueError(
                f"online_eval_max_images must be at least 1, got {online_eval_max_images}."
            )
        if (
            mode == "finetune"
            and utkface_root is None
            and not self._celeba_labeled(celeba_root, task, celeba_gender_labels)
        ):
            raise ValueError(
                "Fine-tuning needs labeled images: pass utkface_root, or celeba_root with "
                "task='gender' and celeba_gender_labels=True."
            )
        self.save_hyperparameters()

        self.utkface_root = utkface_root
        self.ffhq_root = ffhq_root
        self.celeba_root = celeba_root
        self.mode: str = mode
        self.task: str = task
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.index_dir = index_dir
        if augment_on_device and mode != "pretrain":
            rank_zero_warn(
                "augment_on_device only changes the pretraining loader, so it is ignored in "
                "fine-tuning mode."
            )
        self.augment_on_device = augment_on_device and mode == "pretrain"
        self.augmentation = (augmentation or SimCLRAugmentation()).for_size(image_size)
        self.online_eval = online_eval
        self.online_eval_max_images = online_eval_max_images
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.class_names: list[str] = list(RACE_NAMES if task == "race" else GENDER_NAMES)
        self.num_classes: int = len(self.class_names)

        self.index: FaceIndex | None = None
        self.report: DataReport | None = None
        self.split: LabeledSplit | None = None
        self.rows: dict[str, np.ndarray] = {}
        self._datasets: dict[str, PretrainDataset | UInt8PretrainDataset | LabeledDataset] = {}

    @staticmethod
    def _celeba_labeled(celeba_root: str | None, task: str, celeba_gender_labels: bool) -> bool:
        return celeba_root is not None and task == "gender" and celeba_gender_labels

    def prepare_data(self) -> None:
        """Build and save the face index file, unless an up-to-date one or a matching cache exists.

        Lightning calls this on local rank 0 of each node, before ``setup`` runs on any rank, so
        the images are decoded and hashed once per node instead of once per process.
        """
        request, _ = self._index_request()
        load_or_build_face_index(request, index_dir=self.index_dir, cache_dir=self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Read the face index, split the labeled rows and build the datasets, once per instance."""
        if self.index is not None:
            return
        started = time.perf_counter()
        index, skipped, notes = self._read_index()
        labeled = self._labeled_rows(index, skipped, notes)
        split = self._split(index, labeled, notes)
        rows: dict[str, np.ndarray] = {}
        duplicates = 0
        if self.mode == "pretrain":
            pool = unique_by_hash(index.content_hash)
            duplicates = len(index) - pool.size
            if split is not None and split.test.size:
                test_hashes = index.content_hash[labeled[split.test]]
                pool = pool[~np.isin(index.content_hash[pool], test_hashes)]
                notes.append(
                    f"{test_hashes.size} test images are left out of the pretraining pool."
                )
            rows["pretrain"] = pool
        if split is not None:
            rows["finetune"] = labeled[split.finetune]
            rows["val"] = labeled[split.val]
            if split.test.size:
                rows["test"] = labeled[split.test]
        if self.mode == "pretrain" and split is not None and self.online_eval:
            rows["bank"] = self._cap(rows["finetune"], "bank")
            rows["query"] = self._cap(rows["val"], "query")

        self.report = DataReport.build(
            index,
            mode=self.mode,
            task=self.task,
            splits=rows,
            skipped=skipped,
            duplicates_removed=duplicates,
            notes=notes,
        )
        self.report.log()
        self._build_datasets(index, rows)
        self.index, self.split, self.rows = index, split, rows
        rank_zero_info(f"FaceDataModule setup took {time.perf_counter() - started:.2f} s.")

    def _read_index(self) -> tuple[FaceIndex, dict[str, SkipReport], list[str]]:
        request, notes = self._index_request()
        for note in notes:
            rank_zero_info(note)
        stored = load_or_build_face_index(
            request, index_dir=self.index_dir, cache_dir=self.cache_dir
        )
        return stored.index, stored.skipped, notes + stored.notes

    def _index_request(self) -> tuple[FaceIndexRequest, list[str]]:
        """Return the roots and reader options of this mode and task, and notes on unread roots."""
        notes: list[str] = []
        ffhq_root, celeba_root = self.ffhq_root, self.celeba_root
        gender_labels = self._celeba_labeled(
            self.celeba_root, self.task, self.hparams["celeba_gender_labels"]
        )
        if self.mode == "finetune":
            if ffhq_root is not None:
                notes.append("FFHQ has no labels, so ffhq_root is not read in fine-tuning mode.")
                ffhq_root = None
            if celeba_root is not None and not gender_labels:
                notes.append(
                    "CelebA is not read in fine-tuning mode unless task='gender' and "
                    "celeba_gender_labels=True."
                )
                celeba_root = None
        elif self.hparams["celeba_gender_labels"] and not gender_labels:
            notes.append("celeba_gender_labels is ignored because the task is race.")
        request = FaceIndexRequest.create(
            self.utkface_root,
            ffhq_root,
            celeba_root,
            celeba_one_per_identity=self.hparams["celeba_one_per_identity"],
            celeba_partition=self.hparams["celeba_partition"],
            celeba_gender_labels=gender_labels,
            seed=self.seed,
        )
        return request, notes

    def _labeled_rows(
        self, index: FaceIndex, skipped: dict[str, SkipReport], notes: list[str]
    ) -> np.ndarray:
        labeled = (index.source == SOURCE_UTKFACE) & index.labeled_mask()
        if self.task == "gender" and self.hparams["celeba_gender_labels"]:
            labeled |= (index.source == SOURCE_CELEBA) & (index.gender >= 0)
        rows = np.flatnonzero(labeled)
        conflicts = conflicting_label_mask(
            index.race[rows], index.gender[rows], index.content_hash[rows]
        )
        if conflicts.any():
            for row in rows[conflicts]:
                source = SOURCES[index.source[row]]
                skipped.setdefault(source, SkipReport()).add(
                    "duplicate_label_conflict", os.path.basename(index.path(row))
                )
            notes.append(
                f"{int(conflicts.sum())} labeled images are byte-identical copies of images with "
                "another race or gender label, so they are left out of the labeled splits."
            )
        return rows[~conflicts]

    def _split(
        self, index: FaceIndex, labeled: np.ndarray, notes: list[str]
    ) -> LabeledSplit | None:
        if labeled.size == 0:
            if self.mode == "pretrain" and self.online_eval:
                notes.append("No labeled images, so online evaluation is off.")
            return None
        race = index.race[labeled]
        required_races = tuple(range(len(RACE_NAMES))) if np.any(race >= 0) else ()
        try:
            return split_labeled(
                race,
                index.gender[labeled],
                index.content_hash[labeled],
                finetune_fraction=self.hparams["finetune_fraction"],
                val_fraction=self.hparams["val_fraction"],
                test_fraction=self.hparams["test_fraction"],
                seed=self.seed,
                required_races=required_races,
            )
        except ValueError as error:
            if self.mode == "finetune":
                raise
            # Online evaluation only monitors pretraining, so a small labeled set disables it.
            message = f"Online evaluation is off because the labeled split failed: {error}"
            rank_zero_warn(message)
            notes.append(message)
            return None

    def _cap(self, rows: np.ndarray, name: str) -> np.ndarray:
        if rows.size <= self.online_eval_max_images:
            return rows
        offset = 1 if name == "bank" else 2
        rng = np.random.default_rng([self.seed, offset])
        chosen = rng.choice(rows.size, size=self.online_eval_max_images, replace=False)
        return rows[np.sort(chosen)]

    def _build_datasets(self, index: FaceIndex, rows: dict[str, np.ndarray]) -> None:
        images = self._image_source(index)
        targets = index.race if self.task == "race" else index.gender
        eval_transform = build_eval_transform(self.image_size)
        for name, split_rows in rows.items():
            subset = subset_images(images, split_rows)
            split_targets = targets[split_rows]
            if name == "pretrain" and self.augment_on_device:
                self._datasets[name] = UInt8PretrainDataset(subset, split_targets)
                continue
            if name == "pretrain":
                transform = build_pretrain_transform(self.augmentation, self.hparams["cpu_augment"])
                self._datasets[name] = PretrainDataset(subset, split_targets, transform)
                continue
            is_training = name == "finetune" and self.mode == "finetune"
            transform = build_finetune_transform(self.image_size) if is_training else eval_transform
            self._datasets[name] = LabeledDataset(
                subset, split_targets, index.race[split_rows], index.gender[split_rows], transform
            )
        if self.mode == "pretrain":
            pool = rows["pretrain"]
            self._datasets["predict"] = LabeledDataset(
                subset_images(images, pool),
                targets[pool],
                index.race[pool],
                index.gender[pool],
                eval_transform,
            )

    def _image_source(self, index: FaceIndex) -> ImageSource:
        """Return the prepared cache as the image source when it covers ``index``, else files."""
        files = FileImages(index, self.image_size)
        if self.cache_dir is None:
            return files
        try:
            from simclr_lightning.data.cache import CachedImages, PreparedCache
        except ImportError as error:
            rank_zero_warn(f"The prepared cache is unavailable ({error}); reading image files.")
            return files
        try:
            cache = PreparedCache.open(self.cache_dir)
        except (FileNotFoundError, ValueError) as error:
            rank_zero_warn(f"Not using the prepared cache: {error} Reading image files instead.")
            return files
        if cache.image_size != self.image_size:
            rank_zero_warn(
                f"Not using the prepared cache {self.cache_dir}: its images are "
                f"{cache.image_size} px but image_size is {self.image_size}. Reading image files."
            )
            return files
        rows = _cache_rows(cache.index, cache.failed_rows(), index)
        missing = int((rows < 0).sum())
        if missing:
            rank_zero_warn(
                f"Not using the prepared cache {self.cache_dir}: it lacks {missing} of the "
                f"{len(index)} indexed images. Rebuild it with `simclr-lightning prepare` for the "
                "same roots. Reading image files instead."
            )
            return files
        rank_zero_info(f"Reading {len(index)} images from the prepared cache {self.cache_dir}.")
        return subset_images(CachedImages(cache), rows)

    def train_targets(self) -> np.ndarray:
        """Return the task labels of the fine-tuning split (for class weights), running setup."""
        self.setup()
        index = self._require_index()
        if "finetune" not in self.rows:
            raise ValueError("There are no labeled images, so there is no fine-tuning split.")
        labels = index.race if self.task == "race" else index.gender
        return labels[self.rows["finetune"]].astype(np.int64)

    def train_dataloader(self) -> DataLoader:
        self._require_index()
        if self.mode == "pretrain":
            if self.augment_on_device:
                self._check_device_augmentation()
            dataset = self._datasets["pretrain"]
            if len(dataset) < self.batch_size:
                raise ValueError(
                    f"The pretraining pool has {len(dataset)} images, fewer than "
                    f"batch_size={self.batch_size}, so drop_last=True leaves no batch. Lower "
                    "batch_size or add images."
                )
            return self._loader(dataset, shuffle=True, drop_last=True)
        return self._loader(self._datasets["finetune"], shuffle=True, drop_last=False)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        self._require_index()
        if self.mode == "pretrain":
            if "bank" not in self._datasets:
                return []
            return [self._eval_loader("bank"), self._eval_loader("query")]
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        self._require_index()
        if "test" not in self._datasets:
            raise ValueError(
                "There is no test split because test_fraction is 0. Set test_fraction > 0 "
                "(and lower val_fraction so the fractions sum to at most 1)."
            )
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Return the pretraining pool (pretrain mode), else the test split or, without one, val."""
        self._require_index()
        if self.mode == "pretrain":
            return self._eval_loader("predict")
        return self._eval_loader("test" if "test" in self._datasets else "val")

    def _check_device_augmentation(self) -> None:
        """Raise when the attached module declares ``gpu_augment=False`` and so expects views."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        hparams = getattr(module, "hparams", {})
        if "gpu_augment" in hparams and not hparams["gpu_augment"]:
            raise ValueError(
                "augment_on_device=True yields uint8 images without views, but the module has "
                "gpu_augment=False. Pass gpu_augment=True to SimCLRModule, or "
                "augment_on_device=False to FaceDataModule."
            )

    def _require_index(self) -> FaceIndex:
        if self.index is None:
            raise RuntimeError("FaceDataModule.setup() must run before the dataloaders are used.")
        return self.index

    def _eval_loader(self, name: str) -> DataLoader:
        return self._loader(self._datasets[name], shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return build_loader(
            dataset,
            self.batch_size,
            shuffle,
            drop_last,
            self.num_workers,
            self.pin_memory,
            self.persistent_workers,
        )


def _cache_rows(cache_index: FaceIndex, failed: np.ndarray, index: FaceIndex) -> np.ndarray:
    """Return the cache row holding the pixels of each row of ``index`` by content hash, or -1."""
    usable = np.ones(len(cache_index), dtype=bool)
    usable[failed] = False
    row_of_hash: dict[bytes, int] = {}
    for row, content_hash in enumerate(cache_index.content_hash.tolist()):
        if usable[row] and content_hash:
            row_of_hash.setdefault(content_hash, row)
    hashes = index.content_hash.tolist()
    return np.array([row_of_hash.get(h, -1) for h in hashes], dtype=np.int64)


def _check_arguments(
    utkface_root: str | None,
    ffhq_root: str | None,
    celeba_root: str | None,
    mode: str,
    task: str,
    image_size: int,
    batch_size: int,
    num_workers: int,
) -> None:
    if utkface_root is None and ffhq_root is None and celeba_root is None:
        raise ValueError(
            "No dataset root given: pass at least one of utkface_root, ffhq_root or celeba_root."
        )
    if mode not in ("pretrain", "finetune"):
        raise ValueError(f"mode must be 'pretrain' or 'finetune', got {mode!r}.")
    if task not in ("race", "gender"):
        raise ValueError(f"task must be 'race' or 'gender', got {task!r}.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer of at least 8 pixels, got {image_size!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer of 0 or more, got {num_workers!r}.")
