"""Measure the face data pipeline on a generated tree of many small files.

The script writes ``--count`` small images in the UTKFace and FFHQ folder layouts to a temporary
folder, then measures:

1. the index build (``read_face_sources``: listing, decoding and hashing every file),
2. the cache build rate of ``prepare_cache`` with a process pool and with a thread pool,
3. one DataLoader epoch reading from the cache and one reading the files, with the peak memory
   of any one worker process (USS, PSS and RSS from psutil, and Private_Dirty from
   /proc/PID/smaps_rollup, sampled every 0.1 s).

The temporary folder is deleted at the end unless ``--keep`` is given. The results are printed
and written as a section of ``docs/benchmarks.md``, replacing the section of an earlier run.

Usage::

    python benchmarks/data_scale.py --count 2000      # quick run, 16 s on 2 cores
    python benchmarks/data_scale.py                   # 100,000 files, 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.data.cache import CachedImages, PreparedCache, default_workers, prepare_cache
from simclr_lightning.data.images import FileImages, ImageSource
from simclr_lightning.data.index import FaceIndex
from simclr_lightning.data.sources import read_face_sources
from simclr_lightning.data.splits import unique_by_hash

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION_TITLE = "## Data pipeline at scale"
MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="Number of files to generate.")
    parser.add_argument(
        "--file-size", type=int, default=64, help="Side of the generated images, in pixels."
    )
    parser.add_argument(
        "--image-size", type=int, default=64, help="Side of the cached images, in pixels."
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Pool and DataLoader workers (default: all cores).",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="DataLoader batch size.")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="Parent of the temporary tree.")
    parser.add_argument("--keep", action="store_true", help="Keep the generated tree and cache.")
    parser.add_argument(
        "--no-report", action="store_true", help="Print the results without writing the docs."
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Generated tree
# ---------------------------------------------------------------------------------------------


def _utkface_name(n: int) -> str:
    age = 1 + n % 90
    gender = n % 2
    race = n % 5
    return f"{age}_{gender}_{race}_{20170101000000000 + n}.jpg.chip.jpg"


def _pixels(n: int, size: int) -> np.ndarray:
    """Build a smooth, distinct image: 8x8 seeded noise upscaled bicubically to ``size``."""
    coarse = np.random.default_rng(n).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def _write_block(root: str, start: int, stop: int, utkface_count: int, size: int) -> None:
    for n in range(start, stop):
        image = Image.fromarray(_pixels(n, size))
        if n < utkface_count:
            image.save(Path(root) / "utkface" / "UTKFace" / _utkface_name(n), quality=90)
        else:
            k = n - utkface_count
            folder = Path(root) / "ffhq" / "thumbnails128x128" / f"{k // 1000 * 1000:05d}"
            image.save(folder / f"{k:05d}.png")


def generate_tree(root: Path, count: int, size: int, workers: int) -> float:
    """Write ``count`` images, half UTKFace JPEGs and half FFHQ PNGs, and return the seconds."""
    started = time.perf_counter()
    utkface_count = count // 2
    (root / "utkface" / "UTKFace").mkdir(parents=True)
    for k in range(0, count - utkface_count, 1000):
        (root / "ffhq" / "thumbnails128x128" / f"{k:05d}").mkdir(parents=True)
    block = 1000
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(
                _write_block, str(root), start, min(start + block, count), utkface_count, size
            )
            for start in range(0, count, block)
        ]
        for future in futures:
            future.result()
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# DataLoader epoch and worker memory
# ---------------------------------------------------------------------------------------------


class _ArrayDataset(Dataset):
    """Rows of an image source as uint8 tensors of shape (S, S, 3)."""

    def __init__(self, images: ImageSource) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        if isinstance(self.images, CachedImages):
            return torch.from_numpy(np.array(self.images.load_array(i)))
        return torch.from_numpy(np.asarray(self.images.load(i)).copy())


@dataclass
class EpochResult:
    images_per_second: float
    max_uss: float
    max_pss: float
    max_rss: float
    max_dirty: float
    main_rss: float


def _private_dirty(pid: int) -> int:
    """Return the Private_Dirty bytes of ``pid`` from /proc/PID/smaps_rollup, 0 if unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) * 1024
    return 0


def _sample_workers(stop: threading.Event, peaks: dict[str, float]) -> None:
    parent = psutil.Process(os.getpid())
    while not stop.is_set():
        for child in parent.children(recursive=True):
            try:
                info = child.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            peaks["uss"] = max(peaks["uss"], info.uss)
            peaks["pss"] = max(peaks["pss"], getattr(info, "pss", 0))
            peaks["rss"] = max(peaks["rss"], info.rss)
            peaks["dirty"] = max(peaks["dirty"], _private_dirty(child.pid))
        stop.wait(0.1)


def measure_epoch(images: ImageSource, batch_size: int, workers: int) -> EpochResult:
    """Run one shuffled epoch over ``images`` and record the peak memory of any one worker."""
    loader = DataLoader(
        _ArrayDataset(images), batch_size=batch_size, shuffle=True, num_workers=workers
    )
    peaks = {"uss": 0.0, "pss": 0.0, "rss": 0.0, "dirty": 0.0}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_workers, args=(stop, peaks), daemon=True)
    started = time.perf_counter()
    sampler.start()
    seen = 0
    for batch in loader:
        seen += batch.shape[0]
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    return EpochResult(
        images_per_second=seen / elapsed,
        max_uss=peaks["uss"] / MIB,
        max_pss=peaks["pss"] / MIB,
        max_rss=peaks["rss"] / MIB,
        max_dirty=peaks["dirty"] / MIB,
        main_rss=psutil.Process().memory_info().rss / MIB,
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    """Describe the CPU count, memory, CPU model and library versions of this machine."""
    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(default_workers()),
        "ram": f"{psutil.virtual_memory().total / 1024**3:.1f} GiB",
        "cpu": model,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": Image.__version__,
        "torch": torch.__version__,
        "load": " / ".join(f"{value:.1f}" for value in os.getloadavg()),
    }


