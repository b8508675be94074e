"""Small building blocks shared by the necks and heads."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fnl.config import ConfigError


def norm_layer(norm: str, channels: int) -> nn.Module:
    """BatchNorm by name as detectron2 spells it; "" means no norm."""
    if norm == "":
        return nn.Identity()
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "FrozenBN":
        from torchvision.ops.misc import FrozenBatchNorm2d

        return FrozenBatchNorm2d(channels)
    raise ConfigError(f"unknown norm '{norm}'; expected one of '', 'BN', 'SyncBN', 'FrozenBN'")


class ConvNormAct(nn.Sequential):
    """conv -> norm -> ReLU as one Sequential, so fusion finds the pattern among siblings."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, groups: int = 1, norm: str = "", activation: bool = True) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=norm == "")
        ]
        if norm:
            layers.append(norm_layer(norm, out_channels))
        if activation:
            layers.append(nn.ReLU(inplace=False))
        super().__init__(*layers)


class SeparableConvNormAct(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1 + BN + ReLU (EfficientDet's BiFPN convolution)."""

    def __init__(self, channels: int, norm: str = "BN") -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            ConvNormAct(channels, channels, kernel_size=1, norm=norm),
        )


def resize_nearest(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour resampling to another level's size; the paper picks nearest for mobile speed."""
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


def init_conv_weights(module: nn.Module) -> None:
    """Kaiming (fan-out) for convs, zero bias, as detectron2's heads initialise."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
