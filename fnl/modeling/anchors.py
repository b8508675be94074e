"""detectron2's DefaultAnchorGenerator: per level, anchors of given sizes and aspect ratios centred on a grid."""

from __future__ import annotations

import math

import torch
from torch import nn

from fnl.config import ConfigError


class AnchorGenerator(nn.Module):
    def __init__(self, sizes: list[list[float]], aspect_ratios: list[list[float]], strides: list[int],
                 offset: float = 0.0) -> None:
        super().__init__()
        if len(aspect_ratios) == 1:
            aspect_ratios = aspect_ratios * len(sizes)
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ConfigError(f"MODEL.ANCHOR_GENERATOR: {len(sizes)} SIZES for {len(strides)} feature levels")
        self.strides = list(strides)
        self.offset = offset
        for i, (level_sizes, level_ratios) in enumerate(zip(sizes, aspect_ratios, strict=True)):
            self.register_buffer(f"cell_anchors_{i}", self._cell_anchors(level_sizes, level_ratios), persistent=False)
        self.num_anchors = len(sizes[0]) * len(aspect_ratios[0])

    @staticmethod
    def _cell_anchors(sizes: list[float], aspect_ratios: list[float]) -> torch.Tensor:
        anchors = []
        for size in sizes:
            area = size**2.0
            for ratio in aspect_ratios:
                w = math.sqrt(area / ratio)
                h = ratio * w
                anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(anchors, dtype=torch.float32)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Anchors (H*W*A, 4) XYXY per level, ordered (y, x, anchor) as the head's outputs are flattened."""
        anchors = []
        for i, (feature, stride) in enumerate(zip(features, self.strides, strict=True)):
            height, width = feature.shape[-2:]
            device = feature.device
            shifts_x = torch.arange(width, device=device, dtype=torch.float32) * stride + self.offset * stride
            shifts_y = torch.arange(height, device=device, dtype=torch.float32) * stride + self.offset * stride
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            cell = getattr(self, f"cell_anchors_{i}")
            anchors.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
        return anchors
