"""Two-process checks on CPU with gloo: gathered negatives, DDP + LARS steps, Lightning DDP runs.

Processes talk over 127.0.0.1 only. The raw DDP run is ``tests/distributed/ntxent_ddp.py``,
started as one subprocess per rank. The Lightning run uses ``strategy="ddp_spawn"``, because it
spawns fresh processes instead of re-running the pytest command line.
"""

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.models.optim import build_optimizer, split_decay_groups
from simclr_lightning.models.simclr import SimCLRModule

REPO_ROOT = Path(__file__).resolve().parents[1]
DDP_SCRIPT = REPO_ROOT / "tests" / "distributed" / "ntxent_ddp.py"
WORLD_SIZE = 2
ROWS_PER_RANK = 3
STEPS = 3
TEMPERATURE = 0.2
LARS_SETTINGS = {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-4, "trust_coefficient": 0.02}

pytestmark = pytest.mark.slow


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def reference_row_losses(z0: Tensor, z1: Tensor, temperature: float) -> Tensor:
    """Return the NT-Xent loss of each of the 2N rows (view 0 rows first), in float64."""
    n = z0.shape[0]
    z = torch.cat([z0, z1]).double()
    z = z / z.norm(dim=1, keepdim=True)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return -logits.log_softmax(dim=1)[torch.arange(2 * n), positives]


def _module_without_batchnorm() -> SimCLRModule:
    """Build a SimCLRModule with an MLP backbone and head, so no statistic depends on the rank."""
    torch.manual_seed(0)
    module = SimCLRModule(
        backbone="resnet18",
        projection_hidden_dim=16,
        projection_dim=8,
        temperature=TEMPERATURE,
        num_classes=0,
    )
    module.backbone = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 16)
    )
    module.projection_head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    return module


def _embed(module: SimCLRModule, view0: Tensor, view1: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        z0, z1 = module.project(module(torch.cat([view0, view1]))).chunk(2)
    return z0, z1


def _run_ddp_script(inputs: Path, folder: Path) -> None:
    """Start one process of ``ntxent_ddp.py`` per rank and wait for both."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    port = str(free_loopback_port())
    processes = [
        subprocess.Popen(
            [sys.executable, str(DDP_SCRIPT), str(rank), str(inputs), str(folder), port],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    errors = []
    try:
        for rank, process in enumerate(processes):
            _, stderr = process.communicate(timeout=180)
            if process.returncode != 0:
                errors.append(f"rank {rank} exited with {process.returncode}:\n{stderr[-3000:]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the two-process script once, and the same steps on one process for reference."""
    folder = tmp_path_factory.mktemp("ddp")
    module = _module_without_batchnorm()
    generator = torch.Generator().manual_seed(1)
    views = torch.randn(STEPS, 2, WORLD_SIZE * ROWS_PER_RANK, 3, 4, 4, generator=generator)
    torch.save({"module": module, "views": views, **LARS_SETTINGS}, folder / "inputs.pt")

    _run_ddp_script(folder / "inputs.pt", folder)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]

    # The same steps on one process, over the whole global batch.
    single = copy.deepcopy(module)
    optimizer = build_optimizer(
        "lars",
        split_decay_groups(single.parameters(), LARS_SETTINGS["weight_decay"]),
        LARS_SETTINGS["lr"],
        LARS_SETTINGS["momentum"],
        LARS_SETTINGS["trust_coefficient"],
    )
    single_losses: list[float] = []
    row_losses: list[Tensor] = []
    for global_views in views:
        row_losses.append(reference_row_losses(*_embed(single, *global_views), TEMPERATURE))
        optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = single.training_step({"views": [global_views[0], global_views[1]]}, 0)
        loss.backward()
        optimizer.step()
        single_losses.append(loss.item())
    return {
        "ranks": ranks,
        "single_losses": single_losses,
        "single_state": single.state_dict(),
        "row_losses": row_losses,
        "views": views,
        "initial_module": module,
    }


