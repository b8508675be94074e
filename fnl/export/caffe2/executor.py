"""A reference executor for Caffe2 NetDefs: runs an init net and a predict net in Python, operator by operator.

It is a checker, not a device runtime: it exists so that the files ``fnl.export.caffe2`` writes can be executed and
compared with ONNX Runtime and PyTorch on a machine where no Caffe2 runtime exists. It implements exactly the
operators the writer emits, each from its Caffe2 definition (``caffe2/operators/*.cc`` / ``quantized/int8_*.h`` as
PyTorch 1.x shipped them): argument names, defaults, layouts (the ``Int8*`` operators are NHWC, as QNNPACK's are)
and the detection operators' conventions (``legacy_plus_one``, the centre filter of GenerateProposals, NaN
suppression in greedy NMS, BoxWithNMSLimit's class columns). PyTorch / torchvision compute inside an operator
where that computes the same thing. Its speed says nothing about a device's.

Where Caffe2 leaves a result to implementation details, this executor fixes one and says so:
- score ties in GenerateProposals / BoxWithNMSLimit are broken by index (Caffe2's ``std::sort`` is not stable);
- int8 requantization (Int8Conv, Int8FC, Int8ConvTranspose, Int8Add, Int8AveragePool) multiplies the int32
  accumulator by the requantization scale (computed in float32, as QNNPACK computes it) in float64 and rounds half
  away from zero, which is what QNNPACK's fixed-point requantization computes up to its last bit: a device can
  differ by one quantization step on a tie; fbgemm and ONNX Runtime, which multiply in float32, differ from it on
  about one value in 10^5 per layer;
- an ``Int8GivenTensorFill`` / ``Int8GivenIntTensorFill`` carrying ``Y_scales`` (one scale per output channel, an
  fnl extension the writer emits only when asked for per-channel weights) is honoured; stock Caffe2 reads
  ``Y_scale`` only.

An operator it does not implement is refused before anything runs, with its type and position in the net.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf.message import Message
from torch.nn import functional as F
from torchvision.ops import roi_align

from fnl.export.caffe2.proto import Caffe2ModelError, arguments_of, load_netdef


class UnsupportedOperatorError(Caffe2ModelError):
    """A net holds an operator this executor does not implement."""


class Caffe2ExecutionError(RuntimeError):
    """An operator failed; the message names the net, the operator's position and type."""


@dataclass
class Int8Tensor:
    """Caffe2's Int8TensorCPU: the integers (uint8 activations and weights, int32 biases), scale and zero point.
    ``channel_scales`` is the fnl per-output-channel extension (see the module docstring)."""

    data: torch.Tensor
    scale: float
    zero_point: int
    channel_scales: torch.Tensor | None = None

    def scales(self, channels: int) -> torch.Tensor:
        """One float64 scale per output channel."""
        if self.channel_scales is not None:
            if self.channel_scales.numel() != channels:
                raise ValueError(f"{self.channel_scales.numel()} per-channel scales for {channels} channels")
            return self.channel_scales.to(torch.float64)
        return torch.full((channels,), self.scale, dtype=torch.float64)


Blob = torch.Tensor | Int8Tensor


class Args:
    """Typed access to an operator's arguments, with Caffe2's defaults supplied by each operator."""

    def __init__(self, op: Message) -> None:
        self._args = arguments_of(op)

    def __contains__(self, name: str) -> bool:
        return name in self._args

    def _get(self, name: str, default: Any, field: str) -> Any:
        arg = self._args.get(name)
        if arg is None:
            if default is _REQUIRED:
                raise ValueError(f"argument '{name}' is required")
            return default
        if field in ("floats", "ints", "strings"):
            return list(getattr(arg, field))
        if not arg.HasField(field):
            raise ValueError(f"argument '{name}' holds no '{field}' value")
        return getattr(arg, field)

    def int(self, name: str, default: Any = None) -> int:
        value = self._get(name, _REQUIRED if default is None else default, "i")
        return int(value)

    def float(self, name: str, default: Any = None) -> float:
        arg = self._args.get(name)
        if arg is not None and not arg.HasField("f") and arg.HasField("i"):
            return float(arg.i)  # Caffe2 reads an integer argument as a float where a float is asked for
        return float(self._get(name, _REQUIRED if default is None else default, "f"))

    def bool(self, name: str, default: bool) -> bool:
        return bool(self.int(name, int(default)))

    def ints(self, name: str, default: list[int] | None = None) -> list[int]:
        return [int(v) for v in self._get(name, _REQUIRED if default is None else default, "ints")]

    def floats(self, name: str, default: list[float] | None = None) -> list[float]:
        return [float(v) for v in self._get(name, _REQUIRED if default is None else default, "floats")]

    def str(self, name: str, default: str | None = None) -> str:
        value = self._get(name, _REQUIRED if default is None else default, "s")
        return value.decode("utf-8") if isinstance(value, bytes) else value

    def bytes(self, name: str) -> bytes:
        return self._get(name, _REQUIRED, "s")


_REQUIRED = object()
OpFn = Callable[[list[Blob], Args], list[Blob]]
_OPS: dict[str, OpFn] = {}


def _register(*names: str) -> Callable[[OpFn], OpFn]:
    def decorate(fn: OpFn) -> OpFn:
        for name in names:
            _OPS[name] = fn
        return fn

    return decorate


def implemented_operators() -> list[str]:
    return sorted(_OPS)


# --- fills (init net) ------------------------------------------------------------------------------------------
@_register("GivenTensorFill")
def _given_tensor_fill(_: list[Blob], args: Args) -> list[Blob]:
    return [torch.tensor(args.floats("values"), dtype=torch.float32).reshape(args.ints("shape"))]


@_register("GivenTensorIntFill")
def _given_tensor_int_fill(_: list[Blob], args: Args) -> list[Blob]:
    return [torch.tensor(args.ints("values"), dtype=torch.int32).reshape(args.ints("shape"))]


@_register("GivenTensorInt64Fill")
def _given_tensor_int64_fill(_: list[Blob], args: Args) -> list[Blob]:
    return [torch.tensor(args.ints("values"), dtype=torch.int64).reshape(args.ints("shape"))]


