"""The bottom-up backbone: any timm model with ``features_only`` (EfficientNet / MobileNet family, ResNets).

The timm module itself is the ``bottom_up`` child of the neck, so checkpoint keys read
``backbone.bottom_up.<timm names>`` as in detectron2 / DensePoseFnL.
"""

from __future__ import annotations

import timm
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d
from torch import nn

from fnl.config import CfgNode, ConfigError
from fnl.modeling.resnet import DETECTRON2_RESNET_BUILDERS, build_detectron2_resnet


def create_bottom_up(name: str, out_indices: list[int], feature_location: str = "bottleneck",
                     pretrained: bool = False, freeze_at: int = 0, norm: str = "BN") -> nn.Module:
    """``timm.create_model(name, features_only=True)`` with detectron2's freezing and norm options.

    With ``feature_location="expansion"`` timm takes each feature *before* a block's pointwise-linear conv through
    forward pre-hooks on ``conv_pwl``; those hooks are what quantization must keep alive (see ``fnl.hooks``).
    """
    if feature_location not in ("bottleneck", "expansion"):
        raise ConfigError(
            f"MODEL.BACKBONE.FEATURE_LOCATION must be 'bottleneck' or 'expansion', got '{feature_location}'"
        )
    kwargs = {"feature_location": feature_location} if feature_location != "bottleneck" else {}
    if name not in timm.list_models():
        raise ConfigError(f"MODEL.BACKBONE.NAME '{name}' is not a timm model")
    model = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices), **kwargs)
    _freeze(model, freeze_at)
    if norm == "FrozenBN":
        model = freeze_batch_norm_2d(model)
    elif norm == "SyncBN":
        model = convert_sync_batchnorm(model)
    elif norm != "BN":
        raise ConfigError(f"MODEL.BACKBONE.NORM must be 'BN', 'SyncBN' or 'FrozenBN', got '{norm}'")
    return model


def _freeze(model: nn.Module, freeze_at: int) -> None:
    """freeze_at 1 freezes the stem, k >= 2 also the first k-1 stages (detectron2's FREEZE_AT).

    Frozen parts keep their statistics as well: their BN becomes FrozenBN (timm's variant keeps a fused activation).
    """
    if freeze_at <= 0:
        return
    stage_container = "blocks" if hasattr(model, "blocks") else None
    stem_names = [n for n, _ in model.named_children() if n != stage_container and not n.startswith("layer")]
    if stage_container:
        stages = [(f"{stage_container}.{i}", m) for i, m in enumerate(getattr(model, stage_container))]
    else:
        stages = [(n, m) for n, m in model.named_children() if n.startswith("layer")]
    frozen = [(n, model.get_submodule(n)) for n in stem_names] + stages[: freeze_at - 1]
    for name, module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)
        replaced = freeze_batch_norm_2d(module)  # converts children in place; returns a new module for a bare BN
        if replaced is not module:
            model.set_submodule(name, replaced)


def feature_names(bottom_up: nn.Module) -> list[str]:
    """c2..c5 by stride, the names detectron2 gives bottom-up features."""
    return [f"c{int(r).bit_length() - 1}" for r in bottom_up.feature_info.reduction()]


def build_bottom_up(cfg: CfgNode) -> nn.Module:
    """A timm model by name, or detectron2's ResNet (``MODEL.RESNETS``) under detectron2's builder names."""
    b = cfg.MODEL.BACKBONE
    if b.NAME in DETECTRON2_RESNET_BUILDERS:
        return build_detectron2_resnet(cfg)
    return create_bottom_up(b.NAME, b.OUT_INDICES, b.FEATURE_LOCATION, b.PRETRAINED, b.FREEZE_AT, b.NORM)
