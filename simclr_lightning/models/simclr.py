"""SimCLR pretraining as a LightningModule."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn

from simclr_lightning.data.gpu_augment import SimCLRBatchAugment
from simclr_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SimCLRAugmentation
from simclr_lightning.models.backbones import build_backbone, build_projection_head
from simclr_lightning.models.health import representation_health
from simclr_lightning.models.optim import OptimizerName, build_optimizer, split_decay_groups
from simclr_lightning.models.schedules import LRScaling, WarmupCosineSchedule, scale_learning_rate

logger = logging.getLogger(__name__)


class SimCLRModule(pl.LightningModule):
    """SimCLR: a ResNet backbone and projection head trained with the NT-Xent loss.

    Negatives are gathered from every process whenever the world size is above 1, so a run on
    several devices computes the loss of the global batch. The learning rate is scaled from the
    global batch size (per-device batch x devices x nodes x gradient accumulation) and follows a
    linear warm-up, then a cosine decay, stepped per optimizer step.

    Args:
        backbone: torchvision ResNet name, ``resnet18`` to ``resnet152``.
        small_stem: Use a 3x3 stride-1 stem without max pool, for images of 32-64 pixels.
        projection_layers: 2 for the SimCLR head, 3 for the SimCLRv2 head.
        projection_hidden_dim: Width of the hidden head layers; ``None`` uses the backbone's
            feature size.
        projection_dim: Size of the embeddings the loss compares.
        temperature: NT-Xent temperature, strictly positive.
        optimizer: ``lars`` (the SimCLR choice), ``sgd`` or ``adamw``.
        base_lr: Learning rate before batch-size scaling.
        lr_scaling: ``linear`` (``base_lr * batch / 256``), ``sqrt`` (``base_lr * sqrt(batch)``)
            or ``none``.
        weight_decay: Weight decay of the multi-dimensional weights; biases and normalisation
            parameters never decay.
        momentum: Momentum of LARS and SGD.
        trust_coefficient: LARS trust coefficient.
        warmup_epochs: Epochs of linear warm-up (the SimCLR paper uses 10).
        warmup_steps: Warm-up in optimizer steps; overrides ``warmup_epochs`` when set.
        final_lr_ratio: Learning rate at the end of the cosine decay, as a fraction of the peak.
        batch_size_per_device: Images per device per step, used for learning-rate scaling;
            ``None`` reads ``batch_size`` from the attached datamodule.
        num_classes: Classes of the labeled online-evaluation data; ``None`` reads
            ``num_classes`` from the attached datamodule. 0 disables the online linear probe.
        online_probe_lr: Learning rate of the online linear probe on detached features.
        knn_k: Neighbours of the online kNN classifier.
        knn_temperature: Temperature of the kNN vote weights ``exp(similarity / T)``.
        channels_last: Run convolutions in channels-last memory format (faster on recent GPUs).
        compile_backbone: Wrap the backbone in ``torch.compile``.
        gpu_augment: Build the two views on the device with ``SimCLRBatchAugment`` from
            un-augmented uint8 batches ``{"image": uint8 (B, 3, S, S), "target": ...}``, such as
            ``FaceDataModule(augment_on_device=True)`` yields, so CPU workers only decode.
        device_augmentation: Settings of the device augmentation; ``None`` takes the datamodule's
            ``augmentation`` attribute, else the SimCLR defaults. An unset ``image_size`` becomes
            the datamodule's; without a datamodule it must be set.
        augment_seed: Seed of the device augmentation; each rank adds its global rank.
        health_every_n_steps: Compute and log the representation-health statistics
            (``train/z_std``, ``train/pos_cosine`` and the others of
            :func:`~simclr_lightning.models.health.representation_health`) on every n-th training
            batch only, because they cost a (2N, 2N) similarity matrix per batch. 1 logs every
            batch.

    Training batches whose ``views`` are uint8 tensors, such as ``FaceDataModule(cpu_augment=
    "fast")`` yields, are converted to float32 and ImageNet-normalised on the device after the
    batch transfer.
    """

    view_mean: Tensor
    view_std: Tensor

    def __init__(
        self,
        backbone: str = "resnet18",
        small_stem: bool = False,
        projection_layers: int = 2,
        projection_hidden_dim: int | None = None,
        projection_dim: int = 128,
        temperature: float = 0.1,
        optimizer: OptimizerName = "lars",
        base_lr: float = 0.3,
        lr_scaling: LRScaling = "linear",
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        warmup_epochs: float = 10.0,
        warmup_steps: int | None = None,
        final_lr_ratio: float = 0.0,
        batch_size_per_device: int | None = None,
        num_classes: int | None = None,
        online_probe_lr: float = 0.1,
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        channels_last: bool = False,
        compile_backbone: bool = False,
        gpu_augment: bool = False,
        device_augmentation: SimCLRAugmentation | None = None,
        augment_seed: int = 0,
        health_every_n_steps: int = 10,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(
                f"temperature must be strictly positive, got {temperature}; SimCLR uses 0.1 to 0.5."
            )
        if knn_k < 1:
            raise ValueError(f"knn_k must be at least 1, got {knn_k}.")
        if health_every_n_steps < 1:
            raise ValueError(
                f"health_every_n_steps must be at least 1, got {health_every_n_steps}. Use 1 to "
                "log the health statistics on every batch."
            )
        self.save_hyperparameters()

        self.backbone, self.feature_dim = build_backbone(backbone, small_stem=small_stem)
        hidden_dim = projection_hidden_dim or self.feature_dim
        self.projection_head = build_projection_head(
            self.feature_dim, hidden_dim, projection_dim, projection_layers
        )
        # gather_distributed is a no-op on one process, so negatives come from every rank
        # whenever the world size is above 1 without any setting.
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)
        self.online_probe: nn.Linear | None = None
        if num_classes:
            self.online_probe = nn.Linear(self.feature_dim, num_classes)
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        if compile_backbone:
            self.backbone = torch.compile(self.backbone)  # type: ignore[assignment]
        self.batch_augment: SimCLRBatchAugment | None = None
        self._features: dict[int, list[Tensor]] = {}
        self._labels: dict[int, list[Tensor]] = {}
        self._probe_predictions: list[Tensor] = []
        self.register_buffer(
            "view_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "view_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False
        )

    # ---------------------------------------------------------------- forward

    def forward(self, images: Tensor) -> Tensor:
        """Return backbone features of shape (B, D), the representation used downstream."""
        if self.hparams["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images).flatten(start_dim=1)

    def project(self, features: Tensor) -> Tensor:
        """Map backbone features (B, D) to embeddings (B, projection_dim)."""
        return self.projection_head(features)

    # ---------------------------------------------------------------- setup

    def setup(self, stage: str) -> None:
        """Create the online probe and the device augmentation from the attached datamodule."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams["gpu_augment"] and self.batch_augment is None:
            self.batch_augment = self._build_batch_augment(datamodule)
        if self.hparams["num_classes"] is not None or self.online_probe is not None:
            return
        num_classes = getattr(datamodule, "num_classes", 0) or 0
        self.hparams["num_classes"] = num_classes
        if num_classes:
            self.online_probe = nn.Linear(self.feature_dim, num_classes).to(self.device)

    def _build_batch_augment(self, datamodule: Any) -> SimCLRBatchAugment:
        augmentation = self.hparams["device_augmentation"] or getattr(
            datamodule, "augmentation", None
        )
        if isinstance(augmentation, Mapping):
            # LightningCLI passes the settings of a config file as a dict, with lists for tuples.
            settings = dict(augmentation)
            if "blur_sigma" in settings:
                settings["blur_sigma"] = tuple(settings["blur_sigma"])
            augmentation = SimCLRAugmentation(**settings)
        augmentation = augmentation or SimCLRAugmentation()
        image_size = getattr(datamodule, "hparams", {}).get("image_size")
        if image_size is not None:
            augmentation = augmentation.for_size(int(image_size))
        elif augmentation.image_size is None:
            raise ValueError(
                "SimCLRModule(gpu_augment=True) found no image size: the training data comes "
                "without a datamodule that has an image_size hyperparameter. Pass "
                "device_augmentation=SimCLRAugmentation(image_size=...)."
            )
        seed = self.hparams["augment_seed"] + self.global_rank
        rank_zero_info(f"SimCLR views are built on the device from uint8 batches: {augmentation}")
        return SimCLRBatchAugment(augmentation, seed=seed).to(self.device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Turn uint8 training batches into float32 views on the batch's device.

        An un-augmented ``{"image": uint8}`` batch becomes two views with the device augmentation,
        and uint8 ``views`` are normalised with :meth:`normalize_views`.
        """
        if isinstance(batch, dict) and _has_uint8_views(batch):
            return {**batch, "views": [self.normalize_views(view) for view in batch["views"]]}
        if (
            self.batch_augment is not None
            and isinstance(batch, dict)
            and "views" not in batch
            and batch.get("image") is not None
            and batch["image"].dtype == torch.uint8
        ):
            view0, view1 = self.batch_augment(batch["image"])
            return {"views": [view0, view1], "target": batch["target"]}
        return batch

    def normalize_views(self, views: Tensor) -> Tensor:
        """Convert uint8 views (B, 3, H, W) to float32 in [0, 1], then ImageNet-normalise them."""
        scaled = views.float().div_(255.0)
        return scaled.sub_(self.view_mean).div_(self.view_std)

    # ---------------------------------------------------------------- training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        view0, view1 = batch["views"]
        batch_size = view0.shape[0]

        # One backbone pass over both views keeps BatchNorm statistics over the 2N images.
        features = self(torch.cat([view0, view1]))  # (2N, D)
        z0, z1 = self.project(features).chunk(2)  # (N, P) each

        # The loss runs in float32: under bf16 autocast the similarities lose precision.
        with torch.autocast(device_type=self.device.type, enabled=False):
            loss = self.criterion(z0.float(), z1.float())

        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        if batch_idx % self.hparams["health_every_n_steps"] == 0:
            self._log_health(z0, z1, features, batch_size)

        target = batch.get("target")
        if self.online_probe is not None and target is not None:
            loss = loss + self._online_probe_loss(features[:batch_size], target, batch_size)
        return loss

    def _log_health(self, z0: Tensor, z1: Tensor, features: Tensor, batch_size: int) -> None:
        health = representation_health(z0, z1)
        health["feature_std"] = F.normalize(features.detach().float(), dim=1).std(dim=0).mean()
        for name, value in health.items():
            self.log(
                f"train/{name}",
                value,
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=True,
            )

    def _online_probe_loss(self, features: Tensor, target: Tensor, batch_size: int) -> Tensor:
        """Train the linear probe on detached features of the labeled images in the batch."""
        assert self.online_probe is not None
        logits = self.online_probe(features.detach())
        labeled = target >= 0
        if not bool(labeled.any()):
            # Keeps the probe in the graph so DDP receives a gradient for it on every rank.
            return logits.sum() * 0.0
        probe_loss = F.cross_entropy(logits[labeled], target[labeled])
        accuracy = (logits[labeled].argmax(dim=1) == target[labeled]).float().mean()
        self.log("train/probe_loss", probe_loss, batch_size=batch_size, sync_dist=True)
        self.log("train/probe_top1", accuracy, batch_size=batch_size, sync_dist=True)
        return probe_loss

    # ---------------------------------------------------------------- online evaluation

    def on_validation_epoch_start(self) -> None:
        self._features = {}
        self._labels = {}
        self._probe_predictions = []

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Collect features of the kNN bank (loader 0) and of the queries (loader 1)."""
        features = self(batch["image"])
        self._features.setdefault(dataloader_idx, []).append(F.normalize(features.float(), dim=1))
        self._labels.setdefault(dataloader_idx, []).append(batch["target"])
        if dataloader_idx == 1 and self.online_probe is not None:
            self._probe_predictions.append(self.online_probe(features).argmax(dim=1))

    def on_validation_epoch_end(self) -> None:
        if 0 not in self._features or 1 not in self._features:
            return
        from simclr_lightning.evaluation.probe import knn_predict

        bank = self._gather(torch.cat(self._features[0]))
        bank_labels = self._gather(torch.cat(self._labels[0]))
        queries = self._gather(torch.cat(self._features[1]))
        query_labels = self._gather(torch.cat(self._labels[1]))
        num_classes = int(max(bank_labels.max(), query_labels.max()).item()) + 1
        if self.online_probe is not None:
            num_classes = max(num_classes, self.online_probe.out_features)
        predictions = knn_predict(
            bank,
            bank_labels,
            queries,
            k=min(self.hparams["knn_k"], len(bank)),
            temperature=self.hparams["knn_temperature"],
            num_classes=num_classes,
        )
        knn_top1 = (predictions == query_labels).float().mean()
        self.log("val/knn_top1", knn_top1)
        summary = f"kNN top-1 {float(knn_top1):.4f} on {len(queries)} images"
        if self._probe_predictions:
            probe_predictions = self._gather(torch.cat(self._probe_predictions))
            probe_top1 = (probe_predictions == query_labels).float().mean()
            self.log("val/probe_top1", probe_top1)
            summary += f", online probe top-1 {float(probe_top1):.4f}"
        if not self.trainer.sanity_checking:
            rank_zero_info(f"Online evaluation, epoch {self.current_epoch}: {summary}.")

    def _gather(self, tensor: Tensor) -> Tensor:
        """Concatenate a per-rank tensor from every rank; equal lengths come from the sampler."""
        if self.trainer.world_size == 1:
            return tensor
        gathered = self.all_gather(tensor)
        assert isinstance(gathered, Tensor)
        return gathered.reshape(-1, *tensor.shape[1:])

    # ---------------------------------------------------------------- optimization

    def global_batch_size(self) -> int:
        """Images per optimizer step: per-device batch x devices x nodes x accumulation."""
        batch_size = self.hparams["batch_size_per_device"]
        if batch_size is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            batch_size = getattr(datamodule, "batch_size", None)
        if batch_size is None:
            raise ValueError(
                "Cannot scale the learning rate: the batch size is unknown. Pass "
                "batch_size_per_device to SimCLRModule or train with a datamodule that has a "
                "batch_size attribute."
            )
        return int(batch_size) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hparams
        global_batch = self.global_batch_size()
        lr = scale_learning_rate(hp["base_lr"], global_batch, hp["lr_scaling"])
        groups = split_decay_groups(
            list(self.backbone.parameters()) + list(self.projection_head.parameters()),
            hp["weight_decay"],
        )
        if self.online_probe is not None:
            # No weight decay, so lightly's LARS leaves the probe unscaled as well.
            groups.append(
                {
                    "params": list(self.online_probe.parameters()),
                    "weight_decay": 0.0,
                    "lr": hp["online_probe_lr"],
                    "name": "online_probe",
                }
            )
        optimizer = build_optimizer(
            hp["optimizer"], groups, lr, hp["momentum"], hp["trust_coefficient"]
        )
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = self._warmup_steps(total_steps)
        schedule = WarmupCosineSchedule(warmup, total_steps, hp["final_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        rank_zero_info(
            f"SimCLR optimizer: {hp['optimizer']}, global batch {global_batch}, peak lr "
            f"{lr:.4g} ({hp['lr_scaling']} scaling of {hp['base_lr']}), {warmup} warm-up "
            f"steps of {total_steps}."
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _warmup_steps(self, total_steps: int) -> int:
        if self.hparams["warmup_steps"] is not None:
            return min(int(self.hparams["warmup_steps"]), total_steps)
        max_epochs = self.trainer.max_epochs
        if not max_epochs or max_epochs < 1:
            return 0
        steps_per_epoch = total_steps / max_epochs
        warmup = math.ceil(self.hparams["warmup_epochs"] * steps_per_epoch)
        if warmup >= total_steps:
            rank_zero_warn(
                f"warmup_epochs={self.hparams['warmup_epochs']} covers the whole run of "
                f"{max_epochs} epochs, so the learning rate never decays; lower warmup_epochs.",
                stacklevel=2,
            )
        return min(warmup, total_steps)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        if isinstance(optimizer, torch.optim.Optimizer):
            self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)


def _has_uint8_views(batch: dict[str, Any]) -> bool:
    views = batch.get("views")
    return (
        isinstance(views, (list, tuple))
        and len(views) > 0
        and all(isinstance(view, Tensor) and view.dtype == torch.uint8 for view in views)
    )
