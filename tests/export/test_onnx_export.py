import onnx
import onnxruntime as ort
import pytest
import torch
from export_testing import EMPTY_OUTPUT_SHAPES, EXPORT_SIZE, OUTPUTS, op_types, random_image, tiny_model

from fnl.engine.inference import predict_dataset
from fnl.export import OnnxPredictor, to_onnx, verify_onnx
from fnl.export.onnx import ExportableRCNN


def test_export_passes_the_checker_and_declares_dynamic_sizes(tiny_export):
    onnx.checker.check_model(str(tiny_export.path), full_check=True)
    graph = onnx.load(str(tiny_export.path)).graph
    (image,) = graph.input
    dims = [d.dim_value or d.dim_param for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == [1, 3, "height", "width"]
    assert [o.name for o in graph.output] == OUTPUTS
    assert all(o.type.tensor_type.shape.dim[0].dim_param == "detections" for o in graph.output)
    # The detection glue is in the graph as standard ops.
    assert {"RoiAlign", "TopK", "NonMaxSuppression", "Range"} <= op_types(graph)
    assert not any(m.training for m in tiny_export.model.modules())  # export left the model in eval mode


def test_trace_makes_no_python_decision_on_traced_values(tiny_export):
    # A TracerWarning means a branch taken for the sample image was frozen into the graph.
    tracer = [str(w.message) for w in tiny_export.warnings if issubclass(w.category, torch.jit.TracerWarning)]
    assert tracer == []


def test_onnx_runtime_matches_pytorch_at_the_export_size_and_other_sizes(tiny_export):
    # 150x200 is no multiple of 32: the graph pads it, as the model does. At 96x128 the stride-16 level has 144
    # anchors, fewer than the 200 the RPN keeps before NMS: the top-k count must not be frozen at the export size.
    sizes = [EXPORT_SIZE, (160, 224), (150, 200), (96, 128)]
    images = [random_image(h, w, seed=k + 1) for k, (h, w) in enumerate(sizes)]
    report = verify_onnx(tiny_export.model, tiny_export.path, images)
    assert report.passed, report.table()
    assert report.images == 4
    assert report.rows[0].output == "detections" and report.rows[0].compared == 20


def test_predictor_returns_what_the_model_returns_in_the_original_size(tiny_export):
    image = random_image(150, 200, seed=7)
    inputs = [{"image": image, "image_id": 3, "height": 300, "width": 400}]
    with torch.no_grad():
        (expected,) = tiny_export.model(inputs)
    predictor = OnnxPredictor(tiny_export.path)
    (output,) = predictor(inputs)
    assert set(output) == set(expected) and set(output["densepose"]) == set(expected["densepose"])
    # Boxes scale by 2 from the input image: the 1e-3 agreement of the input scale becomes 2e-3.
    torch.testing.assert_close(torch.from_numpy(output["boxes"]), expected["boxes"], atol=2e-3, rtol=0)
    assert output["classes"].dtype.name == "int64" and output["boxes"][:, 2].max() <= 400
    predictions, latencies = predict_dataset(predictor, [inputs])
    assert predictions[0]["image_id"] == 3 and len(predictions[0]["densepose"]) == len(output["boxes"])
    assert len(latencies) == 1


def test_an_image_without_detections_gives_empty_well_formed_outputs(tmp_path):
    model = tiny_model("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0")
    path = to_onnx(model, tmp_path / "empty.onnx", random_image(*EXPORT_SIZE))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = random_image(160, 224, seed=3)
    outputs = dict(zip(OUTPUTS, session.run(None, {"image": image[None].numpy()}), strict=True))
    assert {name: value.shape for name, value in outputs.items()} == EMPTY_OUTPUT_SHAPES
    assert outputs["classes"].dtype.name == "int64" and outputs["boxes"].dtype.name == "float32"
    with torch.no_grad():
        reference = ExportableRCNN(model)(image[None])
    assert [tuple(t.shape) for t in reference] == list(EMPTY_OUTPUT_SHAPES.values())
    predictions, _ = predict_dataset(OnnxPredictor(path), [[{"image": image, "image_id": 1}]])
    assert predictions[0]["boxes"].shape == (0, 4) and predictions[0]["densepose"] == []


@pytest.mark.parametrize("shape", [(4, 128, 160), (2, 3, 128, 160), (128, 160)])
def test_a_wrong_sample_image_is_refused_and_leaves_no_file(tmp_path, shape):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"sample_image must be one RGB image"):
        to_onnx(model, tmp_path / "model.onnx", torch.zeros(shape, dtype=torch.uint8))
    assert list(tmp_path.iterdir()) == []
