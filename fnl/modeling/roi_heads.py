"""RoI heads: the box head (2 convs) with its class/box predictor, and the DensePose head on P2."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from fnl.config import CfgNode, ConfigError
from fnl.modeling.densepose import (
    DensePoseDecoder,
    DensePoseLoss,
    DensePoseOutput,
    build_densepose_head_and_predictor,
)
from fnl.modeling.poolers import ROIPooler
from fnl.modeling.roi_align import channels_last_levels, fast_roi_align_applies
from fnl.modeling.rpn import BBOX_XFORM_CLIP, _box_regression_loss


class FastRCNNConvFCHead(nn.Module):
    """detectron2's box head: NUM_CONV 3x3 convs + ReLU, flatten, NUM_FC fully connected + ReLU."""

    def __init__(self, in_channels: int, resolution: int, num_conv: int, conv_dim: int, num_fc: int,
                 fc_dim: int) -> None:
        super().__init__()
        channels = in_channels
        for k in range(num_conv):
            self.add_module(f"conv{k + 1}", nn.Conv2d(channels, conv_dim, 3, padding=1))
            self.add_module(f"conv{k + 1}_relu", nn.ReLU())
            channels = conv_dim
        self.flatten = nn.Flatten()
        dim = channels * resolution * resolution
        for k in range(num_fc):
            self.add_module(f"fc{k + 1}", nn.Linear(dim, fc_dim))
            self.add_module(f"fc{k + 1}_relu", nn.ReLU())
            dim = fc_dim
        self.output_size = dim
        for layer in self.children():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=1)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x


