"""SimCLRModule: shapes, the online probe, logged metrics and online kNN evaluation."""

import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.models.simclr import SimCLRModule


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    # Tiny models run faster on one intra-op thread than with threads contending for few cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class _PairedViews(Dataset):
    def __init__(self, count: int, labeled: bool = False) -> None:
        generator = torch.Generator().manual_seed(0)
        self.views = torch.randn(2, count, 3, 8, 8, generator=generator)
        self.labeled = labeled

    def __len__(self) -> int:
        return self.views.shape[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        target = index % 2 if self.labeled else -1
        return {"views": [self.views[0, index], self.views[1, index]], "target": target}


class _LabeledImages(Dataset):
    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(count, 3, 8, 8, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self.images[index],
            "target": index % 2,
            "race": -1,
            "gender": -1,
            "index": index,
        }


def _tiny_module(**overrides: Any) -> SimCLRModule:
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


def _views(batch_size: int = 4) -> list[Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(batch_size, 3, 8, 8, generator=generator) for _ in range(2)]


def _step(module: SimCLRModule, batch: dict[str, Any]) -> Tensor:
    with warnings.catch_warnings():
        # self.log warns when no Trainer is attached.
        warnings.simplefilter("ignore")
        return module.training_step(batch, 0)


def _quiet_trainer(**overrides: Any) -> pl.Trainer:
    arguments: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    arguments.update(overrides)
    return pl.Trainer(**arguments)


def test_forward_and_project_shapes() -> None:
    module = _tiny_module()
    features = module(torch.zeros(3, 3, 8, 8))
    assert features.shape == (3, 512)
    assert module.project(features).shape == (3, 8)


def test_rejects_knn_k_zero() -> None:
    with pytest.raises(ValueError, match="knn_k must be at least 1, got 0"):
        SimCLRModule(knn_k=0)


def test_probe_without_labels_adds_nothing() -> None:
    module = _tiny_module(num_classes=3)
    view0, view1 = _views()
    loss = _step(module, {"views": [view0, view1], "target": torch.full((4,), -1)})
    z0, z1 = module.project(module(torch.cat([view0, view1]))).chunk(2)
    expected = NTXentLoss(temperature=0.1)(z0, z1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    # The probe stays in the graph with a zero gradient, so DDP finds a gradient on every rank.
    loss.backward()
    assert module.online_probe is not None
    assert module.online_probe.weight.grad is not None
    assert torch.count_nonzero(module.online_probe.weight.grad) == 0


def test_probe_loss_added_on_detached_features() -> None:
    view0, view1 = _views()
    target = torch.tensor([0, 1, -1, 2])
    labeled = _tiny_module(num_classes=3)
    unlabeled = _tiny_module(num_classes=3)

    loss = _step(labeled, {"views": [view0, view1], "target": target})
    with torch.no_grad():
        features = labeled(torch.cat([view0, view1]))
        z0, z1 = labeled.project(features).chunk(2)
        assert labeled.online_probe is not None
        logits = labeled.online_probe(features[:4])
    # Cross-entropy over the three labeled rows only, added to the contrastive loss.
    rows = torch.tensor([0, 1, 3])
    probe_loss = F.cross_entropy(logits[rows], target[rows])
    expected = NTXentLoss(temperature=0.1)(z0, z1) + probe_loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # The probe loss must not reach the encoder: its gradients equal those without labels.
    loss.backward()
    _step(unlabeled, {"views": [view0, view1], "target": torch.full((4,), -1)}).backward()
    labeled_grad = labeled.backbone.conv1.weight.grad
    unlabeled_grad = unlabeled.backbone.conv1.weight.grad
    assert labeled_grad is not None
    assert unlabeled_grad is not None
    torch.testing.assert_close(labeled_grad, unlabeled_grad, atol=1e-7, rtol=1e-5)


def test_setup_builds_probe_from_datamodule() -> None:
    module = _tiny_module(num_classes=None)
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(num_classes=5))  # type: ignore[assignment]
    module.setup("fit")
    assert module.online_probe is not None
    assert module.online_probe.out_features == 5
    assert module.hparams["num_classes"] == 5


def test_setup_without_classes_keeps_no_probe() -> None:
    module = _tiny_module(num_classes=None)
    module.trainer = SimpleNamespace(datamodule=None)  # type: ignore[assignment]
    module.setup("fit")
    assert module.online_probe is None


@pytest.fixture(scope="module")
def fitted_metrics() -> dict[str, Tensor]:
    """Fit two steps with online evaluation (queries equal to the bank) and return the metrics."""
    module = _tiny_module(num_classes=2, knn_k=1)
    trainer = _quiet_trainer(max_steps=2, num_sanity_val_steps=0)
    train_loader = DataLoader(_PairedViews(8, labeled=True), batch_size=4, drop_last=True)
    bank = DataLoader(_LabeledImages(6), batch_size=3)
    queries = DataLoader(_LabeledImages(6), batch_size=3)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(module, train_loader, val_dataloaders=[bank, queries])
    finally:
        torch.set_num_threads(previous)
    return dict(trainer.callback_metrics)


@pytest.mark.parametrize(
    "name",
    [
        "train/loss",
        "train/lr",
        "train/z_std",
        "train/z_std_ratio",
        "train/pos_cosine",
        "train/neg_cosine",
        "train/contrastive_top1",
        "train/feature_std",
        "train/probe_loss",
        "val/knn_top1",
        "val/probe_top1",
    ],
)
def test_fit_logs_metric(fitted_metrics: dict[str, Tensor], name: str) -> None:
    assert name in fitted_metrics
    assert torch.isfinite(fitted_metrics[name])


def test_fit_knn_finds_identical_queries(fitted_metrics: dict[str, Tensor]) -> None:
    # Each query image is also in the bank, so its single nearest neighbour (cosine 1) is itself.
    assert fitted_metrics["val/knn_top1"].item() == pytest.approx(1.0)


def test_fit_probe_top1_is_a_fraction(fitted_metrics: dict[str, Tensor]) -> None:
    value = fitted_metrics["val/probe_top1"].item()
    # Six queries: the accuracy is a multiple of 1/6 in [0, 1].
    assert 0.0 <= value <= 1.0
    assert value * 6 == pytest.approx(round(value * 6), abs=1e-5)
