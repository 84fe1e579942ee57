"""Loading the pieces of a SimCLRModule checkpoint that fine-tuning keeps."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_MAX_KEYS_SHOWN = 8


@dataclass
class PretrainedWeights:
    """Backbone and projection-head tensors of a SimCLR checkpoint, with its hyper-parameters."""

    path: Path
    hparams: dict[str, Any]
    backbone: dict[str, Tensor]
    projection_head: dict[str, Tensor]


def read_simclr_checkpoint(path: str | Path) -> PretrainedWeights:
    """Read a checkpoint written by ``SimCLRModule`` training.

    Raises:
        FileNotFoundError: When ``path`` does not exist.
        ValueError: When the file is not a Lightning checkpoint of a ``SimCLRModule``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {path} not found. Pass the .ckpt file written by "
            "'simclr-lightning pretrain fit' (it sits in the run's checkpoints/ folder)."
        )
    # NOTE: weights_only=False unpickles arbitrary objects; load only checkpoints you trust.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {error}). Pass the "
            ".ckpt file written by 'simclr-lightning pretrain fit'."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict' entry.")
    state_dict: dict[str, Tensor] = checkpoint["state_dict"]
    if "classifier.weight" in state_dict:
        raise ValueError(
            f"{path} is a FineTuneModule checkpoint, not a SimCLR one. To evaluate it, pass it "
            "as ckpt_path (simclr-lightning finetune validate --ckpt_path ...); to fine-tune, "
            "pass the pretraining run's checkpoints/last.ckpt as checkpoint_path."
        )
    backbone = _strip_prefix(state_dict, "backbone.")
    # torch.compile wraps the backbone; its keys carry an extra "_orig_mod." prefix.
    backbone = {key.removeprefix("_orig_mod."): value for key, value in backbone.items()}
    head = _strip_prefix(state_dict, "projection_head.")
    if not backbone or not head:
        raise ValueError(
            f"{path} lacks 'backbone.*' or 'projection_head.*' tensors, so it was not written "
            "by SimCLRModule. "
            f"Its first keys are {sorted(state_dict)[:_MAX_KEYS_SHOWN]}."
        )
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    return PretrainedWeights(path, hparams, backbone, head)


def _strip_prefix(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {
        key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
    }


def load_state_strict(module: torch.nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    """Load ``tensors`` into ``module``, failing on any missing, unexpected or reshaped key.

    A partial load would fine-tune a half-random network without any sign of it, so every
    difference between the two key sets is an error that lists the first offending keys.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    reshaped = sorted(
        key for key in set(expected) & set(tensors) if expected[key].shape != tensors[key].shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:_MAX_KEYS_SHOWN]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:_MAX_KEYS_SHOWN]}")
    if reshaped:
        shapes = [
            f"{key}: checkpoint {tuple(tensors[key].shape)} vs model {tuple(expected[key].shape)}"
            for key in reshaped[:_MAX_KEYS_SHOWN]
        ]
        problems.append(f"{len(reshaped)} tensors of another shape: {shapes}")
    if problems:
        raise ValueError(
            f"The {what} in the checkpoint does not match the model: {'; '.join(problems)}. "
            "Build the model with the checkpoint's backbone, small_stem and head settings."
        )
    module.load_state_dict(tensors, strict=True)
