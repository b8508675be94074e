"""The quantization pipeline on model B: float islands, hook-preserving fusion, QAT, int8 conversion, reload."""

import subprocess
import sys
import warnings

import pytest
import torch

from fnl.config import load_config
from fnl.hooks import fuse_model
from fnl.modeling import build_model
from fnl.modeling.layers import SubPixelConvTranspose2d
from fnl.qat import (
    calibrate,
    convert,
    load_int8_checkpoint,
    patch_for_quantization,
    prepare,
    quantize,
    save_int8_checkpoint,
)
from fnl.qat.patch import FloatIsland, QuantizableResidualBlock

TAPS = ["blocks.1.2.conv_pwl", "blocks.2.3.conv_pwl", "blocks.4.3.conv_pwl", "blocks.6.0.conv_pwl"]
SMALL = ["INPUT.MIN_SIZE_TEST", "128", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return build_model(load_config("mobile_parsing_rcnn_b", SMALL)).eval()


@pytest.fixture(scope="module")
def image():
    return torch.randint(0, 256, (3, 128, 160), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _tap_modules(audit):
    return sorted(r.module.split("bottom_up.")[-1] for r in audit if r.kind == "forward_pre")


def test_patch_keeps_float_outputs_and_lists_every_island(float_model, image):
    patched, islands = patch_for_quantization(float_model)
    names = {i.module for i in islands}
    assert {"backbone", "proposal_generator.rpn_head", "roi_heads.box_pooler", "roi_heads.densepose_pooler",
            "roi_heads.box_predictor", "roi_heads.densepose_predictor"} <= names
    assert isinstance(patched.roi_heads.box_pooler, FloatIsland)
    timm_blocks = [m for m in float_model.backbone.bottom_up.blocks.modules()
                   if type(m).__name__ in ("InvertedResidual", "DepthwiseSeparableConv")]
    blocks = [m for m in patched.modules() if isinstance(m, QuantizableResidualBlock)]
    assert len(blocks) == len(timm_blocks) > 0
    # the DensePose predictor's transposed convs are SubPixelConvTranspose2d: the same values, summed in another order
    predictor = patched.roi_heads.densepose_predictor.module
    assert all(isinstance(getattr(predictor, name), SubPixelConvTranspose2d)
               for name in ("ann_index_lowres", "index_uv_lowres", "u_lowres", "v_lowres"))
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in patched.modules())
    with torch.no_grad():
        a, b = float_model([{"image": image}])[0], patched([{"image": image}])[0]
    assert torch.equal(a["boxes"], b["boxes"])
    for name in ("coarse_segm", "fine_segm", "u", "v"):
        torch.testing.assert_close(b["densepose"][name], a["densepose"][name], atol=1e-5, rtol=1e-5)
    # the float model itself is untouched (its checkpoints keep their keys)
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in float_model.modules())
    assert "roi_heads.densepose_predictor.u_lowres.weight" in float_model.state_dict()


def test_fused_model_equals_unfused_in_eval(float_model, image):
    patched, _ = patch_for_quantization(float_model)
    fused = fuse_model(patched.eval(), is_qat=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        images = float_model.preprocess_image([{"image": image}])[0]
        reference = float_model.backbone(images)
        features = fused.backbone(images)
    for name in reference:
        assert torch.allclose(reference[name], features[name], atol=1e-5), name


def test_expansion_taps_feed_the_neck_after_fuse_prepare_qat_and_convert(float_model, image):
    from fnl.qat.quantize import QuantizationStages

    stages = QuantizationStages()
    prepared = prepare(float_model, load_config("mobile_parsing_rcnn_b", SMALL), "qat", stages)
    with torch.no_grad():
        prepared.eval()([{"image": image}])  # observers see one image
    int8 = convert(prepared, stages)
    for stage in ("patch", "fuse", "prepare", "convert"):
        assert _tap_modules(stages.hook_audits[stage]) == TAPS, stage
    # The taps fire on the int8 model and feed the BiFPN: its inputs are quantized tensors of the tapped widths.
    bottom_up = int8.backbone.module.bottom_up
    seen = {}
    for name in TAPS:
        bottom_up.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: seen.setdefault(name, args[0]))
    with torch.no_grad():
        features = int8.backbone(float_model.preprocess_image([{"image": image}])[0])
    assert [seen[n].shape[1] for n in TAPS] == [72, 120, 288, 1152]
    assert all(seen[n].is_quantized for n in TAPS)
    assert all(f.is_quantized for f in features.values())


