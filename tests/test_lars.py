"""LARS parameter groups and update steps, checked against hand computations."""

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightly.utils.lars import LARS
from torch import nn

from simclr_lightning.models.optim import build_optimizer, split_decay_groups
from simclr_lightning.models.simclr import SimCLRModule

WEIGHT_DECAY = 1e-4


def _stub_trainer(**overrides: Any) -> SimpleNamespace:
    fields: dict[str, Any] = {
        "world_size": 1,
        "accumulate_grad_batches": 1,
        "estimated_stepping_batches": 100,
        "max_epochs": 10,
        "datamodule": None,
    }
    fields.update(overrides)
    return SimpleNamespace(**fields)


@pytest.fixture(scope="module")
def configured_module() -> tuple[SimCLRModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = SimCLRModule(
        backbone="resnet18",
        small_stem=True,
        projection_layers=3,
        projection_hidden_dim=32,
        projection_dim=16,
        weight_decay=WEIGHT_DECAY,
        batch_size_per_device=8,
        num_classes=3,
    )
    module.trainer = _stub_trainer()  # type: ignore[assignment]
    optimizer = module.configure_optimizers()["optimizer"]
    return module, optimizer


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    owner: dict[int, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            owner[id(parameter)] = group
    return owner


def test_configure_optimizers_builds_lars(
    configured_module: tuple[SimCLRModule, torch.optim.Optimizer],
) -> None:
    _, optimizer = configured_module
    assert isinstance(optimizer, LARS)


def test_configure_optimizers_covers_every_parameter_once(
    configured_module: tuple[SimCLRModule, torch.optim.Optimizer],
) -> None:
    module, optimizer = configured_module
    listed = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in module.parameters()}


def test_configure_optimizers_one_dim_parameters_no_decay(
    configured_module: tuple[SimCLRModule, torch.optim.Optimizer],
) -> None:
    module, optimizer = configured_module
    owner = _group_of(optimizer)
    one_dim = [(name, p) for name, p in module.named_parameters() if p.ndim == 1]

    # The check must reach BatchNorm layers nested in the head and in downsample branches.
    names = [name for name, _ in one_dim]
    assert "backbone.layer2.0.downsample.1.weight" in names
    assert "backbone.layer2.0.downsample.1.bias" in names
    assert "projection_head.layers.4.weight" in names
    assert "projection_head.layers.7.bias" in names
    assert "online_probe.bias" in names

    for name, parameter in one_dim:
        assert owner[id(parameter)]["weight_decay"] == 0.0, name


def test_configure_optimizers_weights_decay(
    configured_module: tuple[SimCLRModule, torch.optim.Optimizer],
) -> None:
    module, optimizer = configured_module
    owner = _group_of(optimizer)
    for name, parameter in module.named_parameters():
        if parameter.ndim > 1 and not name.startswith("online_probe."):
            assert owner[id(parameter)]["weight_decay"] == WEIGHT_DECAY, name


def test_split_decay_groups_skips_frozen() -> None:
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    groups = split_decay_groups(layer.parameters(), 0.5)
    assert len(groups) == 1
    assert groups[0]["params"] == [layer.weight]
    assert groups[0]["weight_decay"] == 0.5


def test_lars_two_steps_hand_values() -> None:
    # ||w|| = 5, ||g|| = 1, wd = 0.1, eta = 0.001, so the first trust ratio is
    # 0.001 * 5 / (1 + 0.1 * 5) = 1 / 300 and the update is lr * (g + wd * w) / 300.
    weight = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64))
    bias = nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    lr, momentum, weight_decay, eta = 2.0, 0.9, 0.1, 0.001
    groups = split_decay_groups([weight, bias], weight_decay)
    optimizer = build_optimizer("lars", groups, lr, momentum, eta)

    weight.grad = torch.tensor([[0.6, 0.0], [0.0, 0.8]], dtype=torch.float64)
    bias.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
    optimizer.step()

    step1 = np.array([[0.9, 0.4], [0.0, 0.8]]) / 300
    weight1 = np.array([[3.0, 4.0], [0.0, 0.0]]) - lr * step1
    np.testing.assert_allclose(weight.detach().numpy(), weight1, atol=1e-10)
    # A group with weight_decay 0 skips the trust ratio: a plain momentum-SGD step.
    np.testing.assert_allclose(bias.detach().numpy(), [1.0 - 1.0, -1.0 - 0.5], atol=1e-12)

    # Second step: new trust ratio from the moved weight, momentum buffer 0.9 * step1 + step2.
    grad2 = np.array([[0.0, 2.0], [0.0, 0.0]])
    weight.grad = torch.tensor(grad2, dtype=torch.float64)
    bias.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    optimizer.step()

    norm1 = np.sqrt((weight1**2).sum())
    trust2 = eta * norm1 / (2.0 + weight_decay * norm1 + 1e-8)
    step2 = (grad2 + weight_decay * weight1) * trust2
    buffer2 = momentum * step1 + step2
    np.testing.assert_allclose(weight.detach().numpy(), weight1 - lr * buffer2, atol=1e-10)
    bias_buffer2 = momentum * np.array([0.5, 0.25]) + np.array([0.0, 1.0])
    np.testing.assert_allclose(
        bias.detach().numpy(), np.array([0.0, -1.5]) - lr * bias_buffer2, atol=1e-12
    )


def test_lars_zero_weight_moves_without_nan() -> None:
    # With ||w|| = 0 the trust ratio is undefined, so lightly's LARS (1.6) skips it and the
    # weight decay and takes a plain lr * g step.
    weight = nn.Parameter(torch.zeros(2, 3))
    optimizer = build_optimizer("lars", split_decay_groups([weight], 1e-6), 0.5, 0.9, 0.001)
    weight.grad = torch.ones(2, 3)
    optimizer.step()
    assert bool(torch.isfinite(weight).all())
    assert torch.allclose(weight.detach(), torch.full((2, 3), -0.5))


def test_lars_zero_gradient_keeps_weight() -> None:
    weight = nn.Parameter(torch.ones(2, 3))
    optimizer = build_optimizer("lars", split_decay_groups([weight], 1e-6), 0.5, 0.9, 0.001)
    weight.grad = torch.zeros(2, 3)
    optimizer.step()
    assert bool(torch.isfinite(weight).all())
    assert torch.equal(weight.detach(), torch.ones(2, 3))


def test_build_optimizer_rejects_nonpositive_lr() -> None:
    groups = split_decay_groups(nn.Linear(2, 2).parameters(), 0.0)
    with pytest.raises(ValueError, match="Learning rate must be positive, got 0"):
        build_optimizer("lars", groups, 0.0)


def test_build_optimizer_rejects_unknown_name() -> None:
    groups = split_decay_groups(nn.Linear(2, 2).parameters(), 0.0)
    with pytest.raises(ValueError, match="Unknown optimizer 'adam'"):
        build_optimizer("adam", groups, 0.1)  # type: ignore[arg-type]
