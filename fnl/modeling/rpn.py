"""Region proposal network, detectron2's StandardRPNHead + RPN, on torchvision's box ops."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from fnl.config import CfgNode, ConfigError
from fnl.modeling.anchors import AnchorGenerator

# detectron2's clamp on dw/dh before exp(): boxes at most 1000/16 times their anchor.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class StandardRPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then 1x1 convs for objectness logits and anchor deltas, on every level."""

    def __init__(self, in_channels: int, num_anchors: int, box_dim: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.activation = nn.ReLU()
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * box_dim, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = [], []
        for x in features:
            hidden = self.activation(self.conv(x))
            logits.append(self.objectness_logits(hidden))
            deltas.append(self.anchor_deltas(hidden))
        return logits, deltas


def flatten_rpn_outputs(logits: list[torch.Tensor], deltas: list[torch.Tensor]
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(N, A, H, W) -> (N, H*W*A) and (N, A*4, H, W) -> (N, H*W*A, 4), the anchors' order."""
    flat_logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
    flat_deltas = [
        d.view(d.shape[0], -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2) for d in deltas
    ]
    return flat_logits, flat_deltas


class RPN(nn.Module):
    def __init__(self, cfg: CfgNode, in_channels: int, strides: dict[str, int]) -> None:
        super().__init__()
        rpn, anchors = cfg.MODEL.RPN, cfg.MODEL.ANCHOR_GENERATOR
        self.in_features = list(rpn.IN_FEATURES)
        missing = [f for f in self.in_features if f not in strides]
        if missing:
            raise ConfigError(f"MODEL.RPN.IN_FEATURES names {missing}, the neck gives {list(strides)}")
        self.anchor_generator = AnchorGenerator(anchors.SIZES, anchors.ASPECT_RATIOS,
                                                [strides[f] for f in self.in_features], anchors.OFFSET)
        self.rpn_head = StandardRPNHead(in_channels, self.anchor_generator.num_anchors)
        self.box_coder = BoxCoder(tuple(rpn.BBOX_REG_WEIGHTS), bbox_xform_clip=BBOX_XFORM_CLIP)
        low, high = rpn.IOU_THRESHOLDS
        self.matcher = Matcher(high, low, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(rpn.BATCH_SIZE_PER_IMAGE, rpn.POSITIVE_FRACTION)
        self.batch_size_per_image = rpn.BATCH_SIZE_PER_IMAGE
        self.smooth_l1_beta = rpn.SMOOTH_L1_BETA
        self.loss_weight = rpn.LOSS_WEIGHT
        self.pre_nms_topk = {True: rpn.PRE_NMS_TOPK_TRAIN, False: rpn.PRE_NMS_TOPK_TEST}
        self.post_nms_topk = {True: rpn.POST_NMS_TOPK_TRAIN, False: rpn.POST_NMS_TOPK_TEST}
        self.nms_thresh = {True: rpn.NMS_THRESH, False: rpn.NMS_THRESH_TEST}
        if rpn.POST_NMS_TOPK_PER not in ("level", "image"):
            raise ConfigError(f"MODEL.RPN.POST_NMS_TOPK_PER must be 'level' or 'image', got '{rpn.POST_NMS_TOPK_PER}'")
        self.post_nms_topk_per_image = rpn.POST_NMS_TOPK_PER == "image"

    def forward(self, features: dict[str, torch.Tensor], image_sizes: list[tuple[int, int]],
                gt_boxes: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        level_features = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(level_features)
        logits, deltas = self.rpn_head(level_features)
        logits, deltas = flatten_rpn_outputs(logits, deltas)
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            if gt_boxes is None:
                raise ValueError("training the RPN needs ground-truth boxes")
            losses = self.losses(anchors, logits, deltas, gt_boxes)
        with torch.no_grad():
            proposals = self.decode_proposals(anchors, [x.detach() for x in logits],
                                              [d.detach() for d in deltas], image_sizes)
        return proposals, losses

    def decode_proposals(self, anchors: list[torch.Tensor], logits: list[torch.Tensor], deltas: list[torch.Tensor],
                         image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per level: top-k by objectness, decode, clip, NMS, keep the post-NMS top-k of that level, or
        (POST_NMS_TOPK_PER "image", detectron2's rule) the top-k of the image over all levels.

        The paper's "test-tuned" setting is POST_NMS_TOPK_TEST=100 per level with NMS_THRESH_TEST=0.3.
        Returns per image (R, 5) boxes XYXY with the objectness logit in the last column.
        """
        pre_k, post_k, thresh = (self.pre_nms_topk[self.training], self.post_nms_topk[self.training],
                                 self.nms_thresh[self.training])
        results = []
        for i, image_size in enumerate(image_sizes):
            kept = []
            for level_anchors, level_logits, level_deltas in zip(anchors, logits, deltas, strict=True):
                scores = level_logits[i]
                scores, idx = scores.topk(_topk_count(scores, pre_k))
                boxes = self.box_coder.decode_single(level_deltas[i][idx], level_anchors[idx])
                boxes = clip_boxes_to_image(boxes, image_size)
                valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
                boxes, scores = boxes[valid], scores[valid]
                keep = remove_small_boxes(boxes, 0.0)
                boxes, scores = boxes[keep], scores[keep]
                keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.int64), thresh)
                keep = keep if self.post_nms_topk_per_image else keep[:post_k]
                kept.append(torch.cat([boxes[keep], scores[keep, None]], dim=1))
            proposals = torch.cat(kept)
            if self.post_nms_topk_per_image:
                proposals = proposals[proposals[:, 4].topk(_topk_count(proposals[:, 4], post_k)).indices]
            results.append(proposals)
        return results

    def losses(self, anchors: list[torch.Tensor], logits: list[torch.Tensor], deltas: list[torch.Tensor],
               gt_boxes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        all_anchors = torch.cat(anchors)
        labels, regression_targets = [], []
        for boxes in gt_boxes:
            if boxes.numel() == 0:
                labels.append(torch.zeros(len(all_anchors), device=all_anchors.device))
                regression_targets.append(torch.zeros_like(all_anchors))
                continue
            matched = self.matcher(box_iou(boxes, all_anchors))
            image_labels = (matched >= 0).float()
            image_labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(image_labels)
            regression_targets.append(self.box_coder.encode_single(boxes[matched.clamp(min=0)], all_anchors))
        pos_masks, neg_masks = self.sampler(labels)
        pos = torch.cat(pos_masks).bool()
        sampled = pos | torch.cat(neg_masks).bool()
        logits_all = torch.cat(logits, dim=1).flatten()
        deltas_all = torch.cat(deltas, dim=1).reshape(-1, 4)
        normalizer = self.batch_size_per_image * len(gt_boxes)
        loss_cls = F.binary_cross_entropy_with_logits(logits_all[sampled], torch.cat(labels)[sampled],
                                                      reduction="sum")
        loss_box = _box_regression_loss(deltas_all[pos], torch.cat(regression_targets)[pos], self.smooth_l1_beta)
        return {"loss_rpn_cls": self.loss_weight * loss_cls / normalizer,
                "loss_rpn_loc": self.loss_weight * loss_box / normalizer}


def _topk_count(scores: torch.Tensor, k: int) -> int | torch.Tensor:
    """min(k, len(scores)). Under ONNX export ``shape[0]`` is a traced value and Python's ``min`` would freeze the
    branch the sample image took (a TopK larger than a smaller image's level); a clamp stays in the graph."""
    if torch.jit.is_tracing():
        return torch.clamp(scores.shape[0], max=k)
    return min(k, scores.shape[0])


def _box_regression_loss(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """detectron2's smooth-L1, which is plain L1 at beta 0; summed."""
    if beta < 1e-5:
        return (pred - target).abs().sum()
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")
