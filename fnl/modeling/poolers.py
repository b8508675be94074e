"""Multi-level RoIAlign with detectron2's level assignment (canonical box 224 px on level 4)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import roi_align

from fnl.config import ConfigError
from fnl.modeling.roi_align import fast_roi_align_applies, roi_align_channels_last


def boxes_to_rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    """Per-image (R, 4) boxes -> (sum R, 5) with the batch index first, as torchvision's roi_align takes them."""
    rois = [torch.cat([torch.full_like(b[:, :1], i), b[:, :4]], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(rois) if rois else torch.zeros(0, 5)


class ROIPooler(nn.Module):
    def __init__(self, output_size: int, strides: list[int], sampling_ratio: int, pooler_type: str,
                 canonical_box_size: int = 224, canonical_level: int = 4) -> None:
        super().__init__()
        if pooler_type not in ("ROIAlignV2", "ROIAlign"):
            raise ConfigError(f"POOLER_TYPE must be 'ROIAlignV2' or 'ROIAlign', got '{pooler_type}'")
        self.output_size = output_size
        self.scales = [1.0 / s for s in strides]
        self.sampling_ratio = sampling_ratio
        self.aligned = pooler_type == "ROIAlignV2"  # half-pixel correct ("aligned") RoIAlign
        self.min_level = int(math.log2(strides[0]))
        self.max_level = int(math.log2(strides[-1]))
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def assign_levels(self, rois: torch.Tensor) -> torch.Tensor:
        sizes = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
        levels = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_box_size + 1e-8))
        return (levels.clamp(self.min_level, self.max_level) - self.min_level).to(torch.int64)

    def forward(self, features: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        rois = boxes_to_rois(boxes).to(features[0].dtype)
        if fast_roi_align_applies(features[0]):
            levels = self.assign_levels(rois) if len(features) > 1 else None
            return roi_align_channels_last(features, rois, levels, self.output_size,
                                           self.scales, self.sampling_ratio, self.aligned)
        if len(features) == 1:
            return self._pool(features[0], rois, self.scales[0])
        levels = self.assign_levels(rois)
        pooled, order = [], []
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            index = torch.nonzero(levels == level).squeeze(1)
            pooled.append(self._pool(feature, rois[index], scale))
            order.append(index)
        # Back to RoI order with one row gather: in ONNX that is Concat + Gather, where copying each level into a
        # zero tensor (index_copy) became a ScatterElements with an index per pooled value, ~7 ms per image.
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]

    def _pool(self, feature: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        return roi_align(feature, rois, self.output_size, spatial_scale=scale,
                         sampling_ratio=self.sampling_ratio, aligned=self.aligned)
