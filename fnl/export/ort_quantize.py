"""ONNX Runtime's own static post-training quantization of an exported float graph: the peer our QAT int8 export is
measured against.

``ort_static_ptq`` quantizes the same regions fnl.qat runs in int8 (backbone and neck, RPN head, box head and
predictor, DensePose head and predictor) and leaves the detection glue in float, as fnl.qat's float islands do:
anchors, proposal decoding, top-k, NMS and RoIAlign carry box coordinates, which 8 bits would ruin. Weights are
per-channel int8, activations uint8, in the QDQ format, calibrated with min/max ranges on images given as the graph
takes them.

This module imports numpy, onnx and onnxruntime only.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

from fnl.export.graph_compaction import compact_onnx_file
from fnl.export.runtime import INPUT_NAME
from fnl.utils.io import atomic_path

logger = logging.getLogger("fnl")

# Node-name prefixes of the modules fnl.qat quantizes, as torch.onnx names the nodes of a graph exported by
# fnl.export.to_onnx (the module path inside the model; the poolers and the proposal decoding are left out).
INT8_SCOPES = ("/backbone/", "/proposal_generator/rpn_head/", "/roi_heads/box_head/", "/roi_heads/box_predictor/",
               "/roi_heads/densepose_head/", "/roi_heads/densepose_predictor/")
# Op types quantized inside those scopes: the network's own ops (shape arithmetic there stays float / int64).
QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "Resize", "MaxPool",
                      "AveragePool", "GlobalAveragePool")


class _ImageReader(CalibrationDataReader):
    """Feeds (3, H, W) images to the calibrator as the graph's (1, 3, H, W) input."""

    def __init__(self, images: list[Any], dtype: np.dtype) -> None:
        self.images: Iterator[Any] = iter(images)
        self.dtype = dtype

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self.images, None)
        if image is None:
            return None
        return {INPUT_NAME: np.ascontiguousarray(np.asarray(image, dtype=self.dtype)[None])}


def ort_static_ptq(float_onnx: str | Path, output: str | Path, calibration_images: Iterable[Any]) -> Path:
    """Quantize ``float_onnx`` (written by ``fnl.export.to_onnx(..., compact=False)``: the int8 regions are found by
    the scoped node names) with ONNX Runtime's ``quantize_static`` into ``output``, calibrated on
    ``calibration_images`` ((3, H, W) RGB, resized as the graph expects), and compacted as fnl's own exports are, so
    that file sizes compare. Returns ``output``.
    """
    float_onnx, output = Path(float_onnx), Path(output)
    images = list(calibration_images)
    if not images:
        raise ValueError(f"no calibration images for the ONNX Runtime quantization of {float_onnx}")
    graph_input = onnx.load(str(float_onnx), load_external_data=False).graph.input[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
    with tempfile.TemporaryDirectory(prefix="fnl-ort-ptq-") as scratch:
        # quant_pre_process (ONNX shape inference + ORT's basic graph optimizations) gives a smaller and faster
        # quantized graph (measured on model B: 4.3 vs 4.4 MB, 23 vs 27 ms). Its symbolic shape inference cannot
        # follow the NMS loop's subgraphs ("Incomplete symbolic shape inference"), so it is skipped.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(float_onnx), str(prepared), skip_symbolic_shape=True)
        nodes = [node.name for node in onnx.load(str(prepared)).graph.node if node.name.startswith(INT8_SCOPES)]
        if not nodes:
            raise ValueError(f"{float_onnx} has no node in the network's int8 regions ({', '.join(INT8_SCOPES)}): "
                             "was it exported by fnl.export.to_onnx(..., compact=False)?")
        with atomic_path(output) as tmp:
            quantize_static(str(prepared), str(tmp), _ImageReader(images, dtype), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=nodes, op_types_to_quantize=list(QUANTIZED_OP_TYPES))
            compact_onnx_file(tmp, tmp)
    logger.info("wrote %s (ONNX Runtime static PTQ of %s, %d calibration images)", output, float_onnx.name,
                len(images))
    return output
