"""Measure two-view SimCLR augmentation throughput on the CPU.

The baseline is the plain path: a DataLoader whose workers decode JPEG or PNG files with PIL and
apply lightly's ``SimCLRTransform``. It is compared with the prepared path: the same images decoded
once into the prepared uint8 cache (``prepare_cache``), read by memory map, then augmented

* with lightly's transform on a PIL image of the cached row,
* with torchvision v2 transforms on the uint8 tensor of each row, or
* with :class:`SimCLRBatchAugment` on whole uint8 batches inside each worker's collate function,
  or
* with :class:`FastSimCLRTransform` on the uint8 array of each row, which returns uint8 views and
  leaves the normalisation to the model on the device.

A last row reads uint8 batches from the cache with no augmentation at all: the CPU cost left when
the views are made on the GPU.

Every pipeline runs with 1 and 2 workers. Throughput counts source images per second, each
giving two augmented views. "Per CPU second" divides the images by the CPU time that the main
process and its workers used in the timed window, which stays comparable when other processes
share the cores. "Per worker" divides images/s by the worker count.

Input images are the UTKFace files under ``../shared/data/utkface/UTKFace`` when present (200x200
JPEGs), otherwise generated 200x200 JPEGs in a temporary folder (``--generate`` forces this). The
results are printed and written as a section of ``docs/benchmarks.md``.

Usage::

    python benchmarks/data_pipeline.py --quick    # about a minute on 2 cores
    python benchmarks/data_pipeline.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, default_collate
from torchvision.transforms import v2 as T

from simclr_lightning.data.cache import CachedImages, PreparedCache, prepare_cache
from simclr_lightning.data.fast_augment import FastSimCLRTransform
from simclr_lightning.data.gpu_augment import SimCLRBatchAugment, UInt8ImageDataset
from simclr_lightning.data.images import load_rgb
from simclr_lightning.data.index import FaceIndex
from simclr_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SimCLRAugmentation,
    build_simclr_transform,
)

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "benchmarks.md"
REAL_IMAGES = ROOT.parent / "shared" / "data" / "utkface" / "UTKFace"
SECTION_TITLE = "## Augmentation throughput on the CPU"
# Loader-side cost when the views are made on the GPU: no augmentation runs in the workers.
DEVICE_ROW = "cache + uint8 batches, augmentation left to the GPU"
TARGET_RATIO = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Short run: fewer images and batches.")
    parser.add_argument(
        "--generate", action="store_true", help="Use generated JPEGs even when UTKFace is present."
    )
    parser.add_argument(
        "--count", type=int, default=2000, help="Generated images (without --quick)."
    )
    parser.add_argument("--image-size", type=int, default=128, help="Side of the views, in pixels.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per batch.")
    parser.add_argument(
        "--batches", type=int, default=30, help="Timed batches per measurement (without --quick)."
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to run."
    )
    parser.add_argument(
        "--no-report", action="store_true", help="Print the results without writing the report."
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.count = min(args.count, 400)
        args.batches = min(args.batches, 8)
    return args


# ---------------------------------------------------------------------------------------------
# Input images
# ---------------------------------------------------------------------------------------------


def generate_jpegs(folder: Path, count: int, size: int = 200, seed: int = 0) -> list[str]:
    """Write ``count`` smooth random colour JPEGs of ``size`` pixels and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, size)
    paths = []
    for i in range(count):
        # A few random low-frequency waves per channel give JPEG-typical content.
        frequencies = rng.uniform(1.0, 6.0, (3, 2))
        phases = rng.uniform(0.0, 2 * np.pi, (3, 2))
        channels = [
            np.sin(frequencies[c, 0] * 2 * np.pi * grid[:, None] + phases[c, 0])
            * np.cos(frequencies[c, 1] * 2 * np.pi * grid[None, :] + phases[c, 1])
            for c in range(3)
        ]
        pixels = np.stack(channels, axis=-1) * 100 + 128 + rng.normal(0, 8, (size, size, 3))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def input_images(args: argparse.Namespace, workdir: Path) -> tuple[list[str], str]:
    """Return the image paths to benchmark and a description of them."""
    if REAL_IMAGES.is_dir() and not args.generate:
        paths = sorted(str(path) for path in REAL_IMAGES.glob("*.jpg"))
        if args.quick:
            paths = paths[: args.count]
        if paths:
            return paths, f"{len(paths)} UTKFace JPEGs (200x200) from {REAL_IMAGES.name}/"
    paths = generate_jpegs(workdir / "images", args.count)
    return paths, f"{len(paths)} generated 200x200 JPEGs"


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


class FileViews(Dataset[dict[str, Any]]):
    """Baseline: decode a file with PIL, then two views with lightly's ``SimCLRTransform``."""

    def __init__(self, paths: list[str], augmentation: SimCLRAugmentation) -> None:
        self.paths = paths
        self.transform = build_simclr_transform(augmentation)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"views": self.transform(load_rgb(self.paths[index])), "target": -1}


