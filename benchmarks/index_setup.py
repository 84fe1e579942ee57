"""Measure ``FaceDataModule.setup`` with a cold and with a warm face index file.

Cold: the index folder is empty, so ``setup`` lists the roots, decodes and hashes every image,
parses the CelebA annotation files and writes the index file. Warm: a second, fresh datamodule
with the same arguments reads that file and only lists the roots (one ``stat`` per file). Both
then split the labeled rows and build the datasets. The images stay in the page cache after the
first round, so "cold" here means a missing index file, not a cold disk.

The roots default to the real UTKFace, FFHQ and CelebA samples next to the repository. The
results are printed as Markdown, and ``--write-docs`` also writes them as a section of
``docs/benchmarks.md``, replacing the section of an earlier run.

Usage::

    python benchmarks/index_setup.py               # 3 rounds, about 13 s on 2 cores
    python benchmarks/index_setup.py --rounds 5 --write-docs
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from simclr_lightning.data.face_datamodule import FaceDataModule
from simclr_lightning.data.index_file import FaceIndexRequest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REPORT = REPO / "docs" / "benchmarks.md"
SECTION_TITLE = "## Face index: cold and warm setup"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utkface-root", type=Path, default=SHARED_DATA / "utkface")
    parser.add_argument("--ffhq-root", type=Path, default=SHARED_DATA / "ffhq")
    parser.add_argument("--celeba-root", type=Path, default=SHARED_DATA / "celeba")
    parser.add_argument("--rounds", type=int, default=3, help="Cold and warm setups to time.")
    parser.add_argument(
        "--write-docs", action="store_true", help=f"Write the results to {REPORT.name}."
    )
    return parser.parse_args(argv)


def _module(args: argparse.Namespace, index_dir: Path) -> FaceDataModule:
    return FaceDataModule(
        utkface_root=str(args.utkface_root),
        ffhq_root=str(args.ffhq_root),
        celeba_root=str(args.celeba_root),
        image_size=64,
        batch_size=64,
        num_workers=0,
        index_dir=str(index_dir),
    )


@dataclass
class SetupTimes:
    """Seconds of each round, and what the datamodule indexed."""

    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    listing: list[float] = field(default_factory=list)
    listed_files: int = 0
    indexed: dict[str, int] = field(default_factory=dict)
    index_kib: float = 0.0


def _timed_setup(args: argparse.Namespace, index_dir: Path) -> tuple[float, FaceDataModule]:
    module = _module(args, index_dir)
    started = time.perf_counter()
    module.setup("fit")
    return time.perf_counter() - started, module


def measure(args: argparse.Namespace) -> SetupTimes:
    """Time ``args.rounds`` cold and warm setups and the listing alone."""
    times = SetupTimes()
    with tempfile.TemporaryDirectory(prefix="index-setup-") as folder:
        for round_number in range(args.rounds):
            index_dir = Path(folder) / f"round{round_number}"
            seconds, _ = _timed_setup(args, index_dir)
            times.cold.append(seconds)
            seconds, module = _timed_setup(args, index_dir)
            times.warm.append(seconds)
            if module.report is not None:
                times.indexed = dict(module.report.indexed)
        times.index_kib = sum(path.stat().st_size for path in Path(folder).glob("round0/*")) / 1024

    request = FaceIndexRequest.create(args.utkface_root, args.ffhq_root, args.celeba_root)
    for _ in range(args.rounds):
        started = time.perf_counter()
        fingerprint = request.fingerprint()
        times.listing.append(time.perf_counter() - started)
        times.listed_files = fingerprint.file_count
    return times


def _seconds(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def format_section(args: argparse.Namespace, times: SetupTimes) -> str:
    """Return the results as a Markdown section of ``docs/benchmarks.md``."""
    ratio = statistics.median(times.cold) / statistics.median(times.warm)
    counts = ", ".join(f"{name} {count:,}" for name, count in times.indexed.items())
    command = shlex.join(["python", "benchmarks/index_setup.py", *sys.argv[1:]])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    cpu = platform.processor() or platform.machine()

    lines = [SECTION_TITLE, "", f"Command: `{command}`, run on {date}.", ""]
    lines += [
        f"Machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}. "
        f"Load average (1, 5, 15 min) at the end: {load}.",
        "",
        f"Data: the UTKFace, FFHQ and CelebA roots given (indexed: {counts}; "
        f"{times.listed_files:,} files listed, with the three full CelebA annotation files of "
        f"202,599 rows each). Index file: {times.index_kib:,.0f} KiB.",
        "",
    ]
    lines += [
        f"Median of {args.rounds} rounds, in seconds.",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| setup, cold index (read, decode, hash, write the file) | {_seconds(times.cold)} |",
        f"| setup, warm index (list the roots, read the file) | {_seconds(times.warm)} |",
        f"| listing fingerprint alone | {_seconds(times.listing)} |",
        "",
        f"Cold / warm: {ratio:.1f} times.",
        "",
    ]
    return "\n".join(lines)


def write_section(section: str, report: Path = REPORT) -> None:
    """Write ``section`` into ``report``, replacing a section of the same title."""
    text = report.read_text(encoding="utf-8") if report.is_file() else "# Benchmarks\n"
    start = text.find(SECTION_TITLE)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION_TITLE))
        tail = "" if end < 0 else text[end + 1 :]
        text = text[:start] + section + ("\n" + tail if tail else "")
    report.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for root in (args.utkface_root, args.ffhq_root, args.celeba_root):
        if not root.is_dir():
            print(
                f"Dataset root {root} not found. Pass --utkface-root, --ffhq-root and "
                "--celeba-root.",
                file=sys.stderr,
            )
            return 1
    logging.basicConfig(level=logging.WARNING)
    section = format_section(args, measure(args))
    print(section)
    if args.write_docs:
        write_section(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
