"""detectron2's ResNet as a bottom-up backbone, with detectron2's module names and stride placement.

detectron2's DensePose baselines (``densepose_rcnn_R_50_FPN_s1x`` and relatives) use this ResNet rather than timm's:
the stride of a stage's first block sits in its 1x1 conv for MSRA weights (``STRIDE_IN_1X1``), the norm is FrozenBN,
and the checkpoint keys read ``backbone.bottom_up.stem.conv1.weight``, ``backbone.bottom_up.stem.conv1.norm.*``,
``backbone.bottom_up.res2.0.conv1.weight``, ``backbone.bottom_up.res2.0.shortcut.norm.*``. Building the same module
tree here lets such a checkpoint load key for key. Selected by ``MODEL.BACKBONE.NAME`` "build_resnet_backbone" or
"build_resnet_fpn_backbone" (detectron2's names), configured by ``MODEL.RESNETS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from fnl.config import CfgNode, ConfigError
from fnl.modeling.layers import norm_layer

# detectron2's names for the backbone builders that make this ResNet.
DETECTRON2_RESNET_BUILDERS = ("build_resnet_backbone", "build_resnet_fpn_backbone")
BLOCKS_PER_STAGE = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
STAGE_NAMES = ("res2", "res3", "res4", "res5")


class Conv2dWithNorm(nn.Sequential):
    """detectron2's ``layers.Conv2d`` with its norm (and ReLU) inside, as conv -> norm [-> ReLU] siblings: the
    pattern fusion for int8 folds (a conv owning its norm as a child is not one). Its state_dict keeps detectron2's
    keys all the same, ``conv1.weight`` and ``conv1.norm.*`` rather than ``conv1.0.weight`` and ``conv1.1.*``: the
    hooks below rename them both ways, so a model-zoo checkpoint loads key for key (and so do fused, QAT and int8
    versions of the module, whose members keep their places 0 and 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, norm: str = "FrozenBN", relu: bool = False) -> None:
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
                  norm_layer(norm, out_channels)]
        super().__init__(*layers, *([nn.ReLU()] if relu else []))
        self.register_state_dict_post_hook(_to_detectron2_keys)
        self.register_load_state_dict_pre_hook(_from_detectron2_keys)

    @property
    def norm(self) -> nn.Module:
        return self[1]

    @property
    def stride(self) -> tuple[int, ...]:
        return self[0].stride

    @property
    def out_channels(self) -> int:
        return self[0].out_channels


# Member places in Conv2dWithNorm -> detectron2's names under the conv: the conv's own tensors sit at its top level.
_DETECTRON2_MEMBER_NAMES = (("0.", ""), ("1.", "norm."))


def _to_detectron2_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for member, name in _DETECTRON2_MEMBER_NAMES:
            if rest.startswith(member):
                state_dict[prefix + name + rest[len(member):]] = state_dict.pop(key)
                break


def _from_detectron2_keys(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        member = "1." if rest.startswith("norm.") else "0."
        state_dict[prefix + member + rest.removeprefix("norm.")] = state_dict.pop(key)


class BasicStem(nn.Module):
    """7x7 stride-2 conv + norm + ReLU, then 3x3 stride-2 max-pool: stride 4."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = Conv2dWithNorm(in_channels, out_channels, 7, stride=2, padding=3, norm=norm, relu=True)
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.max_pool(self.conv1(x))


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 with a projected shortcut where the width changes.

    ``stride_in_1x1``: MSRA's original ResNets (and detectron2's ImageNet weights) stride in the first 1x1 conv;
    torchvision / timm stride in the 3x3 conv. The two compute different functions, so the flag must match the
    weights.
    """

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int, num_groups: int,
                 norm: str, stride_in_1x1: bool, dilation: int) -> None:
        super().__init__()
        self.shortcut = (Conv2dWithNorm(in_channels, out_channels, 1, stride=stride, norm=norm)
                         if in_channels != out_channels else None)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2dWithNorm(in_channels, bottleneck_channels, 1, stride=stride_1x1, norm=norm, relu=True)
        self.conv2 = Conv2dWithNorm(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3, padding=dilation,
                                    dilation=dilation, groups=num_groups, norm=norm, relu=True)
        self.conv3 = Conv2dWithNorm(bottleneck_channels, out_channels, 1, norm=norm)
        self.residual = FloatFunctional()  # add + ReLU: an observed int8 add_relu once quantized
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.residual.add_relu(out, shortcut)