class CachedLightlyViews(Dataset[dict[str, Any]]):
    """A prepared-cache row as a PIL image, then two views with lightly's transform."""

    def __init__(self, images: CachedImages, augmentation: SimCLRAugmentation) -> None:
        self.images = images
        self.transform = build_simclr_transform(augmentation)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"views": self.transform(self.images.load(index)), "target": -1}


def build_torchvision_view(augmentation: SimCLRAugmentation) -> T.Compose:
    """Build torchvision v2 transforms on uint8 tensors with the same settings as lightly's."""
    aug = augmentation
    strength = aug.cj_strength
    jitter = T.ColorJitter(
        brightness=strength * aug.cj_bright,
        contrast=strength * aug.cj_contrast,
        saturation=strength * aug.cj_sat,
        hue=strength * aug.cj_hue,
    )
    # A Gaussian kernel of 3 sigma each side at the largest sigma.
    kernel_size = 2 * int(np.ceil(3 * aug.blur_sigma[1])) + 1
    return T.Compose(
        [
            T.RandomResizedCrop(aug.image_size, scale=(aug.min_scale, 1.0), antialias=True),
            T.RandomHorizontalFlip(aug.hflip_prob),
            T.RandomApply([jitter], p=aug.cj_prob),
            T.RandomGrayscale(aug.gray_prob),
            T.RandomApply([T.GaussianBlur(kernel_size, sigma=aug.blur_sigma)], p=aug.blur_prob),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class CachedTorchvisionViews(Dataset[dict[str, Any]]):
    """A prepared-cache row as a uint8 tensor, then two views with torchvision v2."""

    def __init__(self, images: CachedImages, augmentation: SimCLRAugmentation) -> None:
        self.uint8 = UInt8ImageDataset(images)
        self.view = build_torchvision_view(augmentation)

    def __len__(self) -> int:
        return len(self.uint8)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.uint8[index]["image"]
        return {"views": [self.view(image), self.view(image)], "target": -1}


class CachedFastViews(Dataset[dict[str, Any]]):
    """A prepared-cache row as a uint8 array, then two uint8 views with FastSimCLRTransform."""

    def __init__(self, images: CachedImages, augmentation: SimCLRAugmentation) -> None:
        self.images = images
        self.transform = FastSimCLRTransform(augmentation)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"views": self.transform(self.images.load_array(index)), "target": -1}


class BatchAugmentCollate:
    """Collate uint8 images, then augment them with :class:`SimCLRBatchAugment` in chunks.

    On one CPU core, chunks of about 16 images keep the float32 intermediates in cache and run
    about twice as fast per image as whole batches of 64 (measured on the machine of the report).
    """

    def __init__(self, augmentation: SimCLRAugmentation, chunk_size: int = 16) -> None:
        self.augment = SimCLRBatchAugment(augmentation)
        self.chunk_size = chunk_size

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(items)
        images = batch.pop("image")
        chunks = [self.augment(chunk) for chunk in images.split(self.chunk_size)]
        batch["views"] = [torch.cat([chunk[view] for chunk in chunks]) for view in (0, 1)]
        return batch


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """Throughput of one pipeline with one worker count."""

    pipeline: str
    workers: int
    images_per_second: float
    cpu_seconds: float
    images: int

    @property
    def images_per_cpu_second(self) -> float:
        return self.images / self.cpu_seconds

    @property
    def images_per_second_per_worker(self) -> float:
        return self.images_per_second / self.workers


def process_tree_cpu_seconds(process: psutil.Process) -> float:
    """Return the user plus system CPU seconds of ``process`` and its live children."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(
    name: str,
    dataset: Dataset[Any],
    workers: int,
    args: argparse.Namespace,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> Measurement:
    """Time ``args.batches`` batches after a warm-up of two batches per worker."""
    warmup = 2 * workers
    total = warmup + args.batches
    generator = torch.Generator().manual_seed(0)
    sampler = RandomSampler(
        range(len(cast(Sized, dataset))),
        replacement=True,
        num_samples=total * args.batch_size,
        generator=generator,
    )
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=True,
    )
    process = psutil.Process()
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)

    cpu_start = process_tree_cpu_seconds(process)
    started = time.perf_counter()
    for _ in range(args.batches):
        batch = next(iterator)
    if "views" not in batch and "image" not in batch:
        raise RuntimeError(f"{name} yielded a batch without views or images: {sorted(batch)}.")
    seconds = time.perf_counter() - started
    # Read the workers' CPU time before the iterator shuts them down.
    cpu_seconds = process_tree_cpu_seconds(process) - cpu_start
    del iterator

    images = args.batches * args.batch_size
    result = Measurement(name, workers, images / seconds, cpu_seconds, images)
    print(
        f"{name:<44} workers={workers}  {result.images_per_second:8.0f} images/s  "
        f"{result.images_per_cpu_second:8.0f} per CPU s"
    )
    return result


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[Measurement], dict[str, str]]:
    paths, description = input_images(args, workdir)
    augmentation = SimCLRAugmentation(image_size=args.image_size)
    print(f"input: {description}")

    started = time.perf_counter()
    index = FaceIndex(paths, source=0)
    cache_dir = prepare_cache(index, workdir / "cache", args.image_size, 2, progress=False)
    cache = CachedImages(PreparedCache.open(cache_dir))
    prepare_seconds = time.perf_counter() - started
    print(f"prepared cache of {len(paths)} images in {prepare_seconds:.1f} s")

    pipelines: list[tuple[str, Dataset[Any], Callable[[list[Any]], Any] | None]] = [
        ("files + PIL + lightly (baseline)", FileViews(paths, augmentation), None),
        ("cache + PIL + lightly", CachedLightlyViews(cache, augmentation), None),
        ("cache + torchvision v2 on uint8", CachedTorchvisionViews(cache, augmentation), None),
        (
            "cache + SimCLRBatchAugment in workers",
            UInt8ImageDataset(cache),
            BatchAugmentCollate(augmentation),
        ),
        ("cache + FastSimCLRTransform, uint8 views", CachedFastViews(cache, augmentation), None),
        (DEVICE_ROW, UInt8ImageDataset(cache), None),
    ]
    results = []
    for workers in args.workers:
        for name, dataset, collate_fn in pipelines:
            results.append(measure(name, dataset, workers, args, collate_fn))
    info = {"input": description, "prepare": f"{prepare_seconds:.1f}"}
    return results, info


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine_description() -> str:
    """Return the cores, CPU model, memory and library versions of this machine."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = psutil.virtual_memory().total / 1024**3
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory_gib:.0f} GiB RAM, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def load_note() -> str:
    """Return a sentence with the load average, which shows other processes sharing the cores."""
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"Load average (1, 5, 15 min) at the end of the run: {load}. A value above the core "
        "count means other processes shared the cores during the run."
    )


