"""Per-operator and per-part profiles (fnl.export.profile) of the exported int8 graph and of the PyTorch models."""

from __future__ import annotations

import pytest

from fnl.export.profile import PARTS, Profile, format_profiles_markdown, onnx_part, profile_onnx, profile_torch


def test_an_onnx_profile_sums_kernel_time_by_operator_and_by_part(int8_export):
    images = [image.numpy() for image in int8_export.images[:2]]
    profile = profile_onnx(int8_export.path, images, threads=1)
    assert profile.runtime == "onnxruntime" and profile.images == 2
    # ONNX Runtime fused the QDQ convolutions into int8 kernels, the DensePose predictor's sub-pixel convs among
    # them (no float ConvTranspose left); RoIAlign and the predictor's pixel shuffles (int8 Transposes of channels-last
    # blocks) ran.
    assert profile.by_operator["QLinearConv"] > 0
    assert {"RoiAlign", "Transpose"} <= set(profile.by_operator) and "ConvTranspose" not in profile.by_operator
    # Every part ran (the graph's node names carry them), and parts and operators divide the same kernel time.
    assert all(profile.by_part.get(part, 0) > 0 for part in PARTS)
    assert sum(profile.by_part.values()) == pytest.approx(profile.total_ms, rel=1e-3, abs=0.01)
    assert 0 < profile.total_ms <= profile.wall_ms * 1.05


def test_a_torch_profile_times_the_model_parts(int8_export):
    profile = profile_torch(int8_export.float_model.eval(), int8_export.images[:2], threads=1, name="float")
    assert profile.runtime == "pytorch" and profile.rois >= 1  # the decisive model finds its person
    assert profile.by_part["backbone+neck"] > 0 and profile.by_part["densepose head"] > 0
    assert sum(profile.by_part.values()) == pytest.approx(profile.wall_ms, rel=0.02)
    assert any(op.startswith("aten::") for op in profile.by_operator)


@pytest.mark.parametrize(("name", "part"), [("bb.1c", "backbone+neck"), ("rpn.3", "rpn"), ("dp.ff", "densepose head"),
                                            ("box.a0", "box head"), ("g.0", "glue"), ("", "glue"),
                                            ("bb.1c_token_4", "backbone+neck"), ("QLinearConv_12", "glue")])
def test_part_of_an_onnx_runtime_node(name, part):
    assert onnx_part(name) == part


def test_a_node_onnx_runtime_created_takes_the_part_of_the_value_it_is_named_after():
    assert onnx_part("82e_nchwc", {"82e": "rpn", "8": "box head"}) == "rpn"
    assert onnx_part("ReorderInput", {"82e": "rpn"}) == "glue"


def test_profiles_side_by_side_in_markdown():
    float32 = Profile("float32", "onnxruntime", 2, 1, 12.0, {"Conv": 8.0, "RoiAlign": 2.0},
                      {"backbone+neck": 7.0, "densepose head": 3.0}, rois=2.0)
    int8 = Profile("int8", "onnxruntime", 2, 1, 7.0, {"QLinearConv": 4.0, "RoiAlign": 2.0},
                   {"backbone+neck": 3.5, "densepose head": 2.5}, rois=2.0)
    text = format_profiles_markdown([float32, int8])
    assert "| Conv | 8.0 | - |" in text and "| QLinearConv | - | 4.0 |" in text
    assert "| **total** | **10.0** | **6.0** |" in text
    assert "| DensePose head per RoI | 1.5 | 1.2 |" in text
    assert format_profiles_markdown([]) == ""


def test_profiling_needs_images(int8_export):
    with pytest.raises(ValueError, match="at least one image"):
        profile_onnx(int8_export.path, [])
