"""GeneralizedRCNN for DensePose: preprocess -> backbone (bottom-up + neck) -> RPN -> RoI heads -> postprocess."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fnl.config import CfgNode, ConfigError
from fnl.modeling.necks import build_backbone
from fnl.modeling.roi_heads import DensePoseROIHeads
from fnl.modeling.rpn import RPN
from fnl.utils.errors import UserError


class ImageShapeError(UserError, ValueError):
    """An input image has the wrong rank, channel count or dtype."""


class GeneralizedRCNN(nn.Module):
    """detectron2's meta-architecture, with the module names detectron2 checkpoints use:
    ``backbone`` (``backbone.bottom_up`` inside), ``proposal_generator`` and ``roi_heads``.

    Input: a list of dicts, each with ``image`` (uint8 or float (3, H, W) RGB, already resized by the data mapper),
    optional ``height``/``width`` (the original size to map results back to) and, when training, ``instances``
    (``boxes`` (N, 4) XYXY in the resized image, ``classes`` (N,), ``densepose`` list). Output in eval mode: one dict
    per image with ``boxes`` (in the original image), ``scores``, ``classes`` and ``densepose`` (head outputs on the
    64x64 grid of each box; ``fnl.modeling.densepose_to_iuv`` turns them into I/U/V maps at box resolution).
    """

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__()
        self.backbone = build_backbone(cfg)
        strides = {f"p{int(n[1:])}": 2 ** int(n[1:]) for n in self.backbone.out_features}
        channels = self.backbone.out_channels
        self.proposal_generator = RPN(cfg, channels, strides)
        self.roi_heads = DensePoseROIHeads(cfg, channels, strides)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), persistent=False)
        self.size_divisibility = cfg.INPUT.SIZE_DIVISIBILITY

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # --- stages, each a method a reader (and the quantization patch) can find by name -------------------------
    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3 or image.shape[0] != self.pixel_mean.shape[0]:
            raise ImageShapeError(
                f"expected an RGB image of shape (3, H, W), got shape {tuple(image.shape)}; "
                "convert grayscale/RGBA images to RGB and channels-first first"
            )
        if not (image.dtype == torch.uint8 or image.is_floating_point()):
            raise ImageShapeError(f"expected a uint8 or float image, got dtype {image.dtype}")
        return (image.to(self.device, torch.float32) - self.pixel_mean) / self.pixel_std

    def preprocess_image(self, batched_inputs: list[dict]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalize, then pad every image to a common size divisible by SIZE_DIVISIBILITY.

        Sizes stay as ``shape`` gives them (ints; traced values under ONNX export, so the padding stays dynamic) and
        the rounding up avoids negative floor division, which the ONNX exporter turns into truncation.
        """
        images = [self.normalize(x["image"]) for x in batched_inputs]
        image_sizes = [(im.shape[-2], im.shape[-1]) for im in images]
        d = self.size_divisibility
        max_h = (max(h for h, _ in image_sizes) + d - 1) // d * d
        max_w = (max(w for _, w in image_sizes) + d - 1) // d * d
        batch = torch.stack([F.pad(im, (0, max_w - im.shape[-1], 0, max_h - im.shape[-2])) for im in images])
        return batch, image_sizes

    def forward(self, batched_inputs: list[dict]) -> list[dict] | dict[str, torch.Tensor]:
        if not self.training:
            return self.inference(batched_inputs)
        images, image_sizes = self.preprocess_image(batched_inputs)
        targets = [self._targets(x) for x in batched_inputs]
        features = self.backbone(images)
        proposals, losses = self.proposal_generator(features, image_sizes, [t["boxes"] for t in targets])
        _, roi_losses = self.roi_heads(features, proposals, image_sizes, targets)
        losses.update(roi_losses)
        return losses

    def inference(self, batched_inputs: list[dict], do_postprocess: bool = True) -> list[dict]:
        """``do_postprocess=False`` (detectron2's flag) keeps boxes in the resized input image, as ONNX export does."""
        images, image_sizes = self.preprocess_image(batched_inputs)
        features = self.backbone(images)
        proposals, _ = self.proposal_generator(features, image_sizes)
        detections, _ = self.roi_heads(features, proposals, image_sizes)
        if not do_postprocess:
            return detections
        return [
            postprocess(d, size, (x.get("height", size[0]), x.get("width", size[1])))
            for d, size, x in zip(detections, image_sizes, batched_inputs, strict=True)
        ]

    def _targets(self, batched_input: dict) -> dict:
        if "instances" not in batched_input:
            raise ValueError(f"training input for image {batched_input.get('image_id', '?')} has no 'instances'")
        instances = batched_input["instances"]
        densepose = instances.get("densepose")
        if densepose is not None:
            densepose = [None if a is None else {k: v.to(self.device) for k, v in a.items()} for a in densepose]
        return {"boxes": instances["boxes"].to(self.device, torch.float32),
                "classes": instances["classes"].to(self.device, torch.int64), "densepose": densepose}


def postprocess(detections: dict, input_size: tuple[int, int], output_size: tuple[int, int]) -> dict:
    """Scale boxes from the resized input back to the original image; DensePose outputs are box-relative."""
    scale_y = output_size[0] / input_size[0]
    scale_x = output_size[1] / input_size[1]
    boxes = detections["boxes"] * torch.tensor([scale_x, scale_y, scale_x, scale_y], device=detections["boxes"].device)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, output_size[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, output_size[0])
    return {**detections, "boxes": boxes}


def build_model(cfg: CfgNode) -> GeneralizedRCNN:
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        raise ConfigError(f"MODEL.META_ARCHITECTURE '{cfg.MODEL.META_ARCHITECTURE}' is not supported; "
                          "use 'GeneralizedRCNN'")
    return GeneralizedRCNN(cfg).to(cfg.MODEL.DEVICE)