def _channel_scales(args: Args) -> torch.Tensor | None:
    return torch.tensor(args.floats("Y_scales"), dtype=torch.float64) if "Y_scales" in args else None


@_register("Int8GivenTensorFill")
def _int8_given_tensor_fill(_: list[Blob], args: Args) -> list[Blob]:
    values = np.frombuffer(args.bytes("values"), dtype=np.uint8).copy()
    data = torch.from_numpy(values).reshape(args.ints("shape"))
    return [Int8Tensor(data, args.float("Y_scale", 1.0), args.int("Y_zero_point", 0), _channel_scales(args))]


@_register("Int8GivenIntTensorFill")
def _int8_given_int_tensor_fill(_: list[Blob], args: Args) -> list[Blob]:
    data = torch.tensor(args.ints("values"), dtype=torch.int32).reshape(args.ints("shape"))
    return [Int8Tensor(data, args.float("Y_scale", 1.0), args.int("Y_zero_point", 0), _channel_scales(args))]


# --- shared helpers --------------------------------------------------------------------------------------------
def _float(blob: Blob, what: str = "input") -> torch.Tensor:
    if isinstance(blob, Int8Tensor) or not blob.is_floating_point():
        raise TypeError(f"{what} must be a float tensor, got {_describe(blob)}")
    return blob


def _int8(blob: Blob, what: str = "input") -> Int8Tensor:
    if not isinstance(blob, Int8Tensor):
        raise TypeError(f"{what} must be an Int8 tensor (Int8TensorCPU), got {_describe(blob)}")
    return blob


def _describe(blob: Blob) -> str:
    if isinstance(blob, Int8Tensor):
        return f"Int8Tensor {tuple(blob.data.shape)} {blob.data.dtype}"
    return f"tensor {tuple(blob.shape)} {blob.dtype}"


def _order(args: Args) -> str:
    order = args.str("order", "NCHW")
    if order not in ("NCHW", "NHWC"):
        raise ValueError(f"order must be NCHW or NHWC, got '{order}'")
    return order


def _to_nchw(x: torch.Tensor, order: str) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if order == "NHWC" else x


def _from_nchw(x: torch.Tensor, order: str) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous() if order == "NHWC" else x.contiguous()