def _rank_rows(rank: int) -> Tensor:
    """Rows of rank ``rank`` among the 2 * global_batch rows: its view-0 rows, then view-1 rows."""
    global_batch = WORLD_SIZE * ROWS_PER_RANK
    local = torch.arange(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    return torch.cat([local, local + global_batch])


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_ddp_rank_loss_matches_gathered_reference(ddp_run: dict[str, Any], rank: int) -> None:
    # Each rank's loss is the mean over its own 2B rows, each against all 2 * global_batch - 1.
    for step in range(STEPS):
        expected = ddp_run["row_losses"][step][_rank_rows(rank)].mean().item()
        observed = ddp_run["ranks"][rank]["losses"][step]
        assert observed == pytest.approx(expected, rel=1e-5), f"step {step}"


def test_ddp_mean_loss_equals_one_process(ddp_run: dict[str, Any]) -> None:
    for step in range(STEPS):
        mean = sum(rank["losses"][step] for rank in ddp_run["ranks"]) / WORLD_SIZE
        assert mean == pytest.approx(ddp_run["single_losses"][step], rel=1e-5), f"step {step}"


def test_ddp_first_loss_matches_reference_mean(ddp_run: dict[str, Any]) -> None:
    expected = ddp_run["row_losses"][0].mean().item()
    assert ddp_run["single_losses"][0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_ddp_negatives_gathered_by_default(ddp_run: dict[str, Any], rank: int) -> None:
    # SimCLRModule was built without any distributed setting.
    results = ddp_run["ranks"][rank]
    gathered, local = results["losses"][0], results["local_losses"][0]
    assert abs(gathered - local) > 1e-3

    # The per-rank loss is the plain NT-Xent of the rank's own 2B rows.
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    view0, view1 = ddp_run["views"][0, 0, rows], ddp_run["views"][0, 1, rows]
    z0, z1 = _embed(ddp_run["initial_module"], view0, view1)
    expected_local = reference_row_losses(z0, z1, TEMPERATURE).mean().item()
    assert local == pytest.approx(expected_local, rel=1e-5)


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_ddp_lars_parameters_match_one_process(ddp_run: dict[str, Any], rank: int) -> None:
    single_state = ddp_run["single_state"]
    initial_state = ddp_run["initial_module"].state_dict()
    for name, tensor in ddp_run["ranks"][rank]["state"].items():
        # The steps must move every tensor, or equality would prove nothing.
        assert not torch.equal(tensor, initial_state[name]), name
        torch.testing.assert_close(tensor, single_state[name], atol=1e-6, rtol=0.0, msg=name)


# ---------------------------------------------------------------- Lightning ddp_spawn run


class _IndexedViews(Dataset):
    """Pretraining samples whose target is their index, which identifies the rows of each rank."""

    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(2)
        self.views = torch.randn(2, count, 3, 8, 8, generator=generator)

    def __len__(self) -> int:
        return self.views.shape[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"views": [self.views[0, index], self.views[1, index]], "target": index}


class _RankRecorder(pl.Callback):
    """Write what each rank saw to ``folder/rank{r}.json``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.record: dict[str, Any] = {"batch_sizes": [], "targets": []}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["world_size"] = trainer.world_size

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.record["batch_sizes"].append([len(view) for view in batch["views"]])
        self.record["targets"].extend(batch["target"].tolist())
        self.record["global_batch_size"] = pl_module.global_batch_size()  # type: ignore[operator]
        self.record["lr"] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["global_step"] = trainer.global_step
        path = self.folder / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.record))


def _spawn_trainer(folder: Path, **overrides: Any) -> pl.Trainer:
    arguments: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": WORLD_SIZE,
        "strategy": "ddp_spawn",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "callbacks": [_RankRecorder(folder)],
    }
    arguments.update(overrides)
    return pl.Trainer(**arguments)


def _tiny_simclr(**overrides: Any) -> SimCLRModule:
    torch.manual_seed(0)
    arguments: dict[str, Any] = {
        "backbone": "resnet18",
        "small_stem": True,
        "projection_hidden_dim": 16,
        "projection_dim": 8,
        "batch_size_per_device": 4,
        "num_classes": 0,
        "warmup_steps": 0,
    }
    arguments.update(overrides)
    return SimCLRModule(**arguments)


def _read_ranks(folder: Path) -> list[dict[str, Any]]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


@contextlib.contextmanager
def loopback_environment() -> Iterator[None]:
    """Point Lightning's process group at a free port on 127.0.0.1 and gloo at loopback."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_loopback_port()))
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
        # Set here so Lightning leaves the thread count of this process alone.
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def spawn_batches(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("spawn_batches")
    with loopback_environment():
        # 19 samples: the sampler pads to 10 per rank, and batches of 4 with drop_last leave
        # two full batches per rank instead of a last batch of 2.
        loader = DataLoader(_IndexedViews(19), batch_size=4, drop_last=True)
        _spawn_trainer(folder, max_epochs=1).fit(_tiny_simclr(), loader)
    return _read_ranks(folder)


def test_ddp_spawn_batches_equal_on_ranks(spawn_batches: list[dict[str, Any]]) -> None:
    for rank, record in enumerate(spawn_batches):
        assert record["batch_sizes"] == [[4, 4], [4, 4]], f"rank {rank}"


def test_ddp_spawn_steps_equal_on_ranks(spawn_batches: list[dict[str, Any]]) -> None:
    assert [record["global_step"] for record in spawn_batches] == [2, 2]


def test_ddp_spawn_ranks_see_different_samples(spawn_batches: list[dict[str, Any]]) -> None:
    first, second = (set(record["targets"]) for record in spawn_batches)
    # The distributed sampler splits the data; only a padding repeat could appear twice.
    assert len(first & second) <= 1


def test_ddp_spawn_global_batch_and_lr(spawn_batches: list[dict[str, Any]]) -> None:
    for record in spawn_batches:
        assert record["world_size"] == 2
        assert record["global_batch_size"] == 8
        # No warm-up, 2 steps: the second step is half-way down the cosine, 0.5 * 0.3 * 8 / 256.
        assert record["lr"] == pytest.approx(0.5 * 0.3 * 8 / 256)
