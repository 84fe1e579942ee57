"""Measure SimCLR pretraining throughput and GPU memory on one CUDA device.

Three measurements of a ResNet-50 at 128 px, 1024 images (2048 views) per step, bf16 autocast and
channels-last memory format, with the network, NT-Xent loss and LARS optimizer of
``SimCLRModule`` driven by a plain loop:

1. model only: fixed views already on the GPU, the upper bound,
2. CPU augmentation: DataLoader workers run lightly's ``SimCLRTransform`` on the rows of a uint8
   image array, and the float views are copied to the GPU,
3. GPU augmentation: the workers only collate uint8 rows, and :class:`SimCLRBatchAugment` makes
   the views on the GPU after the copy.

Then, with the process capped at 40 GiB by ``torch.cuda.set_per_process_memory_fraction``, one
training step of each ResNet (18, 34, 50, 101, 152) at the same size finds the largest that fits.

The images are generated: a memory-mapped uint8 array of smooth random colour patterns in a
temporary folder, which is what the prepared cache stores. Nothing is downloaded.

Without a CUDA device the script stops at once with exit status 2, unless ``--dry-run`` is given,
which runs every step on the CPU at tiny sizes to check the script itself.

Usage::

    bash benchmarks/gpu.sh                          # under 8 minutes on one GPU
    python benchmarks/gpu_bench.py --dry-run        # seconds, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import machine_description, write_section  # noqa: E402

from simclr_lightning.data.gpu_augment import SimCLRBatchAugment, UInt8ImageDataset  # noqa: E402
from simclr_lightning.data.transforms import SimCLRAugmentation, build_simclr_transform  # noqa: E402
from simclr_lightning.models.optim import build_optimizer, split_decay_groups  # noqa: E402
from simclr_lightning.models.schedules import scale_learning_rate  # noqa: E402
from simclr_lightning.models.simclr import SimCLRModule  # noqa: E402

SECTION_TITLE = "## GPU pretraining throughput and memory"
GIB = 1024**3
FIT_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="Run on the CPU at tiny sizes to check the script."
    )
    parser.add_argument("--backbone", default="resnet50", help="ResNet of the throughput runs.")
    parser.add_argument("--image-size", type=int, default=128, help="Side of the views, in pixels.")
    parser.add_argument(
        "--batch-size", type=int, default=1024, help="Images per step, 2 views each."
    )
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per throughput run.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps before each run.")
    parser.add_argument("--images", type=int, default=8192, help="Rows of the synthetic array.")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers of the CPU-augmentation run (default: all cores).",
    )
    parser.add_argument(
        "--memory-cap-gib",
        type=float,
        default=40.0,
        help="GPU memory cap of the fit search, in GiB, emulating a smaller card.",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="Markdown file whose section to write."
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        args.backbone = "resnet18"
        args.image_size = 16
        args.batch_size = 4
        args.steps = 1
        args.warmup = 1
        args.images = 16
        args.workers = 1
    if args.workers is None:
        args.workers = len(os.sched_getaffinity(0))
    return args


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------


def make_image_array(path: Path, count: int, size: int, seed: int = 0) -> np.ndarray:
    """Write ``count`` smooth random colour images of ``size`` pixels as a uint8 .npy memmap."""
    images = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.uint8, shape=(count, size, size, 3)
    )
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 2 * np.pi, size, dtype=np.float32)
    chunk = 256
    for start in range(0, count, chunk):
        rows = min(chunk, count - start)
        # One product of two random waves per image and channel, plus noise.
        frequencies = rng.uniform(1.0, 6.0, (rows, 1, 1, 3, 2)).astype(np.float32)
        phases = rng.uniform(0.0, 2 * np.pi, (rows, 1, 1, 3, 2)).astype(np.float32)
        waves_y = np.sin(frequencies[..., 0] * grid[:, None, None] + phases[..., 0])
        waves_x = np.cos(frequencies[..., 1] * grid[None, :, None] + phases[..., 1])
        pixels = waves_y * waves_x * 100 + 128 + rng.normal(0, 8, (rows, size, size, 3))
        images[start : start + rows] = np.clip(pixels, 0, 255).astype(np.uint8)
    images.flush()
    return np.load(path, mmap_mode="r")


class ArrayLightlyViews(Dataset[dict[str, Any]]):
    """Rows of a uint8 (N, S, S, 3) array as PIL images, then lightly's two views."""

    def __init__(self, images: np.ndarray, augmentation: SimCLRAugmentation) -> None:
        self.images = images
        self.transform = build_simclr_transform(augmentation)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = Image.fromarray(np.array(self.images[index]))
        return {"views": self.transform(image), "target": -1}


