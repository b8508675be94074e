"""Compaction of an exported ONNX graph: the same computation in fewer bytes and fewer nodes.

torch.onnx's TorchScript-based exporter writes, for an eager int8 model, a ``Cast`` to the same type after every
``QuantizeLinear`` (uint8 -> uint8) and every int32 bias zero point as ``ConstantOfShape`` -> ``Cast``, every scale
and zero point as its own ``Constant`` node, and long scoped names (``/backbone/module/bottom_up/blocks/1/0/...``)
on every node and value. For model B that is 0.9 MB of names and 3,000 constant nodes around 3 MB of int8 weights;
the identity casts also sit between ``QuantizeLinear`` and ``DequantizeLinear``, where they hide the QDQ pairs that
ONNX Runtime fuses into int8 kernels. ``compact_graph`` removes all of it without changing any computed value:

- identity ``Cast`` nodes are dropped (their consumers read the input instead);
- ``Constant`` nodes and ``ConstantOfShape`` of a constant shape become initializers, identical ones stored once;
- node names are cleared and value names shortened; the graph's input and output names are kept.
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
        while name in aliases:
            name = aliases[name]
        return name

    types = {value.name: value.type.tensor_type.elem_type for value in (*graph.value_info, *graph.input)}
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
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

    used = {resolve(name) for name in _inputs_read(nodes)} | kept_names
    initializers = _deduplicated([tensor for name, tensor in constants.items() if name in used], aliases)
    short_names = _ShortNames(kept_names)
    _rename(nodes, resolve, short_names)
    for tensor in initializers:
        tensor.name = short_names(tensor.name)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.value_info[:]  # shape annotations of values that no longer exist under these names
    return model


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


def _rename(nodes: Iterable[onnx.NodeProto], resolve, short_names: _ShortNames) -> None:
    """Clear node names and shorten value names, in subgraphs too (they read outer-scope values and their own
    inputs by name)."""
    for node in nodes:
        node.name = ""
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
