"""Graph compaction (fnl.export.graph_compaction): fewer bytes and nodes, the very same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fnl.export.graph_compaction import compact_graph, compact_onnx_file, part_tag
from fnl.export.onnx import to_onnx
from fnl.export.runtime import INPUT_NAME


def _run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray], optimized: bool = False) -> list[np.ndarray]:
    """Outputs of ONNX Runtime running the graph's own nodes (``optimized``: as deployed, int8 kernels fused).
    Without graph optimizations, a compacted graph and the exporter's run the same kernels node for node, so their
    outputs must be equal bit for bit on any CPU; with them, ONNX Runtime decides per graph whether a QDQ pair becomes
    an int8 kernel (the identity casts that compaction drops can stop that fusion), and an int8 kernel rounds
    otherwise than a float one: ``optimized`` compares graphs whose int8 kernels are meant to match."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _toy_graph() -> onnx.ModelProto:
    """x -> QuantizeLinear -> identity Cast -> DequantizeLinear -> Add(ConstantOfShape zeros) -> If (branches read
    outer values) -> y, with the same scale stored twice as Constant nodes."""
    scale = numpy_helper.from_array(np.array(0.1, np.float32))
    nodes = [
        helper.make_node("Constant", [], ["/a/scale"], value=scale, name="/a/Constant"),
        helper.make_node("Constant", [], ["/b/scale"], value=scale, name="/b/Constant"),
        helper.make_node("Constant", [], ["/a/zero_point"], value=numpy_helper.from_array(np.array(3, np.uint8))),
        helper.make_node("QuantizeLinear", ["x", "/a/scale", "/a/zero_point"], ["/a/q"], name="/a/QuantizeLinear"),
        helper.make_node("Cast", ["/a/q"], ["/a/cast"], to=TensorProto.UINT8, name="/a/Cast"),
        helper.make_node("DequantizeLinear", ["/a/cast", "/b/scale", "/a/zero_point"], ["/a/dq"]),
        helper.make_node("Constant", [], ["/c/shape"], value=numpy_helper.from_array(np.array([2, 3], np.int64))),
        helper.make_node("ConstantOfShape", ["/c/shape"], ["/c/ones"],
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Add", ["/a/dq", "/c/ones"], ["/c/sum"]),
        helper.make_node("ReduceSum", ["/c/sum"], ["/c/total"], keepdims=0),
        helper.make_node("Constant", [], ["/c/limit"], value=numpy_helper.from_array(np.array(5.0, np.float32))),
        helper.make_node("Greater", ["/c/total", "/c/limit"], ["/c/big"]),
    ]
    then_branch = helper.make_graph([helper.make_node("Mul", ["/c/sum", "/a/scale"], ["/then/out"])], "then", [],
                                    [helper.make_tensor_value_info("/then/out", TensorProto.FLOAT, [2, 3])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["/a/dq"], ["/else/out"])], "else", [],
                                    [helper.make_tensor_value_info("/else/out", TensorProto.FLOAT, [2, 3])])
    nodes.append(helper.make_node("If", ["/c/big"], ["y"], then_branch=then_branch, else_branch=else_branch))
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_compaction_folds_constants_drops_identity_casts_and_shortens_names_without_changing_outputs():
    model = _toy_graph()
    onnx.checker.check_model(model, full_check=True)
    compacted = compact_graph(model)
    onnx.checker.check_model(compacted, full_check=True)

    op_types = [node.op_type for node in compacted.graph.node]
    assert "Constant" not in op_types and "ConstantOfShape" not in op_types and "Cast" not in op_types
    assert op_types == ["QuantizeLinear", "DequantizeLinear", "Add", "ReduceSum", "Greater", "If"]
    # Both scale constants became one initializer; the ones of ConstantOfShape an initializer of its own.
    assert sorted(len(t.dims) for t in compacted.graph.initializer) == [0, 0, 0, 2]
    assert [node.name for node in compacted.graph.node] == [f"g.{i:x}" for i in range(6)]  # untagged scopes: glue
    assert all(not name.startswith("/") for node in compacted.graph.node for name in (*node.input, *node.output))
    assert [v.name for v in compacted.graph.input] == ["x"] and [v.name for v in compacted.graph.output] == ["y"]
    assert len(model.graph.node) == 13  # the input model is left as it was

    for x in (np.full((2, 3), 0.05, np.float32), np.linspace(-1, 2, 6, dtype=np.float32).reshape(2, 3)):
        np.testing.assert_array_equal(_run(compacted, {"x": x})[0], _run(model, {"x": x})[0])


