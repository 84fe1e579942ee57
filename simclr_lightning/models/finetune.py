"""Fine-tuning and linear evaluation of a SimCLR backbone as a LightningModule."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn

from simclr_lightning.models.backbones import (
    build_backbone,
    build_projection_head,
    split_head_layers,
)
from simclr_lightning.models.checkpoints import (
    PretrainedWeights,
    load_state_strict,
    read_simclr_checkpoint,
)
from simclr_lightning.models.optim import OptimizerName, build_optimizer, split_decay_groups
from simclr_lightning.models.schedules import WarmupCosineSchedule

logger = logging.getLogger(__name__)

FineTuneProtocol = Literal["linear", "finetune"]


class FineTuneModule(pl.LightningModule):
    """A classifier on a SimCLR backbone: linear probe or full fine-tuning.

    The projection head of the checkpoint is dropped, except its first ``head_layers_kept``
    layers (SimCLRv2 fine-tunes from the first head layer). Every backbone tensor of the
    checkpoint must load: a missing, unexpected or reshaped key raises ``ValueError``. With no
    checkpoint the backbone starts from a random initialisation, the supervised baseline.

    To restore a trained ``FineTuneModule`` without the SimCLR checkpoint it started from, call
    ``FineTuneModule.load_from_checkpoint(path, checkpoint_path=None)``: the architecture is
    kept in the hyper-parameters and the weights come from ``path``.

    Args:
        checkpoint_path: ``SimCLRModule`` checkpoint to start from; ``None`` trains from scratch.
        num_classes: Output classes; ``None`` reads ``num_classes`` from the datamodule.
        class_names: Names for logs and reports; ``None`` reads ``class_names`` from the
            datamodule, else uses the class indices.
        protocol: ``linear`` freezes the encoder, BatchNorm statistics included, and trains the
            classifier only; ``finetune`` trains everything.
        head_layers_kept: Projection-head layers kept on top of the backbone (0 = SimCLR,
            1 = SimCLRv2).
        backbone: ResNet name; ``None`` takes the checkpoint's, or ``resnet18`` without one.
        small_stem: 3x3 stem without max pool; ``None`` takes the checkpoint's, or ``False``.
        optimizer: ``adamw`` (the default: it fine-tunes SimCLR backbones stably where SGD at
            lr 0.05 collapsed to one class on UTKFace gender), ``sgd`` (Nesterov momentum) or
            ``lars``.
        lr: Peak learning rate of the classifier.
        backbone_lr_ratio: Encoder learning rate as a fraction of ``lr`` in ``finetune`` protocol.
        weight_decay: Weight decay of multi-dimensional weights; 1-D tensors never decay.
        momentum: Momentum of SGD and LARS.
        warmup_epochs: Epochs of linear warm-up before the cosine decay.
        final_lr_ratio: Learning rate at the end of the cosine decay, as a fraction of the peak.
        class_weights: ``balanced`` weighs the cross-entropy by ``N / (C * n_c)`` from the
            datamodule's ``train_targets()``; ``none`` leaves it unweighted.
        label_smoothing: Cross-entropy label smoothing.
        feature_norm: Standardise features with a BatchNorm without affine parameters before
            the classifier. ResNet features are non-negative after the last ReLU and share a
            large mean, so without centring every SGD step moves all logits the same way and
            the classifier flips between predicting one class and another.
        channels_last: Run convolutions in channels-last memory format.
    """

    def __init__(
        self,
        checkpoint_path: str | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        protocol: FineTuneProtocol = "finetune",
        head_layers_kept: int = 0,
        backbone: str | None = None,
        small_stem: bool | None = None,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        backbone_lr_ratio: float = 0.1,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        warmup_epochs: float = 1.0,
        final_lr_ratio: float = 0.0,
        class_weights: Literal["none", "balanced"] = "none",
        label_smoothing: float = 0.0,
        feature_norm: bool = True,
        channels_last: bool = False,
        projection_layers: int = 2,
        projection_hidden_dim: int | None = None,
        projection_dim: int = 128,
    ) -> None:
        super().__init__()
        if protocol not in ("linear", "finetune"):
            raise ValueError(f"protocol must be 'linear' or 'finetune', got {protocol!r}.")
        if head_layers_kept < 0:
            raise ValueError(f"head_layers_kept must be 0 or more, got {head_layers_kept}.")
        if class_weights not in ("none", "balanced"):
            raise ValueError(f"class_weights must be 'none' or 'balanced', got {class_weights!r}.")
        self.save_hyperparameters()

        pretrained = self._read_pretrained(checkpoint_path)
        if pretrained is not None:
            self._adopt_checkpoint_architecture(pretrained.hparams)
        hp = self.hparams
        backbone_name = hp["backbone"] or "resnet18"
        self.backbone, backbone_dim = build_backbone(backbone_name, bool(hp["small_stem"]))
        self.head_layers, self.feature_dim = self._build_kept_head(backbone_dim)
        if pretrained is not None:
            load_state_strict(self.backbone, pretrained.backbone, "backbone")
            if hp["head_layers_kept"]:
                self._load_kept_head(pretrained.projection_head, backbone_dim)
            rank_zero_info(
                f"Loaded {len(pretrained.backbone)} backbone tensors from {pretrained.path}, "
                f"kept {hp['head_layers_kept']} projection-head layers."
            )
        self.feature_norm: nn.Module = (
            nn.BatchNorm1d(self.feature_dim, affine=False) if feature_norm else nn.Identity()
        )
        self.classifier: nn.Linear | None = None
        if num_classes:
            self.classifier = nn.Linear(self.feature_dim, num_classes)
        self.register_buffer("loss_weights", torch.empty(0), persistent=False)
        self._outputs: dict[str, list[dict[str, Tensor]]] = {}
        self.last_reports: dict[str, Any] = {}
        # Most frequent training class, for the majority-baseline check of the collapse guard.
        self.majority_class: int | None = None
        if protocol == "linear":
            self._freeze_encoder()
            # Lightning 2.6 keeps each submodule's mode when fitting starts, so the frozen
            # encoder must start in eval mode rather than rely on a later train() call.
            self.train()

    # ---------------------------------------------------------------- construction

    def _read_pretrained(self, checkpoint_path: str | None) -> PretrainedWeights | None:
        """Read the SimCLR checkpoint, or defer when a trained FineTuneModule is being restored.

        A restored FineTuneModule carries the resolved architecture in its hyper-parameters
        and brings every weight in its own checkpoint, so a SimCLR checkpoint that has moved
        since is not needed then. ``setup`` raises if no checkpoint restores the weights.
        """
        self._missing_pretrained: str | None = None
        if checkpoint_path is None:
            return None
        if not checkpoint_path:
            raise ValueError(
                "checkpoint_path is an empty string. Pass the SimCLR .ckpt file, or None to "
                "train from scratch. (A Trainer without a checkpoint callback leaves "
                "last_model_path empty: save one with trainer.save_checkpoint(path).)"
            )
        if Path(checkpoint_path).is_file() or self.hparams["backbone"] is None:
            return read_simclr_checkpoint(checkpoint_path)
        self._missing_pretrained = checkpoint_path
        rank_zero_warn(
            f"SimCLR checkpoint {checkpoint_path} not found; building the "
            f"{self.hparams['backbone']} from the hyper-parameters. Its weights must come from a "
            "FineTuneModule checkpoint (ckpt_path or load_from_checkpoint).",
            stacklevel=3,
        )
        return None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Note that a FineTuneModule checkpoint supplies every weight."""
        self._missing_pretrained = None

    def _require_weights(self) -> None:
        """Fail when the SimCLR checkpoint was missing and no checkpoint restored the weights.

        The trainer restores ``ckpt_path`` after ``setup``, so this runs in the start hooks.
        """
        if self._missing_pretrained is None:
            return
        raise FileNotFoundError(
            f"SimCLR checkpoint {self._missing_pretrained} not found, and no FineTuneModule "
            "checkpoint restores the weights. Pass the pretraining run's checkpoints/last.ckpt "
            "as checkpoint_path, or a trained FineTuneModule checkpoint as ckpt_path to "
            "validate, test or predict."
        )

    def on_fit_start(self) -> None:
        self._require_weights()

    def on_validation_start(self) -> None:
        self._require_weights()

    def on_test_start(self) -> None:
        self._require_weights()

    def on_predict_start(self) -> None:
        self._require_weights()

    def _adopt_checkpoint_architecture(self, pretrained_hparams: dict[str, Any]) -> None:
        """Take the backbone and head settings from the checkpoint, rejecting contradictions."""
        for name, default in (("backbone", "resnet18"), ("small_stem", False)):
            stored = pretrained_hparams.get(name, default)
            requested = self.hparams[name]
            if requested is not None and requested != stored:
                raise ValueError(
                    f"{name}={requested!r} contradicts the checkpoint, which was trained with "
                    f"{name}={stored!r}. Leave {name} unset to use the checkpoint's value."
                )
            self.hparams[name] = stored
        for name in ("projection_layers", "projection_hidden_dim", "projection_dim"):
            if name in pretrained_hparams:
                self.hparams[name] = pretrained_hparams[name]

    def _full_head(self, backbone_dim: int) -> nn.Module:
        hp = self.hparams
        hidden_dim = hp["projection_hidden_dim"] or backbone_dim
        return build_projection_head(
            backbone_dim, hidden_dim, hp["projection_dim"], hp["projection_layers"]
        )

    def _build_kept_head(self, backbone_dim: int) -> tuple[nn.Sequential, int]:
        kept = self.hparams["head_layers_kept"]
        if kept == 0:
            return nn.Sequential(), backbone_dim
        layers = split_head_layers(self._full_head(backbone_dim))
        if kept > len(layers):
            raise ValueError(
                f"head_layers_kept={kept} but the projection head has only {len(layers)} layers."
            )
        head = nn.Sequential(*layers[:kept])
        return head, layers[kept - 1][0].out_features

    def _load_kept_head(self, head_tensors: dict[str, Tensor], backbone_dim: int) -> None:
        full_head = self._full_head(backbone_dim)
        load_state_strict(full_head, head_tensors, "projection head")
        kept = split_head_layers(full_head)[: self.hparams["head_layers_kept"]]
        self.head_layers.load_state_dict(nn.Sequential(*kept).state_dict(), strict=True)

    def _freeze_encoder(self) -> None:
        for parameter in self.encoder_parameters():
            parameter.requires_grad_(False)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the backbone and the kept head layers."""
        return list(self.backbone.parameters()) + list(self.head_layers.parameters())

    def train(self, mode: bool = True) -> FineTuneModule:
        """Switch train/eval mode, keeping a frozen encoder in eval mode.

        A linear probe must not update the BatchNorm running statistics of the pretrained
        encoder, so its BatchNorm layers stay in eval mode during training.
        """
        super().train(mode)
        if self.hparams["protocol"] == "linear":
            self.backbone.eval()
            self.head_layers.eval()
        return self

    def on_train_epoch_start(self) -> None:
        """Put a frozen encoder back in eval mode after validation restored train mode."""
        if self.hparams["protocol"] == "linear":
            self.backbone.eval()
            self.head_layers.eval()

    def setup(self, stage: str) -> None:
        """Take the classes, class names and class weights from the attached datamodule."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.classifier is None:
            num_classes = getattr(datamodule, "num_classes", None)
            if not num_classes:
                raise ValueError(
                    "num_classes is unknown: pass num_classes to FineTuneModule or use a "
                    "datamodule with a num_classes attribute."
                )
            self.hparams["num_classes"] = int(num_classes)
            self.classifier = nn.Linear(self.feature_dim, int(num_classes)).to(self.device)
        if self.hparams["class_names"] is None:
            names = getattr(datamodule, "class_names", None)
            self.hparams["class_names"] = list(names) if names else None
        if self.hparams["class_weights"] == "balanced" and stage == "fit":
            self.loss_weights = self._balanced_weights(datamodule).to(self.device)
        if datamodule is not None and hasattr(datamodule, "train_targets"):
            targets = np.asarray(datamodule.train_targets())
            targets = targets[targets >= 0]
            if len(targets):
                self.majority_class = int(np.bincount(targets).argmax())

    def _balanced_weights(self, datamodule: Any) -> Tensor:
        if datamodule is None or not hasattr(datamodule, "train_targets"):
            raise ValueError(
                "class_weights='balanced' needs a datamodule with train_targets(); "
                "use class_weights='none' otherwise."
            )
        targets = np.asarray(datamodule.train_targets())
        num_classes = self.num_classes
        counts = np.bincount(targets[targets >= 0], minlength=num_classes).astype(np.float64)
        present = counts > 0
        weights = np.zeros(num_classes)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        rank_zero_info(f"Balanced class weights {np.round(weights, 3).tolist()} from {counts}.")
        return torch.tensor(weights, dtype=torch.float32)

    @property
    def num_classes(self) -> int:
        """Number of classifier outputs."""
        if self.classifier is None:
            raise RuntimeError("The classifier is built in setup(); num_classes is unknown yet.")
        return self.classifier.out_features

    def class_names(self) -> list[str]:
        """Class names from the hyper-parameters or the datamodule, else the indices."""
        names = self.hparams["class_names"]
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    # ---------------------------------------------------------------- forward

    def encode(self, images: Tensor) -> Tensor:
        """Return the features the classifier receives, shape (B, feature_dim)."""
        if self.hparams["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images).flatten(start_dim=1)
        return self.head_layers(features)

    def forward(self, images: Tensor) -> Tensor:
        """Return class logits of shape (B, num_classes)."""
        if self.classifier is None:
            raise RuntimeError("Call trainer.fit/validate or pass num_classes before forward().")
        if self.hparams["protocol"] == "linear":
            with torch.no_grad():
                features = self.encode(images)
        else:
            features = self.encode(images)
        return self.classifier(self.feature_norm(features))

    # ---------------------------------------------------------------- steps

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        target = batch["target"]
        weight = self.loss_weights if self.loss_weights.numel() else None
        loss = F.cross_entropy(
            logits, target, weight=weight, label_smoothing=self.hparams["label_smoothing"]
        )
        accuracy = (logits.argmax(dim=1) == target).float().mean()
        batch_size = target.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log("train/acc", accuracy, batch_size=batch_size, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._collect("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._collect("test", batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        probabilities = self(batch["image"]).softmax(dim=1)
        output = {"probabilities": probabilities, "prediction": probabilities.argmax(dim=1)}
        for key in ("target", "race", "gender", "index"):
            if key in batch:
                output[key] = batch[key]
        return output

    def _collect(self, split: str, batch: dict[str, Tensor]) -> None:
        logits = self(batch["image"])
        target = batch["target"]
        loss = F.cross_entropy(logits, target)
        self.log(f"{split}/loss", loss, batch_size=target.shape[0], sync_dist=True)
        record = {"prediction": logits.argmax(dim=1), "target": target}
        for key in ("race", "gender"):
            if key in batch:
                record[key] = batch[key]
        self._outputs.setdefault(split, []).append(record)

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def _report(self, split: str) -> None:
        records = self._outputs.pop(split, [])
        if not records or self.trainer.sanity_checking:
            return
        gathered = {
            key: self._gather(torch.cat([record[key] for record in records])) for key in records[0]
        }
        arrays = {key: value.cpu().numpy() for key, value in gathered.items()}
        from simclr_lightning.models.reporting import log_classification

        self.last_reports[split] = log_classification(self, split, arrays)

    def _gather(self, tensor: Tensor) -> Tensor:
        if self.trainer.world_size == 1:
            return tensor
        # NOTE: the distributed sampler pads each rank to equal length, so up to world_size - 1
        # repeated samples enter the gathered metrics.
        gathered = self.all_gather(tensor)
        assert isinstance(gathered, Tensor)
        return gathered.reshape(-1, *tensor.shape[1:])

    # ---------------------------------------------------------------- optimization

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hparams
        assert self.classifier is not None
        groups = split_decay_groups(self.classifier.parameters(), hp["weight_decay"])
        if hp["protocol"] == "finetune":
            encoder_groups = split_decay_groups(self.encoder_parameters(), hp["weight_decay"])
            for group in encoder_groups:
                group["lr"] = hp["lr"] * hp["backbone_lr_ratio"]
                group["name"] = f"encoder_{group['name']}"
            groups.extend(encoder_groups)
        optimizer = build_optimizer(hp["optimizer"], groups, hp["lr"], hp["momentum"])
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        max_epochs = self.trainer.max_epochs or 0
        warmup = 0
        if max_epochs > 0:
            warmup = min(math.ceil(hp["warmup_epochs"] * total_steps / max_epochs), total_steps)
        schedule = WarmupCosineSchedule(warmup, total_steps, hp["final_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        if isinstance(optimizer, torch.optim.Optimizer):
            self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)


def warn_on_collapse(messages: list[str], split: str) -> None:
    """Emit every collapse warning of a split as a rank-zero warning."""
    for message in messages:
        rank_zero_warn(f"{split}: {message}", stacklevel=2)
