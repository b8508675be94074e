"""The preprocessing contract in the ONNX file: OnnxPredictor resizes images to the exported test size, and turns
the outputs into I/U/V maps, without torch."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from export_testing import tiny_config, tiny_model
from PIL import Image

from fnl.data.mapper import DatasetMapper
from fnl.engine.inference import to_evaluator_format
from fnl.export import OnnxModelError, OnnxPredictor
from fnl.export.onnx import to_onnx
from fnl.export.runtime import PREPROCESSING_KEY, Preprocessing, iuv_maps
from fnl.modeling import densepose_to_iuv

ORIGINAL = (150, 200)  # test_tiny: shortest side 128 at test time, so the graph must see 128 x 171


@pytest.fixture(scope="module")
def contract_export(tmp_path_factory):
    model = tiny_model()
    cfg = tiny_config()
    path = to_onnx(model, tmp_path_factory.mktemp("contract") / "model_fp32.onnx",
                   torch.zeros(3, 128, 160, dtype=torch.uint8), preprocessing=Preprocessing.from_config(cfg))
    return model, cfg, path


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """An original image (H, W, 3) and its file, as a user has it."""
    pixels = np.random.default_rng(3).integers(0, 256, (*ORIGINAL, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(pixels).save(path)
    return pixels, path


def test_the_test_size_is_stored_in_the_file(contract_export):
    _, _, path = contract_export
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(metadata[PREPROCESSING_KEY]) == {"min_size_test": 128, "max_size_test": 256,
                                                       "size_divisibility": 32, "channel_order": "RGB"}
    assert OnnxPredictor(path, threads=1).preprocessing == Preprocessing(128, 256, 32, "RGB")


def test_an_image_not_at_the_test_size_is_resized_as_the_data_loader_does(contract_export, photo):
    _, cfg, path = contract_export
    pixels, file = photo
    predictor = OnnxPredictor(path, threads=1)
    mapped = DatasetMapper(cfg, is_train=False)({"file_name": str(file), "image_id": 0, "height": ORIGINAL[0],
                                                 "width": ORIGINAL[1]})
    assert tuple(mapped["image"].shape[-2:]) == (128, 171)
    (expected,) = predictor([{"image": mapped["image"].numpy(), "height": ORIGINAL[0], "width": ORIGINAL[1]}])
    (given_original,) = predictor([{"image": pixels.transpose(2, 0, 1)}])
    assert len(expected["scores"]) > 0
    np.testing.assert_array_equal(given_original["scores"], expected["scores"])
    np.testing.assert_array_equal(given_original["boxes"], expected["boxes"])
    # What it used to do: run the graph on the original size, which scores differently.
    unresized = predictor.run_image(pixels.transpose(2, 0, 1))
    assert unresized["scores"].shape != expected["scores"].shape or not np.array_equal(unresized["scores"],
                                                                                          expected["scores"])


def test_iuv_maps_in_numpy_equal_the_torch_ones(contract_export, photo):
    _, _, path = contract_export
    pixels, _ = photo
    (output,) = OnnxPredictor(path, threads=1)([{"image": pixels.transpose(2, 0, 1)}])
    assert len(output["boxes"]) > 0
    # Odd box sizes, upsampling and downsampling of the 64 x 64 outputs.
    boxes = np.array([[3.7, 5.2, 40.1, 130.9], [0.0, 0.0, 150.0, 20.0], [10.0, 10.0, 11.0, 12.0]] *
                     ((len(output["boxes"]) + 2) // 3), dtype=np.float32)[: len(output["boxes"])]
    heads = output["densepose"]
    ours = iuv_maps(boxes, heads)
    theirs = densepose_to_iuv(torch.from_numpy(boxes), {k: torch.from_numpy(v) for k, v in heads.items()})
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.shape == tuple(reference.shape)
        np.testing.assert_array_equal(mine[0], reference[0].numpy())
        np.testing.assert_allclose(mine[1:], reference[1:].numpy(), atol=1e-6)


def test_predict_takes_an_original_image_and_gives_iuv_maps_like_pytorch(contract_export, photo):
    model, cfg, path = contract_export
    pixels, file = photo
    result = OnnxPredictor(path, threads=1).predict(pixels)
    mapped = DatasetMapper(cfg, is_train=False)({"file_name": str(file), "image_id": 0, "height": ORIGINAL[0],
                                                 "width": ORIGINAL[1]})
    with torch.no_grad():
        reference = to_evaluator_format(0, model([mapped])[0])
    np.testing.assert_allclose(result["boxes"], reference["boxes"], atol=1e-3)
    assert len(result["densepose"]) == len(reference["densepose"]) > 0
    for mine, theirs in zip(result["densepose"], reference["densepose"], strict=True):
        assert mine.shape == theirs.shape
        assert (mine[0] == theirs[0]).mean() > 0.99  # parts; a near-tie may flip between runtimes
        np.testing.assert_allclose(mine[1:][:, mine[0] == theirs[0]], theirs[1:][:, mine[0] == theirs[0]], atol=1e-3)


def test_predict_needs_the_contract(tiny_export):
    with pytest.raises(OnnxModelError, match=rf"{tiny_export.path} carries no preprocessing contract"):
        OnnxPredictor(tiny_export.path, threads=1).predict(np.zeros((*ORIGINAL, 3), np.uint8))


def test_predict_runs_without_torch(contract_export, photo, tmp_path):
    _, _, path = contract_export
    pixels, _ = photo
    np.save(tmp_path / "photo.npy", pixels)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from fnl.export.runtime import OnnxPredictor
        result = OnnxPredictor({str(path)!r}, threads=1).predict(np.load({str(tmp_path / "photo.npy")!r}))
        assert len(result["densepose"]) == len(result["boxes"]) > 0
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_fnl_export_records_the_input_size_it_exported_for(tmp_path):
    from fnl.cli.export import main
    from fnl.engine.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "model.pth", tiny_model(), tiny_config())
    assert main(["--ckpt", str(checkpoint), "--output", str(tmp_path / "out"), "--input-size", "96"]) == 0
    predictor = OnnxPredictor(tmp_path / "out" / "model_fp32.onnx", threads=1)
    assert predictor.preprocessing == Preprocessing(96, 256, 32, "RGB")


def test_onnx_runtimes_own_quantization_carries_the_contract_over(contract_export, tmp_path):
    from fnl.export.ort_quantize import ort_static_ptq

    model, cfg, _ = contract_export
    named = to_onnx(model, tmp_path / "named.onnx", torch.zeros(3, 128, 160, dtype=torch.uint8), compact=False,
                    preprocessing=Preprocessing.from_config(cfg))
    calibration = [np.random.default_rng(k).integers(0, 256, (3, 128, 160), dtype=np.uint8) for k in range(2)]
    quantized = ort_static_ptq(named, tmp_path / "model_ort_ptq.onnx", calibration)
    assert OnnxPredictor(quantized, threads=1).preprocessing == Preprocessing.from_config(cfg)
