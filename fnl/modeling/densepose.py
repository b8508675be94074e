"""DensePose head (ASPP + stacked convs, as Parsing R-CNN / Mobile Parsing R-CNN), chart predictor, losses,
and the conversion of head outputs to per-box I/U/V maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.nn import functional as F

from fnl.config import CfgNode, ConfigError
from fnl.modeling.layers import ConvNormAct, init_conv_weights


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3): 1x1, three dilated 3x3 and an image-pooling branch, projected
    back by a 1x1 conv. ``norm`` ("" or "BN") follows each conv but the image-pooling one, whose 1x1 input gives a
    batch norm one value per RoI (and none to normalize over with a single RoI)."""

    def __init__(self, in_channels: int, out_channels: int, dilations: list[int], norm: str = "") -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [ConvNormAct(in_channels, out_channels, 1, norm=norm)]
            + [ConvNormAct(in_channels, out_channels, 3, dilation=d, norm=norm) for d in dilations]
        )
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvNormAct(in_channels, out_channels, 1))
        self.project = ConvNormAct((len(dilations) + 2) * out_channels, out_channels, 1, norm=norm)
        self.concat = FloatFunctional()  # an observed int8 concatenation once quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [conv(x) for conv in self.convs]
        branches.append(F.interpolate(self.pooling(x), size=x.shape[-2:], mode="nearest"))
        return self.project(self.concat.cat(branches, dim=1))


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al.), optional: the paper drops it for latency."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(channels // 2, 1)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)
        phi = self.phi(x).flatten(2)
        attention = torch.softmax(theta @ phi, dim=-1)
        y = (attention @ self.g(x).flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, -1, h, w)
        return x + self.out(y)


class DensePoseHead(nn.Module):
    """"DensePoseDeepLabHead": ASPP [-> non-local] -> N convs; "DensePoseV1ConvXHead": N convs only."""

    def __init__(self, in_channels: int, name: str, num_convs: int, hidden_dim: int, kernel_size: int,
                 dilations: list[int], nonlocal_on: bool, norm: str = "") -> None:
        super().__init__()
        if name not in ("DensePoseDeepLabHead", "DensePoseV1ConvXHead"):
            raise ConfigError(f"MODEL.ROI_DENSEPOSE_HEAD.NAME '{name}' is not one of "
                              "'DensePoseDeepLabHead', 'DensePoseV1ConvXHead'")
        channels = in_channels
        self.ASPP = ASPP(in_channels, in_channels, dilations, norm) if name == "DensePoseDeepLabHead" else nn.Identity()
        self.NLBlock = NonLocalBlock(in_channels) if nonlocal_on else nn.Identity()
        body = []
        for _ in range(num_convs):
            body.append(ConvNormAct(channels, hidden_dim, kernel_size, norm=norm))
            channels = hidden_dim
        self.body = nn.Sequential(*body)
        self.out_channels = channels
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.NLBlock(self.ASPP(x)))


class DensePoseDecoder(nn.Module):
    """detectron2 DensePose's decoder (ROI_DENSEPOSE_HEAD.DECODER_ON; Panoptic FPN's semantic head): each level
    through 3x3 conv + ReLU and 2x bilinear up-sampling until it reaches ``common_stride``, the levels summed, then a
    1x1 conv. The DensePose pooler then reads this one map. Children are named by level (``p2``, ``p3``...) and
    ``predictor`` as in detectron2, so its weights keep their names up to each conv's place in ``ConvNormAct``."""

    def __init__(self, in_features: list[str], strides: dict[str, int], in_channels: int, conv_dims: int,
                 num_classes: int, common_stride: int, norm: str = "") -> None:
        super().__init__()
        too_fine = [f for f in in_features if strides[f] < common_stride]
        if too_fine:
            raise ConfigError(f"MODEL.ROI_DENSEPOSE_HEAD.DECODER_COMMON_STRIDE {common_stride} is coarser than the "
                              f"stride of {too_fine}; the decoder only up-samples")
        self.in_features = list(in_features)
        for name in self.in_features:
            ops: list[nn.Module] = []
            for k in range(max(1, strides[name].bit_length() - common_stride.bit_length())):
                ops.append(ConvNormAct(in_channels if k == 0 else conv_dims, conv_dims, 3, norm=norm))
                if strides[name] != common_stride:
                    ops.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.add_module(name, nn.Sequential(*ops))
        self.predictor = nn.Conv2d(conv_dims, num_classes, 1)
        self.adds = nn.ModuleList(FloatFunctional() for _ in self.in_features[1:])  # int8 adds once quantized
        self.out_channels = num_classes
        init_conv_weights(self)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        out = getattr(self, self.in_features[0])(features[0])
        for name, feature, add in zip(self.in_features[1:], features[1:], self.adds, strict=True):
            out = add.add(out, getattr(self, name)(feature))
        return self.predictor(out)


