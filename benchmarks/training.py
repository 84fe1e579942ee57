"""Compare the training speed of SimCLRModule under lightning.Trainer with a plain PyTorch loop.

Both runs train the same network (a torchvision ResNet-18 and the 2-layer SimCLR projection head),
with lightly's ``NTXentLoss`` and lightly's ``LARS``, the same learning-rate schedule and the same
synthetic two-view tensors from the same DataLoader settings. Only the loop differs: Lightning's
``Trainer.fit`` with everything ``SimCLRModule`` does per step (logging, and the health metrics
every ``--health-every`` steps), or a hand-written loop. The two alternate, so that a change in
machine load affects both.

Throughput counts source images per second (each image is two views) over the steps after a
warm-up. The headline ratio is the median, over trials, of Lightning's rate divided by the plain
loop's rate in the same trial, which cancels most of a slow drift in machine load.

Peak memory is the resident set size (RSS) of this process and the largest RSS of any DataLoader
worker, sampled every 50 ms with psutil during each run. A worker's RSS includes the pages it
shares with the main process (the torch libraries), so the two do not add up.

Usage::

    python benchmarks/training.py --quick      # about 3 minutes on 2 cores
    python benchmarks/training.py
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import psutil
import torch
from lightly.loss import NTXentLoss
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import REPORT, load_note, machine_description, write_section  # noqa: E402

from simclr_lightning.models.backbones import build_backbone, build_projection_head  # noqa: E402
from simclr_lightning.models.optim import build_optimizer, split_decay_groups  # noqa: E402
from simclr_lightning.models.schedules import WarmupCosineSchedule, scale_learning_rate  # noqa: E402
from simclr_lightning.models.simclr import SimCLRModule  # noqa: E402

SECTION_TITLE = "## Lightning loop against a plain PyTorch loop"
TARGET_RATIO = 0.95
BASE_LR = 0.3
TEMPERATURE = 0.1
WARMUP_LR_STEPS = 2
MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Short run: fewer steps and trials.")
    parser.add_argument("--image-size", type=int, default=32, help="Side of the views, in pixels.")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per step.")
    parser.add_argument("--steps", type=int, default=15, help="Timed steps per run.")
    parser.add_argument(
        "--warmup", type=int, default=3, help="Untimed steps at the start of a run."
    )
    parser.add_argument("--trials", type=int, default=5, help="Runs of each loop, alternating.")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of both loops.")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: all cores)."
    )
    parser.add_argument(
        "--health-every",
        type=int,
        default=10,
        help="SimCLRModule's health_every_n_steps: batches between health-metric computations.",
    )
    parser.add_argument(
        "--small-stem",
        action="store_true",
        help="Use the 3x3 stride-1 ResNet stem without max pool (about 16x the compute at 32 px).",
    )
    parser.add_argument(
        "--no-report", action="store_true", help="Print the results without writing the report."
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 6)
        args.trials = min(args.trials, 3)
        args.warmup = min(args.warmup, 2)
    return args


# ---------------------------------------------------------------------------------------------
# Data and memory
# ---------------------------------------------------------------------------------------------


class SyntheticViews(Dataset[dict[str, Any]]):
    """Fixed random two-view samples in the pretraining batch format."""

    def __init__(self, count: int, image_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.views = torch.randn(2, count, 3, image_size, image_size, generator=generator)

    def __len__(self) -> int:
        return self.views.shape[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"views": [self.views[0, index], self.views[1, index]], "target": -1}


def build_loader(args: argparse.Namespace) -> DataLoader[dict[str, Any]]:
    """Return the DataLoader both loops read, with one epoch of warm-up plus timed steps."""
    count = (args.warmup + args.steps) * args.batch_size
    dataset = SyntheticViews(count, args.image_size)
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, drop_last=True)


class MemorySampler:
    """Peak RSS of this process and of its child processes, sampled in a background thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.main_peak = 0
        self.child_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.main_peak = max(self.main_peak, process.memory_info().rss)
            for child in process.children(recursive=True):
                try:
                    self.child_peak = max(self.child_peak, child.memory_info().rss)
                except psutil.NoSuchProcess:
                    continue
            self._stop.wait(self.interval)


# ---------------------------------------------------------------------------------------------
# The two loops
# ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """Throughput and peak memory of one run of one loop."""

    images_per_second: float
    images_per_cpu_second: float
    main_rss: int
    worker_rss: int


@dataclass
class StepClock:
    """Wall-clock time and CPU time of this process at the end of every training step."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def result(self, warmup: int, batch_size: int, memory: MemorySampler) -> RunResult:
        """Return the rates over the steps after ``warmup`` and the peak memory."""
        first = max(warmup - 1, 0)
        steps = len(self.wall) - 1 - first
        if steps < 1:
            raise ValueError(f"Need at least 1 timed step, got {steps}. Raise --steps.")
        wall_seconds = self.wall[-1] - self.wall[first]
        cpu_seconds = self.cpu[-1] - self.cpu[first]
        return RunResult(
            steps * batch_size / wall_seconds,
            steps * batch_size / cpu_seconds,
            memory.main_peak,
            memory.child_peak,
        )


class StepClockCallback(pl.Callback):
    """Record the time at the end of each Lightning training step."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.clock.tick()


def run_lightning(args: argparse.Namespace) -> RunResult:
    """Train SimCLRModule with lightning.Trainer and return its throughput."""
    torch.manual_seed(0)
    model = SimCLRModule(
        backbone="resnet18",
        small_stem=args.small_stem,
        temperature=TEMPERATURE,
        base_lr=BASE_LR,
        warmup_steps=WARMUP_LR_STEPS,
        batch_size_per_device=args.batch_size,
        num_classes=0,
        health_every_n_steps=args.health_every,
    )
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[StepClockCallback(clock)],
    )
    loader = build_loader(args)
    with MemorySampler() as memory:
        trainer.fit(model, train_dataloaders=loader)
    return clock.result(args.warmup, args.batch_size, memory)