@dataclass
class _Window:
    """ConvPoolOpBase's 2D geometry: kernel, stride, pads [t, l, b, r], dilation, group."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilation: tuple[int, int]
    group: int

    @classmethod
    def from_args(cls, args: Args, kernel_from: tuple[int, int] | None = None) -> _Window:
        def pair(plural: str, singular: str, default: int) -> tuple[int, int]:
            if plural in args:
                values = args.ints(plural)
                if len(values) != 2:
                    raise ValueError(f"'{plural}' must hold 2 values for a 2D operator, got {values}")
                return values[0], values[1]
            value = args.int(singular, default)
            return value, value

        kernel = kernel_from if kernel_from is not None else pair("kernels", "kernel", 0)
        if "pads" in args:
            pads = tuple(args.ints("pads"))
            if len(pads) != 4:
                raise ValueError(f"'pads' must hold 4 values [t, l, b, r], got {list(pads)}")
        else:
            pads = (args.int("pad", 0),) * 4
        return cls(kernel, pair("strides", "stride", 1), pads, pair("dilations", "dilation", 1),  # type: ignore[arg-type]
                   args.int("group", 1))

    def pad(self, x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """x (NCHW) padded by [t, l, b, r] explicitly (torch's own padding is symmetric only)."""
        t, left, b, r = self.pads
        return F.pad(x, (left, r, t, b), value=value) if any(self.pads) else x


def _kernel_of(weight_shape: tuple[int, ...], order: str) -> tuple[int, int]:
    return (weight_shape[2], weight_shape[3]) if order == "NCHW" else (weight_shape[1], weight_shape[2])


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def _requantize(steps: torch.Tensor, zero_point: int, floor: int = 0) -> torch.Tensor:
    """Values already divided by the output scale (float64) -> uint8 codes, clamped to [floor, 255] (the floor is
    the ReLU limit of the fused-ReLU operators, 0 otherwise)."""
    return (_round_half_away(steps) + zero_point).clamp(floor, 255).to(torch.uint8)


def _requantization_scales(x_scale: float, w_scales: torch.Tensor, y_scale: float) -> torch.Tensor:
    """QNNPACK's convolution / FC scale ``input_scale * kernel_scale / output_scale``, computed in float32 as it is
    there (per output channel), returned as float64 for the product with the int32 accumulators."""
    scales = (np.float32(x_scale) * w_scales.numpy().astype(np.float32)) / np.float32(y_scale)
    return torch.from_numpy(scales.astype(np.float32)).to(torch.float64)


def _relu_floor(relu: bool, scale: float, zero_point: int) -> int:
    """activationLimits: a fused ReLU clamps at the code of 0.0."""
    return _quantize_value(0.0, scale, zero_point) if relu else 0


def _quantize_value(value: float, scale: float, zero_point: int) -> int:
    """Caffe2's QuantizeUint8 for one value (activationLimits uses it for the ReLU floor)."""
    return int(min(max(zero_point + round(np.float32(value) / np.float32(scale)), 0), 255))


def _output_args(args: Args) -> tuple[float, int]:
    return args.float("Y_scale", 1.0), args.int("Y_zero_point", 0)


def _check_same_quantization(x: Int8Tensor, args: Args, op: str) -> None:
    """Operators that move bytes without requantizing (max-pool, resize, flatten, concat) CHECK that Y_scale and
    Y_zero_point equal the input's."""
    scale, zero_point = _output_args(args)
    if not (np.float32(scale) == np.float32(x.scale) and zero_point == x.zero_point):
        raise ValueError(f"{op} does not requantize: Y_scale/Y_zero_point ({scale}, {zero_point}) must equal the "
                         f"input's ({x.scale}, {x.zero_point})")


# --- float operators -------------------------------------------------------------------------------------------
@_register("Conv")
def _conv(inputs: list[Blob], args: Args) -> list[Blob]:
    order = _order(args)
    x, w = _to_nchw(_float(inputs[0]), order), _float(inputs[1], "filter")
    weight = w.permute(0, 3, 1, 2) if order == "NHWC" else w
    window = _Window.from_args(args, _kernel_of(tuple(w.shape), order))
    bias = _float(inputs[2], "bias") if len(inputs) > 2 else None
    y = F.conv2d(window.pad(x), weight, bias, window.stride, 0, window.dilation, window.group)
    return [_from_nchw(y, order)]


@_register("ConvTranspose")
def _conv_transpose(inputs: list[Blob], args: Args) -> list[Blob]:
    order = _order(args)
    x, w = _to_nchw(_float(inputs[0]), order), _float(inputs[1], "filter")
    weight = w.permute(0, 3, 1, 2) if order == "NHWC" else w  # (C_in, C_out/group, kH, kW)
    window = _Window.from_args(args, _kernel_of(tuple(w.shape), order))
    adj = tuple(args.ints("adjs", [0, 0])) if "adjs" in args else (args.int("adj", 0),) * 2
    bias = _float(inputs[2], "bias") if len(inputs) > 2 else None
    y = F.conv_transpose2d(x, weight, bias, window.stride, 0, adj, window.group)
    t, left, b, r = window.pads  # output = (H - 1) * stride - pad_t - pad_b + kernel + adj
    y = y[:, :, t:y.shape[2] - b, left:y.shape[3] - r]
    return [_from_nchw(y, order)]


@_register("FC")
def _fc(inputs: list[Blob], args: Args) -> list[Blob]:
    x, w, b = _float(inputs[0]), _float(inputs[1], "weight"), _float(inputs[2], "bias")
    axis, axis_w = args.int("axis", 1), args.int("axis_w", 1)
    x2 = x.reshape(math.prod(x.shape[:axis]), -1)
    w2 = w.reshape(math.prod(w.shape[:axis_w]), -1)
    return [x2 @ w2.t() + b]


@_register("Relu")
def _relu(inputs: list[Blob], _: Args) -> list[Blob]:
    return [torch.relu(_float(inputs[0]))]


@_register("Sigmoid")
def _sigmoid(inputs: list[Blob], _: Args) -> list[Blob]:
    return [torch.sigmoid(_float(inputs[0]))]


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    def run(inputs: list[Blob], args: Args) -> list[Blob]:
        a, b = _float(inputs[0], "A"), _float(inputs[1], "B")
        if args.bool("broadcast", False):
            # Legacy broadcast: B's shape is a contiguous run of A's dimensions starting at ``axis``.
            axis = args.int("axis", a.dim() - b.dim())
            b = b.reshape(*b.shape, *([1] * (a.dim() - axis - b.dim())))
        return [fn(a, b)]

    return run


_register("Add")(_binary(torch.add))
_register("Sub")(_binary(torch.sub))
_register("Mul")(_binary(torch.mul))
_register("Div")(_binary(torch.div))


@_register("Scale")
def _scale(inputs: list[Blob], args: Args) -> list[Blob]:
    return [_float(inputs[0]) * np.float32(args.float("scale", 1.0)).item()]


def _concat_axis(args: Args, rank: int) -> int:
    """ConcatOp: ``axis`` when given, else the channel axis of ``order`` (NCHW: 1, NHWC: 3); never both."""
    if "axis" in args:
        if "order" in args:
            raise ValueError("give either 'axis' or 'order' to Concat, not both")
        axis = args.int("axis")
    else:
        axis = 3 if _order(args) == "NHWC" else 1
    return axis + rank if axis < 0 else axis


@_register("Concat")
def _concat(inputs: list[Blob], args: Args) -> list[Blob]:
    tensors = [_float(t, f"input {k}") for k, t in enumerate(inputs)]
    if args.bool("add_axis", False):
        raise ValueError("add_axis=1 is not used by fnl's nets")
    axis = _concat_axis(args, tensors[0].dim())
    split = torch.tensor([t.shape[axis] for t in tensors], dtype=torch.int32)
    return [torch.cat(tensors, dim=axis), split]


def _pool(x: torch.Tensor, args: Args, order: str, kind: str) -> torch.Tensor:
    """MaxPool / AveragePool on NCHW float: padding never counts (Caffe2's max ignores it; average pooling is
    only emitted without padding)."""
    if args.bool("global_pooling", False):
        kernel = (x.shape[2], x.shape[3])
        window = _Window(kernel, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    else:
        window = _Window.from_args(args)
    if window.dilation != (1, 1):
        raise ValueError(f"pooling with dilations {window.dilation} is not supported")
    if kind == "max":
        return F.max_pool2d(window.pad(x, -math.inf), window.kernel, window.stride)
    if any(window.pads):
        raise ValueError("average pooling with padding is not emitted by fnl and not implemented here")
    return F.avg_pool2d(x, window.kernel, window.stride)


@_register("MaxPool")
def _max_pool(inputs: list[Blob], args: Args) -> list[Blob]:
    order = _order(args)
    return [_from_nchw(_pool(_to_nchw(_float(inputs[0]), order), args, order, "max"), order)]


@_register("AveragePool")
def _average_pool(inputs: list[Blob], args: Args) -> list[Blob]:
    order = _order(args)
    return [_from_nchw(_pool(_to_nchw(_float(inputs[0]), order), args, order, "average"), order)]


def _nearest_indices(size: int, scale: float) -> tuple[int, torch.Tensor]:
    """ResizeNearest's output size ``int(size * scale)`` and source index ``min(int(i / scale), size - 1)``,
    computed in float32 as the C++ operator computes them."""
    out = int(np.float32(size) * np.float32(scale))
    source = np.floor(np.arange(out, dtype=np.float32) / np.float32(scale)).astype(np.int64)
    return out, torch.from_numpy(np.minimum(source, size - 1))


def _resize_nearest(x: torch.Tensor, args: Args, layout: str) -> torch.Tensor:
    height_scale, width_scale = args.float("height_scale", 1.0), args.float("width_scale", 1.0)
    if height_scale <= 0 or width_scale <= 0:
        raise ValueError(f"scales must be positive, got height {height_scale}, width {width_scale}")
    h_axis, w_axis = (2, 3) if layout == "NCHW" else (1, 2)
    _, rows = _nearest_indices(x.shape[h_axis], height_scale)
    _, cols = _nearest_indices(x.shape[w_axis], width_scale)
    return x.index_select(h_axis, rows).index_select(w_axis, cols)


@_register("ResizeNearest")
def _resize_nearest_op(inputs: list[Blob], args: Args) -> list[Blob]:
    if len(inputs) > 1:
        raise ValueError("the two-input form (scales as a tensor) is not emitted by fnl and not implemented here")
    return [_resize_nearest(_float(inputs[0]), args, _order(args))]


@_register("Flatten")
def _flatten(inputs: list[Blob], args: Args) -> list[Blob]:
    x = _float(inputs[0])
    axis = args.int("axis", 1)
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


@_register("Reshape")
def _reshape(inputs: list[Blob], args: Args) -> list[Blob]:
    if len(inputs) > 1:
        raise ValueError("the two-input form (shape as a tensor) is not emitted by fnl and not implemented here")
    x = _float(inputs[0])
    # Caffe2: 0 copies the input's dimension, -1 is inferred; the second output is the old shape.
    shape = [x.shape[i] if size == 0 else size for i, size in enumerate(args.ints("shape"))]
    return [x.reshape(shape), torch.tensor(x.shape, dtype=torch.int64)]


@_register("Transpose")
def _transpose(inputs: list[Blob], args: Args) -> list[Blob]:
    x = _float(inputs[0])
    return [x.permute(args.ints("axes", list(range(x.dim()))[::-1])).contiguous()]


@_register("Slice")
def _slice(inputs: list[Blob], args: Args) -> list[Blob]:
    if len(inputs) > 1:
        raise ValueError("the three-input form (bounds as tensors) is not emitted by fnl and not implemented here")
    x = _float(inputs[0])
    starts, ends = args.ints("starts"), args.ints("ends")
    if len(starts) != len(ends) or len(starts) > x.dim():
        raise ValueError(f"starts {starts} and ends {ends} must be as long as each other and at most rank {x.dim()}")
    # Caffe2's SliceImpl: a negative bound counts from one past the end (-1 is the end itself).
    index = tuple(slice(start + size + 1 if start < 0 else start, end + size + 1 if end < 0 else end)
                  for start, end, size in zip(starts, ends, x.shape, strict=False))
    return [x[index].contiguous()]


@_register("Softmax")
def _softmax(inputs: list[Blob], args: Args) -> list[Blob]:
    x = _float(inputs[0])
    axis = args.int("axis", 1)
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return [torch.softmax(flat, dim=1).reshape(x.shape)]


@_register("Copy")
def _copy(inputs: list[Blob], _: Args) -> list[Blob]:
    x = inputs[0]
    return [Int8Tensor(x.data.clone(), x.scale, x.zero_point, x.channel_scales) if isinstance(x, Int8Tensor)
            else x.clone()]


@_register("NCHW2NHWC")
def _nchw2nhwc(inputs: list[Blob], _: Args) -> list[Blob]:
    return [_float(inputs[0]).permute(0, 2, 3, 1).contiguous()]


@_register("NHWC2NCHW")
def _nhwc2nchw(inputs: list[Blob], _: Args) -> list[Blob]:
    return [_float(inputs[0]).permute(0, 3, 1, 2).contiguous()]


# --- detection operators ---------------------------------------------------------------------------------------
BBOX_XFORM_CLIP = float(np.float32(math.log(1000.0 / 16.0)))


def _bbox_transform(boxes: torch.Tensor, deltas: torch.Tensor, weights: list[float], legacy_plus_one: bool
                    ) -> torch.Tensor:
    """utils::bbox_transform_upright in float32."""
    one = float(legacy_plus_one)
    widths = boxes[:, 2] - boxes[:, 0] + one
    heights = boxes[:, 3] - boxes[:, 1] + one
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = (np.float32(w).item() for w in weights)
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = torch.clamp(deltas[:, 2] / ww, max=BBOX_XFORM_CLIP)
    dh = torch.clamp(deltas[:, 3] / wh, max=BBOX_XFORM_CLIP)
    pred_ctr_x, pred_ctr_y = dx * widths + ctr_x, dy * heights + ctr_y
    pred_w, pred_h = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w - one, pred_ctr_y + 0.5 * pred_h - one], dim=1)


