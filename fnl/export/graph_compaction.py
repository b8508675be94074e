"""Compaction of an exported ONNX graph: the same computation in fewer bytes, and in forms ONNX Runtime runs faster.

torch.onnx's TorchScript-based exporter writes, for an eager int8 model, a ``Cast`` to the same type after every
``QuantizeLinear`` (uint8 -> uint8) and every int32 bias zero point as ``ConstantOfShape`` -> ``Cast``, every scale
and zero point as its own ``Constant`` node, and long scoped names (``/backbone/module/bottom_up/blocks/1/0/...``)
on every node and value. For model B that is 0.9 MB of names and 3,000 constant nodes around 3 MB of int8 weights;
the identity casts also sit between ``QuantizeLinear`` and ``DequantizeLinear``, where they hide the QDQ pairs that
ONNX Runtime fuses into int8 kernels. ``compact_graph`` removes all of it without changing any computed value:

- identity ``Cast`` nodes are dropped (their consumers read the input instead);
- ``Constant`` nodes and ``ConstantOfShape`` of a constant shape become initializers, identical ones stored once;
- a multiply by a constant scalar between DequantizeLinear and QuantizeLinear that only rescales (the BiFPN fusion
  weights: torch's quantized ``mul_scalar`` keeps the integers and multiplies the scale) is dropped with its
  QuantizeLinear, whose readers read the integers it would have rewritten unchanged. ONNX Runtime has no int8
  kernel for it and ran a float Mul between a dequantize and a quantize, ~5% of model B's int8 time;
- ``Shape`` of a dequantized tensor reads the quantized one (the same shape): a DequantizeLinear read only by
  ``Shape`` (42 in model B, the sizes the neck resizes to and the poolers' level sizes) dequantized a whole
  feature map for nothing;
- an int8 depthwise conv whose channel count is not a multiple of 16 (spnasnet's 72 and 120) gets zero channels up
  to the next multiple, in the conv before it and the conv after it too (zero weights and biases: every value the
  graph computed is unchanged). ONNX Runtime's int8 depthwise kernel runs the last ``C % 16`` channels in a slow
  loop: a 72-channel 3x3 depthwise conv took 0.82 ms at 128 x 128, a 64-channel one 0.26;
- an int8 conv's constants are stored smaller, each decoded exactly by a node that runtimes fold at load (ONNX
  Runtime does, before it fuses the conv into QLinearConv): all-zero weight and bias zero points are left out (the
  default), a bias scale that is input scale x weight scale becomes their ``Mul``, and int32 biases that fit int16
  are stored as int16 and ``Cast``. Model B's int8 file: 3.47 -> 3.32 MB, 0.281 -> 0.269 of the float32 file;
- int8 nearest Resize (the neck's up- and down-sampling, the DensePose head's pooled ASPP branch) and int8
  DepthToSpace (the DensePose predictor's pixel shuffles) move integers only; they become Gathers (Resize) and a
  Transpose of blocks (DepthToSpace) of the integers in channels-last order, between Transposes that ONNX Runtime
  cancels against the ones around its channels-last int8 convs. Its uint8 Resize and DepthToSpace move one value
  at a time, and not in parallel: with these rewrites model B's int8 graph runs 57.5 instead of 63.2 ms at 1 thread
  and 32.5 instead of 40.2 ms at 2;
- a node that repeats an earlier one (same operator, attributes and inputs) is dropped and its outputs read from the
  earlier one (the exporter's repeated ``Shape`` / ``Unsqueeze`` / ``Cast`` of one value), and attributes set to
  their default are left out;
- transposed convs reading the same input with the same attributes (the DensePose predictor's four) become one
  ConvTranspose whose output channels are theirs, split after: ONNX Runtime's ConvTranspose pays per node, and the
  merged one runs ~20% faster. Int8 weights stay int8 (their per-tensor scales become one per-channel scale);
- node names become the tag of the model part they were traced in and a counter (``bb.1c``: ``part_tag``;
  ``fnl.export.profile`` sums time by it), value names are shortened; the graph's input and output names are kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from fnl.utils.io import atomic_path


def compact_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A compacted copy of ``model`` (see the module docstring); ``model`` is left as it is."""
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    kept_names = {value.name for value in graph.input} | {value.name for value in graph.output}
    aliases: dict[str, str] = {}  # value name -> the name it is now read from

    def resolve(name: str) -> str:
        return _resolved(name, aliases)

    types = {value.name: value.type.tensor_type.elem_type for value in (*graph.value_info, *graph.input)}
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    shapes = {value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
              for value in (*graph.value_info, *graph.input) if value.type.tensor_type.HasField("shape")}
    constants = {tensor.name: tensor for tensor in graph.initializer}
    nodes = []
    for node in graph.node:
        node.input[:] = [resolve(name) for name in node.input]
        constant = _constant_value(node, constants)
        if constant is not None:
            constants[node.output[0]] = numpy_helper.from_array(constant, node.output[0])
        elif _is_identity_cast(node, types) and node.output[0] not in kept_names:
            aliases[node.output[0]] = node.input[0]
        else:
            nodes.append(node)

    nodes = _without_requantizing_scalar_muls(nodes, constants, aliases, kept_names)
    for node in nodes:
        node.input[:] = [resolve(name) for name in node.input]
    nodes = _shapes_read_before_dequantize(nodes, kept_names)
    _pad_int8_depthwise_channels(nodes, constants, kept_names)
    nodes = _resizes_in_channels_last(nodes, constants, shapes, kept_names)
    nodes = _depth_to_spaces_in_channels_last(nodes, constants, shapes, kept_names)
    nodes = _with_smaller_conv_constants(nodes, constants)
    nodes = _merged_conv_transposes(nodes, constants, kept_names)
    nodes = _computed_once(nodes, constants, aliases, kept_names)
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    _drop_default_attributes(nodes, opset)
    used = {resolve(name) for name in _inputs_read(nodes)} | kept_names
    initializers = _deduplicated([tensor for name, tensor in constants.items() if name in used], aliases)
    short_names = _ShortNames(kept_names)
    _rename(nodes, resolve, short_names, tag_parts=True)
    for tensor in initializers:
        tensor.name = short_names(tensor.name)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.value_info[:]  # shape annotations of values that no longer exist under these names
    return model



