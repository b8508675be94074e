"""The model's networks as three ONNX graphs -- trunk (normalization, backbone, neck, RPN head), box head, DensePose
head -- the form ``fnl.export.caffe2.convert`` turns into Caffe2 operators.

Why three graphs and not ``to_onnx``'s one: the whole-model graph holds the detection glue as generic ONNX ops
(TopK, Gather, NonMaxSuppression inside Loop/If, ScatterElements, shape arithmetic); Caffe2 expressed the same
stages with its detection operators (GenerateProposals, RoIAlign, BBoxTransform, BoxWithNMSLimit), whose arguments
come straight from the config. So the networks are traced from the model itself (the same TorchScript-based
exporter ``fnl.export.onnx`` configures: the flattened, traced model, with the int8 model as
QuantizeLinear/DequantizeLinear) and the writer composes the detection operators around them.

Each wrapper calls the model's own modules, so a float model and the int8 model ``fnl.qat`` builds export the same
way: the int8 trunk starts with the QuantStub of ``QuantizeInputs`` and its features leave dequantized (as
``FloatIsland`` poolers dequantize them); the heads start with their pooler's QuantStub. Tracing goes through
``fnl.export.onnx.export_graph``, which also handles what int8 model B needs (timm's feature hooks, the
``quantized::mul_scalar`` symbolic).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from fnl.export.onnx import DEFAULT_OPSET, export_graph
from fnl.export.runtime import DENSEPOSE_OUTPUTS
from fnl.modeling import GeneralizedRCNN

TRUNK_INPUT = "data"
HEAD_INPUT = "pooled"
BOX_HEAD_OUTPUTS = ("cls_logits", "bbox_deltas")
DENSEPOSE_HEAD_OUTPUTS = DENSEPOSE_OUTPUTS


def _pooler_quant(pooler: nn.Module) -> nn.Module:
    """The QuantStub a ``FloatIsland`` pooler ends with (it quantizes the pooled features for the int8 head), or
    identity for a float model's plain pooler."""
    quant = getattr(pooler, "quant", None)
    return quant if isinstance(quant, nn.Module) else nn.Identity()


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.dequantize() if x.is_quantized else x


class TrunkForExport(nn.Module):
    """data (1, 3, H, W) raw RGB -> pooled features (dequantized), then per RPN level objectness logits
    (1, A, h, w) and anchor deltas (1, 4A, h, w). Normalization is inside; padding is the caller's."""

    def __init__(self, model: GeneralizedRCNN, feature_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.feature_names = list(feature_names)
        rpn = model.proposal_generator
        self.output_names = ([f"feature_{f}" for f in self.feature_names]
                             + [f"rpn_logits_{f}" for f in rpn.in_features]
                             + [f"rpn_deltas_{f}" for f in rpn.in_features])

    def forward(self, data: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normalized = (data - self.model.pixel_mean) / self.model.pixel_std
        features = self.model.backbone(normalized)
        rpn = self.model.proposal_generator
        logits, deltas = rpn.rpn_head([features[f] for f in rpn.in_features])
        return tuple(_float(t) for t in [*(features[f] for f in self.feature_names), *logits, *deltas])


class BoxHeadForExport(nn.Module):
    """pooled (R, C, S, S) -> class logits (R, K + 1, background last) and class-specific deltas (R, 4K)."""

    output_names = BOX_HEAD_OUTPUTS

    def __init__(self, model: GeneralizedRCNN) -> None:
        super().__init__()
        heads = model.roi_heads
        self.quant = _pooler_quant(heads.box_pooler)
        self.box_head = heads.box_head
        self.box_predictor = heads.box_predictor

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, deltas = self.box_predictor(self.box_head(self.quant(pooled)))
        return _float(logits), _float(deltas)


class DensePoseHeadForExport(nn.Module):
    """pooled (R, C, S, S) -> coarse_segm, fine_segm, u, v (R, *, 2S * UP_SCALE, ...)."""

    output_names = DENSEPOSE_HEAD_OUTPUTS

    def __init__(self, model: GeneralizedRCNN) -> None:
        super().__init__()
        heads = model.roi_heads
        self.quant = _pooler_quant(heads.densepose_pooler)
        self.densepose_head = heads.densepose_head
        self.densepose_predictor = heads.densepose_predictor

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_float(t) for t in self.densepose_predictor(self.densepose_head(self.quant(pooled))))


@dataclass
class OnnxPart:
    """One traced network: the ONNX model, its input name and output names (in the wrapper's order)."""

    name: str
    model: onnx.ModelProto
    input_name: str
    output_names: tuple[str, ...]


def export_part(name: str, module: nn.Module, example: torch.Tensor, input_name: str,
                output_names: tuple[str, ...] | list[str], dynamic_axes: dict[int, str],
                opset: int = DEFAULT_OPSET) -> OnnxPart:
    """Trace ``module`` (float, or int8 between QuantStub/DeQuantStub) into an ONNX model; ``dynamic_axes`` name
    the input's dynamic dimensions (the outputs follow: heads' first axis, the trunk's spatial ones)."""
    output_axes = {0: dynamic_axes[0]} if 0 in dynamic_axes else {k: v for k, v in dynamic_axes.items() if k >= 2}
    axes = {input_name: dynamic_axes, **{output: output_axes for output in output_names}}
    with tempfile.TemporaryDirectory(prefix="fnl-caffe2-") as tmp:
        # Not compacted: the Caffe2 blobs are named after the ONNX values, and scoped names make model.pbtxt readable.
        path = export_graph(module, (example,), Path(tmp) / f"{name.replace(' ', '_')}.onnx", [input_name],
                            list(output_names), axes, opset, compact=False)
        model = onnx.load(str(path))
    return OnnxPart(name, model, input_name, tuple(output_names))
