"""Run SimCLRModule training steps on two gloo processes with DDP and LARS.

``tests/test_distributed.py`` starts this script once per rank as a subprocess, so no process
re-runs the pytest command line. Usage::

    python tests/distributed/ntxent_ddp.py RANK INPUTS OUTPUT_DIR PORT

``INPUTS`` is a ``torch.save`` file with the pickled ``module``, a ``SimCLRModule`` without
BatchNorm, so no batch statistic can differ from the one-process run. It also contains the global
batches ``views`` of shape (steps, 2, global_batch, C, H, W) and the LARS settings ``lr``,
``momentum``, ``weight_decay`` and ``trust_coefficient``. Rank ``r`` trains on rows
``[r * B, (r + 1) * B)`` of every global batch, with ``B = global_batch / world_size``, and writes
``OUTPUT_DIR/rank{r}.pt`` with its losses per step, the loss of the same embeddings without
gathered negatives, and its final parameters. The ranks meet on ``127.0.0.1:PORT``, where rank 0
listens, and gloo stays on the loopback interface.
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightly.loss import NTXentLoss
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from simclr_lightning.models.optim import build_optimizer, split_decay_groups

WORLD_SIZE = 2


class TrainingStep(nn.Module):
    """Call ``training_step`` from ``forward``, so DDP treats the step as one forward pass."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.module.training_step(batch, 0)


def run_rank(rank: int, inputs_path: str, output_dir: str, port: int) -> None:
    """Train one rank and write its results."""
    torch.set_num_threads(1)
    # Without this, gloo may pick the interface the host name resolves to instead of loopback.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        results = _train(rank, torch.load(inputs_path, weights_only=False))
        torch.save(results, Path(output_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _train(rank: int, inputs: dict[str, Any]) -> dict[str, Any]:
    module = inputs["module"]
    module.train()
    groups = split_decay_groups(module.parameters(), inputs["weight_decay"])
    optimizer = build_optimizer(
        "lars", groups, inputs["lr"], inputs["momentum"], inputs["trust_coefficient"]
    )
    wrapped = DistributedDataParallel(TrainingStep(module))
    local_criterion = NTXentLoss(temperature=module.hparams["temperature"])

    losses: list[float] = []
    local_losses: list[float] = []
    views: Tensor = inputs["views"]
    rows_per_rank = views.shape[2] // WORLD_SIZE
    rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
    for global_views in views:
        view0, view1 = global_views[0, rows], global_views[1, rows]
        optimizer.zero_grad()
        with warnings.catch_warnings():
            # self.log warns on every call because no Trainer is attached.
            warnings.simplefilter("ignore")
            loss = wrapped({"views": [view0, view1]})
        loss.backward()
        with torch.no_grad():
            z0, z1 = module.project(module(torch.cat([view0, view1]))).chunk(2)
            local_losses.append(local_criterion(z0, z1).item())
        losses.append(loss.item())
        optimizer.step()

    state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    return {"losses": losses, "local_losses": local_losses, "state": state}


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise SystemExit("usage: ntxent_ddp.py RANK INPUTS OUTPUT_DIR PORT")
    run_rank(int(argv[0]), argv[1], argv[2], int(argv[3]))


if __name__ == "__main__":
    main(sys.argv[1:])