@dataclass
class DensePoseOutput:
    """Head outputs on the heatmap grid of each box: logits for segmentations, raw U/V per part."""

    coarse_segm: torch.Tensor  # (N, 2 or 15, S, S)
    fine_segm: torch.Tensor  # (N, 25, S, S)
    u: torch.Tensor  # (N, 25, S, S)
    v: torch.Tensor  # (N, 25, S, S)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"coarse_segm": self.coarse_segm, "fine_segm": self.fine_segm, "u": self.u, "v": self.v}

    def __getitem__(self, index: torch.Tensor | slice) -> DensePoseOutput:
        return DensePoseOutput(self.coarse_segm[index], self.fine_segm[index], self.u[index], self.v[index])


class DensePosePredictor(nn.Module):
    """detectron2's DensePoseChartPredictor: 4x4 stride-2 transposed convs, then bilinear up-scaling."""

    def __init__(self, in_channels: int, num_patches: int, num_coarse_segm_channels: int, kernel_size: int,
                 up_scale: int) -> None:
        super().__init__()
        padding = kernel_size // 2 - 1

        def deconv(out_channels: int) -> nn.ConvTranspose2d:
            return nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride=2, padding=padding)

        self.ann_index_lowres = deconv(num_coarse_segm_channels)
        self.index_uv_lowres = deconv(num_patches + 1)
        self.u_lowres = deconv(num_patches + 1)
        self.v_lowres = deconv(num_patches + 1)
        self.up_scale = up_scale
        init_conv_weights(self)

    def _upscale(self, x: torch.Tensor) -> torch.Tensor:
        if self.up_scale == 1:
            return x
        return F.interpolate(x, scale_factor=self.up_scale, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self._upscale(self.ann_index_lowres(x)), self._upscale(self.index_uv_lowres(x)),
                self._upscale(self.u_lowres(x)), self._upscale(self.v_lowres(x)))


def build_densepose_head_and_predictor(cfg: CfgNode, in_channels: int) -> tuple[DensePoseHead, DensePosePredictor]:
    dp = cfg.MODEL.ROI_DENSEPOSE_HEAD
    expected = 2 * dp.POOLER_RESOLUTION * dp.UP_SCALE
    if expected != dp.HEATMAP_SIZE:
        raise ConfigError(f"MODEL.ROI_DENSEPOSE_HEAD.HEATMAP_SIZE {dp.HEATMAP_SIZE} must equal "
                          f"2 * POOLER_RESOLUTION * UP_SCALE = {expected}")
    head = DensePoseHead(in_channels, dp.NAME, dp.NUM_STACKED_CONVS, dp.CONV_HEAD_DIM, dp.CONV_HEAD_KERNEL,
                         dp.ASPP_DILATIONS, dp.NONLOCAL_ON, dp.NORM)
    predictor = DensePosePredictor(head.out_channels, dp.NUM_PATCHES, dp.NUM_COARSE_SEGM_CHANNELS,
                                   dp.DECONV_KERNEL, dp.UP_SCALE)
    return head, predictor