def render(results: list[Measurement], info: dict[str, str], args: argparse.Namespace) -> str:
    """Render the results as a Markdown section with the command, machine and date."""
    command = "python benchmarks/data_pipeline.py " + shlex.join(sys.argv[1:])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION_TITLE,
        "",
        f"Command: `{command.strip()}`, run on {date}.",
        "",
        f"Machine: {machine_description()}.",
        "",
        load_note(),
        "",
        f"Input: {info['input']}, views of {args.image_size} px, batch {args.batch_size}, "
        f"{args.batches} timed batches per row after a warm-up of two batches per worker. The "
        f"prepared cache ({args.image_size} px) took {info['prepare']} s to build with 2 "
        "processes and is not counted in the rows.",
        "",
        "| pipeline | workers | images/s | images/s per worker | images per CPU second | "
        "per CPU second vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        baseline = next(
            r for r in results if r.workers == result.workers and "baseline" in r.pipeline
        )
        ratio = result.images_per_cpu_second / baseline.images_per_cpu_second
        lines.append(
            f"| {result.pipeline} | {result.workers} | {result.images_per_second:,.0f} | "
            f"{result.images_per_second_per_worker:,.0f} | "
            f"{result.images_per_cpu_second:,.0f} | {ratio:.2f}x |"
        )
    lines += [
        "",
        target_sentence(results),
        "",
        f'The row "{DEVICE_ROW}" makes no views on the CPU. It is the loader-side cost when '
        "SimCLRBatchAugment runs on the GPU after the batch transfer, and it does not count "
        "towards the target. The FastSimCLRTransform row leaves ToTensor and normalisation, a "
        "per-pixel float conversion, to SimCLRModule on the device.",
        "",
    ]
    return "\n".join(lines)


def target_sentence(results: list[Measurement]) -> str:
    """State the best prepared-pipeline ratio per CPU second and whether it meets the target."""
    best_ratio = 0.0
    best = results[0]
    for result in results:
        if "baseline" in result.pipeline or result.pipeline == DEVICE_ROW:
            continue
        baseline = next(
            r for r in results if r.workers == result.workers and "baseline" in r.pipeline
        )
        ratio = result.images_per_cpu_second / baseline.images_per_cpu_second
        if ratio > best_ratio:
            best_ratio, best = ratio, result
    verdict = "meets" if best_ratio >= TARGET_RATIO else "does not meet"
    return (
        f"Fastest prepared pipeline per CPU second: {best.pipeline} with {best.workers} "
        f"worker(s), {best_ratio:.2f}x the baseline, which {verdict} the {TARGET_RATIO:.0f}x "
        "target."
    )


def write_section(section: str, title: str, report: Path = REPORT) -> None:
    """Replace the section starting with ``title`` in ``report``, or append it."""
    if report.is_file():
        text = report.read_text(encoding="utf-8")
    else:
        text = "# Benchmarks\n\nMeasured numbers, each with the command and machine behind it.\n"
    start = text.find(title + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(title))
        tail = "" if end < 0 else text[end + 1 :]
        text = text[:start] + section + ("\n" + tail if tail else "")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="simclr-data-pipeline-"))
    try:
        results, info = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    section = render(results, info, args)
    print()
    print(section)
    if not args.no_report:
        write_section(section, SECTION_TITLE)
        print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