def test_a_deep_copy_of_an_int8_model_that_lost_its_taps_says_so(float_model, image):
    import copy

    prepared = prepare(float_model, load_config("mobile_parsing_rcnn_b", SMALL), "ptq")
    with torch.no_grad():
        prepared([{"image": image}])
    # torch.ao's int8 convs deep-copy without their hooks, timm's expansion taps among them (docs/NOTES.md).
    copied = copy.deepcopy(convert(prepared))
    with torch.no_grad(), pytest.raises(RuntimeError, match="returned 0 feature maps, the neck reads 4 .*deepcopy"):
        copied([{"image": image}])


def test_int8_model_is_small_and_reloads_in_a_fresh_process(float_model, image, tmp_path):
    cfg = load_config("mobile_parsing_rcnn_b", SMALL)
    prepared = prepare(float_model, cfg, "ptq")
    calibrate(prepared, [[{"image": image}]] * 2, num_images=2)
    int8 = convert(prepared)
    path = save_int8_checkpoint(tmp_path / "model_int8.pth", int8, cfg, "ptq")
    assert torch.load(path, weights_only=True)["quantization"]["transposed_convs"] == "subpixel-conv"
    float_path = tmp_path / "model_fp32.pth"
    torch.save({"model": float_model.state_dict()}, float_path)
    assert float_path.stat().st_size / path.stat().st_size >= 3.5
    with torch.no_grad():
        expected = int8([{"image": image}])[0]
    torch.save({"image": image, "boxes": expected["boxes"], "u": expected["densepose"]["u"]}, tmp_path / "ref.pt")
    # Exactly equal, as the same kernels run in both processes: the checkpoint's backend is the engine here and there
    # (asserted), on as many threads (the float glue's kernels may split their sums by thread count).
    script = (
        "import torch, sys\n"
        "from fnl.qat import load_int8_checkpoint\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        f"model, cfg = load_int8_checkpoint(r'{path}')\n"
        f"assert torch.backends.quantized.engine == '{torch.backends.quantized.engine}'\n"
        f"ref = torch.load(r'{tmp_path / 'ref.pt'}', weights_only=True)\n"
        "out = model([{'image': ref['image']}])[0]\n"
        "assert torch.equal(out['boxes'], ref['boxes']) and torch.equal(out['densepose']['u'], ref['u'])\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


def test_a_float_checkpoint_is_not_an_int8_one(float_model, tmp_path):
    from fnl.engine.checkpoint import CheckpointError, save_checkpoint

    path = save_checkpoint(tmp_path / "float.pth", float_model, load_config("mobile_parsing_rcnn_b"))
    with pytest.raises(CheckpointError, match="not an int8 checkpoint"):
        load_int8_checkpoint(path)


def test_unknown_float_module_is_named(float_model):
    with pytest.raises(ValueError, match="QUANTIZATION.FLOAT_MODULES names 'roi_heads.nope'"):
        patch_for_quantization(float_model, ["roi_heads.nope"])


def test_qat_trains_freezes_and_resumes(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    result = quantize(model, tiny_cfg, "qat", output_dir=tmp_path)
    assert len(result.history) == 3 and all(torch.isfinite(torch.tensor(h["total_loss"])) for h in result.history)
    fake_quants = [m for m in result.prepared.modules() if hasattr(m, "observer_enabled")]
    assert fake_quants and all(int(m.observer_enabled) == 0 for m in fake_quants)  # frozen at iteration 2
    # QAT trained against the scales convert quantizes with (fnl.qat.quantize.qat_qconfig)
    for fake_quant in fake_quants:
        torch.testing.assert_close(fake_quant.scale, fake_quant.calculate_qparams()[0].to(fake_quant.scale.dtype),
                                   rtol=1e-5, atol=0)
    assert (tmp_path / "qat_model_0000001.pth").is_file() and (tmp_path / "qat_model_final.pth").is_file()
    resumed = quantize(model, tiny_cfg, "qat", output_dir=tmp_path, resume=True)
    assert resumed.history == []  # the run was complete
    with torch.no_grad():
        out = result.int8_model([{"image": torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8)}])[0]
    assert out["densepose"]["fine_segm"].dtype == torch.float32


def test_per_tensor_weights_and_biases_on_the_integer_grid(float_model, image):
    """QUANTIZATION.WEIGHT_SCALES per-tensor gives one weight scale per layer (stock Caffe2 / QNNPACK); convert puts
    every bias on the int32 grid (input scale x weight scale) that integer runtimes store it on."""
    from fnl.qat.quantize import WEIGHTED_INT8

    cfg = load_config("mobile_parsing_rcnn_b", [*SMALL, "QUANTIZATION.WEIGHT_SCALES", "per-tensor"])
    prepared = prepare(float_model, cfg, "ptq")
    calibrate(prepared, [[{"image": image}]], num_images=1)
    int8 = convert(prepared)
    layers = [m for m in int8.modules() if isinstance(m, WEIGHTED_INT8)]
    assert len(layers) > 100
    assert all(m.weight().qscheme() == torch.per_tensor_affine and m.weight().q_zero_point() == 0 for m in layers)
    input_scales = {}

    def record(module, args):
        input_scales.setdefault(module, args[0].q_scale())

    for module in layers:
        module.register_forward_pre_hook(record)
    with torch.no_grad():
        int8([{"image": image}])
    checked = 0
    for module, input_scale in input_scales.items():
        if module.bias() is not None:
            steps = module.bias().double() / (input_scale * module.weight().q_scale())
            torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
            checked += 1
    assert checked > 100
    with pytest.raises(ValueError, match="QUANTIZATION.WEIGHT_SCALES must be one of .* got 'per-row'"):
        prepare(float_model, load_config("mobile_parsing_rcnn_b", ["QUANTIZATION.WEIGHT_SCALES", "per-row"]), "ptq")


def test_qnnpack_keeps_the_1x1_top_block_pooling_in_float(float_model, image):
    # QNNPACK cannot create a 1x1 max-pool (the necks' stride-2 P6): on qnnpack it is a float island, the rest int8.
    cfg = load_config("mobile_parsing_rcnn_b", [*SMALL, "QUANTIZATION.BACKEND", "qnnpack"])
    try:
        prepared = prepare(float_model, cfg, "ptq")
        calibrate(prepared, [[{"image": image}]], num_images=1)
        int8 = convert(prepared)
        assert isinstance(int8.backbone.module.top_block, FloatIsland)
        # QUANTIZATION.WEIGHT_SCALES decides on qnnpack too (torch.ao's qnnpack default is per-tensor)
        from fnl.qat.quantize import WEIGHTED_INT8

        schemes = {m.weight().qscheme() for m in int8.modules() if isinstance(m, WEIGHTED_INT8)
                   and not isinstance(m, torch.ao.nn.quantized.ConvTranspose2d)}
        assert schemes == {torch.per_channel_affine}
        with torch.no_grad():
            out = int8([{"image": image}])[0]
    finally:
        torch.backends.quantized.engine = "fbgemm"
    assert set(out) == {"boxes", "scores", "classes", "densepose"} and torch.isfinite(out["scores"]).all()
    fbgemm = prepare(float_model, load_config("mobile_parsing_rcnn_b", SMALL), "ptq")
    assert isinstance(fbgemm.backbone.module.top_block, torch.nn.MaxPool2d)


PREDICTOR_CONVS = ("ann_index_lowres", "index_uv_lowres", "u_lowres", "v_lowres")


def test_x86_runs_the_densepose_predictor_in_int8_as_subpixel_convs(float_model, image):
    """x86's quantized ConvTranspose2d is wrong, so the predictor was a float island there; as sub-pixel convs it is
    int8 (ordinary int8 convs), within a few output quanta of the float predictor on the same int8 input."""
    from torch.ao.nn import quantized as nnq

    from fnl.qat.patch import DequantizeOutputs

    cfg = load_config("mobile_parsing_rcnn_b", [*SMALL, "QUANTIZATION.BACKEND", "x86"])
    try:
        prepared = prepare(float_model, cfg, "ptq")
        calibrate(prepared, [[{"image": image}]], num_images=1)
        int8 = convert(prepared)
        predictor = int8.roi_heads.densepose_predictor
        assert isinstance(predictor, DequantizeOutputs)
        assert all(isinstance(getattr(predictor.module, name).conv, nnq.Conv2d) for name in PREDICTOR_CONVS)
        assert not any(isinstance(m, torch.nn.ConvTranspose2d | nnq.ConvTranspose2d) for m in int8.modules())
        reference = patch_for_quantization(float_model)[0].roi_heads.densepose_predictor.module
        inputs = []  # the predictor's int8 input on the calibration image
        handle = predictor.module.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        with torch.no_grad():
            int8([{"image": image}])
        handle.remove()
        (x,) = inputs
        assert x.is_quantized and x.shape[0] > 0
        with torch.no_grad():
            for name in PREDICTOR_CONVS:
                actual, expected = getattr(predictor.module, name)(x), getattr(reference, name)(x.dequantize())
                rois, _, height, width = x.shape
                assert actual.shape == expected.shape == (rois, expected.shape[1], 2 * height, 2 * width)
                scale, zero_point = actual.q_scale(), actual.q_zero_point()
                expected = expected.clamp((0 - zero_point) * scale, (255 - zero_point) * scale)  # the output's range
                # rounding of the output and of the int8 weights: a few quanta; a wrong weight layout is hundreds
                assert (actual.dequantize() - expected).abs().max() <= 4 * scale, name
    finally:
        torch.backends.quantized.engine = "fbgemm"


def test_int8_checkpoints_written_before_the_subpixel_rewrite_still_load(float_model, image, tmp_path):
    from torch.ao.nn import quantized as nnq

    from fnl.engine.checkpoint import CheckpointError

    cfg = load_config("mobile_parsing_rcnn_b", SMALL)
    prepared = prepare(float_model, cfg, "ptq", subpixel_predictor=False)  # the int8 model fnl built before
    calibrate(prepared, [[{"image": image}]], num_images=1)
    old = convert(prepared)
    assert isinstance(old.roi_heads.densepose_predictor.module.u_lowres, nnq.ConvTranspose2d)
    path = save_int8_checkpoint(tmp_path / "model_int8.pth", old, cfg, "ptq")
    data = torch.load(path, weights_only=True)
    assert data["quantization"].pop("transposed_convs") == "conv-transpose"
    torch.save(data, path)  # what fnl wrote before: no "transposed_convs" entry
    loaded, _ = load_int8_checkpoint(path)
    assert isinstance(loaded.roi_heads.densepose_predictor.module.u_lowres, nnq.ConvTranspose2d)
    with torch.no_grad():
        expected, actual = old([{"image": image}])[0], loaded([{"image": image}])[0]
    assert torch.equal(actual["densepose"]["u"], expected["densepose"]["u"])
    # a file whose entry contradicts its weights, or holds an unknown value, fails naming the file
    data["quantization"]["transposed_convs"] = "subpixel-conv"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="does not fit the model its config describes"):
        load_int8_checkpoint(path)
    data["quantization"]["transposed_convs"] = "winograd"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="transposed_convs is 'winograd'"):
        load_int8_checkpoint(path)