def test_a_loop_body_keeps_reading_its_own_inputs_after_compaction():
    """Loop bodies have inputs of their own (iteration number, condition, carried values), renamed with the nodes
    that read them."""
    scale = numpy_helper.from_array(np.array(2.0, np.float32))
    body = helper.make_graph(
        [helper.make_node("Identity", ["/body/condition_in"], ["/body/condition_out"]),
         helper.make_node("Mul", ["/body/carried_in", "/outer/scale"], ["/body/carried_out"])],
        "body",
        [helper.make_tensor_value_info("/body/iteration", TensorProto.INT64, []),
         helper.make_tensor_value_info("/body/condition_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("/body/carried_in", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("/body/condition_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("/body/carried_out", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("Constant", [], ["/outer/scale"], value=scale),
        helper.make_node("Constant", [], ["/outer/trips"], value=numpy_helper.from_array(np.array(3, np.int64))),
        helper.make_node("Constant", [], ["/outer/true"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Loop", ["/outer/trips", "/outer/true", "x"], ["y"], body=body),
    ]
    graph = helper.make_graph(nodes, "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compacted = compact_graph(model)
    onnx.checker.check_model(compacted, full_check=True)
    x = np.array([1.0, -0.5], np.float32)
    np.testing.assert_array_equal(_run(compacted, {"x": x})[0], x * 8)


def test_a_compacted_int8_export_is_smaller_and_computes_exactly_what_the_exporter_wrote(int8_export, tmp_path):
    named = to_onnx(int8_export.int8_model, tmp_path / "named.onnx", int8_export.images[0], compact=False)
    compacted = compact_onnx_file(named, tmp_path / "compact.onnx")

    assert compacted.stat().st_size < 0.8 * named.stat().st_size
    named_ops = [node.op_type for node in onnx.load(str(named)).graph.node]
    compact_ops = [node.op_type for node in onnx.load(str(compacted)).graph.node]
    # The exporter's uint8 -> uint8 casts sat between every QuantizeLinear and DequantizeLinear.
    assert named_ops.count("Cast") > compact_ops.count("Cast") and "Constant" not in compact_ops
    assert compact_ops.count("Conv") == named_ops.count("Conv")
    for image in [*int8_export.images[:3], int8_export.blank]:
        feeds = {INPUT_NAME: image[None].numpy()}
        for ours, exporters in zip(_run(str(compacted), feeds), _run(str(named), feeds), strict=True):
            np.testing.assert_array_equal(ours, exporters)


def test_fnl_exports_are_compacted_by_default(int8_export):
    graph = onnx.load(str(int8_export.path)).graph
    assert not any(node.op_type == "Constant" for node in graph.node)
    # Node names are the part each node was traced in (what fnl.export.profile sums by), and unique.
    assert {node.name.split(".")[0] for node in graph.node} == {"bb", "rpn", "box", "dp", "g"}
    assert len({node.name for node in graph.node}) == len(graph.node)
    # The DensePose predictor's four transposed convs are int8 sub-pixel convs, each with its own output scale (so
    # not merged as float transposed convs are): four convs, pixel shuffles and crops, no ConvTranspose. Each pixel
    # shuffle is int8 and runs channels-last: a Transpose of (N, H, W, 2, 2, C) blocks, no DepthToSpace.
    op_types = [node.op_type for node in graph.node]
    assert op_types.count("ConvTranspose") == 0 and op_types.count("DepthToSpace") == 0
    shuffles = [node for node in graph.node if node.op_type == "Transpose" and len(node.attribute[0].ints) == 6]
    assert len(shuffles) == 4 and all(node.name.startswith("dp.") for node in shuffles)


@pytest.mark.parametrize("scope", ["/roi_heads/densepose_predictor/module/u_lowres/ConvTranspose",
                                   "/roi_heads/decoder/p3/0/conv/Conv", "/roi_heads/box_pooler/RoiAlign",
                                   "/proposal_generator/rpn_head/conv/Conv", "/backbone/bottom_up/conv_stem/Conv",
                                   "/Sub", ""])
def test_part_tag_of_a_scope(scope):
    expected = {"densepose": "dp", "decoder": "dp", "box_pooler": "box", "rpn_head": "rpn", "backbone": "bb"}
    assert part_tag(scope) == next((tag for key, tag in expected.items() if key in scope), "g")


def _parallel_conv_transposes(quantized: bool) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """x -> three ConvTranspose (4x4, stride 2, 2 / 5 / 3 outputs) -> y0, y1, y2; with ``quantized``, x and the
    weights reach them through per-tensor DequantizeLinear nodes (one per conv, with scales of their own, as torch.onnx
    writes them) and the biases are int32."""
    rng = np.random.default_rng(0)
    counts, nodes, initializers = [2, 5, 3], [], []

    def constant(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(value, name))
        return name

    if quantized:
        nodes.append(helper.make_node("QuantizeLinear", ["x", constant("xs", np.array(0.05, np.float32)),
                                                          constant("xz", np.array(128, np.uint8))], ["xq"]))
    for k, count in enumerate(counts):
        weight = rng.normal(size=(4, count, 4, 4)).astype(np.float32)
        bias = rng.normal(size=count).astype(np.float32)
        if quantized:
            ws = np.float32(np.abs(weight).max() / 127)
            nodes.append(helper.make_node("DequantizeLinear", ["xq", constant(f"xs{k}", np.array(0.05, np.float32)),
                                                               constant(f"xz{k}", np.array(128, np.uint8))],
                                          [f"x{k}"]))
            nodes.append(helper.make_node("DequantizeLinear", [constant(f"w{k}", np.round(weight / ws).astype(np.int8)),
                                                               constant(f"ws{k}", np.array(ws)),
                                                               constant(f"wz{k}", np.array(0, np.int8))], [f"wf{k}"]))
            nodes.append(helper.make_node("DequantizeLinear", [
                constant(f"b{k}", np.round(bias / (ws * 0.05)).astype(np.int32)),
                constant(f"bs{k}", np.array(ws * 0.05, np.float32)), constant(f"bz{k}", np.array(0, np.int32))],
                [f"bf{k}"]))
            inputs = [f"x{k}", f"wf{k}", f"bf{k}"]
        else:
            inputs = ["x", constant(f"w{k}", weight), constant(f"b{k}", bias)]
        nodes.append(helper.make_node("ConvTranspose", inputs, [f"y{k}"], kernel_shape=[4, 4], strides=[2, 2],
                                      pads=[1, 1, 1, 1], name=f"/densepose_predictor/{k}/ConvTranspose"))
    graph = helper.make_graph(nodes, "deconvs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, [1, n, 12, 12])
                               for k, n in enumerate(counts)], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model, [rng.normal(size=(1, 4, 6, 6)).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("quantized", [False, True])
def test_transposed_convs_reading_one_input_become_one_with_the_same_outputs(quantized):
    model, inputs = _parallel_conv_transposes(quantized)
    compacted = compact_graph(model)
    onnx.checker.check_model(compacted, full_check=True)
    op_types = [node.op_type for node in compacted.graph.node]
    assert op_types.count("ConvTranspose") == 1 and op_types.count("Split") == 1
    if quantized:  # x dequantized once, the merged int8 weights once (per output channel)
        assert op_types.count("DequantizeLinear") == 2
        assert any(t.data_type == TensorProto.INT8 and tuple(t.dims) == (4, 10, 4, 4)
                   for t in compacted.graph.initializer)
    for x in inputs:
        for ours, before in zip(_run(compacted, {"x": x}), _run(model, {"x": x}), strict=True):
            np.testing.assert_array_equal(ours, before)


def test_a_transposed_conv_with_other_attributes_stays_apart():
    model, _ = _parallel_conv_transposes(quantized=False)
    pads = next(a for a in model.graph.node[1].attribute if a.name == "pads")
    pads.ints[:] = [0, 0, 0, 0]  # the second conv: no padding, a larger output
    for dim in model.graph.output[1].type.tensor_type.shape.dim[2:]:
        dim.dim_value = 14
    compacted = compact_graph(model)
    # The first and the third still merge; the second keeps its own node.
    assert [node.op_type for node in compacted.graph.node].count("ConvTranspose") == 2
    x = np.ones((1, 4, 6, 6), np.float32)
    for ours, before in zip(_run(compacted, {"x": x}), _run(model, {"x": x}), strict=True):
        np.testing.assert_array_equal(ours, before)


class _QuantizedGraph:
    """A QDQ graph under construction, as torch.onnx writes eager int8 models: uint8 activations quantized per
    tensor, int8 conv weights and int32 biases per output channel (bias scale = input scale x weight scale)."""

    def __init__(self, channels: int, size: int | tuple[int, int] = 12) -> None:
        self.rng = np.random.default_rng(0)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        height, width = (size, size) if isinstance(size, int) else size
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, height, width])
        self.counter = 0
        self.value, self.scale = self.quantize("x", 0.05, 128), 0.05

    def constant(self, value: np.ndarray) -> str:
        self.counter += 1
        name = f"c{self.counter}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op_type: str, inputs: list[str], **attributes) -> str:
        self.counter += 1
        output = f"v{self.counter}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attributes))
        return output

    def quantize(self, value: str, scale: float, zero_point: int) -> str:
        """value -> QuantizeLinear -> DequantizeLinear (what the next node reads)."""
        args = [self.constant(np.array(scale, np.float32)), self.constant(np.array(zero_point, np.uint8))]
        quantized = self.node("QuantizeLinear", [value, *args])
        return self.node("DequantizeLinear", [quantized, *args])

    def conv(self, source: str, out_channels: int, in_channels: int, group: int = 1, relu: bool = True,
             scale: float = 0.08) -> str:
        kernel = 3 if group > 1 else 1
        weight = self.rng.integers(-127, 128, (out_channels, in_channels // group, kernel, kernel)).astype(np.int8)
        weight_scale = self.rng.uniform(0.002, 0.01, out_channels).astype(np.float32)
        bias = self.rng.integers(-2000, 2000, out_channels).astype(np.int32)
        weight_value = self.node("DequantizeLinear", [self.constant(weight), self.constant(weight_scale),
                                                      self.constant(np.zeros(out_channels, np.int8))], axis=0)
        bias_value = self.node("DequantizeLinear", [self.constant(bias), self.constant(weight_scale * self.scale),
                                                    self.constant(np.zeros(out_channels, np.int32))], axis=0)
        out = self.node("Conv", [source, weight_value, bias_value], group=group, kernel_shape=[kernel, kernel],
                        pads=[kernel // 2] * 4)
        if relu:
            out = self.node("Relu", [out])
        self.scale = scale
        return self.quantize(out, scale, 0 if relu else 100)

    def model(self, outputs: list[str], shape_output: str = "") -> onnx.ModelProto:
        """The graph with float feature-map ``outputs`` and, with ``shape_output``, one int64 shape output."""
        values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", "c", "h", "w"]) for name in outputs]
        if shape_output:
            values.append(helper.make_tensor_value_info(shape_output, TensorProto.INT64, [4]))
        graph = helper.make_graph(self.nodes, "quantized", [self.input], values, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model, full_check=True)
        return model


def _assert_same_outputs(compacted: onnx.ModelProto, model: onnx.ModelProto, x: np.ndarray) -> None:
    """Bit for bit, node by node and with ONNX Runtime's int8 kernels fused."""
    for optimized in (False, True):
        for ours, before in zip(_run(compacted, {"x": x}, optimized), _run(model, {"x": x}, optimized), strict=True):
            np.testing.assert_array_equal(ours, before)


def _groups(model: onnx.ModelProto) -> list[int]:
    return [next((a.i for a in n.attribute if a.name == "group"), 1) for n in model.graph.node if n.op_type == "Conv"]


@pytest.mark.parametrize("channels", [72, 120])
def test_int8_depthwise_convs_get_zero_channels_up_to_a_multiple_of_16_with_the_same_outputs(channels):
    """spnasnet's inverted residual: expand 1x1 -> depthwise 3x3 -> project 1x1, its depthwise output also read by
    another 1x1 conv (a feature the neck takes); every reader of the padded channels is padded with zero weights."""
    graph = _QuantizedGraph(8)
    expanded = graph.conv(graph.value, channels, 8)
    depthwise = graph.conv(expanded, channels, channels, group=channels)
    projected = graph.conv(depthwise, 8, channels, relu=False)
    lateral = graph.conv(depthwise, 16, channels)
    model = graph.model([projected, lateral])
    compacted = compact_graph(model)
    onnx.checker.check_model(compacted, full_check=True)
    assert _groups(compacted) == [1, -(-channels // 16) * 16, 1, 1]
    x = graph.rng.normal(size=(1, 8, 12, 12)).astype(np.float32)
    _assert_same_outputs(compacted, model, x)


def test_a_depthwise_conv_whose_output_reaches_more_than_convs_keeps_its_channels():
    graph = _QuantizedGraph(8)
    depthwise = graph.conv(graph.conv(graph.value, 72, 8), 72, 72, group=72)
    model = graph.model([graph.conv(depthwise, 8, 72), depthwise])  # the depthwise output is also a graph output
    assert _groups(compact_graph(model)) == [1, 72, 1]


def test_a_scalar_multiply_that_only_rescales_int8_values_is_dropped_with_the_same_outputs():
    """torch's quantized mul_scalar (BiFPN fusion weights): DequantizeLinear -> Mul(c) -> QuantizeLinear at scale x c
    gives back the integers it was fed. A multiply whose QuantizeLinear rounds (another scale) stays."""
    graph = _QuantizedGraph(4)
    source = graph.conv(graph.value, 4, 4)
    rescaled = graph.node("Mul", [source, graph.constant(np.array(0.3712, np.float32))])
    exact = graph.node("DequantizeLinear", [graph.node("QuantizeLinear", [
        rescaled, graph.constant(np.array(np.float32(0.08) * np.float32(0.3712), np.float32)),
        graph.constant(np.array(0, np.uint8))]), graph.initializers[-2].name, graph.initializers[-1].name])
    other = graph.node("Mul", [source, graph.constant(np.array(0.5, np.float32))])
    rounded = graph.quantize(other, 0.03, 0)
    model = graph.model([exact, rounded])
    compacted = compact_graph(model)
    dequantized = {n.output[0] for n in compacted.graph.node if n.op_type == "DequantizeLinear"}
    assert sum(n.op_type == "Mul" and n.input[0] in dequantized for n in compacted.graph.node) == 1
    op_types, before = ([node.op_type for node in m.graph.node] for m in (compacted, model))
    assert op_types.count("QuantizeLinear") == before.count("QuantizeLinear") - 1
    _assert_same_outputs(compacted, model, graph.rng.normal(size=(1, 4, 12, 12)).astype(np.float32) * 3)


def test_shape_of_a_dequantized_tensor_reads_the_integers_and_the_dequantize_goes():
    graph = _QuantizedGraph(4)
    source = graph.conv(graph.value, 4, 4)
    dequantize = graph.nodes[-1]
    shape = graph.node("Shape", [graph.node("DequantizeLinear", list(dequantize.input))])
    model = graph.model([source], shape_output=shape)
    compacted = compact_graph(model)
    assert [n.op_type for n in compacted.graph.node].count("DequantizeLinear") == \
        [n.op_type for n in model.graph.node].count("DequantizeLinear") - 1
    _assert_same_outputs(compacted, model, graph.rng.normal(size=(1, 4, 12, 12)).astype(np.float32))


def _fused_op_types(model: onnx.ModelProto, tmp_path) -> list[str]:
    """The node types of the graph ONNX Runtime runs after its optimizations (int8 kernels fused)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def test_int8_conv_constants_are_stored_smaller_and_still_fuse_into_int8_convs(tmp_path):
    """Zero points of zeros left out, bias scale = input scale x weight scale as a Mul, int32 biases that fit int16
    stored as int16 + Cast: a smaller file, the same outputs, and ONNX Runtime still runs QLinearConv."""
    graph = _QuantizedGraph(8)
    model = graph.model([graph.conv(graph.conv(graph.value, 32, 8), 16, 32, relu=False)])
    compacted = compact_graph(model)
    assert compacted.ByteSize() < model.ByteSize()
    assert not any(t.data_type == TensorProto.INT32 for t in compacted.graph.initializer)
    assert sum(t.data_type == TensorProto.INT16 for t in compacted.graph.initializer) == 2
    assert all(len(n.input) == 2 for n in compacted.graph.node
               if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute))
    assert _fused_op_types(compacted, tmp_path).count("QLinearConv") == 2
    assert _fused_op_types(model, tmp_path).count("QLinearConv") == 2
    _assert_same_outputs(compacted, model, graph.rng.normal(size=(1, 8, 12, 12)).astype(np.float32))


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize(("size", "target"), [
    ((8, 6), (16, 12)),  # the neck's 2x up-sampling
    ((5, 3), (9, 5)),  # odd sizes: a coarser level of an odd one
    ((9, 7), (5, 4)),  # down-sampling (the BiFPN's bottom-up path)
    ((4, 6), (11, 7)),  # any other sizes
    ((1, 1), (6, 5)),  # a pooled 1 x 1 map spread over a feature map (DensePose head's ASPP)
])
@pytest.mark.parametrize("by", ["sizes", "scales"])
def test_an_int8_nearest_resize_becomes_gathers_in_channels_last_order_with_the_same_outputs(size, target, by):
    """DequantizeLinear -> Resize(nearest) -> QuantizeLinear of one quantization moves integers only: it becomes
    Transpose -> Gather rows -> Gather pixels -> Transpose of the integers, whose rows and pixels are the ones a
    1-D Resize with the node's own attributes picks, so any sizes give the same values."""
    graph = _QuantizedGraph(4, size)
    source = graph.conv(graph.value, 16, 4)
    dequantize = graph.nodes[-1]
    if by == "sizes":
        resize_inputs = [source, "", "", graph.constant(np.array([1, 16, *target], np.int64))]
    else:
        scales = [np.float32(t) / np.float32(s) for s, t in zip(size, target, strict=True)]
        resize_inputs = [source, "", graph.constant(np.array([1, 1, *scales], np.float32))]
    resized = graph.node("Resize", resize_inputs, mode="nearest", coordinate_transformation_mode="asymmetric",
                         nearest_mode="floor")
    quantized = graph.node("QuantizeLinear", [resized, *dequantize.input[1:]])
    model = graph.model([graph.conv(graph.node("DequantizeLinear", [quantized, *dequantize.input[1:]]), 8, 16)])
    compacted = compact_graph(model)
    assert _op_types(compacted).count("Resize") == 2  # one per axis, each of a 1-D row of positions
    assert {len(_shape_of(compacted, n.input[0])) for n in compacted.graph.node if n.op_type == "Resize"} == {1}
    _assert_same_outputs(compacted, model, graph.rng.normal(size=(1, 4, *size)).astype(np.float32))


def _shape_of(model: onnx.ModelProto, name: str) -> list[int]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    value = next(v for v in (*inferred.graph.value_info, *inferred.graph.input) if v.name == name)
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def test_a_resize_that_rounds_stays():
    """Bilinear Resize computes new values, and a QuantizeLinear of another scale rounds: both stay Resizes."""
    graph = _QuantizedGraph(4)
    source = graph.conv(graph.value, 4, 4)
    sizes = graph.constant(np.array([1, 4, 24, 24], np.int64))
    bilinear = graph.quantize(graph.node("Resize", [source, "", "", sizes], mode="linear"), 0.08, 0)
    rescaled = graph.quantize(graph.node("Resize", [source, "", "", sizes], mode="nearest"), 0.05, 0)
    compacted = compact_graph(graph.model([bilinear, rescaled]))
    assert _op_types(compacted).count("Resize") == 2 and "Gather" not in _op_types(compacted)


@pytest.mark.parametrize("mode", ["CRD", "DCR"])
def test_an_int8_depth_to_space_runs_in_channels_last_order_with_the_same_outputs(mode):
    """The DensePose predictor's sub-pixel conv: int8 conv (4 x 6 channels) -> DepthToSpace(2) -> crop. In CRD
    order (torch's pixel_shuffle) the conv's output channels are reordered to DCR, so the channels-last Transpose
    moves runs of 2 x 6 bytes."""
    graph = _QuantizedGraph(8, (7, 5))
    source = graph.conv(graph.value, 24, 8, relu=False)
    dequantize = graph.nodes[-1]
    moved = graph.node("DepthToSpace", [source], blocksize=2, mode=mode)
    quantized = graph.node("QuantizeLinear", [moved, *dequantize.input[1:]])
    cropped = graph.node("Slice", [graph.node("DequantizeLinear", [quantized, *dequantize.input[1:]]),
                                   graph.constant(np.array([1, 1])), graph.constant(np.array([-1, -1])),
                                   graph.constant(np.array([2, 3]))])
    model = graph.model([cropped])
    compacted = compact_graph(model)
    assert "DepthToSpace" not in _op_types(compacted)
    _assert_same_outputs(compacted, model, graph.rng.normal(size=(1, 8, 7, 5)).astype(np.float32))


def test_a_crd_depth_to_space_whose_conv_output_is_read_elsewhere_stays():
    """Reordering the conv's channels would change what the other reader sees."""
    graph = _QuantizedGraph(8)
    source = graph.conv(graph.value, 16, 8)
    dequantize = graph.nodes[-1]
    moved = graph.node("DepthToSpace", [source], blocksize=2, mode="CRD")
    quantized = graph.node("QuantizeLinear", [moved, *dequantize.input[1:]])
    model = graph.model([graph.node("DequantizeLinear", [quantized, *dequantize.input[1:]]),
                         graph.node("DequantizeLinear", list(dequantize.input))])
    assert "DepthToSpace" in _op_types(compact_graph(model))


def test_nodes_computed_twice_are_computed_once_and_default_attributes_are_left_out():
    """Two Shape -> Gather(constant index) chains of one value (the constants stored apart) become one; Conv's
    all-ones strides and dilations, zero pads, group 1 and Gather's axis 0 are the defaults and are left out."""
    graph = _QuantizedGraph(4)
    source = graph.conv(graph.value, 4, 4)
    dims = [graph.node("Gather", [graph.node("Shape", [source]), graph.constant(np.array([2]))], axis=0)
            for _ in range(2)]
    total = graph.node("Add", dims)
    model = graph.model([source], shape_output="")
    model.graph.output.append(helper.make_tensor_value_info(total, TensorProto.INT64, [1]))
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    conv.attribute.extend([helper.make_attribute("strides", [1, 1]), helper.make_attribute("dilations", [1, 1])])
    compacted = compact_graph(model)
    op_types = _op_types(compacted)
    assert op_types.count("Shape") == 1 and op_types.count("Gather") == 1
    kept = {a.name for n in compacted.graph.node if n.op_type in ("Conv", "Gather") for a in n.attribute}
    assert kept == {"kernel_shape"}
    for ours, before in zip(_run(compacted, {"x": np.ones((1, 4, 12, 12), np.float32)}),
                            _run(model, {"x": np.ones((1, 4, 12, 12), np.float32)}), strict=True):
        np.testing.assert_array_equal(ours, before)
