"""Necks: FPN (Mobile Parsing R-CNN A) and BiFPN (model B). Each owns its ``bottom_up`` as detectron2's FPN does,
and returns P2..P6 as a dict."""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.nn import functional as F

from fnl.config import CfgNode, ConfigError
from fnl.modeling.backbone import build_bottom_up, feature_names
from fnl.modeling.layers import ConvNormAct, SeparableConvNormAct, resize_nearest


def _level(name: str) -> int:
    return int(name[1:])


class Neck(nn.Module):
    """What both necks share: the ``bottom_up`` child and outputs named P2..P(n+1), P(n+1) by stride-2 max-pool."""

    def __init__(self, bottom_up: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.bottom_up = bottom_up
        self.in_features = feature_names(bottom_up)
        last = _level(self.in_features[-1])
        self.out_features = [f"p{_level(n)}" for n in self.in_features] + [f"p{last + 1}"]
        self.out_channels = out_channels
        self.size_divisibility = 2 ** (last + 1)
        # detectron2's LastLevelMaxPool; a module, so the quantization patch can find it (QNNPACK refuses 1x1 pooling)
        self.top_block = nn.MaxPool2d(kernel_size=1, stride=2)

    def bottom_up_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's feature maps, one per ``in_features`` name."""
        features = self.bottom_up(x)
        if len(features) != len(self.in_features):
            # timm collects some taps with hooks; a module that lost them (torch.ao's int8 modules drop their hooks in
            # copy.deepcopy) returns fewer maps, which would end in a zip() error far from the cause.
            raise RuntimeError(f"the backbone returned {len(features)} feature maps, the neck reads "
                               f"{len(self.in_features)} ({', '.join(self.in_features)}): were its feature hooks "
                               "lost, e.g. by copy.deepcopy of an int8 model? Copy it before quantizing instead "
                               "(docs/NOTES.md)")
        return features


class FPN(Neck):
    """detectron2's FPN: 1x1 laterals, nearest top-down sum, 3x3 outputs, P6 by stride-2 max-pool of P5."""

    def __init__(self, bottom_up: nn.Module, out_channels: int, norm: str = "") -> None:
        super().__init__(bottom_up, out_channels)
        in_channels = bottom_up.feature_info.channels()
        for name, channels in zip(self.in_features, in_channels, strict=True):
            level = _level(name)
            # Plain convs without norm keep detectron2's key names (fpn_lateral2.weight).
            lateral = ConvNormAct(channels, out_channels, 1, norm=norm, activation=False)
            output = ConvNormAct(out_channels, out_channels, 3, norm=norm, activation=False)
            self.add_module(f"fpn_lateral{level}", lateral if norm else lateral[0])
            self.add_module(f"fpn_output{level}", output if norm else output[0])
        # One FloatFunctional per sum: a plain add in float, an observed int8 add once quantized.
        self.top_down_adds = nn.ModuleList(FloatFunctional() for _ in self.in_features[:-1])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.bottom_up_features(x)
        outputs: list[torch.Tensor] = []
        top_down: torch.Tensor | None = None
        for k, (name, feature) in enumerate(zip(reversed(self.in_features), reversed(features), strict=True)):
            level = _level(name)
            lateral = getattr(self, f"fpn_lateral{level}")(feature)
            if top_down is None:
                top_down = lateral
            else:
                top_down = self.top_down_adds[k - 1].add(lateral, resize_nearest(top_down, lateral))
            outputs.insert(0, getattr(self, f"fpn_output{level}")(top_down))
        outputs.append(self.top_block(outputs[-1]))
        return dict(zip(self.out_features, outputs, strict=True))


class WeightedFusion(nn.Module):
    """EfficientDet's fast normalized fusion: sum_i relu(w_i) x_i / (sum_i relu(w_i) + eps).

    On int8 tensors the normalized weights are constants: each input is scaled by a quantized multiply-by-scalar and
    the sums are observed int8 adds (the ``adds`` FloatFunctionals), so the fusion needs no float island.
    """

    def __init__(self, num_inputs: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))
        self.eps = eps
        self.scale = FloatFunctional()  # unobserved: multiply-by-scalar keeps the input's quantization
        self.adds = nn.ModuleList(FloatFunctional() for _ in range(num_inputs - 1))

    def normalized_weights(self) -> torch.Tensor:
        w = F.relu(self.weight)
        return w / (w.sum() + self.eps)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        w = self.normalized_weights()
        if inputs[0].is_quantized:
            scaled = [self.scale.mul_scalar(x, float(w[i])) for i, x in enumerate(inputs)]
        else:
            scaled = [x * w[i] for i, x in enumerate(inputs)]
        out = scaled[0]
        for add, x in zip(self.adds, scaled[1:], strict=True):
            out = add.add(out, x)
        return out


# MODEL.NECK.BIFPN_LAYOUT: "fnl" (P6 is a BiFPN level, nearest down-sampling, BN laterals, NUM_REPEATS layers) or
# "densepose-fnl", the BiFPN of DensePoseFnL's released model B (its fpn.py): P2..P5 only, 1x1 laterals with bias and
# no norm, each bottom-up node fed by a stride-2 separable conv + BN + ReLU, P6 max-pooled from the output P5.
BIFPN_LAYOUTS = ("fnl", "densepose-fnl")