class DensePoseLoss:
    """DensePose R-CNN losses: cross-entropy on the coarse segmentation (box grid) and on the fine part index at the
    annotated points, smooth-L1 on U and V of the annotated part, summed over points (detectron2's weights)."""

    def __init__(self, cfg: CfgNode) -> None:
        dp = cfg.MODEL.ROI_DENSEPOSE_HEAD
        self.w_points = dp.POINT_REGRESSION_WEIGHTS
        self.w_part = dp.PART_WEIGHTS
        self.w_segm = dp.INDEX_WEIGHTS
        self.num_coarse = dp.NUM_COARSE_SEGM_CHANNELS

    def __call__(self, output: DensePoseOutput, proposal_boxes: torch.Tensor, gt_boxes: torch.Tensor,
                 gt_densepose: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """proposal_boxes, gt_boxes: (M, 4) XYXY; gt_densepose: M dicts with x, y, i, u, v, segm."""
        size = output.fine_segm.shape[-1]
        zero = sum(t.sum() for t in output.as_dict().values()) * 0.0  # keeps every output in the graph
        if proposal_boxes.shape[0] == 0:
            return {"loss_densepose_I": zero, "loss_densepose_U": zero, "loss_densepose_V": zero,
                    "loss_densepose_S": zero}
        point_i, point_u, point_v, est_fine, est_u, est_v = [], [], [], [], [], []
        segm_targets = []
        for m, annotation in enumerate(gt_densepose):
            grid = _points_in_proposal(annotation["x"], annotation["y"], gt_boxes[m], proposal_boxes[m])
            inside = (grid.abs() <= 1).all(dim=1)
            grid = grid[inside]
            sample_grid = grid.view(1, 1, -1, 2)

            def sample(t: torch.Tensor, g: torch.Tensor = sample_grid, m: int = m) -> torch.Tensor:
                return F.grid_sample(t[m:m + 1], g, mode="bilinear", align_corners=False)[0, :, 0].t()

            est_fine.append(sample(output.fine_segm))
            est_u.append(sample(output.u))
            est_v.append(sample(output.v))
            point_i.append(annotation["i"][inside])
            point_u.append(annotation["u"][inside])
            point_v.append(annotation["v"][inside])
            segm_targets.append(_segm_on_proposal(annotation["segm"], gt_boxes[m], proposal_boxes[m], size))
        fine = torch.cat(est_fine)
        labels = torch.cat(point_i).long()
        segm_target = torch.stack(segm_targets)
        if self.num_coarse == 2:
            segm_target = (segm_target > 0).long()
        loss_segm = F.cross_entropy(output.coarse_segm, segm_target) * self.w_segm
        if labels.numel() == 0:
            return {"loss_densepose_I": zero, "loss_densepose_U": zero, "loss_densepose_V": zero,
                    "loss_densepose_S": loss_segm}
        part = labels.view(-1, 1)
        u_est = torch.cat(est_u).gather(1, part).squeeze(1)
        v_est = torch.cat(est_v).gather(1, part).squeeze(1)
        return {
            "loss_densepose_I": F.cross_entropy(fine, labels) * self.w_part,
            "loss_densepose_U": F.smooth_l1_loss(u_est, torch.cat(point_u), reduction="sum") * self.w_points,
            "loss_densepose_V": F.smooth_l1_loss(v_est, torch.cat(point_v), reduction="sum") * self.w_points,
            "loss_densepose_S": loss_segm,
        }


def _points_in_proposal(x: torch.Tensor, y: torch.Tensor, gt_box: torch.Tensor, proposal: torch.Tensor
                        ) -> torch.Tensor:
    """Annotated points (0..256 in the GT box) -> grid_sample coordinates (-1..1) in the proposal's heatmap."""
    img_x = gt_box[0] + x / 256.0 * (gt_box[2] - gt_box[0])
    img_y = gt_box[1] + y / 256.0 * (gt_box[3] - gt_box[1])
    gx = (img_x - proposal[0]) / (proposal[2] - proposal[0]).clamp(min=1e-6) * 2 - 1
    gy = (img_y - proposal[1]) / (proposal[3] - proposal[1]).clamp(min=1e-6) * 2 - 1
    return torch.stack([gx, gy], dim=1)


def _segm_on_proposal(segm: torch.Tensor, gt_box: torch.Tensor, proposal: torch.Tensor, size: int) -> torch.Tensor:
    """The GT coarse part labels (256x256 over the GT box) resampled (nearest) onto the proposal's size x size grid."""
    centers = (torch.arange(size, device=proposal.device, dtype=torch.float32) + 0.5) / size
    img_x = proposal[0] + centers * (proposal[2] - proposal[0])
    img_y = proposal[1] + centers * (proposal[3] - proposal[1])
    gx = (img_x - gt_box[0]) / (gt_box[2] - gt_box[0]).clamp(min=1e-6) * 2 - 1
    gy = (img_y - gt_box[1]) / (gt_box[3] - gt_box[1]).clamp(min=1e-6) * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).unsqueeze(0)
    labels = F.grid_sample(segm.float()[None, None], grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
    return labels[0, 0].long()


def densepose_to_iuv(boxes: torch.Tensor, output: DensePoseOutput | dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Head outputs -> one (3, h, w) float map per box at the box's integer size: part index I (0 = background),
    U and V of that part. Pixel (r, c) is image pixel (int(y0) + r, int(x0) + c), as detectron2's DensePose results.

    The 64x64 head outputs are resampled bilinearly to the box size, then I = argmax of the fine segmentation where
    the coarse segmentation says foreground.
    """
    if isinstance(output, dict):
        output = DensePoseOutput(**output)
    maps = []
    for k, box in enumerate(boxes.tolist()):
        w = max(int(box[2] - box[0]), 1)
        h = max(int(box[3] - box[1]), 1)

        def resample(t: torch.Tensor, k: int = k, h: int = h, w: int = w) -> torch.Tensor:
            return F.interpolate(t[k:k + 1].float(), size=(h, w), mode="bilinear", align_corners=False)[0]

        foreground = resample(output.coarse_segm).argmax(dim=0) > 0
        index = resample(output.fine_segm).argmax(dim=0) * foreground
        u = resample(output.u).gather(0, index[None]).clamp(0, 1)[0]
        v = resample(output.v).gather(0, index[None]).clamp(0, 1)[0]
        maps.append(torch.stack([index.float(), u, v]))
    return maps