def run_plain(args: argparse.Namespace) -> RunResult:
    """Train the same network, loss and optimizer with a hand-written loop."""
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("resnet18", small_stem=args.small_stem)
    head = build_projection_head(feature_dim, feature_dim, 128, num_layers=2)
    criterion = NTXentLoss(temperature=TEMPERATURE)
    parameters = list(backbone.parameters()) + list(head.parameters())
    lr = scale_learning_rate(BASE_LR, args.batch_size, "linear")
    optimizer = build_optimizer("lars", split_decay_groups(parameters, 1e-6), lr)
    total_steps = args.warmup + args.steps
    schedule = WarmupCosineSchedule(WARMUP_LR_STEPS, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    backbone.train()
    head.train()

    clock = StepClock()
    loader = build_loader(args)
    with MemorySampler() as memory:
        for batch in loader:
            view0, view1 = batch["views"]
            features = backbone(torch.cat([view0, view1])).flatten(start_dim=1)
            z0, z1 = head(features).chunk(2)
            loss: Tensor = criterion(z0, z1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            clock.tick()
    return clock.result(args.warmup, args.batch_size, memory)


def run(args: argparse.Namespace) -> dict[str, list[RunResult]]:
    """Run both loops ``args.trials`` times, alternating which one goes first."""
    loops: dict[str, Callable[[argparse.Namespace], RunResult]] = {
        "SimCLRModule + lightning.Trainer": run_lightning,
        "plain PyTorch loop": run_plain,
    }
    results: dict[str, list[RunResult]] = {name: [] for name in loops}
    for trial in range(args.trials):
        order = list(loops) if trial % 2 == 0 else list(reversed(loops))
        for name in order:
            result = loops[name](args)
            results[name].append(result)
            print(
                f"trial {trial + 1}: {name:<34} {result.images_per_second:7.1f} images/s  "
                f"{result.images_per_cpu_second:7.1f} per CPU s"
            )
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def render(results: dict[str, list[RunResult]], args: argparse.Namespace) -> str:
    """Render the results as a Markdown section with the command, machine and date."""
    command = "python benchmarks/training.py " + " ".join(sys.argv[1:])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    stem = "3x3 stride-1 stem" if args.small_stem else "standard stem"
    lines = [
        SECTION_TITLE,
        "",
        f"Command: `{command.strip()}`, run on {date}.",
        "",
        f"Machine: {machine_description()}, {torch.get_num_threads()} torch threads.",
        "",
        load_note(),
        "",
        f"Model: ResNet-18 ({stem}) and 2-layer projection head, {args.image_size} px views, "
        f"batch {args.batch_size} images (2 views each), NT-Xent, LARS. {args.trials} runs of "
        f"each loop, alternating, each timing {args.steps} steps after {args.warmup} warm-up "
        f"steps. DataLoader with {args.workers} worker(s) over fixed synthetic tensors. "
        f"SimCLRModule computes its health metrics every {args.health_every} steps.",
        "",
    ]
    lines += table_lines(results)
    lines += [""]
    lines += ratio_lines(results)
    return "\n".join(lines)


def table_lines(results: dict[str, list[RunResult]]) -> list[str]:
    """Return the Markdown table of rates and peak memory, one row per loop."""
    lines = [
        "| loop | images/s (median) | images/s per run | images per CPU second (median) | "
        "peak RSS, main (MiB) | peak RSS, one worker (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        rates = [run.images_per_second for run in runs]
        per_run = ", ".join(f"{rate:.1f}" for rate in rates)
        per_cpu_second = statistics.median(run.images_per_cpu_second for run in runs)
        main_rss = max(run.main_rss for run in runs) / MIB
        worker_rss = max(run.worker_rss for run in runs) / MIB
        lines.append(
            f"| {name} | {statistics.median(rates):.1f} | {per_run} | {per_cpu_second:.1f} | "
            f"{main_rss:.0f} | {worker_rss:.0f} |"
        )
    return lines


def ratio_lines(results: dict[str, list[RunResult]]) -> list[str]:
    """Return the Lightning / plain ratios per trial, their medians and the verdict."""
    lightning_runs, plain_runs = results.values()
    pairs = list(zip(lightning_runs, plain_runs, strict=True))
    wall_ratios = [light.images_per_second / plain.images_per_second for light, plain in pairs]
    cpu_ratios = [
        light.images_per_cpu_second / plain.images_per_cpu_second for light, plain in pairs
    ]
    median_rates = [
        statistics.median(run.images_per_second for run in runs) for runs in results.values()
    ]

    ratio = statistics.median(wall_ratios)
    verdict = "meets" if ratio >= TARGET_RATIO else "does not meet"
    return [
        "Lightning / plain per trial: " + ", ".join(f"{r:.3f}" for r in wall_ratios) + ".",
        f"Median of those ratios: {ratio:.3f}, which {verdict} the {TARGET_RATIO} target. "
        f"Ratio of the median rates: {median_rates[0] / median_rates[1]:.3f}.",
        "",
        "Per CPU second of the training process, Lightning / plain per trial: "
        + ", ".join(f"{r:.3f}" for r in cpu_ratios)
        + f", median {statistics.median(cpu_ratios):.3f}. CPU time leaves out the time the "
        "process waits for a core, but threads that spin while waiting for each other add to "
        "it, so it is steadiest with `--threads 1`.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Lightning's start-up notes (no GPU, worker count hints) would repeat for every run.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    results = run(args)
    section = render(results, args)
    print()
    print(section)
    if not args.no_report:
        write_section(section, SECTION_TITLE)
        print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
