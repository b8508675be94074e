"""int8: QNNPACK-style nets from fnl.qat's int8 model, executed and compared with the PyTorch int8 model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from caffe2_testing import QUANTIZATION_WARNINGS, ptq_int8_model, verification_images
from export_testing import one_intra_op_thread, unpaired_decisive_detections

from fnl.export.caffe2 import Caffe2Predictor, NetExecutor, caffe2_report_row, to_caffe2, verify_caffe2
from fnl.export.caffe2.executor import Caffe2ExecutionError
from fnl.export.caffe2.predictor import prepare_inputs
from fnl.export.caffe2.proto import arguments_of, load_netdef, make_op
from fnl.export.caffe2.writer import INIT_NET_FILE, PREDICT_NET_FILE
from fnl.export.runtime import DENSEPOSE_OUTPUTS

pytestmark = QUANTIZATION_WARNINGS

INT8_OPS = {"Int8Quantize", "Int8Dequantize", "Int8Conv", "Int8ConvRelu", "Int8Add", "Int8FC", "Int8Concat",
            "Int8ResizeNearest", "Int8AveragePool", "Int8Flatten"}


def test_int8_net_runs_the_network_on_qnnpack_int8_operators(caffe2_int8):
    counts = caffe2_int8.export.operators
    assert INT8_OPS <= set(counts)
    # every conv / linear of the model is int8, the DensePose predictor's transposed convs too: sub-pixel Int8Convs,
    # their pixel shuffle (Reshape, Transpose, Reshape) and crop (Slice) moving the dequantized values
    assert not {"Conv", "ConvTranspose", "Int8ConvTranspose", "FC"} & set(counts)
    assert counts["Reshape"] == 8 and counts["Transpose"] == 4 and counts["Slice"] == 8
    ops = load_netdef(caffe2_int8.directory / PREDICT_NET_FILE).op
    for op in ops:
        if op.type.startswith("Int8") and op.type not in ("Int8Dequantize",):
            args = arguments_of(op)
            assert "Y_scale" in args and "Y_zero_point" in args, op.type
        if op.type in ("Int8Conv", "Int8ConvRelu", "Int8ConvTranspose", "Int8MaxPool"):
            assert arguments_of(op)["order"].s == b"NHWC"
    biases = [op for op in load_netdef(caffe2_int8.directory / INIT_NET_FILE).op if op.type == "Int8GivenIntTensorFill"]
    assert biases and all(arguments_of(op)["Y_zero_point"].i == 0 for op in biases)


def test_p6_subsampling_is_an_identity_depthwise_conv_that_qnnpack_can_create(caffe2_int8):
    """The BiFPN's P6 is a 1x1 max pool with stride 2, which QNNPACK refuses: it is written as an exact depthwise
    Int8Conv, and the executor refuses the Int8MaxPool that Caffe2 mobile could not create."""
    predict, init = (load_netdef(caffe2_int8.directory / name) for name in (PREDICT_NET_FILE, INIT_NET_FILE))
    pools = [op for op in predict.op if op.type in ("Int8MaxPool", "Int8AveragePool")]
    assert all(list(arguments_of(op).get("kernels", ()).ints) != [1, 1] for op in pools if op.type == "Int8MaxPool")
    subsampling = [op for op in predict.op if op.type == "Int8Conv" and "MaxPool" in op.name]
    assert len(subsampling) == 1
    args = arguments_of(subsampling[0])
    assert list(args["kernels"].ints) == [1, 1] and list(args["strides"].ints) == [2, 2]
    weight = next(op for op in init.op if op.output[0] == subsampling[0].input[1])
    assert arguments_of(weight)["Y_scale"].f == 0.5 and set(arguments_of(weight)["values"].s) == {130}
    assert args["group"].i == len(arguments_of(weight)["values"].s)

    # the same node as Int8MaxPool: refused, as QNNPACK refuses it
    op = subsampling[0]
    pool = make_op("Int8MaxPool", [op.input[0]], list(op.output), kernels=[1, 1], strides=[2, 2], pads=[0, 0, 0, 0],
                   order="NHWC", Y_scale=args["Y_scale"].f, Y_zero_point=args["Y_zero_point"].i)
    index = list(predict.op).index(op)
    predict.op.remove(op)
    predict.op.insert(index, pool)
    files = Caffe2Predictor(caffe2_int8.directory)
    inputs = prepare_inputs(np.asarray(verification_images()[0]), files.pixel_mean, files.size_divisibility)
    with pytest.raises(Caffe2ExecutionError, match="QNNPACK refuses 1x1 pooling"):
        NetExecutor(predict, init).run(inputs)


def test_per_channel_export_heads_are_within_one_quantization_step_of_pytorch(caffe2_int8_per_channel):
    result = verify_caffe2(caffe2_int8_per_channel.model, caffe2_int8_per_channel.directory, verification_images())
    assert result.stages_passed, result.table()
    assert {row.output for row in result.stages} == {"cls_logits", "bbox_deltas", "coarse_segm", "fine_segm", "u",
                                                     "v"}
    # One step, but for rounding ties that propagate through the head's stacked int8 layers: two at most.
    assert all(row.compared > 0 and row.max_abs_diff <= 2 * row.tolerance for row in result.stages)
    # End to end, detections of a random-weight model are decided by near-ties (quantized logits): reported only.
    assert result.end_to_end.rows[0].compared >= 1


def test_per_tensor_export_reports_what_requantizing_the_weights_costs(caffe2_int8):
    requantized = caffe2_int8.export.weight_requantization
    assert len(requantized) > 50  # fbgemm's per-channel weights: every conv and linear but the transposed convs
    assert all(r.max_abs_error <= r.max_abs_weight / 127 for r in requantized)  # at most one step of s_max
    result = verify_caffe2(caffe2_int8.model, caffe2_int8.directory, verification_images()[:1])
    steps = {row.output: row.max_abs_diff / row.tolerance for row in result.stages}
    assert all(0 <= s < 16 for s in steps.values()), result.table()  # honest, bounded, not hidden


def test_a_model_quantized_with_per_tensor_weights_exports_to_stock_caffe2_exactly(int8_model_per_tensor_weights,
                                                                                   tmp_path):
    # QUANTIZATION.WEIGHT_SCALES per-tensor: QAT / PTQ choose the one scale stock Caffe2 runs, nothing is requantized,
    # and the heads agree to a step as the per-channel export does with a per-channel model.
    with one_intra_op_thread():
        export = to_caffe2(int8_model_per_tensor_weights, tmp_path)
        result = verify_caffe2(int8_model_per_tensor_weights, tmp_path, verification_images())
    assert export.weight_scales == "per-tensor"
    assert export.weight_requantization == [] or all(r.max_abs_error == 0 for r in export.weight_requantization)
    assert result.stages_passed, result.table()
    assert all(row.compared > 0 and row.max_abs_diff <= 2 * row.tolerance for row in result.stages)


def test_on_qnnpack_the_box_head_computes_what_the_caffe2_net_computes_bit_for_bit(tiny_cfg, tmp_path):
    # The one exact comparison of two int8 implementations, as both do the same integer arithmetic: the engine is
    # pinned to qnnpack, which runs QNNPACK's kernels, the ones Caffe2 mobile's Int8 operators called (on x86 the same
    # SSE2 code whatever AVX-512 / AMX the CPU has), and the reference executor computes what they compute: with
    # per-tensor weights and biases on the int32 grid, exactly, on the same pooled RoI features. Nothing end to end is
    # exact.
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this PyTorch build has no qnnpack engine")
    previous = torch.backends.quantized.engine
    try:
        model = ptq_int8_model(tiny_cfg, "per-tensor", backend="qnnpack")
        assert torch.backends.quantized.engine == "qnnpack"
        with one_intra_op_thread():
            to_caffe2(model, tmp_path)
            result = verify_caffe2(model, tmp_path, verification_images())
    finally:
        torch.backends.quantized.engine = previous
    steps = {row.output: row.max_abs_diff / row.tolerance for row in result.stages if row.tolerance}
    assert set(steps) == {"cls_logits", "bbox_deltas", *DENSEPOSE_OUTPUTS}
    assert all(row.compared > 0 for row in result.stages)
    assert {name: steps[name] for name in ("cls_logits", "bbox_deltas")} == {"cls_logits": 0.0, "bbox_deltas": 0.0}
    # The DensePose head and predictor are int8 on qnnpack too (the predictor's sub-pixel convs): not bit for bit
    # (up to two steps in about 5 values in 100,000 of its outputs here; not traced to a layer), within the stage
    # criterion.
    assert result.stages_passed and all(steps[name] <= 2.001 for name in DENSEPOSE_OUTPUTS), result.table()


def test_report_row_scores_the_files_and_leaves_latency_empty(caffe2_int8, tiny_cfg):
    row, results = caffe2_report_row("model B int8 (Caffe2)", caffe2_int8.directory, tiny_cfg, "int8", "ptq")
    assert row.format == "caffe2" and row.precision == "int8" and row.method == "ptq"
    assert row.size_mb == caffe2_int8.export.size_mb
    assert row.latency_ms_p50 is None and row.latency_ms_p90 is None and row.fps is None
    assert row.bbox_AP is not None and row.densepose_AP is not None and "bbox" in results


def test_decisive_int8_model_detects_what_the_pytorch_int8_model_detects(int8_export, tmp_path):
    # tests/export's int8 model B with a fitted box classifier (export_testing.fit_decisive_detector). fbgemm and the
    # reference executor (QNNPACK's arithmetic) are different int8 kernels: candidates near the threshold may pass in
    # one only, and differently on another CPU, so the number of detections is not compared. What holds: the
    # verification's criteria, the heads within two steps on the same RoI features, the fitted objects in both.
    images = [*int8_export.images, int8_export.blank]
    to_caffe2(int8_export.int8_model, tmp_path / "per-channel", weight_scales="per-channel")
    result = verify_caffe2(int8_export.int8_model, tmp_path / "per-channel", images)
    assert result.passed, result.table()
    assert all(row.compared > 0 and row.max_abs_diff <= 2 * row.tolerance for row in result.stages), result.table()
    decisive, unpaired = unpaired_decisive_detections(
        int8_export.int8_model, Caffe2Predictor(tmp_path / "per-channel").run_image, int8_export.images)
    assert decisive >= 3 and unpaired == [], unpaired
    # Stock per-tensor weights move the heads' outputs by a few steps (reported, not judged, as in
    # test_per_tensor_export_reports_what_requantizing_the_weights_costs): near-threshold detections come and go, the
    # fitted objects stay.
    to_caffe2(int8_export.int8_model, tmp_path / "per-tensor")
    result = verify_caffe2(int8_export.int8_model, tmp_path / "per-tensor", images)
    steps = {row.output: row.max_abs_diff / row.tolerance for row in result.stages}
    assert all(0 <= s < 16 for s in steps.values()), result.table()
    decisive, unpaired = unpaired_decisive_detections(
        int8_export.int8_model, Caffe2Predictor(tmp_path / "per-tensor").run_image, int8_export.images)
    assert decisive >= 3 and unpaired == [], unpaired
