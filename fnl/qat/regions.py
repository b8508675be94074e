"""The int8 regions of ``fnl.qat.patch.QUANTIZED_REGIONS`` run one at a time: each region's modules composed in call
order, and example inputs for every region taken from the model itself. The PT2E engine captures these with
``torch.export``; the eager engine runs them to learn each int8 layer's input scale (``fnl.qat.quantize.snap_biases``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fnl.config import CfgNode
from fnl.utils.modules import eval_mode

# Capture batch 2: torch.export specializes a dimension whose example size is 0 or 1.
CAPTURE_BATCH = 2
MAX_BATCH = 64
MAX_ROIS = 1 << 16


class RegionModules(nn.Module):
    """The modules of one region composed in call order (each takes the previous one's output): what is captured.
    Every region takes one input (the image batch, the list of feature levels, or the pooled RoI features)."""

    def __init__(self, stages: list[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Any) -> Any:
        output = self.stages[0](x)
        for stage in self.stages[1:]:
            output = stage(output)
        return output


@dataclass
class RegionCapture:
    """What a region is captured with: example inputs and their dynamic dimensions (torch.export's form).

    ``per_level``: the region takes a list of feature levels and applies the same weights to each (the RPN head);
    it is captured on one level and its program runs once per level. One capture over all levels would quantize the
    shared weights for the first level only (the quantizer annotates a weight once) and give XNNPACK one bias for
    convs of different input scales; per level, every level runs int8 with one set of ranges, as in the eager engine.
    """

    args: tuple[Any, ...]
    dynamic_shapes: tuple[Any, ...] | None
    per_level: bool = False


def run_per_level(program: Any, levels: list[torch.Tensor]) -> tuple[list[Any], ...]:
    """A one-level program over every level: its per-output lists concatenated, as the multi-level module returns."""
    outputs = [program([level]) for level in levels]
    return tuple([item for output in outputs for item in output[k]] for k in range(len(outputs[0])))


def _blocks(size: int, divisor: int) -> int:
    return max(2, math.ceil(size / divisor))


def region_captures(float_model: nn.Module, cfg: CfgNode, max_size: int | None = None,
                    batch: int | None = None, max_rois: int = MAX_ROIS) -> dict[str, RegionCapture]:
    """Example inputs and dynamic shapes of every region, from the float model itself.

    ``max_size``: the largest padded image side (default: the configured maximum, train or test); ``batch``: a fixed
    batch size (ExecuTorch runs one image) instead of a dynamic one; ``max_rois``: the most RoIs a head takes.
    """
    from torch.export import Dim

    divisor = max(cfg.INPUT.SIZE_DIVISIBILITY, 1)
    max_size = max_size or max(cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TEST)
    max_blocks = _blocks(max_size, divisor)
    # An image of 4 x 5 blocks: every level down to P6 is at least 2 x 2, so no dimension is specialized as 0 / 1.
    height, width = divisor * min(4, max_blocks), divisor * min(5, max_blocks)
    images = torch.randn(batch or CAPTURE_BATCH, 3, height, width, generator=torch.Generator().manual_seed(0))
    batch_dim = None if batch else Dim("batch", min=1, max=MAX_BATCH)
    image_dims = {2: divisor * Dim("height_blocks", min=1, max=max_blocks),
                  3: divisor * Dim("width_blocks", min=1, max=max_blocks)}
    if batch_dim is not None:
        image_dims[0] = batch_dim
    captures = {"backbone": RegionCapture((images,), (image_dims,))}
    rpn = float_model.proposal_generator
    with torch.no_grad(), eval_mode(float_model.backbone):
        features = float_model.backbone(images)
    levels = [features[f] for f in rpn.in_features]
    # The finest level, up to the largest image / its stride (+1 for rounding).
    level_max = math.ceil(max_size * levels[0].shape[-1] / width) + 1
    level_dims = {2: Dim("level_height", min=1, max=level_max), 3: Dim("level_width", min=1, max=level_max)}
    if batch_dim is not None:
        level_dims[0] = batch_dim
    captures["rpn_head"] = RegionCapture(([levels[0]],), ([level_dims],), per_level=True)
    channels = levels[0].shape[1]
    roi_heads = float_model.roi_heads
    rois = Dim("rois", min=0, max=max_rois)
    poolers = {"box_head": roi_heads.box_pooler}
    if roi_heads.densepose_on:
        poolers["densepose_head"] = roi_heads.densepose_pooler
    for name, pooler in poolers.items():
        resolution = pooler.output_size
        pooled = torch.randn(CAPTURE_BATCH, channels, resolution, resolution,
                             generator=torch.Generator().manual_seed(1))
        captures[name] = RegionCapture((pooled,), ({0: rois},))
    return captures
