"""ResNet backbones and the projection head."""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

RESNET_FACTORIES: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}


def build_backbone(name: str, small_stem: bool = False) -> tuple[nn.Module, int]:
    """Build a randomly initialised torchvision ResNet without its classifier.

    Args:
        name: One of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``.
        small_stem: Replace the 7x7 stride-2 convolution and the max pool with one 3x3 stride-1
            convolution, as the SimCLR paper does for 32-pixel CIFAR-10 images (appendix B.9).

    Returns:
        The backbone, mapping (B, 3, H, W) images to (B, D) features, and D.
    """
    if name not in RESNET_FACTORIES:
        raise ValueError(f"Unknown backbone {name!r}; expected one of {sorted(RESNET_FACTORIES)}.")
    # weights=None: nothing is downloaded, every run starts from a random initialisation.
    resnet = RESNET_FACTORIES[name](weights=None)
    feature_dim = resnet.fc.in_features
    resnet.fc = nn.Identity()
    if small_stem:
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    return resnet, feature_dim


def build_projection_head(
    input_dim: int, hidden_dim: int, output_dim: int, num_layers: int
) -> SimCLRProjectionHead:
    """Build lightly's SimCLR projection head: 2 layers for SimCLR, 3 for SimCLRv2."""
    if num_layers not in (2, 3):
        raise ValueError(f"projection_layers must be 2 (SimCLR) or 3 (SimCLRv2), got {num_layers}.")
    return SimCLRProjectionHead(
        input_dim=input_dim,
        hidden_dim=hidden_dim,
        output_dim=output_dim,
        num_layers=num_layers,
        batch_norm=True,
    )


def split_head_layers(head: nn.Module) -> list[nn.Sequential]:
    """Split a projection head into its layers, each a Linear with the BatchNorm and ReLU after it.

    lightly's ``ProjectionHead`` stores its blocks flattened in one ``nn.Sequential``; a new
    layer starts at every ``nn.Linear``.
    """
    layers_attr = getattr(head, "layers", None)
    container = layers_attr if isinstance(layers_attr, nn.Sequential) else head
    modules = list(container.children())
    layers: list[list[nn.Module]] = []
    for module in modules:
        if isinstance(module, nn.Linear):
            layers.append([])
        if not layers:
            raise ValueError(f"Projection head must start with nn.Linear, found {module}.")
        layers[-1].append(module)
    return [nn.Sequential(*layer) for layer in layers]
