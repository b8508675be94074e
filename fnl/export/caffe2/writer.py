"""``to_caffe2``: a GeneralizedRCNN (float32, or the eager int8 model of ``fnl.qat``) as Caffe2 protobufs:
``model.pb`` (predict net), ``model_init.pb`` (weights as fill operators) and ``model.pbtxt`` (the predict net in
protobuf's text format), in detectron2's Caffe2 layout.

The predict net, in order (blob names in quotes are its interface):
1. trunk: normalization (Sub, Div), backbone, neck and RPN head, converted from ONNX (``fnl.export.caffe2.parts``,
   ``fnl.export.caffe2.convert``);
2. per RPN level, ``GenerateProposals`` on the objectness logits and anchor deltas with that level's cell anchors
   (an init-net blob), the model's pre/post-NMS top-k and NMS threshold, ``min_size`` 0; the levels' proposals are
   concatenated (fnl's RPN keeps a top-k per level and none over all levels, so no CollectRpnProposals);
3. ``DistributeFpnProposals``, ``RoIAlign`` per level (``aligned`` for ROIAlignV2), ``Concat``, ``BatchPermutation``
   back to proposal order (a single ``RoIAlign`` when the box head pools one level);
4. box head (converted), ``Softmax``, ``BBoxTransform`` with the box head's regression weights, ``BoxWithNMSLimit``
   with its score threshold, NMS threshold and detections per image -> "boxes", "scores", "classes";
5. ``RoIAlign`` of the detected boxes on the DensePose level, DensePose head (converted) -> "coarse_segm",
   "fine_segm", "u", "v" (NCHW, as the ONNX export's outputs).
The detection operators are composed from the model's own attributes (the values its config set), not traced:
``legacy_plus_one`` is 0 everywhere (detectron2's and fnl's box convention).

Inputs: "data" (1, 3, H, W) float32 RGB pixel values (0..255, not normalized: normalization is inside), the image
already resized to the test size and padded at the bottom/right to a multiple of the net's ``size_divisibility``
argument with the pixel mean (which normalization maps to 0, the model's own padding value); "im_info" (1, 3) float32
(height, width, scale) of the image before padding. ``scale`` follows detectron2's export: BBoxTransform divides the
boxes by it, clips to round(height / scale), multiplies back (``apply_scale``), and GenerateProposals scales its
min_size (0 here) by it; pass 1.0 for results identical to PyTorch and rescale boxes outside, as
``fnl.export.caffe2.predictor`` does. ``size_divisibility`` is max(INPUT.SIZE_DIVISIBILITY, the coarsest RPN stride):
ResizeNearest takes fixed scales, so every level must be exactly half the previous one.

Known differences from the PyTorch model, all in degenerate boxes: GenerateProposals drops proposals whose centre is
not inside the image (zero-area boxes clipped onto the right/bottom edge; fnl's RPN keeps them and they can take
post-NMS slots) and its NMS suppresses a zero-area box against another zero-area box (NaN IoU); DistributeFpnProposals
adds 1e-6 inside the level logarithm where fnl's pooler adds 1e-8.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf.message import Message
from torch import nn

import fnl
from fnl.config import ConfigError
from fnl.export.caffe2.convert import NCHW, NHWC, ConvertedNet, WeightRequantization, convert_onnx
from fnl.export.caffe2.parts import (
    BOX_HEAD_OUTPUTS,
    DENSEPOSE_HEAD_OUTPUTS,
    HEAD_INPUT,
    TRUNK_INPUT,
    BoxHeadForExport,
    DensePoseHeadForExport,
    OnnxPart,
    TrunkForExport,
    export_part,
)
from fnl.export.caffe2.proto import NetDef, make_argument, make_op, save_netdef, save_netdef_text
from fnl.export.onnx import model_precision
from fnl.export.runtime import BOX_OUTPUTS, DENSEPOSE_OUTPUTS
from fnl.modeling import GeneralizedRCNN
from fnl.modeling.poolers import ROIPooler
from fnl.modeling.rpn import BBOX_XFORM_CLIP

logger = logging.getLogger("fnl")

PREDICT_NET_FILE = "model.pb"
INIT_NET_FILE = "model_init.pb"
PREDICT_NET_TEXT_FILE = "model.pbtxt"
DATA, IM_INFO = "data", "im_info"
BOX_POOLED, DENSEPOSE_POOLED = "box_pooled", "densepose_pooled"  # the heads' inputs (RoIAlign outputs)


@dataclass
class Caffe2Export:
    """What ``to_caffe2`` wrote."""

    predict_net: Path
    init_net: Path
    predict_net_text: Path
    precision: str
    weight_scales: str
    size_divisibility: int
    operators: dict[str, int]
    weight_requantization: list[WeightRequantization] = field(default_factory=list)

    @property
    def size_mb(self) -> float:
        """model.pb + model_init.pb, in MB (10^6 bytes) as the report's other sizes."""
        return round((self.predict_net.stat().st_size + self.init_net.stat().st_size) / 1e6, 3)