class FastRCNNOutputLayers(nn.Module):
    """Class scores (K + 1, background last, as detectron2) and class-specific box deltas."""

    def __init__(self, input_size: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(input_size, num_classes + 1)
        self.bbox_pred = nn.Linear(input_size, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class DensePoseROIHeads(nn.Module):
    def __init__(self, cfg: CfgNode, in_channels: int, strides: dict[str, int]) -> None:
        super().__init__()
        heads, box, dp = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.ROI_DENSEPOSE_HEAD
        for key, names in (("ROI_HEADS", heads.IN_FEATURES), ("ROI_DENSEPOSE_HEAD", dp.IN_FEATURES)):
            missing = [f for f in names if f not in strides]
            if missing:
                raise ConfigError(f"MODEL.{key}.IN_FEATURES names {missing}, the neck gives {list(strides)}")
        self.num_classes = heads.NUM_CLASSES
        self.in_features = list(heads.IN_FEATURES)
        self.box_pooler = ROIPooler(box.POOLER_RESOLUTION, [strides[f] for f in self.in_features],
                                    box.POOLER_SAMPLING_RATIO, box.POOLER_TYPE)
        self.box_head = FastRCNNConvFCHead(in_channels, box.POOLER_RESOLUTION, box.NUM_CONV, box.CONV_DIM,
                                           box.NUM_FC, box.FC_DIM)
        self.box_predictor = FastRCNNOutputLayers(self.box_head.output_size, self.num_classes)
        self.box_coder = BoxCoder(tuple(box.BBOX_REG_WEIGHTS), bbox_xform_clip=BBOX_XFORM_CLIP)
        self.smooth_l1_beta = box.SMOOTH_L1_BETA
        self.proposal_matcher = Matcher(heads.IOU_THRESHOLDS[0], heads.IOU_THRESHOLDS[0],
                                        allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(heads.BATCH_SIZE_PER_IMAGE, heads.POSITIVE_FRACTION)
        self.proposal_append_gt = heads.PROPOSAL_APPEND_GT
        self.score_thresh = heads.SCORE_THRESH_TEST
        self.nms_thresh = heads.NMS_THRESH_TEST
        self.detections_per_image = heads.DETECTIONS_PER_IMAGE

        self.densepose_on = cfg.MODEL.DENSEPOSE_ON
        if self.densepose_on:
            self.densepose_in_features = list(dp.IN_FEATURES)
            pooled_strides = [strides[f] for f in self.densepose_in_features]
            head_channels = in_channels
            self.decoder: DensePoseDecoder | None = None
            if dp.DECODER_ON:
                self.decoder = DensePoseDecoder(self.densepose_in_features, strides, in_channels,
                                                dp.DECODER_CONV_DIMS, dp.DECODER_NUM_CLASSES,
                                                dp.DECODER_COMMON_STRIDE, dp.DECODER_NORM)
                pooled_strides, head_channels = [dp.DECODER_COMMON_STRIDE], self.decoder.out_channels
            self.densepose_pooler = ROIPooler(dp.POOLER_RESOLUTION, pooled_strides, dp.POOLER_SAMPLING_RATIO,
                                              dp.POOLER_TYPE)
            self.densepose_head, self.densepose_predictor = build_densepose_head_and_predictor(cfg, head_channels)
            self.densepose_loss = DensePoseLoss(cfg)
            self.densepose_fg_iou = dp.FG_IOU_THRESHOLD
            self.densepose_batch_size = dp.BATCH_SIZE_PER_IMAGE

    # --- shared pieces ------------------------------------------------------------------------------------
    def box_features(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        pooled = self.box_pooler([features[f] for f in self.in_features], boxes)
        return self.box_head(pooled)

    def densepose_outputs(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor]) -> DensePoseOutput:
        levels = [features[f] for f in self.densepose_in_features]
        if self.decoder is not None:
            levels = [self.decoder(levels)]
        pooled = self.densepose_pooler(levels, boxes)
        return DensePoseOutput(*self.densepose_predictor(self.densepose_head(pooled)))

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], targets: list[dict] | None = None
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("training the RoI heads needs targets")
            return [], self.losses(features, proposals, targets)
        return self.inference(features, proposals, image_sizes), {}

    # --- inference ----------------------------------------------------------------------------------------
    def inference(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                  image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        # Counts come from shape[0], not len(): under ONNX export len() freezes the sample image's count.
        boxes = [p[:, :4] for p in proposals]
        counts = [b.shape[0] for b in boxes]
        features = self.pooling_layout(features)
        logits, deltas = self.box_predictor(self.box_features(features, boxes))
        detections = []
        for (logit, delta), image_boxes, size in zip(
            zip(logits.split(counts), deltas.split(counts), strict=True), boxes, image_sizes, strict=True,
        ):
            detections.append(self.select_detections(logit, delta, image_boxes, size))
        if self.densepose_on:
            output = self.densepose_outputs(features, [d["boxes"] for d in detections])
            start = 0
            for d in detections:
                count = d["boxes"].shape[0]
                d["densepose"] = output[slice(start, start + count)].as_dict()
                start = start + count
        return detections

    def pooling_layout(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The levels the poolers read, laid out channels-last in one buffer where the fast RoIAlign runs
        (``fnl.modeling.roi_align``): one transpose per level, shared by the box and DensePose poolers (both pool
        P2), and no copy in either."""
        names = list(dict.fromkeys(self.in_features + (self.densepose_in_features
                                                       if self.densepose_on and self.decoder is None else [])))
        if not fast_roi_align_applies(features[names[0]]):
            return features
        return {**features, **dict(zip(names, channels_last_levels([features[n] for n in names]), strict=True))}

    def select_detections(self, logits: torch.Tensor, deltas: torch.Tensor, proposals: torch.Tensor,
                          image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Softmax scores, class-specific decoding, score threshold, per-class NMS, top detections."""
        scores = F.softmax(logits, dim=-1)[:, :-1]
        num = proposals.shape[0]
        boxes = self.box_coder.decode_single(deltas.reshape(num * self.num_classes, 4),
                                             proposals.repeat_interleave(self.num_classes, dim=0))
        boxes = clip_boxes_to_image(boxes, image_size).view(num, self.num_classes, 4)
        classes = torch.arange(self.num_classes, device=scores.device).expand(num, -1)
        keep = scores > self.score_thresh
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        keep = batched_nms(boxes, scores, classes, self.nms_thresh)[: self.detections_per_image]
        return {"boxes": boxes[keep], "scores": scores[keep], "classes": classes[keep]}

    # --- training -----------------------------------------------------------------------------------------
    def sample_proposals(self, proposals: list[torch.Tensor], targets: list[dict]
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Match proposals (plus the GT boxes) to GT, sample 25% foreground. Returns per image the sampled boxes,
        the matched GT index (-1 for background) and the IoU with it."""
        sampled_boxes, matched_idxs, matched_ious = [], [], []
        labels = []
        for image_proposals, target in zip(proposals, targets, strict=True):
            gt = target["boxes"]
            boxes = image_proposals[:, :4]
            if self.proposal_append_gt:
                boxes = torch.cat([boxes, gt])
            if gt.numel() == 0:
                matched = torch.full((len(boxes),), -1, dtype=torch.int64, device=boxes.device)
                ious = torch.zeros(len(boxes), device=boxes.device)
            else:
                iou = box_iou(gt, boxes)
                ious, _ = iou.max(dim=0)
                matched = self.proposal_matcher(iou)
            labels.append((matched >= 0).to(torch.int64))
            sampled_boxes.append(boxes)
            matched_idxs.append(matched.clamp(min=-1))
            matched_ious.append(ious)
        pos_masks, neg_masks = self.sampler(labels)
        result = ([], [], [])
        for boxes, matched, ious, pos, neg in zip(sampled_boxes, matched_idxs, matched_ious, pos_masks, neg_masks,
                                                  strict=True):
            keep = (pos | neg).bool()
            result[0].append(boxes[keep])
            result[1].append(torch.where(pos[keep].bool(), matched[keep], torch.full_like(matched[keep], -1)))
            result[2].append(ious[keep])
        return result

    def losses(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor], targets: list[dict]
               ) -> dict[str, torch.Tensor]:
        boxes, matched, ious = self.sample_proposals(proposals, targets)
        logits, deltas = self.box_predictor(self.box_features(features, boxes))
        gt_classes, regression_targets = [], []
        for image_boxes, image_matched, target in zip(boxes, matched, targets, strict=True):
            fg = image_matched >= 0
            classes = torch.full_like(image_matched, self.num_classes)
            if fg.any():
                classes[fg] = target["classes"][image_matched[fg]]
            gt_classes.append(classes)
            gt_for_box = target["boxes"][image_matched.clamp(min=0)] if len(target["boxes"]) else image_boxes
            regression_targets.append(self.box_coder.encode_single(gt_for_box, image_boxes))
        gt_classes_all = torch.cat(gt_classes)
        targets_all = torch.cat(regression_targets)
        fg = gt_classes_all < self.num_classes
        fg_deltas = deltas.view(-1, self.num_classes, 4)[fg, gt_classes_all[fg]]
        losses = {
            "loss_cls": F.cross_entropy(logits, gt_classes_all),
            "loss_box_reg": _box_regression_loss(fg_deltas, targets_all[fg], self.smooth_l1_beta)
            / max(gt_classes_all.numel(), 1),
        }
        if self.densepose_on:
            losses.update(self.densepose_losses(features, boxes, matched, ious, targets))
        return losses

    def densepose_losses(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                         matched: list[torch.Tensor], ious: list[torch.Tensor], targets: list[dict]
                         ) -> dict[str, torch.Tensor]:
        """Foreground proposals with IoU >= FG_IOU_THRESHOLD whose GT person carries DensePose annotations."""
        dp_boxes, dp_gt_boxes, dp_annotations = [], [], []
        for image_boxes, image_matched, image_ious, target in zip(boxes, matched, ious, targets, strict=True):
            annotations = target.get("densepose") or [None] * len(target["boxes"])
            foreground = (image_matched >= 0) & (image_ious >= self.densepose_fg_iou)
            candidates = [k for k in torch.nonzero(foreground).flatten().tolist()
                          if annotations[int(image_matched[k])] is not None]
            if len(candidates) > self.densepose_batch_size:
                order = torch.randperm(len(candidates))[: self.densepose_batch_size].tolist()
                candidates = [candidates[k] for k in order]
            index = torch.tensor(candidates, dtype=torch.int64, device=image_boxes.device)
            dp_boxes.append(image_boxes[index])
            dp_gt_boxes.append(target["boxes"][image_matched[index]])
            dp_annotations.extend(annotations[int(image_matched[k])] for k in candidates)
        output = self.densepose_outputs(features, dp_boxes)
        return self.densepose_loss(output, torch.cat(dp_boxes), torch.cat(dp_gt_boxes), dp_annotations)