def format_section(
    rows: list[tuple[str, str, str]],
    epochs: dict[str, EpochResult],
    args: argparse.Namespace,
    info: dict[str, str],
    workers: int,
    cache_mib: float,
) -> str:
    """Render the benchmark section of ``docs/benchmarks.md``."""
    command = "python benchmarks/data_scale.py " + shlex.join(sys.argv[1:])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION_TITLE,
        "",
        f"Command: `{command.strip()}`, run on {date}.",
        "",
        f"Machine: {info['nproc']} cores ({info['cpu']}), {info['ram']} RAM. Python "
        f"{info['python']}, numpy {info['numpy']}, Pillow {info['pillow']}, "
        f"torch {info['torch']}.",
        "",
        f"Load average (1, 5, 15 min) at the end of the run: {info['load']}. A value above the "
        "core count means other processes shared the cores during the run.",
        "",
        f"Tree: {args.count:,} generated {args.file_size}x{args.file_size} files, half UTKFace "
        f"JPEGs and half FFHQ PNGs. Cache: {args.image_size} px, {cache_mib:,.0f} MiB on disk, "
        f"built with {workers} workers.",
        "",
        "| step | time (s) | rate (images/s) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {seconds} | {rate} |" for name, seconds, rate in rows]
    lines += [
        "",
        f"One shuffled epoch of uint8 tensors, batch size {args.batch_size}, {workers} DataLoader "
        "workers, no augmentation. Memory is the peak of any one worker, sampled every 0.1 s. "
        "USS, PSS and RSS include the pages of images.npy that a worker has mapped. Those are "
        "clean file pages that the kernel can drop. Private dirty memory (Private_Dirty in "
        "/proc/PID/smaps_rollup) leaves them out and counts only what the worker itself wrote, "
        "such as pages copied on write from the parent and its own allocations.",
        "",
        "| source | images/s | worker USS (MiB) | worker PSS (MiB) | worker RSS (MiB) | "
        "worker private dirty (MiB) | main RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in epochs.items():
        lines.append(
            f"| {name} | {result.images_per_second:,.0f} | {result.max_uss:.0f} | "
            f"{result.max_pss:.0f} | {result.max_rss:.0f} | {result.max_dirty:.0f} | "
            f"{result.main_rss:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_section(section: str, report: Path = REPORT) -> None:
    """Replace this benchmark's section of ``report``, or append it, keeping other sections."""
    if report.is_file():
        text = report.read_text(encoding="utf-8")
    else:
        text = "# Benchmarks\n\nMeasured numbers, each with the command and machine behind it.\n"
    start = text.find(SECTION_TITLE)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION_TITLE))
        tail = "" if end < 0 else text[end + 1 :]
        text = text[:start] + section + ("\n" + tail if tail else "")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _rate(count: int, seconds: float) -> tuple[str, str]:
    return f"{seconds:.1f}", f"{count / seconds:,.0f}"


def run(args: argparse.Namespace) -> str:
    workers = args.workers if args.workers is not None else default_workers()
    root = Path(tempfile.mkdtemp(prefix="simclr-data-scale-", dir=args.tmp_dir))
    rows: list[tuple[str, str, str]] = []
    try:
        seconds = generate_tree(root, args.count, args.file_size, workers)
        rows.append(("generate the tree", *_rate(args.count, seconds)))
        print(f"generated {args.count} files in {seconds:.1f} s under {root}")

        started = time.perf_counter()
        merged, _ = read_face_sources(root / "utkface", root / "ffhq")
        index: FaceIndex = merged.subset(unique_by_hash(merged.content_hash))
        seconds = time.perf_counter() - started
        rows.append(("index build (list, decode, hash, deduplicate)", *_rate(len(merged), seconds)))
        print(f"indexed {len(merged)} files ({len(index)} unique) in {seconds:.1f} s")

        cache_dir = root / "cache"
        for executor in ("process", "thread"):
            started = time.perf_counter()
            prepare_cache(
                index,
                cache_dir,
                args.image_size,
                workers,
                overwrite=True,
                executor=executor,
                progress=False,
            )
            seconds = time.perf_counter() - started
            rows.append((f"cache build, {executor} pool", *_rate(len(index), seconds)))
            print(f"cache build with a {executor} pool: {len(index) / seconds:,.0f} images/s")
        cache_mib = (cache_dir / "images.npy").stat().st_size / MIB

        cache = PreparedCache.open(cache_dir)
        epochs = {
            "prepared cache": measure_epoch(CachedImages(cache), args.batch_size, workers),
            "image files": measure_epoch(
                FileImages(index, args.image_size), args.batch_size, workers
            ),
        }
        for name, result in epochs.items():
            print(f"epoch from {name}: {result}")
        return format_section(rows, epochs, args, machine_info(), workers, cache_mib)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    section = run(args)
    print(section)
    if not args.no_report:
        write_section(section)
        print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