def _inner(module: nn.Module) -> nn.Module:
    """The wrapped module of fnl.qat's boundary wrappers (QuantizeInputs, FloatIsland, DequantizeOutputs)."""
    return getattr(module, "module", module)


def _log2(stride: float) -> int:
    level = int(round(math.log2(stride)))
    if 2**level != stride:
        raise ValueError(f"feature stride {stride} is not a power of two")
    return level


class _NetBuilder:
    """Collects ops of the predict net and fills of the init net while the stages are composed."""

    def __init__(self) -> None:
        self.ops: list[Message] = []
        self.init_ops: list[Message] = []
        self.requantized: list[WeightRequantization] = []

    def op(self, op_type: str, inputs: list[str], outputs: list[str], **arguments: Any) -> None:
        self.ops.append(make_op(op_type, inputs, outputs, **arguments))

    def fill(self, name: str, array: np.ndarray) -> str:
        self.init_ops.append(make_op("GivenTensorFill", [], [name], shape=list(array.shape),
                                     values=np.asarray(array, np.float32).reshape(-1).tolist()))
        return name

    def add(self, converted: ConvertedNet) -> None:
        self.ops.extend(converted.ops)
        self.init_ops.extend(converted.init_ops)
        self.requantized.extend(converted.weight_requantization)


def _check_model(model: GeneralizedRCNN) -> None:
    """Refuse what the Caffe2 detection operators cannot express, naming the config key."""
    rpn, heads = model.proposal_generator, model.roi_heads
    if tuple(float(w) for w in rpn.box_coder.weights) != (1.0, 1.0, 1.0, 1.0):
        raise ConfigError(f"MODEL.RPN.BBOX_REG_WEIGHTS {rpn.box_coder.weights}: Caffe2's GenerateProposals decodes "
                          "with weights (1, 1, 1, 1) only")
    for coder, key in ((rpn.box_coder, "RPN"), (heads.box_coder, "box head")):
        if not math.isclose(coder.bbox_xform_clip, BBOX_XFORM_CLIP, rel_tol=1e-6):
            raise ConfigError(f"the {key} clamps dw/dh at {coder.bbox_xform_clip}; Caffe2 clamps at log(1000/16)")
    if heads.densepose_on and len(_inner(heads.densepose_pooler).scales) != 1:
        raise ConfigError(f"MODEL.ROI_DENSEPOSE_HEAD.IN_FEATURES {heads.densepose_in_features}: the Caffe2 export "
                          "pools the DensePose head on one level (detected boxes carry no batch column for "
                          "DistributeFpnProposals)")


def size_divisibility(model: GeneralizedRCNN) -> int:
    return int(max(model.size_divisibility, max(model.proposal_generator.anchor_generator.strides)))


