"""SimCLR self-supervised pretraining and fine-tuning on face images with PyTorch Lightning.

The public classes load on first access, so ``import simclr_lightning`` stays cheap and a
subpackage can be imported on its own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CIFAR10DataModule": "simclr_lightning.data.cifar",
    "FaceDataModule": "simclr_lightning.data.face_datamodule",
    "FineTuneModule": "simclr_lightning.models.finetune",
    "LFWDataModule": "simclr_lightning.data.lfw",
    "SimCLRAugmentation": "simclr_lightning.data.transforms",
    "SimCLRModule": "simclr_lightning.models.simclr",
    "WandbRunLogger": "simclr_lightning.loggers",
}

__all__ = [
    "CIFAR10DataModule",
    "FaceDataModule",
    "FineTuneModule",
    "LFWDataModule",
    "SimCLRAugmentation",
    "SimCLRModule",
    "WandbRunLogger",
]

if TYPE_CHECKING:
    from simclr_lightning.data.cifar import CIFAR10DataModule
    from simclr_lightning.data.face_datamodule import FaceDataModule
    from simclr_lightning.data.lfw import LFWDataModule
    from simclr_lightning.data.transforms import SimCLRAugmentation
    from simclr_lightning.loggers import WandbRunLogger
    from simclr_lightning.models.finetune import FineTuneModule
    from simclr_lightning.models.simclr import SimCLRModule


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'simclr_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