def _clip_boxes(boxes: torch.Tensor, height: int, width: int, legacy_plus_one: bool) -> torch.Tensor:
    one = int(legacy_plus_one)
    x = boxes[:, 0::2].clamp(max=width - one).clamp(min=0)
    y = boxes[:, 1::2].clamp(max=height - one).clamp(min=0)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def _nms(boxes: torch.Tensor, order: torch.Tensor, threshold: float, top_n: int, legacy_plus_one: bool
         ) -> torch.Tensor:
    """utils::nms_cpu_upright: greedy over ``order`` (indices by decreasing score); a box is kept against the one
    just selected when IoU <= threshold, so a NaN IoU (two empty boxes) suppresses."""
    one = float(legacy_plus_one)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    keep: list[int] = []
    remaining = order
    while remaining.numel() > 0:
        if 0 <= top_n <= len(keep):
            break
        i = int(remaining[0])
        keep.append(i)
        rest = remaining[1:]
        w = (torch.minimum(x2[rest], x2[i]) - torch.maximum(x1[rest], x1[i]) + one).clamp(min=0)
        h = (torch.minimum(y2[rest], y2[i]) - torch.maximum(y1[rest], y1[i]) + one).clamp(min=0)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        remaining = rest[overlap <= threshold]
    return torch.tensor(keep, dtype=torch.int64)


