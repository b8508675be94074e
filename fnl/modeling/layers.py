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


class SubPixelConvTranspose2d(nn.Module):
    """A ``ConvTranspose2d(kernel 4, stride 2, padding 1)`` computed exactly as an ordinary conv: a 2x2 conv with
    padding 1 and 4x the output channels, ``pixel_shuffle(2)``, and a crop of one pixel at every border.

    Why: int8 runtimes have fast, correct int8 convs but not int8 transposed convs (ONNX Runtime has no int8
    ConvTranspose kernel; torch.ao's x86 and qnnpack ones are wrong), so quantized as an ordinary conv the DensePose
    predictor stops being a float island. It costs ``16 C_in C_out (H + 1)(W + 1)`` MACs against the transposed
    conv's ``16 C_in C_out H W`` (a 3x3 conv + pixel shuffle would cost 2.25x).

    Per axis, the transposed conv writes ``out[o] = sum in[i] w[k]`` over ``o = 2i - 1 + k``: the even outputs
    ``out[2m] = in[m-1] w[3] + in[m] w[1]``, the odd ones ``out[2m+1] = in[m] w[2] + in[m+1] w[0]``. The 2-tap conv
    on the padded input, ``Y[t] = in[t-1] c[0] + in[t] c[1]``, gives the odd phase at ``t = m + 1`` with taps
    ``(w[2], w[0])`` (shuffle sub-position 0) and the even phase at ``t = m`` with taps ``(w[3], w[1])``
    (sub-position 1): tap ``k`` of sub-position ``s`` is ``w[2 + s - 2k]``, and the shuffled axis ``S`` has
    ``S[2t] = out[2t - 1]``, ``S[2t + 1] = out[2t]``, so ``out = S[1:-1]``. In 2-D both axes do this.
    """

    # The one transposed-conv geometry this module computes (the DensePose predictor's).
    GEOMETRY = {"kernel_size": (4, 4), "stride": (2, 2), "padding": (1, 1), "dilation": (1, 1),
                "output_padding": (0, 0), "groups": 1, "padding_mode": "zeros"}

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, kernel_size=2, padding=1, bias=bias)

    @classmethod
    def computes(cls, deconv: nn.ConvTranspose2d) -> bool:
        """Whether ``deconv`` has the geometry this module computes."""
        return all(getattr(deconv, key) == value for key, value in cls.GEOMETRY.items())

    @classmethod
    def from_conv_transpose(cls, deconv: nn.ConvTranspose2d) -> SubPixelConvTranspose2d:
        """The same computation as ``deconv`` (weights and bias mapped exactly, same device and dtype); a
        ConfigError for any transposed conv other than kernel 4, stride 2, padding 1 without dilation, groups or
        output padding."""
        if not isinstance(deconv, nn.ConvTranspose2d) or not cls.computes(deconv):
            wrong = {key: getattr(deconv, key, None) for key, value in cls.GEOMETRY.items()
                     if getattr(deconv, key, None) != value}
            raise ConfigError(f"SubPixelConvTranspose2d computes only ConvTranspose2d(kernel_size=4, stride=2, "
                              f"padding=1, dilation=1, output_padding=0, groups=1, padding_mode='zeros'); got "
                              f"{type(deconv).__name__} with {wrong}: {deconv}")
        module = cls(deconv.in_channels, deconv.out_channels, bias=deconv.bias is not None)
        module.to(device=deconv.weight.device, dtype=deconv.weight.dtype)
        with torch.no_grad():
            module.conv.weight.copy_(subpixel_weight(deconv.weight.detach()))
            if deconv.bias is not None:
                module.conv.bias.copy_(deconv.bias.detach().repeat_interleave(4))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A constant crop ([1:-1], not [1:2H+1]): exported graphs get fixed Slice bounds, no shape arithmetic.
        return F.pixel_shuffle(self.conv(x), 2)[..., 1:-1, 1:-1]

    def extra_repr(self) -> str:
        return f"computes ConvTranspose2d({self.conv.in_channels}, {self.out_channels}, 4, stride=2, padding=1)"


def subpixel_weight(deconv_weight: torch.Tensor) -> torch.Tensor:
    """(C_in, C_out, 4, 4) transposed-conv weights -> the (4 C_out, C_in, 2, 2) conv weights of
    :class:`SubPixelConvTranspose2d`: output channel ``4 c + 2 s_y + s_x`` (``pixel_shuffle``'s order), tap
    ``(k_y, k_x)`` = ``w[:, c, 2 + s_y - 2 k_y, 2 + s_x - 2 k_x]``."""
    in_channels, out_channels = deconv_weight.shape[:2]
    taps = torch.tensor([[2, 0], [3, 1]], device=deconv_weight.device)  # [s][k] = 2 + s - 2k
    # (C_in, C_out, s_y, k_y, s_x, k_x) -> (C_out, s_y, s_x, C_in, k_y, k_x)
    gathered = deconv_weight[:, :, taps[:, :, None, None], taps[None, None, :, :]]
    return gathered.permute(1, 2, 4, 0, 3, 5).reshape(4 * out_channels, in_channels, 2, 2)