def to_caffe2(model: GeneralizedRCNN, output_dir: str | Path, weight_scales: str = "per-tensor") -> Caffe2Export:
    """Write ``output_dir``/model.pb, model_init.pb and model.pbtxt for ``model`` (see the module docstring).

    ``weight_scales`` ("per-tensor" or "per-channel") matters for int8 models only; see
    ``fnl.export.caffe2.convert``. Returns what was written, with the weight requantization errors.
    """
    _check_model(model)
    output_dir = Path(output_dir)
    precision = model_precision(model)
    int8 = precision == "int8"
    feature_layout = NHWC if int8 else NCHW  # RoIAlign pools the features in the layout the heads start in
    divisibility = size_divisibility(model)
    heads = model.roi_heads
    box_pooler: ROIPooler = _inner(heads.box_pooler)
    densepose_pooler: ROIPooler | None = _inner(heads.densepose_pooler) if heads.densepose_on else None
    levels = _feature_levels(model)
    pooled_features = sorted(set(heads.in_features) | set(heads.densepose_in_features if heads.densepose_on else []),
                             key=lambda f: levels[f])
    channels = _inner(model.backbone).out_channels
    builder = _NetBuilder()

    trunk = TrunkForExport(model, pooled_features)
    generator = torch.Generator().manual_seed(0)
    sizes = [(2 * divisibility, 3 * divisibility), (3 * divisibility, 2 * divisibility)]
    samples = [torch.rand(1, 3, h, w, generator=generator) * 255 for h, w in sizes]
    part = export_part("trunk", trunk, samples[0], TRUNK_INPUT, trunk.output_names, {2: "height", 3: "width"})
    trunk_outputs = {name: (name.removeprefix("feature_"), feature_layout if name.startswith("feature_") else NCHW)
                     for name in trunk.output_names}
    builder.add(_convert(part, {TRUNK_INPUT: (DATA, NCHW)}, trunk_outputs, [s.numpy() for s in samples],
                         "trunk/", weight_scales))

    proposals = _add_proposals(builder, model)
    box_pooled = _add_pooling(builder, box_pooler, heads.in_features, proposals, BOX_POOLED, feature_layout)
    box_part = export_part("box head", BoxHeadForExport(model), _pooled_sample(box_pooler, channels), HEAD_INPUT,
                           BOX_HEAD_OUTPUTS, {0: "rois"})
    builder.add(_convert(box_part, {HEAD_INPUT: (box_pooled, feature_layout)},
                         {name: (name, None) for name in BOX_HEAD_OUTPUTS},
                         [_head_feed(box_pooler, channels)], "box_head/", weight_scales))
    _add_detections(builder, model, proposals)
    outputs = list(BOX_OUTPUTS)
    if densepose_pooler is not None:
        pooled = _add_pooling(builder, densepose_pooler, heads.densepose_in_features, BOX_OUTPUTS[0],
                              DENSEPOSE_POOLED, feature_layout)
        dp_part = export_part("DensePose head", DensePoseHeadForExport(model), _pooled_sample(densepose_pooler,
                                                                                               channels),
                              HEAD_INPUT, DENSEPOSE_HEAD_OUTPUTS, {0: "rois"})
        builder.add(_convert(dp_part, {HEAD_INPUT: (pooled, feature_layout)},
                             {name: (name, NCHW) for name in DENSEPOSE_HEAD_OUTPUTS},
                             [_head_feed(densepose_pooler, channels)], "densepose_head/",
                             weight_scales))
        outputs += list(DENSEPOSE_OUTPUTS)

    predict_net = NetDef(name="fnl_predict", op=builder.ops, external_input=[DATA, IM_INFO],
                         external_output=outputs)
    predict_net.arg.extend(_net_arguments(model, precision, weight_scales, divisibility))
    init_net = NetDef(name="fnl_init", op=builder.init_ops,
                      external_output=[name for op in builder.init_ops for name in op.output])
    predict_net.external_input.extend(init_net.external_output)
    written = Caffe2Export(save_netdef(predict_net, output_dir / PREDICT_NET_FILE),
                           save_netdef(init_net, output_dir / INIT_NET_FILE),
                           save_netdef_text(predict_net, output_dir / PREDICT_NET_TEXT_FILE), precision,
                           weight_scales if int8 else "-", divisibility, _operator_counts(predict_net),
                           builder.requantized)
    logger.info("wrote %s and %s (%s, %d operators, %.1f MB)", written.predict_net, written.init_net, precision,
                len(predict_net.op), written.size_mb)
    return written


def _feature_levels(model: GeneralizedRCNN) -> dict[str, int]:
    rpn = model.proposal_generator
    levels = {f: _log2(s) for f, s in zip(rpn.in_features, rpn.anchor_generator.strides, strict=True)}
    for pooler, names in ((model.roi_heads.box_pooler, model.roi_heads.in_features),
                          (model.roi_heads.densepose_pooler if model.roi_heads.densepose_on else None,
                           model.roi_heads.densepose_in_features if model.roi_heads.densepose_on else [])):
        if pooler is not None:
            levels.update({f: _log2(1.0 / s) for f, s in zip(names, _inner(pooler).scales, strict=True)})
    return levels


def _convert(part: OnnxPart, inputs: dict[str, tuple[str, str | None]], outputs: dict[str, tuple[str, str | None]],
             feeds: list[np.ndarray], prefix: str, weight_scales: str) -> ConvertedNet:
    return convert_onnx(part.model, inputs, outputs, [{part.input_name: feed} for feed in feeds], prefix,
                        weight_scales)


def _pooled_sample(pooler: ROIPooler, channels: int) -> torch.Tensor:
    size = pooler.output_size
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


def _head_feed(pooler: ROIPooler, channels: int) -> np.ndarray:
    """The probe feed of a head graph (ONNX's NCHW, whatever layout the Caffe2 blob has)."""
    return _pooled_sample(pooler, channels).numpy()