def _sorted_by_score(scores: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
    """Indices by decreasing score, ties by index (Caffe2's std::sort leaves tie order unspecified)."""
    if indices is None:
        indices = torch.arange(scores.numel())
    order = torch.sort(scores[indices], descending=True, stable=True).indices
    return indices[order]


@_register("GenerateProposals")
def _generate_proposals(inputs: list[Blob], args: Args) -> list[Blob]:
    scores, deltas, im_info, anchors = (_float(t, name) for t, name in
                                        zip(inputs, ("scores", "bbox_deltas", "im_info", "anchors"), strict=True))
    if anchors.shape[1] != 4:
        raise ValueError("rotated proposals (5-column anchors) are not implemented")
    num_images, num_anchors, height, width = scores.shape
    if tuple(deltas.shape) != (num_images, 4 * num_anchors, height, width):
        raise ValueError(f"bbox_deltas {tuple(deltas.shape)} do not match scores {tuple(scores.shape)}")
    feat_stride = float(np.float32(1.0) / np.float32(args.float("spatial_scale", 1.0 / 16)))
    pre_n, post_n = args.int("pre_nms_topN", 6000), args.int("post_nms_topN", 300)
    threshold, min_size = args.float("nms_thresh", 0.7), args.float("min_size", 16.0)
    legacy = args.bool("legacy_plus_one", True)
    shift_x = torch.arange(width, dtype=torch.float32) * feat_stride
    shift_y = torch.arange(height, dtype=torch.float32) * feat_stride
    sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack([sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)], dim=1)
    all_anchors = (shifts[:, None, :] + anchors[None, :, :]).reshape(-1, 4)  # rows ordered (H, W, A)
    rois, probs = [], []
    for i in range(num_images):
        image_scores = scores[i].permute(1, 2, 0).reshape(-1)
        image_deltas = deltas[i].reshape(num_anchors, 4, height, width).permute(2, 3, 0, 1).reshape(-1, 4)
        order = _sorted_by_score(image_scores)
        if 0 < pre_n < order.numel():
            order = order[:pre_n]
        proposals = _bbox_transform(all_anchors[order], image_deltas[order], [1.0] * 4, legacy)
        im_h, im_w, im_scale = (float(v) for v in im_info[i])
        proposals = _clip_boxes(proposals, int(im_h), int(im_w), legacy)
        sorted_scores = image_scores[order]
        one = float(legacy)
        ws = proposals[:, 2] - proposals[:, 0] + one
        hs = proposals[:, 3] - proposals[:, 1] + one
        scaled_min = min_size * im_scale
        valid = ((ws >= scaled_min) & (hs >= scaled_min) & (proposals[:, 0] + ws / 2 < im_w)
                 & (proposals[:, 1] + hs / 2 < im_h))
        keep_candidates = torch.nonzero(valid).flatten()
        top_n = post_n if 0 < post_n < keep_candidates.numel() else -1
        keep = _nms(proposals, keep_candidates, threshold, top_n, legacy)
        rois.append(torch.cat([torch.full((keep.numel(), 1), float(i)), proposals[keep]], dim=1))
        probs.append(sorted_scores[keep])
    return [torch.cat(rois).reshape(-1, 5), torch.cat(probs)]


@_register("DistributeFpnProposals")
def _distribute_fpn_proposals(inputs: list[Blob], args: Args) -> list[Blob]:
    rois = _float(inputs[0], "rois")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (R, 5) [batch index, x1, y1, x2, y2], got {tuple(rois.shape)}")
    low, high = args.int("roi_min_level", 2), args.int("roi_max_level", 5)
    canonical_scale, canonical_level = args.int("roi_canonical_scale", 224), args.int("roi_canonical_level", 4)
    one = float(args.bool("legacy_plus_one", True))
    area = (rois[:, 3] - rois[:, 1] + one) * (rois[:, 4] - rois[:, 2] + one)
    if bool((area < 0).any()):
        raise ValueError("negative RoI areas found")
    levels = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_scale + 1e-6))
    levels = levels.clamp(low, high)
    outputs: list[Blob] = []
    order = []
    for level in range(low, high + 1):
        index = torch.nonzero(levels == level).flatten()
        outputs.append(rois[index])
        order.append(index)
    restore = torch.argsort(torch.cat(order), stable=True).to(torch.int32)
    return [*outputs, restore]


@_register("RoIAlign")
def _roi_align(inputs: list[Blob], args: Args) -> list[Blob]:
    x, rois = _float(inputs[0], "X"), _float(inputs[1], "RoIs")
    order = _order(args)
    pooled = (args.int("pooled_h", 1), args.int("pooled_w", 1))
    if rois.dim() != 2 or rois.shape[1] not in (4, 5):
        raise ValueError(f"RoIs must be (R, 4) or (R, 5), got {tuple(rois.shape)}")
    if rois.shape[1] == 4:  # a single image's RoIs: batch index 0
        rois = torch.cat([torch.zeros(rois.shape[0], 1), rois], dim=1)
    features = _to_nchw(x, order)
    if rois.shape[0] == 0:
        y = features.new_zeros((0, features.shape[1], *pooled))
    else:
        y = roi_align(features, rois, pooled, spatial_scale=args.float("spatial_scale", 1.0),
                      sampling_ratio=args.int("sampling_ratio", -1), aligned=args.bool("aligned", False))
    return [_from_nchw(y, order)]


@_register("BatchPermutation")
def _batch_permutation(inputs: list[Blob], _: Args) -> list[Blob]:
    x, indices = _float(inputs[0], "X"), inputs[1]
    if isinstance(indices, Int8Tensor) or indices.is_floating_point():
        raise TypeError(f"indices must be an integer tensor, got {_describe(indices)}")
    if indices.numel() != x.shape[0]:
        raise ValueError(f"{indices.numel()} indices for a batch of {x.shape[0]}")
    return [x[indices.to(torch.int64)]]