@dataclass(frozen=True)
class ResNetFeatureInfo:
    """The part of timm's ``feature_info`` the necks read: channels and strides of the returned features."""

    channel_list: tuple[int, ...]
    stride_list: tuple[int, ...]

    def channels(self) -> list[int]:
        return list(self.channel_list)

    def reduction(self) -> list[int]:
        return list(self.stride_list)


class ResNet(nn.Module):
    """Stem, then stages ``res2`` .. ``res5`` (only up to the last one in ``out_features``); returns the listed
    stages' outputs in order, as timm's ``features_only`` models return a list."""

    def __init__(self, stem: BasicStem, stages: list[list[BottleneckBlock]], out_features: list[str],
                 freeze_at: int = 0) -> None:
        super().__init__()
        unknown = [name for name in out_features if name not in STAGE_NAMES]
        if unknown or not out_features:
            raise ConfigError(f"MODEL.RESNETS.OUT_FEATURES must name stages among {list(STAGE_NAMES)}, "
                              f"got {out_features}")
        self.stem = stem
        num_stages = max(STAGE_NAMES.index(name) for name in out_features) + 1
        self.stage_names = STAGE_NAMES[:num_stages]
        self.out_features = [name for name in self.stage_names if name in out_features]
        stride, channels, strides = 4, {}, {}
        for name, blocks in zip(self.stage_names, stages[:num_stages], strict=True):
            self.add_module(name, nn.Sequential(*blocks))
            for block in blocks:
                stride *= block.stride
            strides[name], channels[name] = stride, blocks[-1].conv3.out_channels
        self.feature_info = ResNetFeatureInfo(tuple(channels[n] for n in self.out_features),
                                              tuple(strides[n] for n in self.out_features))
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """detectron2's FREEZE_AT: 1 freezes the stem, k >= 2 also res2 .. res(k); frozen norms become FrozenBN."""
        frozen = (["stem"] if freeze_at >= 1 else []) + list(self.stage_names[: max(freeze_at - 1, 0)])
        for name in frozen:
            module = getattr(self, name)
            for param in module.parameters():
                param.requires_grad_(False)
            freeze_batch_norm_2d(module)  # converts the norms in place (none is the module itself)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                outputs.append(x)
        return outputs


def build_detectron2_resnet(cfg: CfgNode) -> ResNet:
    """The ResNet ``MODEL.RESNETS`` describes, built as detectron2's ``build_resnet_backbone`` lays it out."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in BLOCKS_PER_STAGE:
        raise ConfigError(f"MODEL.RESNETS.DEPTH must be one of {sorted(BLOCKS_PER_STAGE)} (bottleneck ResNets), "
                          f"got {r.DEPTH}")
    if r.NORM not in ("FrozenBN", "BN", "SyncBN"):
        raise ConfigError(f"MODEL.RESNETS.NORM must be 'FrozenBN', 'BN' or 'SyncBN', got '{r.NORM}'")
    if r.RES5_DILATION not in (1, 2):
        raise ConfigError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {r.RES5_DILATION}")
    stem = BasicStem(len(cfg.MODEL.PIXEL_MEAN), r.STEM_OUT_CHANNELS, r.NORM)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for index, num_blocks in enumerate(BLOCKS_PER_STAGE[r.DEPTH]):
        dilation = r.RES5_DILATION if index == 3 else 1
        # res2 follows the stem's max-pool, and a dilated res5 keeps its resolution: neither strides.
        first_stride = 1 if index == 0 or dilation == 2 else 2
        blocks = []
        for k in range(num_blocks):
            blocks.append(BottleneckBlock(in_channels if k == 0 else out_channels, out_channels, bottleneck_channels,
                                          first_stride if k == 0 else 1, r.NUM_GROUPS, r.NORM, r.STRIDE_IN_1X1,
                                          dilation))
        stages.append(blocks)
        in_channels, out_channels, bottleneck_channels = out_channels, out_channels * 2, bottleneck_channels * 2
    return ResNet(stem, stages, list(r.OUT_FEATURES), cfg.MODEL.BACKBONE.FREEZE_AT)
