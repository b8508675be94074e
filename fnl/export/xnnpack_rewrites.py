"""Exact rewrites of a region's FX program before XNNPACK lowering (``fnl.export.executorch.lower_to_xnnpack``), so
that ExecuTorch runs it in one XNNPACK partition, channels-last, instead of leaving ops to its portable kernels.

Why (executorch 1.5.1, model B's backbone program at 512 px, 1 thread, docs/PROFILE.md): XNNPACK's partitioner has
no nearest resampling and no max pool of kernel 1, so the BiFPN's 24 nearest up / down-samplings and its P6 pool ran
on ExecuTorch's portable kernels, in float, between 26 XNNPACK partitions that converted every tensor NHWC -> NCHW
and back (and int8 -> float -> int8) at each boundary. The multiplies by the BiFPN's fusion weights, 0-d tensors
computed from parameters at run time, also kept XNNPACK's tensors in NCHW around them. Written as below, the
backbone is one partition with 6 layout transposes instead of 85: int8 29.0 -> 21.0 ms, float32 40.1 -> 35.8 ms.

- ``resamplings_as_convs``: a nearest 2x up-sampling becomes a transposed conv (kernel 2, stride 2) whose weight is
  the identity over channels; a nearest 2x down-sampling, or a max pool of kernel 1 and stride 2, a depthwise conv
  (kernel 1, stride 2) of unit weights; a nearest resampling from 1 x 1 (the DensePose head's ASPP pooling branch)
  a broadcasting multiply by ones. In float each output is ``x * 1`` plus exact zeros. In an int8 program (the
  resampling reads a dequantize) the weights are int8 1 at scale 1 and the output is quantized with the input's
  scale and zero point: XNNPACK's requantization multiplier is exactly 1, so the integers are copied (a different
  quantization after the resampling stays where it was). The sizes decide what is 2x: in a program of dynamic
  shapes only sizes the program fixes count.
- ``parameter_scalars_as_constants``: a 0-d tensor computed from parameters alone becomes a (1, 1, 1, 1) constant
  (the same value), which XNNPACK broadcasts channels-last.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx.passes.shape_prop import ShapeProp

UP, DOWN, BROADCAST = "up", "down", "broadcast"
NEAREST = ("upsample_nearest2d.vec", "upsample_nearest2d.default")


def _spatial(node: torch.fx.Node, static_only: bool) -> tuple[int, int] | None:
    """(H, W) of a node's tensor as ``ShapeProp`` recorded it; with ``static_only``, None unless the program's own
    shape (``meta["val"]``, from ``torch.export``) has them as plain ints rather than dynamic sizes."""
    if static_only:
        while "val" not in node.meta and _is(node, "quantize_per_tensor.default", "dequantize_per_tensor.default"):
            node = node.args[0]  # convert_pt2e's (de)quantize nodes have no recorded value; their input has
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not all(type(size) is int for size in value.shape[-2:]):
            return None
    height, width = node.meta["tensor_meta"].shape[-2:]
    return int(height), int(width)


def _is(node: Any, *names: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and any(
        str(node.target).endswith(name) for name in names)


def resampling_candidate(node: torch.fx.Node) -> bool:
    return _is(node, *NEAREST, "max_pool2d.default")


def resampling_kind(node: torch.fx.Node, static_only: bool = False) -> str | None:
    """UP / DOWN for a nearest resampling by exactly 2 on both axes, BROADCAST for one from 1 x 1, DOWN for a max
    pool of kernel 1 and stride 2 (it keeps the pixels of even index, at any size); None otherwise. Reads the shapes
    ``ShapeProp`` recorded; with ``static_only`` (a program of dynamic shapes), only sizes the program fixes."""
    if _is(node, *NEAREST):
        source, result = _spatial(node.args[0], static_only), _spatial(node, static_only)
        if source is None or result is None:
            return None
        (height, width), (out_height, out_width) = source, result
        if (height, width) == (1, 1):
            return BROADCAST
        if (out_height, out_width) == (2 * height, 2 * width):
            return UP
        if (height, width) == (2 * out_height, 2 * out_width):
            return DOWN
    if _is(node, "max_pool2d.default"):
        kernel, stride, padding, dilation, ceil_mode = (list(node.args[1:]) + [None] * 5)[:5]
        stride = stride or kernel
        pairs = [list(v) * (2 // len(v)) for v in (kernel, stride, padding or [0], dilation or [1])]
        if pairs == [[1, 1], [2, 2], [0, 0], [1, 1]] and not ceil_mode:
            return DOWN
    return None


def _quantize_ops() -> tuple[Any, Any]:
    return (torch.ops.quantized_decomposed.quantize_per_tensor.default,
            torch.ops.quantized_decomposed.dequantize_per_tensor.default)


def resamplings_as_convs(program: torch.fx.GraphModule, args: tuple[Any, ...], dynamic: bool = False) -> int:
    """Rewrite ``program``'s nearest resamplings by 2 and from 1 x 1, and its kernel-1 stride-2 max pools, as ops
    XNNPACK runs (module docstring); ``args`` are inputs the program runs on. In a program of ``dynamic`` shapes
    only resamplings whose sizes the program fixes are rewritten. Returns how many were."""
    if not any(resampling_candidate(node) for node in program.graph.nodes):
        return 0
    with torch.no_grad():
        ShapeProp(program).propagate(*args)
    graph = program.graph
    # Decided before any rewrite: a new op has no recorded shape for a later resampling to read.
    rewrites = [(node, kind, node.meta["tensor_meta"].shape) for node in graph.nodes
                if (kind := resampling_kind(node, static_only=dynamic))]
    weights: dict[tuple[str, tuple[int, ...], bool], torch.fx.Node] = {}
    for node, kind, shape in rewrites:
        source = node.args[0]
        quantize, dequantize = _quantize_ops() if _is(source, "dequantize_per_tensor.default") else (None, None)
        with graph.inserting_before(node):
            weight = _unit_weight(program, weights, kind, tuple(shape), quantized=quantize is not None)
            if kind == UP:
                result = graph.call_function(torch.ops.aten.conv_transpose2d.input,
                                             (source, weight, None, [2, 2], [0, 0], [0, 0], 1, [1, 1]))
            elif kind == DOWN:
                result = graph.call_function(torch.ops.aten.conv2d.default,
                                             (source, weight, None, [2, 2], [0, 0], [1, 1], shape[1]))
            else:
                result = graph.call_function(torch.ops.aten.mul.Tensor, (source, weight))
            if quantize is not None:
                qparams = tuple(source.args[1:])
                readers = list(node.users)
                already_quantized = len(readers) == 1 and readers[0].target == quantize and \
                    tuple(readers[0].args[1:]) == qparams
                if not already_quantized:
                    result = graph.call_function(dequantize, (graph.call_function(quantize, (result, *qparams)),
                                                              *qparams))
        result.meta = dict(node.meta)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
    graph.lint()
    program.recompile()
    return len(rewrites)


def _unit_weight(program: torch.fx.GraphModule, cache: dict[tuple[str, tuple[int, ...], bool], torch.fx.Node],
                 kind: str, shape: tuple[int, ...], quantized: bool) -> torch.fx.Node:
    """The constant operand of a rewrite of output ``shape`` (one buffer per kind, size and precision), as a graph
    node: for UP the identity (C, C, 2, 2) of a transposed conv, for DOWN (C, 1, 1, 1) ones, for BROADCAST
    (1, 1, H, W) ones; int8 1 at scale 1 when ``quantized``."""
    channels, size = shape[1], tuple(shape[-2:])
    key = (kind, (channels,) if kind != BROADCAST else size, quantized)
    if key not in cache:
        if kind == UP:
            weight = torch.zeros(channels, channels, 2, 2)
            weight[torch.arange(channels), torch.arange(channels)] = 1.0
        elif kind == DOWN:
            weight = torch.ones(channels, 1, 1, 1)
        else:
            weight = torch.ones(1, 1, *size)
        name = f"_xnnpack_{kind}_{'x'.join(map(str, key[1]))}{'_int8' if quantized else ''}"
        program.register_buffer(name, weight.to(torch.int8) if quantized else weight)
        node = program.graph.get_attr(name)
        if quantized:
            node = program.graph.call_function(_quantize_ops()[1], (node, 1.0, 0, -127, 127, torch.int8))
        cache[key] = node
    return cache[key]


def parameter_scalars_as_constants(program: torch.fx.GraphModule) -> int:
    """Replace every 0-d tensor that ``program`` computes from its parameters and buffers alone (and that only 4-D
    ops on activations read) by a (1, 1, 1, 1) buffer of the same value; returns how many. The parameter-only ops
    left without readers are removed."""
    graph = program.graph
    values: dict[torch.fx.Node, Any] = {}

    def value(node: torch.fx.Node) -> Any:
        if node not in values:
            if node.op == "get_attr":
                values[node] = _attribute(program, node.target)
            else:
                node_args, node_kwargs = torch.fx.node.map_arg((node.args, node.kwargs), value)
                values[node] = node.target(*node_args, **node_kwargs)
        return values[node]

    constant: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or node.op == "call_function" and node.all_input_nodes and not node.is_impure() \
                and all(source in constant for source in node.all_input_nodes):
            constant.add(node)
    folded = 0
    for node in list(graph.nodes):
        readers = [user for user in node.users if user not in constant]
        if node.op != "call_function" or node not in constant or not readers or _rank(node) not in (0, None):
            continue
        if not all(_rank(reader) == 4 for reader in readers):  # (1, 1, 1, 1) broadcasts as 0-d only in 4-D ops
            continue
        result = value(node)
        if isinstance(result, torch.Tensor) and result.dim() == 0:
            name = f"_parameter_scalar_{folded}"
            program.register_buffer(name, result.detach().clone().reshape(1, 1, 1, 1))
            with graph.inserting_before(node):
                node.replace_all_uses_with(graph.get_attr(name))
            folded += 1
    if folded:
        graph.eliminate_dead_code()
        program.recompile()
    return folded


def _rank(node: torch.fx.Node) -> int | None:
    """The rank of a node's tensor as ``torch.export`` recorded it (None when it did not)."""
    value = node.meta.get("val")
    return value.dim() if isinstance(value, torch.Tensor) else None


def _attribute(program: torch.nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(program.get_submodule(owner), name)
