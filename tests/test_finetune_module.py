"""FineTuneModule: SimCLRv2 head layers kept from a checkpoint, strict loading, linear probe."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.models.finetune import FineTuneModule
from simclr_lightning.models.simclr import SimCLRModule

HIDDEN_DIM = 32


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


class _LabeledImages(Dataset):
    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(count, 3, 8, 8, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self.images[index],
            "target": index % 3,
            "race": index % 5,
            "gender": index % 2,
            "index": index,
        }


def _quiet_trainer(**overrides: Any) -> pl.Trainer:
    arguments: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
    }
    arguments.update(overrides)
    return pl.Trainer(**arguments)


@pytest.fixture(scope="module")
def simclr_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train a SimCLRModule with a SimCLRv2 3-layer head for two steps and save its checkpoint."""
    torch.manual_seed(0)
    module = SimCLRModule(
        backbone="resnet18",
        small_stem=True,
        projection_layers=3,
        projection_hidden_dim=HIDDEN_DIM,
        projection_dim=16,
        batch_size_per_device=4,
        num_classes=0,
        warmup_steps=0,
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = _quiet_trainer(max_steps=2)
        trainer.fit(module, DataLoader(_PairedViews(8), batch_size=4, drop_last=True))
    finally:
        torch.set_num_threads(previous)
    path = tmp_path_factory.mktemp("pretrained") / "simclr.ckpt"
    trainer.save_checkpoint(path)
    return path


def _checkpoint_state(path: Path) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _rewrite_checkpoint(source: Path, target: Path, state_dict: dict[str, Tensor]) -> Path:
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = state_dict
    torch.save(checkpoint, target)
    return target


def _expected_head_keys(kept: int) -> dict[str, str]:
    """Map kept-head keys to checkpoint keys.

    lightly's 3-layer head is one flat Sequential: Linear, BatchNorm1d, ReLU (indices 0-2),
    Linear, BatchNorm1d, ReLU (3-5), Linear, BatchNorm1d (6-7). Layer i of the kept head is
    Sequential(Linear, BatchNorm1d, ReLU) taken from flat indices 3i, 3i + 1 and 3i + 2.
    """
    mapping = {}
    for layer in range(kept):
        linear, norm = 3 * layer, 3 * layer + 1
        mapping[f"head_layers.{layer}.0.weight"] = f"projection_head.layers.{linear}.weight"
        for buffer in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            mapping[f"head_layers.{layer}.1.{buffer}"] = f"projection_head.layers.{norm}.{buffer}"
    return mapping


@pytest.mark.parametrize(("kept", "feature_dim"), [(0, 512), (1, HIDDEN_DIM), (2, HIDDEN_DIM)])
def test_finetune_keeps_head_layers(simclr_checkpoint: Path, kept: int, feature_dim: int) -> None:
    module = FineTuneModule(str(simclr_checkpoint), num_classes=3, head_layers_kept=kept)
    state = module.state_dict()
    checkpoint = _checkpoint_state(simclr_checkpoint)
    expected = _expected_head_keys(kept)

    kept_keys = sorted(key for key in state if key.startswith("head_layers."))
    assert kept_keys == sorted(expected)
    for key, checkpoint_key in expected.items():
        assert torch.equal(state[key], checkpoint[checkpoint_key]), key
    assert module.feature_dim == feature_dim
    assert module.classifier is not None
    assert module.classifier.in_features == feature_dim


def test_finetune_head_stats_come_from_training(simclr_checkpoint: Path) -> None:
    # Two training steps moved the BatchNorm statistics, so equality above is not a default.
    checkpoint = _checkpoint_state(simclr_checkpoint)
    assert checkpoint["projection_head.layers.1.num_batches_tracked"].item() == 2
    assert not torch.equal(checkpoint["projection_head.layers.1.running_mean"], torch.zeros(32))


def test_finetune_loads_every_backbone_tensor(simclr_checkpoint: Path) -> None:
    module = FineTuneModule(str(simclr_checkpoint), num_classes=3)
    checkpoint = _checkpoint_state(simclr_checkpoint)
    backbone = module.backbone.state_dict()
    assert len(backbone) == sum(key.startswith("backbone.") for key in checkpoint)
    for key, tensor in backbone.items():
        assert torch.equal(tensor, checkpoint[f"backbone.{key}"]), key


def test_finetune_adopts_checkpoint_architecture(simclr_checkpoint: Path) -> None:
    module = FineTuneModule(str(simclr_checkpoint), num_classes=3)
    assert module.hparams["backbone"] == "resnet18"
    assert module.hparams["small_stem"] is True
    assert module.hparams["projection_layers"] == 3


def test_finetune_rejects_too_many_head_layers(simclr_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="head_layers_kept=4 but the projection head has only 3"):
        FineTuneModule(str(simclr_checkpoint), num_classes=3, head_layers_kept=4)


def test_finetune_rejects_contradicting_backbone(simclr_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="backbone='resnet34' contradicts the checkpoint"):
        FineTuneModule(str(simclr_checkpoint), num_classes=3, backbone="resnet34")


def test_finetune_missing_backbone_key_named(simclr_checkpoint: Path, tmp_path: Path) -> None:
    state = _checkpoint_state(simclr_checkpoint)
    del state["backbone.layer3.1.bn2.running_var"]
    path = _rewrite_checkpoint(simclr_checkpoint, tmp_path / "missing.ckpt", state)
    with pytest.raises(ValueError, match="missing keys, e.g. \\['layer3.1.bn2.running_var'\\]"):
        FineTuneModule(str(path), num_classes=3)


def test_finetune_unexpected_backbone_key_named(simclr_checkpoint: Path, tmp_path: Path) -> None:
    state = _checkpoint_state(simclr_checkpoint)
    state["backbone.layer5.0.conv1.weight"] = torch.zeros(1)
    path = _rewrite_checkpoint(simclr_checkpoint, tmp_path / "unexpected.ckpt", state)
    with pytest.raises(ValueError, match="unexpected keys, e.g. \\['layer5.0.conv1.weight'\\]"):
        FineTuneModule(str(path), num_classes=3)


def test_finetune_missing_head_key_named(simclr_checkpoint: Path, tmp_path: Path) -> None:
    state = _checkpoint_state(simclr_checkpoint)
    del state["projection_head.layers.4.bias"]
    path = _rewrite_checkpoint(simclr_checkpoint, tmp_path / "head.ckpt", state)
    with pytest.raises(ValueError, match="projection head.*\\['layers.4.bias'\\]"):
        FineTuneModule(str(path), num_classes=3, head_layers_kept=1)


def _encoder_state(module: FineTuneModule) -> dict[str, Tensor]:
    tensors = {f"backbone.{k}": v for k, v in module.backbone.state_dict().items()}
    tensors.update({f"head_layers.{k}": v for k, v in module.head_layers.state_dict().items()})
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def _fit_one_step(module: FineTuneModule) -> None:
    trainer = _quiet_trainer(max_steps=1)
    trainer.fit(module, DataLoader(_LabeledImages(8), batch_size=8))


def test_linear_protocol_freezes_encoder(simclr_checkpoint: Path) -> None:
    module = FineTuneModule(
        str(simclr_checkpoint), num_classes=3, protocol="linear", head_layers_kept=1
    )
    assert not any(p.requires_grad for p in module.encoder_parameters())
    assert module.classifier is not None
    assert all(p.requires_grad for p in module.classifier.parameters())

    before = _encoder_state(module)
    classifier_before = module.classifier.weight.detach().clone()
    _fit_one_step(module)
    after = _encoder_state(module)

    # Weights and BatchNorm running statistics of the encoder are untouched by the step.
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert not torch.equal(module.classifier.weight.detach(), classifier_before)


def test_linear_protocol_keeps_encoder_in_eval(simclr_checkpoint: Path) -> None:
    module = FineTuneModule(str(simclr_checkpoint), num_classes=3, protocol="linear")
    module.train()
    assert not module.backbone.training
    assert not module.head_layers.training
    assert module.classifier is not None
    assert module.classifier.training


def test_finetune_protocol_updates_statistics(simclr_checkpoint: Path) -> None:
    # The counterpart of the linear check: full fine-tuning moves the running statistics.
    module = FineTuneModule(str(simclr_checkpoint), num_classes=3, protocol="finetune")
    before = _encoder_state(module)
    _fit_one_step(module)
    after = _encoder_state(module)
    assert not torch.equal(after["backbone.bn1.running_mean"], before["backbone.bn1.running_mean"])
    assert not torch.equal(after["backbone.conv1.weight"], before["backbone.conv1.weight"])
