"""One ONNX graph (float32, or int8 as torch.onnx writes eager int8 models: QuantizeLinear/DequantizeLinear around
float ops) -> Caffe2 operators for a predict net and weight fills for an init net.

Why from ONNX: the ONNX graph is the model already flattened by tracing -- module structure, hooks, Python control
flow and quantization wrappers are gone, every op has explicit attributes, and the int8 model's quantization
parameters are constants beside the ops that use them. Converting that graph op by op is mechanical and the same
for every backbone; walking the PyTorch module tree would not be.

How:
1. Constants are folded (ONNX's reference evaluator runs every node whose inputs are all constant, e.g. the BiFPN's
   normalized fusion weights), except DequantizeLinear of constant integers: those stay quantized weights.
2. Shapes come from running the graph in ONNX Runtime on probe inputs. Resize ops whose output size is computed from
   other tensors' shapes become ``ResizeNearest`` with fixed scales measured on the probes; a scale that differs
   between probes is refused (the caller pads inputs so that it cannot). Nodes only shape arithmetic fed are dropped.
3. Nodes are converted lazily in graph order: a float op becomes a Caffe2 op when something needs its float value.
   A QuantizeLinear whose input is a float op on dequantized int8 values (the QDQ pattern ``DequantizeLinear -> op
   -> QuantizeLinear``) becomes the Int8 op (Int8Conv, Int8ConvRelu, Int8ConvTranspose, Int8FC, Int8Add,
   Int8AddRelu, Int8Concat, Int8MaxPool, Int8AveragePool, Int8ResizeNearest, Int8Flatten) with ``Y_scale`` and
   ``Y_zero_point``. Anything else on int8 values runs in float between Int8Dequantize and Int8Quantize (the BiFPN's
   multiply-by-fusion-weight, which no Caffe2 int8 op does, and the DensePose predictor's pixel shuffle and crop
   after its sub-pixel Int8Convs: DepthToSpace as Reshape -> Transpose -> Reshape, Slice; both move values only, so
   requantizing them at the same scale is exact).
4. Layouts: Caffe2's Int8 ops are NHWC (QNNPACK); float ops are emitted NCHW. NCHW2NHWC / NHWC2NCHW are inserted
   where a value crosses, once per value. Int8 weights are stored OHWI (Int8Conv) / IHWO (Int8ConvTranspose).

Int8 weights: Caffe2 stores them as uint8 with a zero point (symmetric int8 ``w`` is stored ``w + 128`` with zero
point 128, as Caffe2's int8 models do) in ``Int8GivenTensorFill``, biases as int32 at scale ``x_scale * w_scale`` in
``Int8GivenIntTensorFill``. QNNPACK's Int8Conv has one weight scale per tensor, fbgemm's int8 models one per output
channel; ``weight_scales`` says what to do:
- ``"per-tensor"`` (default, what stock Caffe2 computes): weights are requantized to the largest channel scale
  (``round(w * s_c / s_max)``), which loses precision in channels with small scales; the error of every tensor is
  recorded in ``ConvertedNet.weight_requantization``.
- ``"per-channel"``: the integers stay as they are and every channel's scale goes into a ``Y_scales`` argument (an
  fnl extension): exact, and what ``fnl.export.caffe2.executor`` runs, but stock Caffe2 ignores ``Y_scales`` and
  would compute with ``Y_scale`` alone -- such files are for checking, not for a stock runtime.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import Message
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from fnl.engine.backends import CAFFE2_INT8, WEIGHT_SCALES
from fnl.export.caffe2.proto import make_op
from fnl.utils.errors import UserError

NCHW, NHWC = "NCHW", "NHWC"
_TO_NHWC = (0, 2, 3, 1)
_AXIS_IN_NHWC = {0: 0, 1: 3, 2: 1, 3: 2}  # an NCHW axis -> the same axis of the NHWC tensor


class ConversionError(UserError, ValueError):
    """An ONNX node has no Caffe2 form here; the message names the node and why."""


@dataclass
class WeightRequantization:
    """A per-channel int8 weight requantized to one scale: the largest error on a real-valued weight, the tensor's
    largest real-valued weight, and the worst channel's largest error relative to that channel's largest weight
    (a channel whose scale is far below the largest keeps only a few integer levels)."""

    op: str
    channels: int
    max_abs_error: float
    max_abs_weight: float
    worst_channel_relative_error: float


@dataclass
class ConvertedNet:
    ops: list[Message]
    init_ops: list[Message]
    weight_requantization: list[WeightRequantization] = field(default_factory=list)


# --- values ----------------------------------------------------------------------------------------------------
@dataclass
class _QConst:
    """A DequantizeLinear of constant integers: quantized weights or a quantized bias."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def real(self) -> np.ndarray:
        shape = [1] * self.values.ndim
        if self.scale.size > 1:
            shape[self.axis] = -1
        scale, zero_point = self.scale.reshape(shape), self.zero_point.reshape(shape).astype(np.float64)
        return ((self.values.astype(np.float64) - zero_point) * scale).astype(np.float32)


@dataclass
class _Float:
    blob: str
    layout: str | None  # for 4-D values; None otherwise


@dataclass
class _Int8:
    blob: str
    scale: float
    zero_point: int
    layout: str | None
    flattened_chw: tuple[int, int, int] | None = None  # an NHWC tensor flattened: its (C, H, W) in ONNX order


@dataclass
class _Dequantized:
    """A DequantizeLinear of an int8 activation, not yet materialized as a float blob."""

    source: _Int8


@dataclass
class _Pending:
    """A float op not emitted yet: it may still fuse into the QuantizeLinear that consumes it."""

    node: onnx.NodeProto


_Value = np.ndarray | _QConst | _Float | _Int8 | _Dequantized | _Pending


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _describe(node: onnx.NodeProto) -> str:
    return f"ONNX node '{node.name or node.output[0]}' ({node.op_type})"


