"""Reading SimCLR checkpoints and strict state loading."""

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from simclr_lightning.models.checkpoints import load_state_strict, read_simclr_checkpoint


def _save(path: Path, state_dict: dict[str, Tensor], **extra: object) -> Path:
    torch.save({"state_dict": state_dict, **extra}, path)
    return path


def _small_state() -> dict[str, Tensor]:
    return {
        "backbone.conv.weight": torch.full((2, 1, 1, 1), 3.0),
        "backbone.bn.running_mean": torch.tensor([0.5, -0.5]),
        "projection_head.layers.0.weight": torch.eye(2),
        "online_probe.weight": torch.zeros(3, 2),
    }


def test_read_checkpoint_splits_backbone_and_head(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.ckpt", _small_state(), hyper_parameters={"backbone": "resnet18"})
    weights = read_simclr_checkpoint(path)

    assert sorted(weights.backbone) == ["bn.running_mean", "conv.weight"]
    assert sorted(weights.projection_head) == ["layers.0.weight"]
    assert torch.equal(weights.backbone["conv.weight"], torch.full((2, 1, 1, 1), 3.0))
    assert torch.equal(weights.projection_head["layers.0.weight"], torch.eye(2))
    assert weights.hparams == {"backbone": "resnet18"}
    assert weights.path == path


def test_read_checkpoint_strips_compile_prefix(tmp_path: Path) -> None:
    state = {"backbone._orig_mod.conv.weight": torch.ones(1), "projection_head.w": torch.ones(1)}
    weights = read_simclr_checkpoint(_save(tmp_path / "compiled.ckpt", state))
    assert list(weights.backbone) == ["conv.weight"]


def test_read_checkpoint_without_hparams_gives_empty_dict(tmp_path: Path) -> None:
    weights = read_simclr_checkpoint(_save(tmp_path / "bare.ckpt", _small_state()))
    assert weights.hparams == {}


def test_read_checkpoint_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.ckpt not found"):
        read_simclr_checkpoint(tmp_path / "absent.ckpt")


def test_read_checkpoint_rejects_plain_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ValueError, match="has no 'state_dict' entry"):
        read_simclr_checkpoint(path)


def test_read_checkpoint_rejects_other_module(tmp_path: Path) -> None:
    path = _save(tmp_path / "other.ckpt", {"encoder.weight": torch.ones(1)})
    with pytest.raises(
        ValueError, match="lacks 'backbone.\\*' or 'projection_head.\\*' tensors.*encoder.weight"
    ):
        read_simclr_checkpoint(path)


def _two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_load_state_strict_copies_tensors() -> None:
    source, target = _two_layers(), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    source[1].running_mean.fill_(0.25)
    load_state_strict(target, source.state_dict(), "backbone")
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_load_state_strict_missing_key_named() -> None:
    tensors = _two_layers().state_dict()
    del tensors["1.running_var"]
    with pytest.raises(ValueError, match="1 missing keys, e.g. \\['1.running_var'\\]"):
        load_state_strict(_two_layers(), tensors, "backbone")


def test_load_state_strict_unexpected_key_named() -> None:
    tensors = _two_layers().state_dict()
    tensors["2.weight"] = torch.ones(4)
    with pytest.raises(ValueError, match="1 unexpected keys, e.g. \\['2.weight'\\]"):
        load_state_strict(_two_layers(), tensors, "backbone")


def test_load_state_strict_reshaped_key_named() -> None:
    tensors = _two_layers().state_dict()
    tensors["0.weight"] = torch.ones(4, 5)
    with pytest.raises(ValueError, match="0.weight: checkpoint \\(4, 5\\) vs model \\(4, 3\\)"):
        load_state_strict(_two_layers(), tensors, "backbone")


def test_load_state_strict_names_part() -> None:
    with pytest.raises(ValueError, match="The projection head in the checkpoint does not match"):
        load_state_strict(_two_layers(), {}, "projection head")


def test_load_state_strict_leaves_module_on_failure() -> None:
    target = _two_layers()
    before = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    tensors = {name: torch.zeros_like(t) for name, t in target.state_dict().items()}
    tensors["extra"] = torch.ones(1)
    with pytest.raises(ValueError):
        load_state_strict(target, tensors, "backbone")
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, before[name]), name
