"""ResNet backbones, projection heads, memory format, SyncBatchNorm and bf16 on CPU."""

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.models.backbones import (
    build_backbone,
    build_projection_head,
    split_head_layers,
)
from simclr_lightning.models.simclr import SimCLRModule


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    # Tiny models run faster on one intra-op thread than with threads contending for few cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class _PairedViews(Dataset):
    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.views = torch.randn(2, count, 3, 8, 8, generator=generator)

    def __len__(self) -> int:
        return self.views.shape[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"views": [self.views[0, index], self.views[1, index]], "target": -1}


class _LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.losses.append(outputs["loss"].detach())


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


@pytest.mark.slow
def test_build_backbone_feature_dims() -> None:
    expected = {
        "resnet18": 512,
        "resnet34": 512,
        "resnet50": 2048,
        "resnet101": 2048,
        "resnet152": 2048,
    }
    for name, dim in expected.items():
        backbone, feature_dim = build_backbone(name)
        assert feature_dim == dim, name
        assert isinstance(backbone.fc, nn.Identity), name
        if name in ("resnet18", "resnet50"):
            backbone.eval()
            with torch.no_grad():
                features = backbone(torch.zeros(1, 3, 32, 32))
            assert features.shape == (1, dim), name


def test_build_backbone_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="Unknown backbone 'resnet19'"):
        build_backbone("resnet19")


def test_build_backbone_small_stem_keeps_resolution() -> None:
    backbone, _ = build_backbone("resnet18", small_stem=True)
    assert backbone.conv1.kernel_size == (3, 3)
    assert backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)

    # The small stem and layer1 keep a 16x16 input at 16x16, but the standard stem divides it by 4.
    images = torch.zeros(2, 3, 16, 16)
    backbone.eval()
    with torch.no_grad():
        stem = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
        assert backbone.layer1(stem).shape == (2, 64, 16, 16)
        assert backbone(images).shape == (2, 512)

    standard, _ = build_backbone("resnet18")
    standard.eval()
    with torch.no_grad():
        standard_stem = standard.maxpool(standard.relu(standard.bn1(standard.conv1(images))))
    assert standard_stem.shape == (2, 64, 4, 4)


@pytest.mark.parametrize(("layers", "linear_count"), [(2, 2), (3, 3)])
def test_projection_head_layers(layers: int, linear_count: int) -> None:
    head = build_projection_head(512, 64, 16, layers)
    split = split_head_layers(head)
    assert len(split) == linear_count
    assert all(isinstance(layer[0], nn.Linear) for layer in split)
    assert split[0][0].in_features == 512
    assert split[-1][0].out_features == 16
    assert head(torch.randn(4, 512)).shape == (4, 16)


def test_projection_head_rejects_four_layers() -> None:
    with pytest.raises(ValueError, match="projection_layers must be 2 \\(SimCLR\\) or 3"):
        build_projection_head(512, 64, 16, 4)


def test_split_head_layers_rejects_leading_relu() -> None:
    with pytest.raises(ValueError, match="must start with nn.Linear"):
        split_head_layers(nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))


def test_channels_last_forward_equals_contiguous() -> None:
    contiguous = _tiny_simclr()
    channels_last = _tiny_simclr(channels_last=True)
    channels_last.load_state_dict(contiguous.state_dict())
    contiguous.eval()
    channels_last.eval()
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        expected = contiguous(images)
        observed = channels_last(images)

    assert channels_last.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(observed, expected, atol=1e-5, rtol=1e-5)


def test_sync_batchnorm_converts_every_batchnorm() -> None:
    module = _tiny_simclr()
    batchnorm_count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", sync_batchnorm=True, logger=False
    )
    # NOTE: the conversion is checked without fitting, because torch's DistributedDataParallel
    # rejects SyncBatchNorm on CPU ("SyncBatchNorm layers only work with GPU modules").
    # The private _layer_sync is the plugin DDPStrategy.setup applies before wrapping.
    layer_sync = trainer.strategy._layer_sync  # type: ignore[attr-defined]
    assert isinstance(layer_sync, TorchSyncBatchNorm)

    converted = layer_sync.apply(module)
    kinds = [type(m) for m in converted.modules()]
    # ResNet-18 has 1 in the stem, 2 in each of 8 blocks and 3 in downsample branches; the head 2.
    assert batchnorm_count == 22
    assert kinds.count(nn.SyncBatchNorm) == batchnorm_count
    assert nn.BatchNorm2d not in kinds
    assert nn.BatchNorm1d not in kinds


def test_bf16_mixed_training_step_finite() -> None:
    recorder = _LossRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    module = _tiny_simclr()
    head_dtypes: list[torch.dtype] = []
    module.projection_head.register_forward_hook(
        lambda _module, _inputs, output: head_dtypes.append(output.dtype)
    )
    trainer.fit(module, DataLoader(_PairedViews(8), batch_size=4, drop_last=True))

    # The head ran under bf16 autocast, yet the loss came out in float32.
    assert head_dtypes == [torch.bfloat16, torch.bfloat16]
    assert len(recorder.losses) == 2
    for loss in recorder.losses:
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss)
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