@_register("BBoxTransform")
def _bbox_transform_op(inputs: list[Blob], args: Args) -> list[Blob]:
    rois, deltas, im_info = _float(inputs[0], "rois"), _float(inputs[1], "deltas"), _float(inputs[2], "im_info")
    if args.bool("rotated", False):
        raise ValueError("rotated boxes are not implemented")
    weights = args.floats("weights", [1.0, 1.0, 1.0, 1.0])
    apply_scale, legacy = args.bool("apply_scale", True), args.bool("legacy_plus_one", True)
    if rois.shape[1] not in (4, 5) or deltas.shape[0] != rois.shape[0] or deltas.shape[1] % 4:
        raise ValueError(f"rois {tuple(rois.shape)} and deltas {tuple(deltas.shape)} do not fit")
    batch_size = im_info.shape[0]
    if rois.shape[1] == 4:
        if batch_size != 1:
            raise ValueError("4-column rois need a batch of one image")
        counts = [rois.shape[0]]
    else:
        counts = [int((rois[:, 0] == b).sum()) for b in range(batch_size)]
    out = torch.empty_like(deltas)
    offset = 0
    for b, count in enumerate(counts):
        im_h, im_w, scale = (float(np.float32(v)) for v in im_info[b])
        scale_after = scale if apply_scale else 1.0
        img_h, img_w = int(im_h / scale + 0.5), int(im_w / scale + 0.5)
        boxes = rois[offset:offset + count, -4:] / scale
        for k in range(deltas.shape[1] // 4):
            decoded = _bbox_transform(boxes, deltas[offset:offset + count, 4 * k:4 * k + 4], weights, legacy)
            out[offset:offset + count, 4 * k:4 * k + 4] = _clip_boxes(decoded, img_h, img_w, legacy) * scale_after
        offset += count
    return [out, torch.tensor(counts, dtype=torch.float32)]


@_register("BoxWithNMSLimit")
def _box_with_nms_limit(inputs: list[Blob], args: Args) -> list[Blob]:
    scores, boxes = _float(inputs[0], "scores"), _float(inputs[1], "boxes")
    if args.bool("soft_nms_enabled", False) or args.bool("rotated", False):
        raise ValueError("soft NMS and rotated boxes are not implemented")
    score_thresh, nms_thresh = args.float("score_thresh", 0.05), args.float("nms", 0.3)
    per_image = args.int("detections_per_im", 100)
    agnostic = args.bool("cls_agnostic_bbox_reg", False)
    boxes_include_bg = args.bool("input_boxes_include_bg_cls", True)
    classes_include_bg = args.bool("output_classes_include_bg_cls", True)
    legacy = args.bool("legacy_plus_one", True)
    num_classes = scores.shape[1]

    def box_column(j: int) -> int:  # class j counts from the background (0)
        return 0 if agnostic else (j if boxes_include_bg else j - 1)

    def score_column(j: int) -> int:
        return j - 1 + int(boxes_include_bg)

    if boxes.shape[1] != 4 * (box_column(num_classes - 1) + 1):
        raise ValueError(f"boxes {tuple(boxes.shape)} do not fit {num_classes} score columns")
    splits = [scores.shape[0]] if len(inputs) < 3 else [int(v) for v in _float(inputs[2], "batch_splits")]
    if sum(splits) != scores.shape[0]:
        raise ValueError(f"batch_splits {splits} do not add up to {scores.shape[0]} boxes")
    out_scores, out_boxes, out_classes, out_keeps, keeps_sizes, totals = [], [], [], [], [], []
    offset = 0
    for count in splits:
        image_scores, image_boxes = scores[offset:offset + count], boxes[offset:offset + count]
        keeps: dict[int, torch.Tensor] = {}
        for j in range(1, num_classes):
            column = image_scores[:, score_column(j)]
            candidates = _sorted_by_score(column, torch.nonzero(column > score_thresh).flatten())
            class_boxes = image_boxes[:, 4 * box_column(j):4 * box_column(j) + 4]
            keeps[j] = _nms(class_boxes, candidates, nms_thresh, per_image if per_image > 0 else -1, legacy)
        total = sum(k.numel() for k in keeps.values())
        if 0 < per_image < total:
            flat = [(j, int(i)) for j in range(1, num_classes) for i in keeps[j]]
            flat_scores = torch.stack([image_scores[i, score_column(j)] for j, i in flat])
            top = torch.sort(flat_scores, descending=True, stable=True).indices[:per_image]
            chosen = [flat[int(t)] for t in top]
            keeps = {j: torch.tensor([i for c, i in chosen if c == j], dtype=torch.int64) for j in keeps}
            total = per_image
        for j in range(1, num_classes):
            index = keeps[j]
            out_scores.append(image_scores[index, score_column(j)])
            out_boxes.append(image_boxes[index, 4 * box_column(j):4 * box_column(j) + 4])
            out_classes.append(torch.full((index.numel(),), float(j - (0 if classes_include_bg else 1))))
        out_keeps.extend([keeps.get(0, torch.zeros(0, dtype=torch.int64))] + [keeps[j] for j in range(1, num_classes)])
        keeps_sizes.append([0] + [keeps[j].numel() for j in range(1, num_classes)])
        totals.append(total)
        offset += count
    return [torch.cat(out_scores), torch.cat(out_boxes).reshape(-1, 4), torch.cat(out_classes),
            torch.tensor(totals, dtype=torch.float32), torch.cat(out_keeps).to(torch.int32),
            torch.tensor(keeps_sizes, dtype=torch.int32)]


# --- int8 (QNNPACK) operators, NHWC ------------------------------------------------------------------------------
@_register("Int8Quantize")
def _int8_quantize(inputs: list[Blob], args: Args) -> list[Blob]:
    x = _float(inputs[0])
    scale, zero_point = _output_args(args)
    # x * (1 / scale) in float32, rounded half to even: the NEON path of Int8Quantize (ARM, where QNNPACK models
    # run), and what PyTorch's quantize computes; the scalar C++ path divides, which can round a tie differently.
    inverse = (np.float32(1.0) / np.float32(scale)).item()
    codes = torch.round(x * inverse) + zero_point
    return [Int8Tensor(codes.clamp(0, 255).to(torch.uint8), scale, zero_point)]


@_register("Int8Dequantize")
def _int8_dequantize(inputs: list[Blob], _: Args) -> list[Blob]:
    x = _int8(inputs[0])
    return [(x.data.to(torch.int32) - x.zero_point).to(torch.float32) * np.float32(x.scale).item()]


def _check_nhwc(args: Args, op: str) -> None:
    if _order(args) != "NHWC":
        raise ValueError(f"{op} only supports order NHWC (QNNPACK)")


def _int8_conv_common(inputs: list[Blob], args: Args, op: str, relu: bool, transposed: bool) -> list[Blob]:
    _check_nhwc(args, op)
    x, w, b = _int8(inputs[0], "X"), _int8(inputs[1], "W"), _int8(inputs[2], "B")
    if b.data.dtype != torch.int32:
        raise TypeError(f"{op} bias must hold int32 values, got {b.data.dtype}")
    y_scale, y_zero_point = _output_args(args)
    x_int = (x.data.to(torch.int32) - x.zero_point).permute(0, 3, 1, 2)
    w_int = w.data.to(torch.int32) - w.zero_point
    # The accumulation must be exact (int32 in QNNPACK). float32 sums integers exactly while every partial sum stays
    # below 2**24; past that bound (long reductions of large codes) float64 is used.
    # Products one output sums: kH * kW * C/group (W is M,kH,kW,C/group); transposed, at most C_in * kH * kW.
    terms = w.data[0].numel() if not transposed else w.data.shape[0] * w.data.shape[1] * w.data.shape[2]
    bound = terms * int(x_int.abs().max()) * int(w_int.abs().max()) if x_int.numel() and w_int.numel() else 0
    exact = torch.float32 if bound < 2**24 else torch.float64
    x_real, w_int = x_int.to(exact), w_int.to(exact)
    if transposed:  # W (C_in, kH, kW, C_out) -> (C_in, C_out, kH, kW)
        out_channels = w.data.shape[3]
        weight = w_int.permute(0, 3, 1, 2)
        window = _Window.from_args(args, (w.data.shape[1], w.data.shape[2]))
        adj = tuple(args.ints("adjs", [0, 0])) if "adjs" in args else (args.int("adj", 0),) * 2
        acc = F.conv_transpose2d(x_real, weight, None, window.stride, 0, adj, 1)
        t, left, bottom, right = window.pads
        acc = acc[:, :, t:acc.shape[2] - bottom, left:acc.shape[3] - right]
    else:  # W (M, kH, kW, C/group) -> (M, C/group, kH, kW)
        out_channels = w.data.shape[0]
        weight = w_int.permute(0, 3, 1, 2)
        window = _Window.from_args(args, (w.data.shape[1], w.data.shape[2]))
        acc = F.conv2d(window.pad(x_real, float(0)), weight, None, window.stride, 0, window.dilation, window.group)
    acc = acc.to(torch.float64) + b.data.to(torch.float64).view(1, -1, 1, 1)
    multiplier = _requantization_scales(x.scale, w.scales(out_channels), y_scale)
    codes = _requantize(acc * multiplier.view(1, -1, 1, 1), y_zero_point, _relu_floor(relu, y_scale, y_zero_point))
    return [Int8Tensor(codes.permute(0, 2, 3, 1).contiguous(), y_scale, y_zero_point)]


@_register("Int8Conv")
def _int8_conv(inputs: list[Blob], args: Args) -> list[Blob]:
    return _int8_conv_common(inputs, args, "Int8Conv", relu=False, transposed=False)


@_register("Int8ConvRelu")
def _int8_conv_relu(inputs: list[Blob], args: Args) -> list[Blob]:
    return _int8_conv_common(inputs, args, "Int8ConvRelu", relu=True, transposed=False)


@_register("Int8ConvTranspose")
def _int8_conv_transpose(inputs: list[Blob], args: Args) -> list[Blob]:
    return _int8_conv_common(inputs, args, "Int8ConvTranspose", relu=False, transposed=True)


@_register("Int8FC")
def _int8_fc(inputs: list[Blob], args: Args) -> list[Blob]:
    x, w, b = _int8(inputs[0], "X"), _int8(inputs[1], "W"), _int8(inputs[2], "B")
    y_scale, y_zero_point = _output_args(args)
    x2 = x.data.reshape(x.data.shape[0], -1).to(torch.float64) - x.zero_point
    w2 = w.data.reshape(w.data.shape[0], -1).to(torch.float64) - w.zero_point
    acc = x2 @ w2.t() + b.data.to(torch.float64)
    multiplier = _requantization_scales(x.scale, w.scales(w2.shape[0]), y_scale)
    return [Int8Tensor(_requantize(acc * multiplier, y_zero_point), y_scale, y_zero_point)]


def _int8_add_common(inputs: list[Blob], args: Args, relu: bool) -> list[Blob]:
    a, b = _int8(inputs[0], "A"), _int8(inputs[1], "B")
    if a.data.shape != b.data.shape:
        raise ValueError(f"Int8Add has no broadcasting: {tuple(a.data.shape)} vs {tuple(b.data.shape)}")
    y_scale, y_zero_point = _output_args(args)
    real = ((a.data.to(torch.float64) - a.zero_point) * a.scale + (b.data.to(torch.float64) - b.zero_point) * b.scale)
    floor = _relu_floor(relu, y_scale, y_zero_point)
    return [Int8Tensor(_requantize(real / y_scale, y_zero_point, floor), y_scale, y_zero_point)]


@_register("Int8Add")
def _int8_add(inputs: list[Blob], args: Args) -> list[Blob]:
    return _int8_add_common(inputs, args, relu=False)


@_register("Int8AddRelu")
def _int8_add_relu(inputs: list[Blob], args: Args) -> list[Blob]:
    return _int8_add_common(inputs, args, relu=True)


@_register("Int8Relu")
def _int8_relu(inputs: list[Blob], args: Args) -> list[Blob]:
    x = _int8(inputs[0])
    _check_same_quantization(x, args, "Int8Relu")
    return [Int8Tensor(x.data.clamp(min=x.zero_point), x.scale, x.zero_point)]


@_register("Int8Concat")
def _int8_concat(inputs: list[Blob], args: Args) -> list[Blob]:
    tensors = [_int8(t, f"input {k}") for k, t in enumerate(inputs)]
    # Caffe2 checks the output parameters against input 0 only and then copies bytes: an input quantized
    # differently would be silently misread there, so the checker refuses it.
    for k, t in enumerate(tensors):
        try:
            _check_same_quantization(t, args, "Int8Concat")
        except ValueError as exc:
            raise ValueError(f"input {k}: {exc}") from None
    axis = _concat_axis(args, tensors[0].data.dim())
    data = torch.cat([t.data for t in tensors], dim=axis)
    return [Int8Tensor(data, tensors[0].scale, tensors[0].zero_point),
            torch.tensor([t.data.shape[axis] for t in tensors], dtype=torch.int32)]


def _check_qnnpack_pooling(args: Args, op: str) -> None:
    """QNNPACK (which runs Caffe2's Int8 pooling) refuses a 1-element window: 'failed to create max pooling with 1
    pooling element: 1x1 pooling is meaningless' (src/max-pooling.c, likewise average pooling)."""
    if not args.bool("global_pooling", False) and math.prod(_Window.from_args(args).kernel) == 1:
        raise ValueError(f"{op} with a 1x1 window: QNNPACK refuses 1x1 pooling, so Caffe2 mobile cannot create this "
                         "operator (a strided 1x1 max pool is a subsampling: write it as a depthwise Int8Conv with "
                         "identity weights, as fnl.export.caffe2.convert does)")


@_register("Int8MaxPool")
def _int8_max_pool(inputs: list[Blob], args: Args) -> list[Blob]:
    _check_nhwc(args, "Int8MaxPool")
    _check_qnnpack_pooling(args, "Int8MaxPool")
    x = _int8(inputs[0])
    _check_same_quantization(x, args, "Int8MaxPool")
    pooled = _pool(x.data.permute(0, 3, 1, 2).to(torch.float32), args, "NCHW", "max")
    return [Int8Tensor(pooled.to(torch.uint8).permute(0, 2, 3, 1).contiguous(), x.scale, x.zero_point)]


@_register("Int8AveragePool")
def _int8_average_pool(inputs: list[Blob], args: Args) -> list[Blob]:
    _check_nhwc(args, "Int8AveragePool")
    _check_qnnpack_pooling(args, "Int8AveragePool")
    x = _int8(inputs[0])
    y_scale, y_zero_point = _output_args(args)
    real = _pool((x.data.to(torch.float64) - x.zero_point).permute(0, 3, 1, 2), args, "NCHW", "average") * x.scale
    codes = _requantize(real / y_scale, y_zero_point)
    return [Int8Tensor(codes.permute(0, 2, 3, 1).contiguous(), y_scale, y_zero_point)]


@_register("Int8ResizeNearest")
def _int8_resize_nearest(inputs: list[Blob], args: Args) -> list[Blob]:
    x = _int8(inputs[0])
    _check_same_quantization(x, args, "Int8ResizeNearest")
    return [Int8Tensor(_resize_nearest(x.data, args, "NHWC"), x.scale, x.zero_point)]


@_register("Int8Flatten")
def _int8_flatten(inputs: list[Blob], args: Args) -> list[Blob]:
    x = _int8(inputs[0])
    _check_same_quantization(x, args, "Int8Flatten")
    axis = args.int("axis", 1)
    return [Int8Tensor(x.data.reshape(math.prod(x.data.shape[:axis]), -1), x.scale, x.zero_point)]


# --- the executor ----------------------------------------------------------------------------------------------
def check_operators(net: Message, source: str) -> None:
    """Refuse a net holding an operator this executor does not implement, naming it and its position."""
    for index, op in enumerate(net.op):
        if op.type not in _OPS:
            raise UnsupportedOperatorError(
                f"{source}: operator #{index} of net '{net.name}' has type '{op.type}' (outputs {list(op.output)}), "
                f"which the reference executor does not implement; it implements {', '.join(implemented_operators())}")


def _run_net(net: Message, workspace: dict[str, Blob], source: str) -> None:
    for index, op in enumerate(net.op):
        missing = [name for name in op.input if name not in workspace]
        where = f"{source}: operator #{index} ({op.type} -> {', '.join(op.output)})"
        if missing:
            raise Caffe2ExecutionError(f"{where}: input blob(s) {missing} were never produced")
        try:
            outputs = _OPS[op.type]([workspace[name] for name in op.input], Args(op))
        except (ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise Caffe2ExecutionError(f"{where}: {exc}") from exc
        if len(outputs) < len(op.output):
            raise Caffe2ExecutionError(f"{where}: {len(op.output)} outputs named, the operator gives {len(outputs)}")
        workspace.update(zip(op.output, outputs, strict=False))


class NetExecutor:
    """Runs ``init_net`` once (the weights) and ``predict_net`` per call, on one thread of torch."""

    def __init__(self, predict_net: Message, init_net: Message | None = None, source: str = "net") -> None:
        self.source = source
        self.predict_net = predict_net
        for net in (init_net, predict_net):
            if net is not None:
                check_operators(net, source)
        self.weights: dict[str, Blob] = {}
        if init_net is not None:
            _run_net(init_net, self.weights, f"{source} (init net)")

    @classmethod
    def from_files(cls, predict_path: str | Path, init_path: str | Path) -> NetExecutor:
        predict_net, init_net = load_netdef(predict_path), load_netdef(init_path)
        return cls(predict_net, init_net, source=str(predict_path))

    def run(self, inputs: Mapping[str, Any], fetch: Iterable[str] = ()) -> dict[str, Blob]:
        """External inputs by name (arrays or tensors) -> the external outputs, and the intermediate blobs named in
        ``fetch`` (a checker looks inside)."""
        workspace = dict(self.weights)
        for name, value in inputs.items():
            workspace[name] = value if isinstance(value, torch.Tensor | Int8Tensor) else torch.as_tensor(value)
        missing = [name for name in self.predict_net.external_input if name not in workspace]
        if missing:
            raise Caffe2ExecutionError(f"{self.source}: external input(s) {missing} were not given")
        with torch.no_grad():
            _run_net(self.predict_net, workspace, self.source)
        unknown = [name for name in fetch if name not in workspace]
        if unknown:
            raise Caffe2ExecutionError(f"{self.source}: blob(s) {unknown} asked for were never produced")
        return {name: workspace[name] for name in [*self.predict_net.external_output, *fetch]}