def _add_proposals(builder: _NetBuilder, model: GeneralizedRCNN) -> str:
    rpn = model.proposal_generator
    anchors = rpn.anchor_generator
    rois, probs = [], []
    for k, (name, stride) in enumerate(zip(rpn.in_features, anchors.strides, strict=True)):
        # fnl shifts anchors by OFFSET * stride; GenerateProposals shifts them by x * stride: fold the offset in.
        cell = getattr(anchors, f"cell_anchors_{k}").cpu().numpy() + anchors.offset * stride
        anchor_blob = builder.fill(f"anchors_{name}", cell)
        rois.append(f"rpn_rois_{name}")
        probs.append(f"rpn_roi_probs_{name}")
        builder.op("GenerateProposals", [f"rpn_logits_{name}", f"rpn_deltas_{name}", IM_INFO, anchor_blob],
                   [rois[-1], probs[-1]], spatial_scale=1.0 / stride, pre_nms_topN=int(rpn.pre_nms_topk[False]),
                   post_nms_topN=int(rpn.post_nms_topk[False]), nms_thresh=float(rpn.nms_thresh[False]),
                   min_size=0.0, legacy_plus_one=0)
    builder.op("Concat", rois, ["rpn_rois", "rpn_rois_split_info"], axis=0)
    builder.op("Concat", probs, ["rpn_roi_probs", "rpn_roi_probs_split_info"], axis=0)
    return "rpn_rois"


def _add_pooling(builder: _NetBuilder, pooler: ROIPooler, features: list[str], rois: str, output: str,
                 layout: str) -> str:
    """RoIAlign of ``rois`` on ``features`` (one level, or distributed over levels and restored to rois' order)."""
    common = {"pooled_h": pooler.output_size, "pooled_w": pooler.output_size,
              "sampling_ratio": int(pooler.sampling_ratio), "aligned": int(pooler.aligned), "order": layout}
    if len(features) == 1:
        builder.op("RoIAlign", [features[0], rois], [output], spatial_scale=float(pooler.scales[0]), **common)
        return output
    levels = [f"{rois}_fpn{level}" for level in range(pooler.min_level, pooler.max_level + 1)]
    restore = f"{rois}_idx_restore_int32"
    builder.op("DistributeFpnProposals", [rois], [*levels, restore], roi_canonical_scale=pooler.canonical_box_size,
               roi_canonical_level=pooler.canonical_level, roi_max_level=pooler.max_level,
               roi_min_level=pooler.min_level, legacy_plus_one=0)
    pooled_levels = []
    for feature, level_rois, scale in zip(features, levels, pooler.scales, strict=True):
        pooled_levels.append(f"{output}_{feature}")
        builder.op("RoIAlign", [feature, level_rois], [pooled_levels[-1]], spatial_scale=float(scale), **common)
    builder.op("Concat", pooled_levels, [f"{output}_shuffled", f"{output}_split_info"], axis=0)
    builder.op("BatchPermutation", [f"{output}_shuffled", restore], [output])
    return output


def _add_detections(builder: _NetBuilder, model: GeneralizedRCNN, proposals: str) -> None:
    heads = model.roi_heads
    builder.op("Softmax", [BOX_HEAD_OUTPUTS[0]], ["cls_prob"], axis=1)
    builder.op("BBoxTransform", [proposals, BOX_HEAD_OUTPUTS[1], IM_INFO], ["pred_boxes", "roi_batch_splits"],
               weights=[float(w) for w in heads.box_coder.weights], apply_scale=1, rotated=0, legacy_plus_one=0)
    boxes, scores, classes = BOX_OUTPUTS
    builder.op("BoxWithNMSLimit", ["cls_prob", "pred_boxes", "roi_batch_splits"],
               [scores, boxes, classes, "batch_splits", "keeps", "keeps_size"],
               score_thresh=float(heads.score_thresh), nms=float(heads.nms_thresh),
               detections_per_im=int(heads.detections_per_image), soft_nms_enabled=0, cls_agnostic_bbox_reg=0,
               input_boxes_include_bg_cls=0, output_classes_include_bg_cls=0, legacy_plus_one=0)


def _net_arguments(model: GeneralizedRCNN, precision: str, weight_scales: str, divisibility: int) -> list[Message]:
    """detectron2 kept what a caller needs to prepare inputs in the predict net's arguments; so does fnl."""
    return [
        make_argument("meta_architecture", "GeneralizedRCNN"),
        make_argument("size_divisibility", divisibility),
        make_argument("device", "cpu"),
        make_argument("pixel_mean", model.pixel_mean.reshape(-1).tolist()),
        make_argument("input_format", "RGB 0..255 float32, padded bottom/right with pixel_mean"),
        make_argument("precision", precision),
        make_argument("weight_scales", weight_scales if precision == "int8" else "-"),
        make_argument("fnl_version", fnl.__version__),
    ]


def _operator_counts(net: Message) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in net.op:
        counts[op.type] = counts.get(op.type, 0) + 1
    return dict(sorted(counts.items()))