def _resolved(name: str, aliases: dict[str, str]) -> str:
    """The name a value is read from now: ``name`` followed through ``aliases`` (value name -> the name it is now
    read from)."""
    while name in aliases:
        name = aliases[name]
    return name

def compact_onnx_file(source: str | Path, destination: str | Path) -> Path:
    """``compact_graph`` of the ONNX file ``source``, checked with ``onnx.checker`` and written atomically to
    ``destination`` (which may be ``source``). Returns ``destination``."""
    destination = Path(destination)
    compacted = compact_graph(onnx.load(str(source)))
    with atomic_path(destination) as tmp:
        onnx.save(compacted, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    return destination


def _constant_value(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The value of a node that only produces a constant: ``Constant`` (tensor form) or ``ConstantOfShape`` of a
    constant shape; None for any other node."""
    if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    if node.op_type == "ConstantOfShape" and node.input[0] in constants:
        shape = numpy_helper.to_array(constants[node.input[0]])
        fill = numpy_helper.to_array(node.attribute[0].t) if node.attribute else np.zeros(1, np.float32)
        return np.full(shape.astype(np.int64), fill.reshape(-1)[0], dtype=fill.dtype)
    return None


def _is_identity_cast(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    if node.op_type != "Cast":
        return False
    to = next(attribute.i for attribute in node.attribute if attribute.name == "to")
    return types.get(node.input[0]) == to


def _inputs_read(nodes: Iterable[onnx.NodeProto]) -> Iterable[str]:
    """Every value name read by ``nodes``, including the outer-scope names their subgraphs (If branches) read."""
    for node in nodes:
        yield from node.input
        for subgraph in _subgraphs(node):
            yield from _inputs_read(subgraph.node)
            yield from (value.name for value in subgraph.output)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [attribute.g for attribute in node.attribute if attribute.type == onnx.AttributeProto.GRAPH]


def _deduplicated(tensors: list[onnx.TensorProto], aliases: dict[str, str]) -> list[onnx.TensorProto]:
    """One tensor per distinct (type, shape, bytes); the others become aliases of it."""
    first: dict[tuple, str] = {}
    unique = []
    for tensor in tensors:
        key = (tensor.data_type, tuple(tensor.dims), numpy_helper.to_array(tensor).tobytes())
        if key in first:
            aliases[tensor.name] = first[key]
        else:
            first[key] = tensor.name
            unique.append(tensor)
    return unique


class _ShortNames:
    """Hexadecimal value names in order of first use, skipping the names that must stay (graph inputs/outputs)."""

    def __init__(self, reserved: set[str]) -> None:
        self.reserved = reserved
        self.names: dict[str, str] = {}
        self.counter = 0

    def __call__(self, name: str) -> str:
        if not name or name in self.reserved:
            return name
        if name not in self.names:
            while format(self.counter, "x") in self.reserved:
                self.counter += 1
            self.names[name] = format(self.counter, "x")
            self.counter += 1
        return self.names[name]


# Module scopes torch.onnx writes into node names ("/model/roi_heads/box_pooler/RoiAlign") -> part tag, first match.
_PART_SCOPES = (("densepose", "dp"), ("decoder", "dp"), ("/roi_heads/box_", "box"), ("proposal_generator", "rpn"),
                ("/backbone/", "bb"))


def part_tag(scoped_name: str) -> str:
    """The model part a node traced in module scope ``scoped_name`` belongs to: ``bb`` (backbone and neck), ``rpn``,
    ``box`` (box pooler, head, predictor), ``dp`` (DensePose pooler, head, predictor), ``g`` (glue: the rest)."""
    return next((tag for scope, tag in _PART_SCOPES if scope in scoped_name), "g")


def _rename(nodes: Iterable[onnx.NodeProto], resolve, short_names: _ShortNames, tag_parts: bool = False) -> None:
    """Node names become ``<part tag>.<counter>`` (top level; ONNX Runtime wants them unique) or are cleared
    (subgraphs); value names are shortened, in subgraphs too (they read outer-scope values and their own inputs by
    name)."""
    for index, node in enumerate(nodes):
        node.name = f"{part_tag(node.name)}.{index:x}" if tag_parts else ""
        node.input[:] = [short_names(resolve(name)) for name in node.input]
        node.output[:] = [short_names(name) for name in node.output]
        for subgraph in _subgraphs(node):
            for value in subgraph.input:  # a Loop / Scan body's own inputs, read by its nodes
                value.name = short_names(value.name)
            for value in subgraph.output:
                value.name = short_names(resolve(value.name))
            for tensor in subgraph.initializer:
                tensor.name = short_names(tensor.name)
            del subgraph.value_info[:]
            _rename(subgraph.node, resolve, short_names)


def _producers_and_readers(nodes: list[onnx.NodeProto]
                           ) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """The node writing each value, and the nodes reading it."""
    producers = {output: node for node in nodes for output in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return producers, readers


def _shapes_read_before_dequantize(nodes: list[onnx.NodeProto], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` with each ``Shape`` that reads a DequantizeLinear's output reading its input instead (dequantizing
    keeps the shape), and the DequantizeLinear nodes nobody reads any more dropped."""
    producers, _ = _producers_and_readers(nodes)
    changed = False
    for node in nodes:
        source = producers.get(node.input[0]) if node.op_type == "Shape" else None
        if source is not None and source.op_type == "DequantizeLinear":
            node.input[0] = source.input[0]
            changed = True
    return _without_dead_dequantize(nodes, graph_outputs) if changed else nodes


def _without_requantizing_scalar_muls(nodes: list[onnx.NodeProto], constants: dict[str, onnx.TensorProto],
                                      aliases: dict[str, str], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without each DequantizeLinear -> Mul(constant scalar) -> QuantizeLinear chain whose QuantizeLinear
    gives back every integer it is fed (checked for all 256 uint8 values, as ONNX Runtime computes them): its output
    becomes an alias (in ``aliases``) of the DequantizeLinear's input. DequantizeLinear nodes left unread go."""
    producers, readers = _producers_and_readers(nodes)
    dropped: set[int] = set()
    for node in nodes:
        if node.op_type != "QuantizeLinear" or node.output[0] in graph_outputs:
            continue
        mul = producers.get(node.input[0])
        if mul is None or mul.op_type != "Mul" or len(readers.get(mul.output[0], [])) != 1:
            continue
        dequantize = producers.get(mul.input[0])
        factor = constants.get(mul.input[1])
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or factor is None:
            continue
        if _rescales_exactly(dequantize, numpy_helper.to_array(factor), node, constants):
            aliases[node.output[0]] = dequantize.input[0]
            dropped.update((id(mul), id(node)))
    if not dropped:
        return nodes
    return _without_dead_dequantize([n for n in nodes if id(n) not in dropped], graph_outputs)


def _rescales_exactly(dequantize: onnx.NodeProto, factor: np.ndarray, quantize: onnx.NodeProto,
                      constants: dict[str, onnx.TensorProto]) -> bool:
    """Whether QuantizeLinear(DequantizeLinear(q) * factor) == q for every uint8 q: per-tensor uint8 on both sides,
    one zero point, a positive scalar factor. Checked in float32 both as x / scale and x * (1 / scale) round."""
    names = [*dequantize.input[1:3], *quantize.input[1:3]]
    if len(names) != 4 or not all(name in constants for name in names) or factor.size != 1:
        return False
    scale, zero_point, new_scale, new_zero_point = (numpy_helper.to_array(constants[name]) for name in names)
    if (zero_point.dtype != np.uint8 or new_zero_point.dtype != np.uint8 or scale.size != 1 or new_scale.size != 1
            or zero_point.reshape(()) != new_zero_point.reshape(()) or not factor.reshape(()) > 0):
        return False
    integers = np.arange(256, dtype=np.float32)
    zero = np.float32(zero_point.reshape(()))
    values = (integers - zero) * np.float32(scale.reshape(())) * np.float32(factor.reshape(()))
    new_scale = np.float32(new_scale.reshape(()))
    return all(np.array_equal(np.clip(np.rint(scaled) + zero, 0, 255), integers)
               for scaled in (values / new_scale, values * (np.float32(1) / new_scale)))


# ONNX Runtime's int8 depthwise conv kernel handles channels in blocks of this many (measured: see the docstring).
_DEPTHWISE_CHANNEL_BLOCK = 16
# Nodes that may sit between two convs of a quantized chain without looking at the channel count.
_PER_TENSOR_STEPS = ("Relu", "Clip", "QuantizeLinear", "DequantizeLinear")


def _pad_int8_depthwise_channels(nodes: list[onnx.NodeProto], constants: dict[str, onnx.TensorProto],
                                 graph_outputs: set[str]) -> None:
    """Give each int8 depthwise conv of C channels (C % 16 != 0) zero channels up to the next multiple of 16, with
    the conv that feeds it (more zero output channels) and the conv it feeds (zero input weights), when a chain of
    single readers through per-tensor Relu / Clip / QuantizeLinear / DequantizeLinear joins the three. The extra
    channels are 0 after the first conv and contribute 0 to the third, so the graph's values stay the same. Weights
    and biases must be DequantizeLinear of constants (int8 graphs); new constants go into ``constants``."""
    producers, readers = _producers_and_readers(nodes)

    def conv_before(value: str) -> onnx.NodeProto | None:
        """The conv whose output alone reaches ``value`` through single-reader per-tensor steps."""
        while (len(readers.get(value, [])) == 1 and value not in graph_outputs
               and (node := producers.get(value)) is not None):
            if node.op_type == "Conv":
                return node
            if node.op_type not in _PER_TENSOR_STEPS or _per_channel(node, constants):
                return None
            value = node.input[0]
        return None

    def convs_after(value: str) -> list[onnx.NodeProto] | None:
        """The convs every reader of ``value`` reaches as their input through per-tensor steps, or None when a
        path ends anywhere else (the graph's output, an Add, a weight input)."""
        if value in graph_outputs:
            return None
        following = readers.get(value, [])
        found: list[onnx.NodeProto] = []
        for node in following:
            if node.op_type == "Conv" and node.input[0] == value:
                found.append(node)
                continue
            further = None
            if node.op_type in _PER_TENSOR_STEPS and not _per_channel(node, constants):
                further = convs_after(node.output[0])
            if further is None:
                return None
            found.extend(further)
        return found or None

    for conv in [node for node in nodes if node.op_type == "Conv"]:
        channels = _attribute(conv, "group", 1)
        if channels % _DEPTHWISE_CHANNEL_BLOCK == 0 or channels < _DEPTHWISE_CHANNEL_BLOCK or len(conv.input) != 3:
            continue
        before, after = conv_before(conv.input[0]), convs_after(conv.output[0])
        if before is None or after is None or any(_attribute(n, "group", 1) != 1 for n in (before, *after)):
            continue
        padded = -(-channels // _DEPTHWISE_CHANNEL_BLOCK) * _DEPTHWISE_CHANNEL_BLOCK
        edits = [(before, 1, 0), (before, 2, 0), (conv, 1, 0), (conv, 2, 0), *((n, 1, 1) for n in after)]
        quantized = [_quantized_constant(node.input[index], producers, constants) for node, index, _ in edits]
        if any(q is None or q[0].shape[axis] != channels or len(readers[node.input[index]]) != 1
               or not _zero_point_paddable(q[1], axis, constants)
               for q, (node, index, axis) in zip(quantized, edits, strict=True)):
            continue
        for (_, _, axis), dequantize in zip(edits, quantized, strict=True):
            _pad_dequantized_constant(dequantize[1], axis, padded, constants)
        for attribute in conv.attribute:
            if attribute.name == "group":
                attribute.i = padded


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((attribute.i for attribute in node.attribute if attribute.name == name), default)


def _per_channel(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> bool:
    """Whether a QuantizeLinear / DequantizeLinear node has a scale per channel (or one not a constant)."""
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
        return False
    scale = constants.get(node.input[1])
    return scale is None or len(scale.dims) > 0 and int(np.prod(scale.dims)) > 1


def _quantized_constant(name: str, producers: dict[str, onnx.NodeProto], constants: dict[str, onnx.TensorProto]
                        ) -> tuple[np.ndarray, onnx.NodeProto] | None:
    """(integer values, the DequantizeLinear node) of a value that is DequantizeLinear of constants, else None."""
    node = producers.get(name)
    if node is None or node.op_type != "DequantizeLinear" or not all(i in constants for i in node.input):
        return None
    return numpy_helper.to_array(constants[node.input[0]]), node


def _zero_point_paddable(dequantize: onnx.NodeProto, axis: int, constants: dict[str, onnx.TensorProto]) -> bool:
    """Whether the zero point of new entries along ``axis`` is defined: one zero point, one per channel along that
    axis, or the same for every channel of another axis."""
    if len(dequantize.input) < 3:
        return True
    zero_point = numpy_helper.to_array(constants[dequantize.input[2]])
    return zero_point.size == 1 or _attribute(dequantize, "axis", 1) == axis or np.unique(zero_point).size == 1


def _pad_dequantized_constant(dequantize: onnx.NodeProto, axis: int, size: int,
                              constants: dict[str, onnx.TensorProto]) -> None:
    """Pad what a DequantizeLinear reads to ``size`` along ``axis`` so the new entries dequantize to exactly 0: a scale
    and zero point per channel along that axis repeat their last channel's (ONNX Runtime fuses a conv into an int8
    kernel only while bias scale = input scale x weight scale per channel, which the repeat keeps), the integers are
    filled with the zero point. New constants under new names: constants other nodes share stay as they are."""
    inputs = list(dequantize.input)
    values = numpy_helper.to_array(constants[inputs[0]])
    zero_point = numpy_helper.to_array(constants[inputs[2]]) if len(inputs) > 2 else np.zeros((), values.dtype)
    per_channel = _attribute(dequantize, "axis", 1) == axis and zero_point.size > 1

    def padded(array: np.ndarray, pad_axis: int, fill: np.ndarray | None) -> np.ndarray:
        widths = [(0, size - array.shape[pad_axis]) if k == pad_axis else (0, 0) for k in range(array.ndim)]
        if fill is None:
            return np.pad(array, widths, mode="edge")
        return np.pad(array, widths, constant_values=fill.reshape(-1)[-1]).astype(array.dtype)

    arrays = {0: padded(values, axis, zero_point)}
    if per_channel:
        arrays.update({position: padded(numpy_helper.to_array(constants[inputs[position]]), 0, None)
                       for position in (1, 2)})
    for position, array in arrays.items():
        name = f"{inputs[position]}_padded{size}_{dequantize.output[0]}"
        constants[name] = numpy_helper.from_array(array, name)
        dequantize.input[position] = name


# ONNX Runtime runs int8 convs channels-last (NHWC); its layout pass puts a Transpose pair around them and cancels
# each pair against the next. Moves of int8 values written here as Transposes to and from channels-last order, with
# whole pixels or rows moved in between, therefore run without any transpose between int8 convs.
_TO_CHANNELS_LAST, _FROM_CHANNELS_LAST = [0, 2, 3, 1], [0, 3, 1, 2]


def _same_quantization(dequantize: onnx.NodeProto, quantize: onnx.NodeProto,
                       constants: dict[str, onnx.TensorProto]) -> bool:
    """Whether a QuantizeLinear gives back the integers a DequantizeLinear read: both per tensor with equal constant
    scales and zero points (a value moved unchanged between them, as by nearest resampling, then round-trips)."""
    if len(dequantize.input) != len(quantize.input) or not all(
            name in constants for name in (*dequantize.input[1:], *quantize.input[1:])):
        return False
    pairs = [(numpy_helper.to_array(constants[a]), numpy_helper.to_array(constants[b]))
             for a, b in zip(dequantize.input[1:], quantize.input[1:], strict=True)]
    return all(a.size == 1 and a.dtype == b.dtype and np.array_equal(a, b) for a, b in pairs)


def _moved_between_same_quantization(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                                     readers: dict[str, list[onnx.NodeProto]], constants: dict[str, onnx.TensorProto],
                                     shapes: dict[str, list[int | None]]) -> tuple[str, onnx.NodeProto] | None:
    """(the integers, the QuantizeLinear) of DequantizeLinear -> ``node`` -> its only reader QuantizeLinear, with the
    same quantization on both sides and rank-4 values; None otherwise."""
    dequantize = producers.get(node.input[0])
    following = readers.get(node.output[0], [])
    if (dequantize is None or dequantize.op_type != "DequantizeLinear" or len(following) != 1
            or following[0].op_type != "QuantizeLinear" or len(shapes.get(node.input[0], [])) != 4):
        return None
    if not _same_quantization(dequantize, following[0], constants):
        return None
    return dequantize.input[0], following[0]


class _NodeWriter:
    """New nodes and constants named after one node (its name keeps their model part for ``part_tag``)."""

    def __init__(self, origin: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> None:
        self.origin, self.constants, self.nodes = origin, constants, []

    def constant(self, value: np.ndarray) -> str:
        name = f"{self.origin.output[0]}_c{len(self.constants)}"
        self.constants[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def __call__(self, op_type: str, inputs: list[str], output: str = "", **attributes) -> str:
        output = output or f"{self.origin.output[0]}_{op_type}{len(self.nodes)}"
        self.nodes.append(onnx.helper.make_node(op_type, inputs, [output], name=self.origin.name, **attributes))
        return output


def _resizes_in_channels_last(nodes: list[onnx.NodeProto], constants: dict[str, onnx.TensorProto],
                              shapes: dict[str, list[int | None]], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` with each int8 nearest Resize (DequantizeLinear -> Resize -> QuantizeLinear, one quantization,
    rank 4) done as two Gathers of the integers in channels-last order: whole rows, then whole pixels. The rows and
    columns gathered are the ones the Resize picks, for any sizes: a 1-D Resize with the node's attributes and its
    size (or scale) on that axis, applied to 0 .. n-1, returns them. ONNX Runtime's uint8 Resize runs a loop per
    value: 0.66 ms to up-sample 64 channels from 64 x 64 to 128 x 128, where the Gathers copy 64-byte pixels."""
    producers, readers = _producers_and_readers(nodes)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for node in nodes:
        if node.op_type != "Resize":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        target = next((name for name in reversed(node.input[2:]) if name), "")  # sizes, else scales
        moved = _moved_between_same_quantization(node, producers, readers, constants, shapes)
        if (moved is None or not target or attributes.get("mode") != b"nearest" or "axes" in attributes
                or attributes.get("coordinate_transformation_mode") == b"tf_crop_and_resize"):
            continue
        integers, quantize = moved
        write = _NodeWriter(node, constants)
        shape = write("Shape", [integers])
        value = write("Transpose", [integers], perm=_TO_CHANNELS_LAST)
        start, step = write.constant(np.int64(0)), write.constant(np.int64(1))
        for axis, channels_last_axis in ((2, 1), (3, 2)):
            # int32 positions: ONNX Runtime's Resize has no int64 kernel, and Gather takes int32 indices
            length = write("Gather", [shape, write.constant(np.int64(axis))])
            positions = write("Cast", [write("Range", [start, length, step])], to=onnx.TensorProto.INT32)
            axis_target = write("Slice", [target, write.constant(np.array([axis])),
                                          write.constant(np.array([axis + 1]))])
            picked = write("Resize", [positions, "", axis_target] if len(node.input) < 4 or not node.input[3]
                           else [positions, "", "", axis_target])
            write.nodes[-1].attribute.extend(node.attribute)
            value = write("Gather", [value, picked], axis=channels_last_axis)
        write("Transpose", [value], quantize.output[0], perm=_FROM_CHANNELS_LAST)
        replaced.update({id(node): write.nodes, id(quantize): []})
    return _with_replacements(nodes, replaced, graph_outputs)


def _depth_to_spaces_in_channels_last(nodes: list[onnx.NodeProto], constants: dict[str, onnx.TensorProto],
                                      shapes: dict[str, list[int | None]], graph_outputs: set[str]
                                      ) -> list[onnx.NodeProto]:
    """``nodes`` with each int8 DepthToSpace (DequantizeLinear -> DepthToSpace -> QuantizeLinear, one quantization,
    rank 4, a known channel count) done as Reshape -> Transpose -> Reshape of the integers in channels-last order,
    where the Transpose moves runs of blocksize x C / blocksize² bytes. In CRD order (torch's pixel_shuffle: the
    DensePose predictor's sub-pixel convs) it would move single bytes, so the int8 conv that writes the input, when
    nothing else reads it, gets its output channels reordered to DCR order. ONNX Runtime's uint8 DepthToSpace moves
    single bytes: 0.95 ms for 10 RoIs of 100 x 33 x 33."""
    producers, readers = _producers_and_readers(nodes)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for node in nodes:
        if node.op_type != "DepthToSpace":
            continue
        moved = _moved_between_same_quantization(node, producers, readers, constants, shapes)
        block = _attribute(node, "blocksize", 0)
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"DCR")
        channels = shapes[node.input[0]][1] if moved is not None else None  # rank 4 when moved
        if moved is None or mode not in (b"DCR", b"CRD") or not channels or channels % (block * block):
            continue
        integers, quantize = moved
        if mode == b"CRD" and not _reorder_conv_output_channels(integers, block, producers, readers, constants):
            continue
        write = _NodeWriter(node, constants)
        shape = write("Shape", [integers])
        value = write("Transpose", [integers], perm=_TO_CHANNELS_LAST)
        # the channel count written out, not -1: with no detections N is 0 and -1 could not be inferred
        split_channels = np.array([0, 0, 0, block, block, channels // block // block])
        value = write("Reshape", [value, write.constant(split_channels)])
        value = write("Transpose", [value], perm=[0, 1, 3, 2, 4, 5])  # N, H, block, W, block, C / block²
        channels_last_shape = write("Gather", [shape, write.constant(np.array(_TO_CHANNELS_LAST))])
        moved_shape = write("Div", [write("Mul", [channels_last_shape, write.constant(np.array([1, block, block, 1]))]),
                                    write.constant(np.array([1, 1, 1, block * block]))])
        write("Transpose", [write("Reshape", [value, moved_shape])], quantize.output[0], perm=_FROM_CHANNELS_LAST)
        replaced.update({id(node): write.nodes, id(quantize): []})
    return _with_replacements(nodes, replaced, graph_outputs)


def _reorder_conv_output_channels(integers: str, block: int, producers: dict[str, onnx.NodeProto],
                                  readers: dict[str, list[onnx.NodeProto]],
                                  constants: dict[str, onnx.TensorProto]) -> bool:
    """Reorder the output channels of the int8 conv whose per-tensor QuantizeLinear writes ``integers`` from CRD to
    DCR order (channel c * block² + k moves to k * C / block² + c), when nothing but one DepthToSpace's
    DequantizeLinear and Shape nodes reads them; its weight and bias constants are rewritten under new names.
    Returns whether it did."""
    quantize = producers.get(integers)
    if quantize is None or quantize.op_type != "QuantizeLinear" or _per_channel(quantize, constants):
        return False
    if sum(reader.op_type != "Shape" for reader in readers.get(integers, [])) != 1:
        return False
    conv = producers.get(quantize.input[0])
    if conv is None or conv.op_type != "Conv" or readers.get(conv.output[0]) != [quantize]:
        return False
    parameters = [_quantized_constant(name, producers, constants) for name in conv.input[1:]]
    if _attribute(conv, "group", 1) != 1 or any(p is None or readers.get(p[1].output[0]) != [conv]
                                                  for p in parameters):
        return False
    if any(_per_channel(dequantize, constants) and _attribute(dequantize, "axis", 1) != 0
           for _, dequantize in parameters):
        return False
    channels = parameters[0][0].shape[0]
    order = np.array([c * block * block + k for k in range(block * block) for c in range(channels // block // block)])
    for _, dequantize in parameters:
        for position, name in enumerate(dequantize.input):
            array = numpy_helper.to_array(constants[name])
            if position == 0 or array.size > 1:
                new_name = f"{name}_dcr_{dequantize.output[0]}"
                constants[new_name] = numpy_helper.from_array(array[order], new_name)
                dequantize.input[position] = new_name
    return True


def _with_smaller_conv_constants(nodes: list[onnx.NodeProto], constants: dict[str, onnx.TensorProto]
                                 ) -> list[onnx.NodeProto]:
    """``nodes`` with the weight and bias constants of int8 convs (DequantizeLinear of constants, read by that conv
    alone) stored smaller (see the module docstring); the nodes that decode them come first."""
    producers, readers = _producers_and_readers(nodes)
    decoders: list[onnx.NodeProto] = []

    def only_reader(name: str, node: onnx.NodeProto) -> onnx.NodeProto | None:
        quantized = _quantized_constant(name, producers, constants)
        return quantized[1] if quantized is not None and readers.get(name) == [node] else None

    for conv in [node for node in nodes if node.op_type == "Conv" and len(node.input) == 3]:
        activation, weight, bias = (producers.get(conv.input[0]), only_reader(conv.input[1], conv),
                                    only_reader(conv.input[2], conv))
        if weight is None or bias is None:
            continue
        for dequantize in (weight, bias):
            if len(dequantize.input) == 3 and not numpy_helper.to_array(constants[dequantize.input[2]]).any():
                del dequantize.input[2]
        if activation is not None and activation.op_type == "DequantizeLinear" and activation.input[1] in constants:
            product = (numpy_helper.to_array(constants[activation.input[1]])
                       * numpy_helper.to_array(constants[weight.input[1]])).astype(np.float32)
            if np.array_equal(product, numpy_helper.to_array(constants[bias.input[1]])):
                decoders.append(onnx.helper.make_node("Mul", [activation.input[1], weight.input[1]],
                                                      [f"{bias.output[0]}_scale"], name=conv.name))
                bias.input[1] = decoders[-1].output[0]
        values = numpy_helper.to_array(constants[bias.input[0]])
        if values.dtype == np.int32 and np.abs(values).max(initial=0) <= np.iinfo(np.int16).max:
            narrow = f"{bias.output[0]}_int16"
            constants[narrow] = numpy_helper.from_array(values.astype(np.int16), narrow)
            decoders.append(onnx.helper.make_node("Cast", [narrow], [f"{bias.output[0]}_int32"], name=conv.name,
                                                  to=onnx.TensorProto.INT32))
            bias.input[0] = decoders[-1].output[0]
    return [*decoders, *nodes]


def _merged_conv_transposes(nodes: list[onnx.NodeProto], constants: dict[str, onnx.TensorProto],
                            graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` with each group of ConvTranspose nodes that read the same input (the same value, or the same
    quantized value through DequantizeLinear) with the same attributes and constant weights replaced by one
    ConvTranspose and a Split into the original outputs (see the module docstring). New constants go into
    ``constants``; nodes left without consumers by the merge are dropped."""
    producers = {output: node for node in nodes for output in node.output}
    groups: dict[tuple, list[onnx.NodeProto]] = {}
    for node in nodes:
        if node.op_type != "ConvTranspose" or len(node.input) != 3:
            continue
        weight = _constant_weight(node.input[1], producers, constants)
        if weight is None or _constant_weight(node.input[2], producers, constants) is None:
            continue
        source = producers.get(node.input[0])
        reads: object = node.input[0]
        if source is not None and source.op_type == "DequantizeLinear":  # scales not yet deduplicated: by value
            reads = tuple(_value_key(name, constants) for name in source.input)
        attributes = tuple(onnx.helper.printable_attribute(a) for a in node.attribute)
        groups.setdefault((reads, attributes, weight[0].dtype.str), []).append(node)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for group in groups.values():
        if len(group) > 1:
            replaced[id(group[0])] = _merge_group(group, producers, constants)
            replaced.update({id(node): [] for node in group[1:]})
    return _with_replacements(nodes, replaced, graph_outputs)


def _value_key(name: str, constants: dict[str, onnx.TensorProto]) -> object:
    """A constant by its type, shape and bytes; any other value by its name."""
    tensor = constants.get(name)
    return name if tensor is None else (tensor.data_type, tuple(tensor.dims), numpy_helper.to_array(tensor).tobytes())


def _constant_weight(name: str, producers: dict[str, onnx.NodeProto], constants: dict[str, onnx.TensorProto]
                     ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None:
    """(values, scale, zero point) of a ConvTranspose weight or bias: a float constant (no scale), or a per-tensor
    DequantizeLinear of an integer constant; None for anything else."""
    if name in constants:
        return numpy_helper.to_array(constants[name]), None, None
    node = producers.get(name)
    if node is None or node.op_type != "DequantizeLinear" or not all(i in constants for i in node.input):
        return None
    values, scale, *zero_point = (numpy_helper.to_array(constants[i]) for i in node.input)
    if scale.size != 1:
        return None
    return values, scale, zero_point[0] if zero_point else np.zeros((), values.dtype)


def _merge_group(group: list[onnx.NodeProto], producers: dict[str, onnx.NodeProto],
                 constants: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
    first = group[0]
    prefix = first.output[0]
    weights = [_constant_weight(node.input[1], producers, constants) for node in group]
    counts = [w[0].shape[1] for w in weights]  # ConvTranspose weights are (in, out / groups, kH, kW)

    def constant(suffix: str, value: np.ndarray) -> str:
        constants[prefix + suffix] = numpy_helper.from_array(value, prefix + suffix)
        return prefix + suffix

    weight = constant("_merged_weight", np.concatenate([w[0] for w in weights], axis=1))
    new_nodes = []
    if weights[0][1] is not None:  # int8 weights: per-tensor scales side by side as one per-output-channel scale
        scale = np.concatenate([np.full(n, w[1].reshape(()), w[1].dtype) for n, w in zip(counts, weights, strict=True)])
        zero = np.concatenate([np.full(n, w[2].reshape(()), w[2].dtype) for n, w in zip(counts, weights, strict=True)])
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", [weight, constant("_scale", scale),
                                                                    constant("_zero_point", zero)],
                                               [prefix + "_merged_float_weight"], name=first.name, axis=1))
        weight = prefix + "_merged_float_weight"
    biases = [_dequantized(_constant_weight(node.input[2], producers, constants)) for node in group]
    bias = constant("_merged_bias", np.concatenate(biases))
    merged = onnx.helper.make_node("ConvTranspose", [first.input[0], weight, bias], [prefix + "_merged"],
                                   name=first.name)
    merged.attribute.extend(first.attribute)
    split = onnx.helper.make_node("Split", [prefix + "_merged", constant("_split", np.array(counts, np.int64))],
                                  [n.output[0] for n in group], name=first.name, axis=1)
    return [*new_nodes, merged, split]


def _dequantized(tensor: tuple[np.ndarray, np.ndarray | None, np.ndarray | None]) -> np.ndarray:
    """A constant's float values, as DequantizeLinear computes them ((q - zero point) * scale in float32)."""
    values, scale, zero_point = tensor
    if scale is None:
        return values
    return (values.astype(np.int64) - zero_point.astype(np.int64)).astype(np.float32) * scale.astype(np.float32)


# Kept apart however alike: each of these draws its own random values.
_NOT_MERGED = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
               "Dropout")


def _computed_once(nodes: list[onnx.NodeProto], constants: dict[str, onnx.TensorProto], aliases: dict[str, str],
                   graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without each node that repeats an earlier one (same operator, attributes and inputs, after earlier
    repeats are resolved): its outputs become aliases (in ``aliases``) of the earlier node's. Model B's exporter
    writes the same ``Shape`` / ``Unsqueeze`` / ``Cast`` / ``DequantizeLinear`` of one value many times: 208 of
    its int8 graph's nodes."""
    first: dict[tuple, onnx.NodeProto] = {}
    kept = []
    for node in nodes:
        node.input[:] = [_resolved(name, aliases) for name in node.input]
        if node.op_type in _NOT_MERGED or _subgraphs(node) or any(name in graph_outputs for name in node.output):
            kept.append(node)
            continue
        key = (node.domain, node.op_type, tuple(_value_key(name, constants) for name in node.input), len(node.output),
               tuple(attribute.SerializeToString() for attribute in node.attribute))
        if key in first:
            aliases.update(zip(node.output, first[key].output, strict=True))
        else:
            first[key] = node
            kept.append(node)
    return kept


# Attributes whose default the ONNX spec gives in words, not in the operator schema: all ones / all zeros.
_UNIT_WINDOW_ATTRIBUTES = {"Conv": ("dilations", "strides", "pads"), "ConvTranspose": ("dilations", "strides", "pads"),
                           "MaxPool": ("dilations", "strides", "pads"), "AveragePool": ("strides", "pads")}


def _drop_default_attributes(nodes: list[onnx.NodeProto], opset: int) -> None:
    """Leave out attributes set to their default (the schema's default value; for convs and pools, dilations and
    strides of all ones and pads of all zeros): the runtime reads the same value. Model B: 14 KB."""
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        kept = []
        for attribute in node.attribute:
            value = onnx.helper.get_attribute_value(attribute)
            declared = schema.attributes.get(attribute.name)
            default = declared.default_value if declared is not None else None
            if default is not None and default.type == attribute.type and \
                    onnx.helper.get_attribute_value(default) == value:
                continue
            if attribute.name in _UNIT_WINDOW_ATTRIBUTES.get(node.op_type, ()) and \
                    all(v == (0 if attribute.name == "pads" else 1) for v in value):
                continue
            kept.append(attribute)
        if len(kept) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(kept)


def _with_replacements(nodes: list[onnx.NodeProto], replaced: dict[int, list[onnx.NodeProto]],
                       graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` with each node whose id is in ``replaced`` replaced by the nodes given there, in its place, and the
    DequantizeLinear nodes nobody reads any more dropped."""
    if not replaced:
        return nodes
    return _without_dead_dequantize([new for node in nodes for new in replaced.get(id(node), [node])], graph_outputs)


def _without_dead_dequantize(nodes: list[onnx.NodeProto], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop DequantizeLinear nodes nothing reads any more (the merged convs' own input and weight dequantizers)."""
    read = set(_inputs_read(nodes)) | graph_outputs
    return [n for n in nodes if n.op_type != "DequantizeLinear" or any(o in read for o in n.output)]
