import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fnl.export import OnnxModelError, OnnxPredictor


# The float32 graph, and the int8 (QDQ) one, whose every anchor is a proposal: a small image keeps that cheap.
@pytest.mark.parametrize(("exported", "shape"), [("tiny_export", (3, 150, 200)), ("int8_export", (3, 64, 80))])
def test_runtime_runs_in_a_process_that_never_imports_torch(exported, shape, request, tmp_path):
    path = request.getfixturevalue(exported).path
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from fnl.export.runtime import OnnxPredictor
        predictor = OnnxPredictor({str(path)!r}, threads=1)
        image = np.load({str(tmp_path / "image.npy")!r})
        (output,) = predictor([{{"image": image, "height": 300, "width": 400}}])
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        np.savez({str(tmp_path / "out.npz")!r}, boxes=output["boxes"], u=output["densepose"]["u"])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    fresh = np.load(tmp_path / "out.npz")
    (here,) = OnnxPredictor(path, threads=1)([{"image": image, "height": 300, "width": 400}])
    np.testing.assert_allclose(fresh["boxes"], here["boxes"], atol=1e-4)
    np.testing.assert_allclose(fresh["u"], here["densepose"]["u"], atol=1e-4)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(OnnxModelError, match=r"ONNX model not found: .*nothing\.onnx"):
        OnnxPredictor(tmp_path / "nothing.onnx")


def test_a_file_of_another_format_is_a_clear_error(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a protobuf")
    with pytest.raises(OnnxModelError, match=rf"{path} is not a loadable ONNX model"):
        OnnxPredictor(path)


def test_a_truncated_model_is_a_clear_error(tiny_export, tmp_path):
    path = tmp_path / "truncated.onnx"
    data = tiny_export.path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxModelError, match=rf"{path} is not a loadable ONNX model"):
        OnnxPredictor(path)


def test_an_onnx_model_with_other_inputs_is_a_clear_error(tmp_path):
    path = tmp_path / "classifier.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "classifier",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 224, 224])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(OnnxModelError, match=rf"{path} is not a model exported by fnl.export.to_onnx: "
                                             r"expected one input 'image'.*it has inputs \[\('input'"):
        OnnxPredictor(path)


def test_images_of_the_wrong_shape_or_dtype_are_refused(tiny_export):
    predictor = OnnxPredictor(tiny_export.path)
    with pytest.raises(ValueError, match=r"expected an RGB image of shape \(3, H, W\), got shape \(128, 160, 3\)"):
        predictor([{"image": np.zeros((128, 160, 3), dtype=np.uint8)}])
    with pytest.raises(ValueError, match=r"takes uint8 images .* got float32"):
        predictor([{"image": np.zeros((3, 128, 160), dtype=np.float32)}])