def _fold_constants(graph: onnx.GraphProto) -> tuple[dict[str, np.ndarray], dict[str, _QConst],
                                                     list[onnx.NodeProto]]:
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    qconsts: dict[str, _QConst] = {}
    live = []
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if not all(name in consts for name in inputs):
            live.append(node)
            continue
        if node.op_type == "DequantizeLinear":
            values, scale = consts[node.input[0]], consts[node.input[1]]
            zero_point = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
            qconsts[node.output[0]] = _QConst(values, np.asarray(scale, np.float32), np.asarray(zero_point),
                                              int(_attributes(node).get("axis", 1)))
            continue
        results = ReferenceEvaluator(node).run(None, {name: consts[name] for name in inputs})
        consts.update((name, np.asarray(value)) for name, value in zip(node.output, results, strict=True))
    return consts, qconsts, live


def _needed_nodes(live: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """Nodes the outputs depend on; a Resize depends on its data input only (its sizes become fixed scales)."""
    needed = set(outputs)
    kept = []
    for node in reversed(live):
        if not any(name in needed for name in node.output):
            continue
        kept.append(node)
        needed.update(node.input[:1] if node.op_type == "Resize" else node.input)
    return kept[::-1]


def probe_shapes(model: onnx.ModelProto, feeds: list[Mapping[str, np.ndarray]]) -> list[dict[str, tuple[int, ...]]]:
    """Run ``model`` in ONNX Runtime once per feed with every intermediate value as an output; their shapes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    elem_types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.graph.value_info,
                                                                    *inferred.graph.output]}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in existing and elem_types.get(name):
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_types[name], None))
                existing.add(name)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = []
    for feed in feeds:
        values = session.run(names, dict(feed))
        shapes = {name: tuple(int(d) for d in np.shape(value)) for name, value in feed.items()}
        shapes.update((name, tuple(int(d) for d in np.shape(value))) for name, value in zip(names, values, strict=True))
        results.append(shapes)
    return results


# --- the converter -----------------------------------------------------------------------------------------------
class _Converter:
    def __init__(self, model: onnx.ModelProto, prefix: str, shapes: list[dict[str, tuple[int, ...]]],
                 weight_scales: str) -> None:
        if weight_scales not in WEIGHT_SCALES:
            raise ValueError(f"weight_scales must be one of {WEIGHT_SCALES}, got '{weight_scales}'")
        self.prefix = prefix
        self.shapes = shapes
        self.weight_scales = weight_scales
        self.consts, self.qconsts, self.live = _fold_constants(model.graph)
        self.values: dict[str, _Value] = {}
        self.consumers: Counter[str] = Counter()
        self.ops: list[Message] = []
        self.init_ops: list[Message] = []
        self.requantized: list[WeightRequantization] = []
        self._init_blobs: dict[str, str] = {}
        self._dequantized: dict[str, _Float] = {}
        self._relayouts: dict[tuple[str, str], str] = {}
        self._renamed: dict[str, str] = {}

    # --- names, values, shapes ------------------------------------------------------------------------------
    def blob(self, onnx_name: str, suffix: str = "") -> str:
        return f"{self.prefix}{onnx_name.lstrip('/')}{suffix}"

    def get(self, name: str) -> _Value:
        if name in self.values:
            return self.values[name]
        if name in self.qconsts:
            return self.qconsts[name]
        if name in self.consts:
            return self.consts[name]
        raise ConversionError(f"ONNX value '{name}' is used before any node produces it")

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes[0]:
            raise ConversionError(f"no probed shape for ONNX value '{name}'")
        return self.shapes[0][name]

    def rank(self, name: str) -> int:
        value = self.get(name)
        if isinstance(value, np.ndarray):
            return value.ndim
        if isinstance(value, _QConst):
            return value.values.ndim
        return len(self.shape(name))

    def emit(self, op_type: str, inputs: list[str], outputs: list[str], node: onnx.NodeProto | None = None,
             **arguments: Any) -> None:
        self.ops.append(make_op(op_type, inputs, outputs, name=(node.name if node is not None else ""), **arguments))

    # --- constants -----------------------------------------------------------------------------------------
    def const_blob(self, key: str, array: np.ndarray) -> str:
        """A constant as a blob of the init net (GivenTensorFill / GivenTensorIntFill / GivenTensorInt64Fill)."""
        if key in self._init_blobs:
            return self._init_blobs[key]
        name = self.blob(key)
        array = np.asarray(array)
        if array.dtype.kind == "f":
            fill, values = "GivenTensorFill", array.astype(np.float32).reshape(-1).tolist()
        elif array.dtype == np.int64:
            fill, values = "GivenTensorInt64Fill", array.reshape(-1).tolist()
        elif array.dtype.kind in "iu":
            fill, values = "GivenTensorIntFill", array.astype(np.int32).reshape(-1).tolist()
        else:
            raise ConversionError(f"constant '{key}' has dtype {array.dtype}, which no Caffe2 fill here holds")
        self.init_ops.append(make_op(fill, [], [name], shape=list(array.shape), values=values))
        self._init_blobs[key] = name
        return name

    def const_array(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        value = self.get(name)
        if isinstance(value, _QConst):
            return value.real()
        if isinstance(value, np.ndarray):
            return value.astype(np.float32) if value.dtype.kind == "f" else value
        raise ConversionError(f"{_describe(node)}: input '{name}' must be a constant (weights, bias, attribute "
                              "tensor); it is computed at run time")

    # --- float values --------------------------------------------------------------------------------------
    def relayout(self, blob: str, source: str, target: str) -> str:
        key = (blob, target)
        if key not in self._relayouts:
            name = f"{blob}_{target.lower()}"
            self.emit("NCHW2NHWC" if target == NHWC else "NHWC2NCHW", [blob], [name])
            self._relayouts[key] = name
        return self._relayouts[key]

    def float_value(self, name: str) -> _Float:
        """The float blob holding ONNX value ``name``, emitting what it takes (lazily, once)."""
        value = self.get(name)
        if isinstance(value, _Float):
            return value
        if isinstance(value, _Pending):
            result = self.emit_float_node(value.node)
            self.values[value.node.output[0]] = result
            return result
        if isinstance(value, _Dequantized):
            source = value.source
            if source.flattened_chw is not None:
                raise ConversionError(f"ONNX value '{name}' is an int8 tensor flattened in NHWC order; only an "
                                      "Int8FC can consume it")
            if source.blob not in self._dequantized:
                out = f"{source.blob}_dequantized"
                self.emit("Int8Dequantize", [source.blob], [out])
                self._dequantized[source.blob] = _Float(out, source.layout)
            return self._dequantized[source.blob]
        if isinstance(value, np.ndarray | _QConst):
            array = value.real() if isinstance(value, _QConst) else value
            return _Float(self.const_blob(name, array), NCHW if array.ndim == 4 else None)
        raise ConversionError(f"ONNX value '{name}' is int8 where a float value is expected")

    def float_blob(self, name: str, layout: str | None = None) -> str:
        value = self.float_value(name)
        if layout is None or value.layout is None or value.layout == layout:
            return value.blob
        return self.relayout(value.blob, value.layout, layout)

    # --- the graph -----------------------------------------------------------------------------------------
    def convert(self, graph: onnx.GraphProto, inputs: Mapping[str, tuple[str, str | None]],
                outputs: Mapping[str, tuple[str, str | None]]) -> ConvertedNet:
        for name, (blob, layout) in inputs.items():
            self.values[name] = _Float(blob, layout)
        nodes = _needed_nodes(self.live, list(outputs))
        self.consumers = Counter(name for node in nodes for name in node.input if name)
        self.consumers.update(list(outputs))
        for node in nodes:
            try:
                self.convert_node(node)
            except ConversionError:
                raise
            except (ValueError, KeyError, IndexError) as exc:
                raise ConversionError(f"{_describe(node)}: {exc}") from exc
        # Every output is materialized before any is renamed: materializing one can emit ops reading another.
        produced = {name: self.float_blob(name, layout) for name, (_, layout) in outputs.items()}
        for name, (blob, _) in outputs.items():
            self.name_output(produced[name], blob, inputs)
        return ConvertedNet(self.ops, self.init_ops, self.requantized)

    def name_output(self, produced: str, wanted: str, inputs: Mapping[str, tuple[str, str | None]]) -> None:
        """Give the blob of a graph output its interface name: rename the op output, or Copy an input, a constant
        or a blob already renamed for another output."""
        if produced == wanted:
            return
        if produced in self._renamed:
            self.emit("Copy", [self._renamed[produced]], [wanted])
            return
        if produced in {blob for blob, _ in inputs.values()} or produced in self._init_blobs.values():
            self.emit("Copy", [produced], [wanted])
            return
        self._renamed[produced] = wanted
        for op in self.ops:
            for field_name in ("input", "output"):
                names = getattr(op, field_name)
                for k, name in enumerate(names):
                    if name == produced:
                        names[k] = wanted

    def convert_node(self, node: onnx.NodeProto) -> None:
        kind = node.op_type
        if kind in ("Identity", "Dropout"):
            self.values[node.output[0]] = self.get(node.input[0])
        elif kind == "Cast":
            self.convert_cast(node)
        elif kind == "QuantizeLinear":
            self.values[node.output[0]] = self.convert_quantize(node)
        elif kind == "DequantizeLinear":
            self.values[node.output[0]] = self.convert_dequantize(node)
        elif kind in _FLOAT_OPS:
            self.values[node.output[0]] = _Pending(node)
        else:
            raise ConversionError(f"{_describe(node)} has no Caffe2 conversion here (inputs {list(node.input)}); "
                                  f"supported: {', '.join(sorted(_FLOAT_OPS | _QDQ_OPS))}")

    def convert_cast(self, node: onnx.NodeProto) -> None:
        value = self.get(node.input[0])
        to = _attributes(node)["to"]
        if isinstance(value, _Int8) and to == onnx.TensorProto.UINT8:
            self.values[node.output[0]] = value  # the exporter's uint8 -> uint8 cast between Q and DQ
        elif isinstance(value, _Float | _Pending | _Dequantized) and to == onnx.TensorProto.FLOAT:
            self.values[node.output[0]] = value
        else:
            raise ConversionError(f"{_describe(node)}: a cast to ONNX type {to} of a run-time value has no Caffe2 "
                                  "form here")

    def quantization(self, node: onnx.NodeProto) -> tuple[float, int]:
        scale = np.asarray(self.const_array(node.input[1], node), np.float32)
        zero_point = self.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if scale.size != 1:
            raise ConversionError(f"{_describe(node)}: per-channel activation quantization has no Caffe2 int8 form")
        if not isinstance(zero_point, np.ndarray) or zero_point.dtype != np.uint8:
            raise ConversionError(f"{_describe(node)}: Caffe2's int8 activations are uint8; this zero point is "
                                  f"{getattr(zero_point, 'dtype', type(zero_point).__name__)}")
        return float(scale.reshape(())), int(zero_point.reshape(()))

    def convert_dequantize(self, node: onnx.NodeProto) -> _Dequantized:
        source = self.get(node.input[0])
        if not isinstance(source, _Int8):
            raise ConversionError(f"{_describe(node)}: dequantizes '{node.input[0]}', which is no int8 activation")
        scale, zero_point = self.quantization(node)
        if np.float32(scale) != np.float32(source.scale) or zero_point != source.zero_point:
            raise ConversionError(f"{_describe(node)}: reads an int8 value at ({scale}, {zero_point}), it was "
                                  f"quantized at ({source.scale}, {source.zero_point})")
        return _Dequantized(source)

    def convert_quantize(self, node: onnx.NodeProto) -> _Int8:
        scale, zero_point = self.quantization(node)
        name = node.input[0]
        value = self.get(name)
        rank = self.rank(name)
        layout = NHWC if rank == 4 else None
        out = self.blob(node.output[0])
        if isinstance(value, _Dequantized):
            source = value.source
            if np.float32(scale) == np.float32(source.scale) and zero_point == source.zero_point:
                return source
        elif isinstance(value, _Pending) and self.consumers[name] == 1:
            fused = _fuse_int8(self, value.node, node, out, scale, zero_point)
            if fused is not None:
                return fused
        self.emit("Int8Quantize", [self.float_blob(name, layout)], [out], node, Y_scale=scale,
                  Y_zero_point=zero_point)
        return _Int8(out, scale, zero_point, layout)

    # --- float ops -----------------------------------------------------------------------------------------
    def emit_float_node(self, node: onnx.NodeProto) -> _Float:
        emitter = _FLOAT_EMITTERS[node.op_type]
        try:
            return emitter(self, node, self.blob(node.output[0]))
        except ConversionError:
            raise
        except (ValueError, KeyError, IndexError) as exc:
            raise ConversionError(f"{_describe(node)}: {exc}") from exc

    def resize_scales(self, node: onnx.NodeProto) -> tuple[float, float]:
        """Fixed (height, width) scales of a nearest Resize, measured on every probe and checked against Caffe2's
        ResizeNearest arithmetic (output ``int(in * scale)``, source ``int(out_index / scale)``)."""
        attrs = _attributes(node)
        mode = (attrs.get("mode", b"nearest"), attrs.get("coordinate_transformation_mode", b"half_pixel"),
                attrs.get("nearest_mode", b"round_prefer_floor"))
        if mode != (b"nearest", b"asymmetric", b"floor"):
            raise ConversionError(f"{_describe(node)}: mode {[m.decode() for m in mode]} has no Caffe2 form; only "
                                  "nearest / asymmetric / floor (PyTorch's 'nearest') maps to ResizeNearest")
        measured = set()
        for probe in self.shapes:
            (_, _, in_h, in_w), (_, _, out_h, out_w) = probe[node.input[0]], probe[node.output[0]]
            scales = (out_h / in_h, out_w / in_w)
            for size, out, scale in ((in_h, out_h, scales[0]), (in_w, out_w, scales[1])):
                caffe2_out = int(np.float32(size) * np.float32(scale))
                onnx_index = np.floor(np.arange(out) * (size / out)).astype(np.int64)
                caffe2_index = np.minimum(np.floor(np.arange(out, dtype=np.float32) / np.float32(scale)), size - 1)
                if caffe2_out != out or not np.array_equal(onnx_index, caffe2_index.astype(np.int64)):
                    raise ConversionError(f"{_describe(node)}: resizing {size} -> {out} is not what ResizeNearest "
                                          f"computes with scale {scale}")
            measured.add(scales)
        if len(measured) != 1:
            raise ConversionError(f"{_describe(node)}: its scale depends on the input size ({sorted(measured)} on "
                                  "the probes); Caffe2's ResizeNearest takes fixed scales -- pad inputs to a "
                                  "multiple of the coarsest feature stride")
        return measured.pop()


# --- float emitters ----------------------------------------------------------------------------------------------
def _window_arguments(node: onnx.NodeProto, kernel: list[int]) -> dict[str, Any]:
    attrs = _attributes(node)
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ConversionError(f"{_describe(node)}: auto_pad is not supported; export with explicit pads")
    return {"kernels": list(kernel), "strides": list(attrs.get("strides", [1, 1])),
            "pads": list(attrs.get("pads", [0, 0, 0, 0]))}


def _emit_conv(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    attrs = _attributes(node)
    weight = c.const_array(node.input[1], node)
    inputs = [c.float_blob(node.input[0], NCHW), c.const_blob(f"{node.output[0]}_w", weight)]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(c.const_blob(f"{node.output[0]}_b", c.const_array(node.input[2], node)))
    c.emit("Conv", inputs, [out], node, **_window_arguments(node, list(weight.shape[2:])),
           dilations=list(attrs.get("dilations", [1, 1])), group=int(attrs.get("group", 1)), order=NCHW)
    return _Float(out, NCHW)


def _emit_conv_transpose(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    attrs = _attributes(node)
    if list(attrs.get("dilations", [1, 1])) != [1, 1] or "output_shape" in attrs:
        raise ConversionError(f"{_describe(node)}: Caffe2's ConvTranspose has no dilations or output_shape")
    weight = c.const_array(node.input[1], node)
    inputs = [c.float_blob(node.input[0], NCHW), c.const_blob(f"{node.output[0]}_w", weight)]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(c.const_blob(f"{node.output[0]}_b", c.const_array(node.input[2], node)))
    group = int(attrs.get("group", 1))
    c.emit("ConvTranspose", inputs, [out], node, **_window_arguments(node, list(weight.shape[2:])),
           adjs=list(attrs.get("output_padding", [0, 0])), group=group if group != 1 else None, order=NCHW)
    return _Float(out, NCHW)


def _gemm_weights(c: _Converter, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, K) weights and the bias of a Gemm that is a fully connected layer."""
    attrs = _attributes(node)
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
        raise ConversionError(f"{_describe(node)}: only Gemm with alpha = beta = 1 and no transA is an FC")
    weight = c.get(node.input[1])
    if not isinstance(weight, np.ndarray | _QConst):
        raise ConversionError(f"{_describe(node)}: its weights are computed at run time")
    bias = c.const_array(node.input[2], node).reshape(-1) if len(node.input) > 2 and node.input[2] else None
    return weight, bias  # type: ignore[return-value]


def _emit_gemm(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    weight, bias = _gemm_weights(c, node)
    real = weight.real() if isinstance(weight, _QConst) else np.asarray(weight, np.float32)
    real = real if _attributes(node).get("transB", 0) else real.T
    bias = bias if bias is not None else np.zeros(real.shape[0], np.float32)
    c.emit("FC", [c.float_blob(node.input[0]), c.const_blob(f"{node.output[0]}_w", real),
                  c.const_blob(f"{node.output[0]}_b", bias)], [out], node)
    return _Float(out, None)


def _emit_unary(op_type: str):  # noqa: ANN202
    def emit(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
        value = c.float_value(node.input[0])
        c.emit(op_type, [value.blob], [out], node)
        return _Float(out, value.layout)

    return emit


def _emit_binary(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    a, b = node.input[0], node.input[1]
    constants = [name for name in (a, b) if isinstance(c.get(name), np.ndarray | _QConst)]
    activations = [name for name in (a, b) if name not in constants]
    if not activations:
        raise ConversionError(f"{_describe(node)}: both inputs are constant (constant folding should have run)")
    if node.op_type == "Mul" and len(constants) == 1 and c.const_array(constants[0], node).size == 1:
        value = c.float_value(activations[0])
        scale = float(c.const_array(constants[0], node).reshape(()))
        c.emit("Scale", [value.blob], [out], node, scale=scale)
        return _Float(out, value.layout)
    # NHWC only when every constant is a scalar (a broadcast tensor constant is laid out for NCHW).
    first = c.float_value(activations[0])
    scalar_constants = all(c.const_array(name, node).size == 1 for name in constants)
    layout = first.layout if (first.layout == NHWC and scalar_constants) else (NCHW if first.layout else None)
    blobs = [c.float_blob(name, layout) for name in (a, b)]
    c.emit(node.op_type, blobs, [out], node)
    return _Float(out, layout)


def _emit_concat(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    axis = int(_attributes(node)["axis"])
    rank = c.rank(node.input[0])
    axis = axis + rank if axis < 0 else axis
    layout = c.float_value(node.input[0]).layout
    blobs = [c.float_blob(name, layout) for name in node.input]
    c.emit("Concat", blobs, [out, f"{out}_split_info"], node,
           axis=_AXIS_IN_NHWC[axis] if layout == NHWC else axis)
    return _Float(out, layout)


def _pool_arguments(node: onnx.NodeProto) -> dict[str, Any]:
    attrs = _attributes(node)
    if attrs.get("ceil_mode", 0) or list(attrs.get("dilations", [1, 1])) != [1, 1]:
        raise ConversionError(f"{_describe(node)}: ceil_mode and dilations have no Caffe2 pooling form")
    return _window_arguments(node, list(attrs["kernel_shape"]))


def _emit_max_pool(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    if len(node.output) > 1 and node.output[1]:
        raise ConversionError(f"{_describe(node)}: the indices output has no Caffe2 form")
    c.emit("MaxPool", [c.float_blob(node.input[0], NCHW)], [out], node, **_pool_arguments(node), order=NCHW)
    return _Float(out, NCHW)


def _emit_average_pool(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    arguments = _pool_arguments(node)
    if any(arguments["pads"]):
        raise ConversionError(f"{_describe(node)}: average pooling with padding is not converted")
    c.emit("AveragePool", [c.float_blob(node.input[0], NCHW)], [out], node, **arguments, order=NCHW)
    return _Float(out, NCHW)


def _emit_global_average_pool(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    c.emit("AveragePool", [c.float_blob(node.input[0], NCHW)], [out], node, global_pooling=1, order=NCHW)
    return _Float(out, NCHW)


def _emit_resize(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    height_scale, width_scale = c.resize_scales(node)
    c.emit("ResizeNearest", [c.float_blob(node.input[0], NCHW)], [out], node, height_scale=height_scale,
           width_scale=width_scale, order=NCHW)
    return _Float(out, NCHW)


def _emit_flatten(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    c.emit("Flatten", [c.float_blob(node.input[0], NCHW)], [out], node, axis=int(_attributes(node).get("axis", 1)))
    return _Float(out, None)


def _emit_softmax(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    rank = c.rank(node.input[0])
    axis = int(_attributes(node).get("axis", -1))
    if (axis + rank if axis < 0 else axis) != rank - 1:
        raise ConversionError(f"{_describe(node)}: only a softmax over the last axis maps to Caffe2's Softmax")
    c.emit("Softmax", [c.float_blob(node.input[0], NCHW)], [out], node, axis=rank - 1)
    return _Float(out, None if rank != 4 else NCHW)


def _emit_depth_to_space(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    """DepthToSpace (CRD: PyTorch's pixel_shuffle, in the DensePose predictor's sub-pixel convs) as stock Caffe2's
    Reshape (N, C, r, r, H, W) -> Transpose -> Reshape (N, C, rH, rW), which has no DepthToSpace operator. H and W
    must be the same on every probe (the RoI heads' fixed pooled size); N stays dynamic (Reshape's 0 copies it)."""
    attrs = _attributes(node)
    if attrs.get("mode", b"DCR") != b"CRD":
        raise ConversionError(f"{_describe(node)}: only DepthToSpace mode CRD (pixel_shuffle) is converted")
    block = int(attrs["blocksize"])
    sizes = {tuple(probe[node.input[0]][1:]) for probe in c.shapes}
    if len(sizes) != 1:
        raise ConversionError(f"{_describe(node)}: its input's channels / height / width differ between the probes "
                              f"({sorted(sizes)}); Caffe2's Reshape takes a fixed shape")
    channels, height, width = sizes.pop()
    blocks = [0, channels // block**2, block, block, height, width]
    c.emit("Reshape", [c.float_blob(node.input[0], NCHW)], [f"{out}_blocks", f"{out}_blocks_shape"], node,
           shape=blocks)
    c.emit("Transpose", [f"{out}_blocks"], [f"{out}_interleaved"], node, axes=[0, 1, 4, 2, 5, 3])
    c.emit("Reshape", [f"{out}_interleaved"], [out, f"{out}_shape"], node,
           shape=[0, channels // block**2, height * block, width * block])
    return _Float(out, NCHW)


def _emit_slice(c: _Converter, node: onnx.NodeProto, out: str) -> _Float:
    """Slice with constant bounds and step 1 as Caffe2's Slice, whose negative bounds count from one past the end
    (an ONNX end of -1, exclusive, is Caffe2's -2) and which takes a start and an end for every leading axis."""
    starts, ends = (c.const_array(name, node).reshape(-1) for name in node.input[1:3])
    rank = c.rank(node.input[0])
    axes = (c.const_array(node.input[3], node).reshape(-1) if len(node.input) > 3 and node.input[3]
            else np.arange(len(starts)))
    if len(node.input) > 4 and node.input[4] and np.any(c.const_array(node.input[4], node) != 1):
        raise ConversionError(f"{_describe(node)}: only step 1 has a Caffe2 Slice form")
    caffe2_starts, caffe2_ends = [0] * rank, [-1] * rank
    dims = c.shape(node.input[0])
    for axis, start, end in zip(axes, starts, ends, strict=True):
        axis = int(axis) + rank if axis < 0 else int(axis)
        start, end = int(start), int(end)
        caffe2_starts[axis] = start - 1 if start < 0 else start
        caffe2_ends[axis] = end - 1 if end < 0 else (-1 if end >= dims[axis] else end)
    c.emit("Slice", [c.float_blob(node.input[0], NCHW if rank == 4 else None)], [out], node, starts=caffe2_starts,
           ends=caffe2_ends)
    return _Float(out, NCHW if rank == 4 else None)


_FLOAT_EMITTERS = {
    "Conv": _emit_conv, "ConvTranspose": _emit_conv_transpose, "Gemm": _emit_gemm,
    "Relu": _emit_unary("Relu"), "Sigmoid": _emit_unary("Sigmoid"),
    "Add": _emit_binary, "Sub": _emit_binary, "Mul": _emit_binary, "Div": _emit_binary,
    "Concat": _emit_concat, "MaxPool": _emit_max_pool, "AveragePool": _emit_average_pool,
    "GlobalAveragePool": _emit_global_average_pool, "Resize": _emit_resize, "Flatten": _emit_flatten,
    "Softmax": _emit_softmax, "DepthToSpace": _emit_depth_to_space, "Slice": _emit_slice,
}
_FLOAT_OPS = frozenset(_FLOAT_EMITTERS)
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast", "Identity", "Dropout"})


# --- int8 fusion -------------------------------------------------------------------------------------------------
def _dequantized_input(c: _Converter, name: str) -> _Int8 | None:
    value = c.get(name)
    return value.source if isinstance(value, _Dequantized) else None


def _fuse_int8(c: _Converter, node: onnx.NodeProto, quantize: onnx.NodeProto, out: str, scale: float,
               zero_point: int) -> _Int8 | None:
    """The Int8 op for ``QuantizeLinear(node(...))`` when ``node`` reads dequantized int8 values, else None."""
    relu = False
    if node.op_type == "Relu":
        inner = c.get(node.input[0])
        if not (isinstance(inner, _Pending) and c.consumers[node.input[0]] == 1
                and inner.node.op_type in ("Conv", "Add")):
            return None
        node, relu = inner.node, True
    fuse = _INT8_FUSIONS.get(node.op_type)
    if fuse is None:
        return None
    return fuse(c, node, quantize, out, scale, zero_point, relu)


def _int8_weight(c: _Converter, node: onnx.NodeProto, weight: _QConst, layout_axes: tuple[int, ...] | None,
                 out: str) -> tuple[str, np.ndarray]:
    """Emit the Int8GivenTensorFill of a quantized weight; returns its blob and the per-output-channel scales the
    arithmetic will use (one repeated value in per-tensor mode)."""
    channels = weight.values.shape[weight.axis if weight.scale.size > 1 else 0]
    real = weight.real().astype(np.float64)
    arguments: dict[str, Any] = {}
    if weight.scale.size > 1 and c.weight_scales == "per-tensor":
        scale = float(np.max(weight.scale))
        codes = np.clip(np.round(real / scale), -127, 127).astype(np.int16)
        zero_point = 0
        error = np.abs(real - codes * scale)
        per_channel = np.moveaxis(error, weight.axis, 0).reshape(channels, -1).max(axis=1)
        largest = np.moveaxis(np.abs(real), weight.axis, 0).reshape(channels, -1).max(axis=1)
        relative = np.where(largest > 0, per_channel / np.where(largest > 0, largest, 1.0), 0.0)
        c.requantized.append(WeightRequantization(node.name or out, channels, float(error.max()),
                                                  float(np.abs(real).max()), float(relative.max())))
        scales = np.full(channels, scale)
    else:
        codes = weight.values.astype(np.int16)
        zero_point = int(weight.zero_point.reshape(-1)[0])
        if weight.zero_point.size > 1 and np.any(weight.zero_point != zero_point):
            raise ConversionError(f"{_describe(node)}: per-channel weight zero points differ; Caffe2 has one")
        scales = np.broadcast_to(weight.scale.astype(np.float64).reshape(-1), (channels,)).copy()
        scale = float(scales[0])
        if weight.scale.size > 1:
            arguments["Y_scales"] = scales.tolist()
    if weight.values.dtype == np.int8 or (zero_point == 0 and codes.min() < 0):
        codes, zero_point = codes + 128, zero_point + 128  # Caffe2 stores int8 weights as uint8 with an offset
    if layout_axes is not None:
        codes = codes.transpose(layout_axes)
    name = c.blob(out, "_w")
    c.init_ops.append(make_op("Int8GivenTensorFill", [], [name], shape=list(codes.shape),
                              values=codes.astype(np.uint8).tobytes(), Y_scale=scale, Y_zero_point=zero_point,
                              **arguments))
    return name, scales


def _int8_bias(c: _Converter, node: onnx.NodeProto, bias_name: str | None, x: _Int8, weight_scales: np.ndarray,
               out: str) -> str:
    """int32 bias at scale x_scale * w_scale (per channel with Y_scales in per-channel mode)."""
    scales = x.scale * weight_scales
    if bias_name:
        bias = c.get(bias_name)
        if isinstance(bias, _QConst) and bias.scale.size == scales.size and np.allclose(bias.scale, scales,
                                                                                          rtol=1e-6, atol=0):
            codes = bias.values.astype(np.int64) - bias.zero_point.astype(np.int64)
        else:
            codes = np.round(c.const_array(bias_name, node).reshape(-1).astype(np.float64) / scales).astype(np.int64)
    else:
        codes = np.zeros(scales.size, np.int64)
    if np.any(np.abs(codes) > np.iinfo(np.int32).max):
        raise ConversionError(f"{_describe(node)}: a bias overflows int32 at scale x_scale * w_scale")
    arguments = {"Y_scales": scales.tolist()} if np.any(scales != scales[0]) else {}
    name = c.blob(out, "_b")
    c.init_ops.append(make_op("Int8GivenIntTensorFill", [], [name], shape=[scales.size],
                              values=codes.astype(np.int32).tolist(), Y_scale=float(scales[0]), Y_zero_point=0,
                              **arguments))
    return name


def _fuse_conv(c: _Converter, node: onnx.NodeProto, quantize: onnx.NodeProto, out: str, scale: float,
               zero_point: int, relu: bool) -> _Int8 | None:
    x = _dequantized_input(c, node.input[0])
    weight = c.get(node.input[1])
    if x is None or not isinstance(weight, _QConst):
        return None
    attrs = _attributes(node)
    transposed = node.op_type == "ConvTranspose"
    if transposed and (relu or int(attrs.get("group", 1)) != 1 or "output_shape" in attrs
                       or list(attrs.get("dilations", [1, 1])) != [1, 1]):
        return None  # QNNPACK's deconvolution: one group, no dilation, no fused ReLU
    if transposed and weight.scale.size > 1 and c.weight_scales == "per-channel":
        raise ConversionError(f"{_describe(node)}: per-channel scales on a transposed conv's weights have no Int8 "
                              "form here; use weight_scales='per-tensor'")
    # ONNX weights: Conv (M, C/g, kH, kW) -> OHWI; ConvTranspose (C_in, C_out, kH, kW) -> (C_in, kH, kW, C_out).
    w_blob, w_scales = _int8_weight(c, node, weight, _TO_NHWC, quantize.output[0])
    bias = node.input[2] if len(node.input) > 2 else None
    channels = weight.values.shape[1] if transposed else weight.values.shape[0]
    w_scales = np.broadcast_to(w_scales[:1], (channels,)).copy() if transposed else w_scales
    b_blob = _int8_bias(c, node, bias, x, w_scales, quantize.output[0])
    arguments = _window_arguments(node, list(weight.values.shape[2:]))
    if transposed:
        arguments["adjs"] = list(attrs.get("output_padding", [0, 0]))
        op_type = "Int8ConvTranspose"
    else:
        arguments.update(dilations=list(attrs.get("dilations", [1, 1])), group=int(attrs.get("group", 1)))
        op_type = "Int8ConvRelu" if relu else "Int8Conv"
    c.emit(op_type, [x.blob, w_blob, b_blob], [out], node, **arguments, order=NHWC, Y_scale=scale,
           Y_zero_point=zero_point)
    return _Int8(out, scale, zero_point, NHWC)


def _fuse_gemm(c: _Converter, node: onnx.NodeProto, quantize: onnx.NodeProto, out: str, scale: float,
               zero_point: int, relu: bool) -> _Int8 | None:
    x = _dequantized_input(c, node.input[0])
    weight, _ = _gemm_weights(c, node)
    if x is None or relu or not isinstance(weight, _QConst) or not _attributes(node).get("transB", 0):
        return None
    if x.flattened_chw is not None:
        # The input was flattened from NHWC, (h, w, c) order: reorder the weight columns to match.
        channels, height, width = x.flattened_chw
        n = weight.values.shape[0]
        reordered = weight.values.reshape(n, channels, height, width).transpose(0, 2, 3, 1).reshape(n, -1)
        weight = _QConst(reordered, weight.scale, weight.zero_point, weight.axis)
    w_blob, w_scales = _int8_weight(c, node, weight, None, quantize.output[0])
    bias = node.input[2] if len(node.input) > 2 else None
    b_blob = _int8_bias(c, node, bias, x, w_scales, quantize.output[0])
    c.emit("Int8FC", [x.blob, w_blob, b_blob], [out], node, Y_scale=scale, Y_zero_point=zero_point)
    return _Int8(out, scale, zero_point, None)


def _fuse_add(c: _Converter, node: onnx.NodeProto, quantize: onnx.NodeProto, out: str, scale: float,
              zero_point: int, relu: bool) -> _Int8 | None:
    a, b = (_dequantized_input(c, name) for name in node.input)
    if a is None or b is None or c.shape(node.input[0]) != c.shape(node.input[1]) or a.layout != b.layout:
        return None  # Int8Add has no broadcasting
    c.emit("Int8AddRelu" if relu else "Int8Add", [a.blob, b.blob], [out], node, Y_scale=scale,
           Y_zero_point=zero_point)
    return _Int8(out, scale, zero_point, a.layout)


def _fuse_concat(c: _Converter, node: onnx.NodeProto, quantize: onnx.NodeProto, out: str, scale: float,
                 zero_point: int, relu: bool) -> _Int8 | None:
    sources = [_dequantized_input(c, name) for name in node.input]
    if relu or any(s is None for s in sources) or len({s.layout for s in sources}) != 1:  # type: ignore[union-attr]
        return None
    blobs = []
    for k, source in enumerate(sources):
        assert source is not None
        if np.float32(source.scale) == np.float32(scale) and source.zero_point == zero_point:
            blobs.append(source.blob)
            continue
        # Int8Concat copies bytes: an input at other quantization parameters is requantized to the output's.
        requantized = f"{out}_input{k}_requantized"
        c.emit("Int8Quantize", [c.float_blob(node.input[k], source.layout)], [requantized], node, Y_scale=scale,
               Y_zero_point=zero_point)
        blobs.append(requantized)
    axis = int(_attributes(node)["axis"])
    rank = c.rank(node.input[0])
    axis = axis + rank if axis < 0 else axis
    layout = sources[0].layout  # type: ignore[union-attr]
    c.emit("Int8Concat", blobs, [out, f"{out}_split_info"], node, axis=_AXIS_IN_NHWC[axis] if layout == NHWC
           else axis, Y_scale=scale, Y_zero_point=zero_point)
    return _Int8(out, scale, zero_point, layout)


def _same_quantization(x: _Int8, scale: float, zero_point: int) -> bool:
    return bool(np.float32(x.scale) == np.float32(scale) and x.zero_point == zero_point)


def _fuse_max_pool(c: _Converter, node: onnx.NodeProto, quantize: onnx.NodeProto, out: str, scale: float,
                   zero_point: int, relu: bool) -> _Int8 | None:
    x = _dequantized_input(c, node.input[0])
    if x is None or relu or x.layout != NHWC or not _same_quantization(x, scale, zero_point):
        return None
    arguments = _pool_arguments(node)
    if arguments["kernels"] == [1, 1] and not CAFFE2_INT8.pools_1x1:
        return _subsampling_conv(c, node, x, out, arguments) if not any(arguments["pads"]) else None
    c.emit("Int8MaxPool", [x.blob], [out], node, **arguments, order=NHWC, Y_scale=scale, Y_zero_point=zero_point)
    return _Int8(out, scale, zero_point, NHWC)


def _subsampling_conv(c: _Converter, node: onnx.NodeProto, x: _Int8, out: str, arguments: dict[str, Any]) -> _Int8:
    """A 1x1 max pool (strided: the BiFPN's P6 subsampling) as a depthwise 1x1 Int8Conv with identity weights.

    QNNPACK refuses 1x1 pooling, so Caffe2 mobile could not create Int8MaxPool here. The conv is exact: weight code 2
    at scale 0.5 (QNNPACK needs a requantization scale below 1: here s_x * 0.5 / s_x = 0.5), zero bias, the input's
    scale and zero point out, so every output code is (x - z) * 2 * 0.5 + z = x.
    """
    channels = c.shape(node.input[0])[1]
    weight = c.blob(out, "_w")
    c.init_ops.append(make_op("Int8GivenTensorFill", [], [weight], shape=[channels, 1, 1, 1],
                              values=np.full(channels, 128 + 2, np.uint8).tobytes(), Y_scale=0.5, Y_zero_point=128))
    bias = c.blob(out, "_b")
    c.init_ops.append(make_op("Int8GivenIntTensorFill", [], [bias], shape=[channels], values=[0] * channels,
                              Y_scale=x.scale * 0.5, Y_zero_point=0))
    c.emit("Int8Conv", [x.blob, weight, bias], [out], node, kernels=[1, 1], strides=arguments["strides"],
           pads=arguments["pads"], dilations=[1, 1], group=channels, order=NHWC, Y_scale=x.scale,
           Y_zero_point=x.zero_point)
    return _Int8(out, x.scale, x.zero_point, NHWC)


def _fuse_global_average_pool(c: _Converter, node: onnx.NodeProto, quantize: onnx.NodeProto, out: str,
                              scale: float, zero_point: int, relu: bool) -> _Int8 | None:
    x = _dequantized_input(c, node.input[0])
    if x is None or relu or x.layout != NHWC:
        return None
    c.emit("Int8AveragePool", [x.blob], [out], node, global_pooling=1, order=NHWC, Y_scale=scale,
           Y_zero_point=zero_point)
    return _Int8(out, scale, zero_point, NHWC)


def _fuse_resize(c: _Converter, node: onnx.NodeProto, quantize: onnx.NodeProto, out: str, scale: float,
                 zero_point: int, relu: bool) -> _Int8 | None:
    x = _dequantized_input(c, node.input[0])
    if x is None or relu or x.layout != NHWC or not _same_quantization(x, scale, zero_point):
        return None
    height_scale, width_scale = c.resize_scales(node)
    c.emit("Int8ResizeNearest", [x.blob], [out], node, height_scale=height_scale, width_scale=width_scale,
           order=NHWC, Y_scale=scale, Y_zero_point=zero_point)
    return _Int8(out, scale, zero_point, NHWC)


def _fuse_flatten(c: _Converter, node: onnx.NodeProto, quantize: onnx.NodeProto, out: str, scale: float,
                  zero_point: int, relu: bool) -> _Int8 | None:
    x = _dequantized_input(c, node.input[0])
    axis = int(_attributes(node).get("axis", 1))
    if x is None or relu or axis != 1 or not _same_quantization(x, scale, zero_point):
        return None
    flattened = None
    if x.layout == NHWC:
        _, channels, height, width = c.shape(node.input[0])
        flattened = (channels, height, width)
    c.emit("Int8Flatten", [x.blob], [out], node, axis=1, Y_scale=scale, Y_zero_point=zero_point)
    return _Int8(out, scale, zero_point, None, flattened)


_INT8_FUSIONS = {
    "Conv": _fuse_conv, "ConvTranspose": _fuse_conv, "Gemm": _fuse_gemm, "Add": _fuse_add, "Concat": _fuse_concat,
    "MaxPool": _fuse_max_pool, "GlobalAveragePool": _fuse_global_average_pool, "Resize": _fuse_resize,
    "Flatten": _fuse_flatten,
}


def convert_onnx(model: onnx.ModelProto, inputs: Mapping[str, tuple[str, str | None]],
                 outputs: Mapping[str, tuple[str, str | None]], probe_feeds: list[Mapping[str, np.ndarray]],
                 prefix: str = "", weight_scales: str = "per-tensor") -> ConvertedNet:
    """Convert ``model`` to Caffe2 ops.

    ``inputs``: ONNX input name -> (Caffe2 blob, layout of the float blob: "NCHW", "NHWC" or None);
    ``outputs``: ONNX output name -> (Caffe2 blob, layout wanted); ``probe_feeds``: at least one feed for ONNX
    Runtime (two of different sizes where Resize scales must be checked to be input-independent); ``prefix``
    makes the blob names of this graph unique in a net that holds several.
    """
    if not probe_feeds:
        raise ValueError("convert_onnx needs at least one probe feed")
    shapes = probe_shapes(model, probe_feeds)
    converter = _Converter(model, prefix, shapes, weight_scales)
    return converter.convert(model.graph, inputs, outputs)
