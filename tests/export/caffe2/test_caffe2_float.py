"""float32: the Caffe2 net, executed, gives ONNX Runtime's detections and DensePose outputs."""

from __future__ import annotations

import numpy as np
import torch
from caffe2_testing import verification_images
from export_testing import random_image

from fnl.export import OnnxPredictor, to_onnx
from fnl.export.caffe2 import Caffe2Predictor, verify_caffe2
from fnl.export.caffe2.proto import arguments_of, load_netdef
from fnl.export.caffe2.writer import PREDICT_NET_FILE


def test_float_net_agrees_with_onnx_runtime_within_1e3_and_same_detections(caffe2_float):
    result = verify_caffe2(caffe2_float.model, caffe2_float.directory, verification_images())
    report = result.end_to_end
    assert result.passed, result.table()
    assert report.rows[0].output == "detections" and report.rows[0].compared == 15 and report.rows[0].failures == 0
    assert all(row.max_abs_diff <= 1e-3 for row in report.rows[1:])


def test_net_is_composed_of_caffe2_detection_operators(caffe2_float):
    counts = caffe2_float.export.operators
    levels = len(caffe2_float.model.proposal_generator.in_features)
    assert counts["GenerateProposals"] == levels
    assert counts["DistributeFpnProposals"] == counts["BatchPermutation"] == 1
    assert counts["BBoxTransform"] == counts["BoxWithNMSLimit"] == 1
    assert counts["RoIAlign"] == len(caffe2_float.model.roi_heads.in_features) + 1  # box levels + DensePose
    args = arguments_of(load_netdef(caffe2_float.directory / PREDICT_NET_FILE))
    assert args["size_divisibility"].i == 64 and args["precision"].s == b"float32"
    assert caffe2_float.export.size_mb > 0 and caffe2_float.export.weight_requantization == []


def test_predictor_returns_what_onnx_predictor_returns_in_the_original_size(caffe2_float, tmp_path):
    image = random_image(128, 192, seed=7)
    inputs = [{"image": image, "image_id": 3, "height": 256, "width": 384}]
    onnx_path = to_onnx(caffe2_float.model, tmp_path / "model.onnx", image)
    (expected,) = OnnxPredictor(onnx_path, threads=1)(inputs)
    (output,) = Caffe2Predictor(caffe2_float.directory)(inputs)
    assert set(output) == set(expected) and output["classes"].dtype == np.int64
    np.testing.assert_allclose(output["boxes"], expected["boxes"], atol=2e-3, rtol=0)
    for name, value in expected["densepose"].items():
        np.testing.assert_allclose(output["densepose"][name], value, atol=1e-3, rtol=0)
    assert torch.is_tensor(image)  # the input is left as it was


def test_verification_crops_images_to_the_nets_size_divisibility(caffe2_float):
    # 150x200 pads to 160x224 in PyTorch but 192x256 in the Caffe2 net: compared at 128x192, where both agree.
    result = verify_caffe2(caffe2_float.model, caffe2_float.directory, [random_image(150, 200, seed=9)])
    assert result.passed and result.cropped == 1, result.table()
    assert "cropped" in result.table()