def strided_separable_conv(channels: int) -> nn.Sequential:
    """DensePoseFnL's bottom-up down-sampling node: depthwise 3x3 stride 2, then pointwise 1x1 + BN + ReLU."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
                         ConvNormAct(channels, channels, kernel_size=1, norm="BN"))


class BiFPNLayer(nn.Module):
    """One bidirectional layer over levels L_0 (finest) .. L_n (coarsest): top-down, then bottom-up.

    Each bottom-up node takes the finer output nearest-down-sampled or (``downsample="conv"``) through its own
    ``strided_separable_conv``."""

    def __init__(self, num_levels: int, channels: int, eps: float, downsample: str = "nearest") -> None:
        super().__init__()
        if downsample not in ("nearest", "conv"):
            raise ConfigError(f"BiFPN down-sampling must be 'nearest' or 'conv', got '{downsample}'")
        self.num_levels = num_levels
        # top-down nodes for levels n-1 .. 0, bottom-up nodes for levels 1 .. n
        self.td_fusions = nn.ModuleList(WeightedFusion(2, eps) for _ in range(num_levels - 1))
        self.td_convs = nn.ModuleList(SeparableConvNormAct(channels) for _ in range(num_levels - 1))
        self.bu_fusions = nn.ModuleList(
            WeightedFusion(3 if i < num_levels - 1 else 2, eps) for i in range(1, num_levels)
        )
        self.bu_convs = nn.ModuleList(SeparableConvNormAct(channels) for _ in range(num_levels - 1))
        self.downsamples = nn.ModuleList(
            strided_separable_conv(channels) for _ in range(num_levels - 1 if downsample == "conv" else 0)
        )

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        n = self.num_levels
        top_down = [inputs[-1]]
        for k, level in enumerate(range(n - 2, -1, -1)):
            fused = self.td_fusions[k]([inputs[level], resize_nearest(top_down[0], inputs[level])])
            top_down.insert(0, self.td_convs[k](fused))
        outputs = [top_down[0]]
        for k, level in enumerate(range(1, n)):
            finer = self.downsamples[k](outputs[-1]) if self.downsamples else resize_nearest(outputs[-1], inputs[level])
            parts = [inputs[level], finer]
            if level < n - 1:
                parts.insert(1, top_down[level])
            outputs.append(self.bu_convs[k](self.bu_fusions[k](parts)))
        return outputs


class BiFPN(Neck):
    """BiFPN as Mobile Parsing R-CNN B uses it. Layout "fnl": 1x1 conv+BN laterals on C2..C5, P6 by stride-2
    max-pool, ``num_repeats`` bidirectional layers over P2..P6, nearest up/down-sampling. Layout "densepose-fnl"
    (see ``BIFPN_LAYOUTS``): the layers run over P2..P5 and P6 is pooled from their output."""

    def __init__(self, bottom_up: nn.Module, out_channels: int, num_repeats: int = 3, eps: float = 1e-4,
                 norm: str = "BN", layout: str = "fnl") -> None:
        super().__init__(bottom_up, out_channels)
        if layout not in BIFPN_LAYOUTS:
            raise ConfigError(f"MODEL.NECK.BIFPN_LAYOUT must be one of {', '.join(BIFPN_LAYOUTS)}, got '{layout}'")
        in_channels = bottom_up.feature_info.channels()
        self.p6_in_layers = layout == "fnl"
        lateral_norm = (norm or "BN") if self.p6_in_layers else ""
        self.laterals = nn.ModuleList(
            ConvNormAct(c, out_channels, 1, norm=lateral_norm, activation=False) for c in in_channels
        )
        num_levels = len(in_channels) + self.p6_in_layers
        downsample = "nearest" if self.p6_in_layers else "conv"
        self.layers = nn.ModuleList(BiFPNLayer(num_levels, out_channels, eps, downsample) for _ in range(num_repeats))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.bottom_up_features(x)
        levels = [lateral(f) for lateral, f in zip(self.laterals, features, strict=True)]
        if self.p6_in_layers:
            levels.append(self.top_block(levels[-1]))
        for layer in self.layers:
            levels = layer(levels)
        if not self.p6_in_layers:
            levels.append(self.top_block(levels[-1]))
        return dict(zip(self.out_features, levels, strict=True))


def build_backbone(cfg: CfgNode) -> nn.Module:
    """bottom_up + neck as one module, named ``backbone`` in the meta-architecture."""
    neck = cfg.MODEL.NECK
    bottom_up = build_bottom_up(cfg)
    if neck.NAME == "FPN":
        return FPN(bottom_up, neck.OUT_CHANNELS, neck.NORM)
    if neck.NAME == "BiFPN":
        return BiFPN(bottom_up, neck.OUT_CHANNELS, neck.NUM_REPEATS, neck.FUSE_EPS, neck.NORM, neck.BIFPN_LAYOUT)
    raise ConfigError(f"MODEL.NECK.NAME must be 'FPN' or 'BiFPN', got '{neck.NAME}'")