def endless_batches(
    dataset: Dataset[Any], args: argparse.Namespace, workers: int, steps: int
) -> Iterator[dict[str, Any]]:
    """Yield ``steps`` batches drawn with replacement, from pinned memory on CUDA."""
    sampler = RandomSampler(
        range(len(dataset)),  # type: ignore[arg-type]
        replacement=True,
        num_samples=steps * args.batch_size,
        generator=torch.Generator().manual_seed(0),
    )
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=not args.dry_run,
        drop_last=True,
        # One batch in flight per worker: a float batch of 2 x 1024 views at 128 px is 400 MB.
        prefetch_factor=1 if workers > 0 else None,
    )
    yield from loader


# ---------------------------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------------------------


@dataclass
class Trainee:
    """SimCLRModule's network and loss with a LARS optimizer, driven by a plain loop."""

    module: SimCLRModule
    optimizer: torch.optim.Optimizer
    device: torch.device
    autocast: bool

    @classmethod
    def build(cls, backbone: str, args: argparse.Namespace, device: torch.device) -> Trainee:
        module = SimCLRModule(
            backbone=backbone,
            channels_last=True,
            batch_size_per_device=args.batch_size,
            num_classes=0,
        ).to(device)
        module.train()
        parameters = list(module.backbone.parameters()) + list(module.projection_head.parameters())
        lr = scale_learning_rate(0.3, args.batch_size, "linear")
        optimizer = build_optimizer("lars", split_decay_groups(parameters, 1e-6), lr)
        return cls(module, optimizer, device, autocast=device.type == "cuda")

    def step(self, view0: Tensor, view1: Tensor) -> Tensor:
        """Run one optimizer step on a pair of view batches and return the loss."""
        context = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.autocast
            else contextlib.nullcontext()
        )
        with context:
            # As SimCLRModule.training_step: one backbone pass over both views, loss in float32.
            features = self.module(torch.cat([view0, view1]))
            z0, z1 = self.module.project(features).chunk(2)
        loss: Tensor = self.module.criterion(z0.float(), z1.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------
# Throughput runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    """Images per second of one run, its data-wait share and its peak GPU memory."""

    name: str
    images_per_second: float
    data_wait_share: float
    peak_gib: float | None


@dataclass
class StepPlan:
    """Untimed and timed steps of one run."""

    warmup: int
    steps: int

    @classmethod
    def for_workers(cls, args: argparse.Namespace, workers: int) -> StepPlan:
        """Return a plan that measures a DataLoader's sustained rate, not its prefetched batches.

        Every worker prepares one batch before the first step, so the warm-up drains at least one
        batch per worker, and the timed steps span at least two batches per worker.
        """
        return cls(max(args.warmup, workers), max(args.steps, 2 * workers))


def time_steps(
    name: str,
    batches: Iterator[tuple[Tensor, Tensor]],
    trainee: Trainee,
    plan: StepPlan,
    batch_size: int,
) -> Throughput:
    """Run ``plan.warmup`` untimed and ``plan.steps`` timed steps over ``batches``."""
    device = trainee.device
    for _ in range(plan.warmup):
        trainee.step(*next(batches))
    synchronize(device)
    reset_peak_memory(device)

    waited = 0.0
    started = time.perf_counter()
    for _ in range(plan.steps):
        before = time.perf_counter()
        views = next(batches)
        waited += time.perf_counter() - before
        trainee.step(*views)
    synchronize(device)
    seconds = time.perf_counter() - started
    result = Throughput(
        name, plan.steps * batch_size / seconds, waited / seconds, peak_memory_gib(device)
    )
    memory = "n/a" if result.peak_gib is None else f"{result.peak_gib:.1f} GiB"
    print(
        f"{name:<24} {result.images_per_second:9.0f} images/s  data wait "
        f"{result.data_wait_share:5.1%}  peak {memory}",
        flush=True,
    )
    return result


def model_only_batches(
    args: argparse.Namespace, device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    views = torch.randn(shape, device=device), torch.randn(shape, device=device)
    while True:
        yield views


def cpu_augmented_batches(
    images: np.ndarray, args: argparse.Namespace, device: torch.device, plan: StepPlan
) -> Iterator[tuple[Tensor, Tensor]]:
    dataset = ArrayLightlyViews(images, SimCLRAugmentation(image_size=args.image_size))
    steps = plan.warmup + plan.steps
    for batch in endless_batches(dataset, args, args.workers, steps):
        view0, view1 = batch["views"]
        yield view0.to(device, non_blocking=True), view1.to(device, non_blocking=True)


def gpu_workers(args: argparse.Namespace) -> int:
    """Return the worker count of the GPU-augmentation run."""
    # Collating uint8 rows costs little, so a few workers keep up with the GPU.
    return min(args.workers, 4)


def gpu_augmented_batches(
    images: np.ndarray, args: argparse.Namespace, device: torch.device, plan: StepPlan
) -> Iterator[tuple[Tensor, Tensor]]:
    augment = SimCLRBatchAugment(SimCLRAugmentation(image_size=args.image_size), seed=0)
    augment = augment.to(device)
    steps = plan.warmup + plan.steps
    for batch in endless_batches(UInt8ImageDataset(images), args, gpu_workers(args), steps):
        batch["image"] = batch["image"].to(device, non_blocking=True)
        view0, view1 = augment.augment_batch(batch)["views"]
        yield view0, view1


def run_throughput(
    images: np.ndarray, args: argparse.Namespace, device: torch.device
) -> list[Throughput]:
    """Measure the three throughput runs with one network."""
    trainee = Trainee.build(args.backbone, args, device)
    cpu_plan = StepPlan.for_workers(args, args.workers)
    gpu_plan = StepPlan.for_workers(args, gpu_workers(args))
    sources: list[tuple[str, StepPlan, Callable[[], Iterator[tuple[Tensor, Tensor]]]]] = [
        ("model only", StepPlan(args.warmup, args.steps), lambda: model_only_batches(args, device)),
        (
            "CPU augmentation",
            cpu_plan,
            lambda: cpu_augmented_batches(images, args, device, cpu_plan),
        ),
        (
            "GPU augmentation",
            gpu_plan,
            lambda: gpu_augmented_batches(images, args, device, gpu_plan),
        ),
    ]
    results = []
    for name, plan, make_batches in sources:
        try:
            results.append(time_steps(name, make_batches(), trainee, plan, args.batch_size))
        except torch.cuda.OutOfMemoryError as error:
            print(f"{name}: out of GPU memory ({error})", flush=True)
            results.append(Throughput(name, float("nan"), float("nan"), None))
            gc.collect()
            torch.cuda.empty_cache()
    del trainee
    return results


# ---------------------------------------------------------------------------------------------
# Memory fit search
# ---------------------------------------------------------------------------------------------


@dataclass
class Fit:
    """Whether one ResNet trains at the benchmark size under the memory cap."""

    backbone: str
    fits: bool
    peak_gib: float | None


def cap_memory(device: torch.device, cap_gib: float) -> str:
    """Cap this process's GPU memory at ``cap_gib`` and describe the cap."""
    if device.type != "cuda":
        return "no cap (CPU dry run)"
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, cap_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return f"{fraction * total / GIB:.1f} GiB of {total / GIB:.1f} GiB (fraction {fraction:.3f})"


def try_fit(backbone: str, args: argparse.Namespace, device: torch.device) -> Fit:
    """Run two training steps of ``backbone`` and report whether they fit in memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    trainee = None
    try:
        trainee = Trainee.build(backbone, args, device)
        views = torch.randn(shape, device=device), torch.randn(shape, device=device)
        for _ in range(2):
            trainee.step(*views)
        synchronize(device)
        fit = Fit(backbone, True, peak_memory_gib(device))
    except torch.cuda.OutOfMemoryError:
        fit = Fit(backbone, False, None)
    del trainee
    status = "fits" if fit.fits else "out of memory"
    memory = "" if fit.peak_gib is None else f", peak {fit.peak_gib:.1f} GiB"
    print(f"{backbone:<10} {status}{memory}", flush=True)
    return fit


# ---------------------------------------------------------------------------------------------
# Report and entry point
# ---------------------------------------------------------------------------------------------


def device_description(device: torch.device) -> str:
    if device.type != "cuda":
        return "CPU (dry run)"
    properties = torch.cuda.get_device_properties(device)
    return (
        f"{properties.name}, {properties.total_memory / GIB:.0f} GiB, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}"
    )


def render(
    throughput: list[Throughput],
    fits: list[Fit],
    cap: str,
    args: argparse.Namespace,
    device: torch.device,
) -> str:
    """Render the results as a Markdown section with the command, machine and date."""
    command = "python benchmarks/gpu_bench.py " + " ".join(sys.argv[1:])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    precision = "bf16 autocast" if device.type == "cuda" else "float32"
    lines = [
        SECTION_TITLE,
        "",
        f"Command: `{command.strip()}`, run on {date}.",
        "",
        f"Machine: {device_description(device)}. Host: {machine_description()}.",
        "",
        f"Setting: {args.backbone} at {args.image_size} px, {args.batch_size} images "
        f"({2 * args.batch_size} views) per step, {precision}, channels-last, LARS, "
        f"at least {args.steps} timed steps after at least {args.warmup} warm-up steps. CPU "
        f"augmentation uses {args.workers} DataLoader workers, GPU augmentation "
        f"{gpu_workers(args)}. A DataLoader run warms up for at least one batch per worker and "
        "times at least two per worker, so prefetched batches do not inflate its rate.",
        "",
    ]
    lines += throughput_lines(throughput)
    lines += ["", f"Memory fit at the same size, capped at {cap}:", ""]
    lines += fit_lines(fits)
    return "\n".join(lines)


def throughput_lines(throughput: list[Throughput]) -> list[str]:
    """Return the Markdown table of the throughput runs."""
    lines = [
        "| run | images/s | time waiting for data | peak GPU memory (GiB) |",
        "|---|---|---|---|",
    ]
    for result in throughput:
        memory = "n/a" if result.peak_gib is None else f"{result.peak_gib:.1f}"
        lines.append(
            f"| {result.name} | {result.images_per_second:,.0f} | "
            f"{result.data_wait_share:.0%} | {memory} |"
        )
    return lines


def fit_lines(fits: list[Fit]) -> list[str]:
    """Return the Markdown table of the memory fit search and the largest ResNet that fits."""
    lines = ["| backbone | fits | peak GPU memory (GiB) |", "|---|---|---|"]
    for fit in fits:
        memory = "n/a" if fit.peak_gib is None else f"{fit.peak_gib:.1f}"
        lines.append(f"| {fit.backbone} | {'yes' if fit.fits else 'no'} | {memory} |")
    fitting = [fit.backbone for fit in fits if fit.fits]
    largest = fitting[-1] if fitting else "none"
    return lines + ["", f"Largest ResNet that fits: {largest}.", ""]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "error: no CUDA device is available (torch.cuda.is_available() is False). Run this "
            "benchmark on a machine with an NVIDIA GPU and a CUDA build of torch, or pass "
            "--dry-run to check the script on the CPU.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.backends.cudnn.benchmark = True
    print(f"device: {device_description(device)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="simclr-gpu-bench-") as folder:
        started = time.perf_counter()
        images = make_image_array(Path(folder) / "images.npy", args.images, args.image_size)
        print(f"generated {args.images} images in {time.perf_counter() - started:.1f} s")
        throughput = run_throughput(images, args, device)
        del images

    cap = cap_memory(device, args.memory_cap_gib)
    models = FIT_MODELS[:1] if args.dry_run else FIT_MODELS
    fits = [try_fit(backbone, args, device) for backbone in models]

    section = render(throughput, fits, cap, args, device)
    print()
    print(section)
    if args.report is not None:
        write_section(section, SECTION_TITLE, args.report)
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
