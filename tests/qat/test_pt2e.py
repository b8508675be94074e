"""The PT2E engine: the same int8 regions as the eager engine, captured with torch.export (BiFPN taps included),
trained by the same QAT loop, converted with convert_pt2e."""

import copy
import warnings

import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from fnl.config import load_config  # noqa: E402
from fnl.engine.checkpoint import CheckpointError  # noqa: E402
from fnl.hooks import audit_hooks  # noqa: E402
from fnl.modeling import build_model  # noqa: E402
from fnl.qat import patch_for_quantization, quantize  # noqa: E402
from fnl.qat.patch import QUANTIZED_REGIONS, REGION_NAMES  # noqa: E402
from fnl.qat.pt2e import (  # noqa: E402
    CONV_BN_PAIRS_KEY,
    TRANSPOSED_CONV_WEIGHTS_KEY,
    XNNPACK_MIN_SCALE,
    ExportedRegion,
    MergedIntoRegion,
    capture_region,
    convert_pt2e_model,
    drop_training_state,
    exported_regions,
    load_pt2e_checkpoint,
    prepare_pt2e_model,
    save_pt2e_checkpoint,
)
from fnl.qat.regions import region_captures  # noqa: E402
from fnl.qat.serialization import SUBPIXEL, TRANSPOSED, TRANSPOSED_CONVS_KEY  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
TAPS = ["blocks.1.2.conv_pwl", "blocks.2.3.conv_pwl", "blocks.4.3.conv_pwl", "blocks.6.0.conv_pwl"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return build_model(load_config("test_tiny")).eval()


@pytest.fixture(scope="module")
def qat_prepared(float_model, tiny_cfg):
    """float_model prepared for QAT as fnl-quantize does; tests that change it take a copy."""
    return prepare_pt2e_model(float_model, tiny_cfg, "qat")


def test_both_engines_read_one_region_table(float_model):
    _, islands = patch_for_quantization(float_model)
    firsts = {r.modules[0] for r in QUANTIZED_REGIONS}
    lasts = {r.modules[-1] for r in QUANTIZED_REGIONS if r.exit_reason}
    poolers = {r.entry for r in QUANTIZED_REGIONS if r.entry.endswith("pooler")}
    eager = {i.module for i in islands}
    assert "backbone" in eager and lasts <= eager and poolers <= eager
    assert REGION_NAMES == ("backbone", "rpn_head", "box_head", "densepose_head") and "backbone" in firsts


def test_captured_backbone_equals_float_and_keeps_the_expansion_taps(float_model):
    """In eval mode the exported float backbone (before any quantization) computes what the module does, with
    the features timm's conv_pwl pre-hooks collect feeding the BiFPN inside the graph."""
    taps = sorted(r.module.split("bottom_up.")[-1] for r in audit_hooks(float_model) if r.kind == "forward_pre")
    assert taps == TAPS
    region = QUANTIZED_REGIONS[0]
    capture = region_captures(float_model, load_config("test_tiny"))["backbone"]
    program = capture_region(float_model, region, capture)
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0].shape)
        return hook

    bottom_up = float_model.backbone.bottom_up
    handles = [bottom_up.get_submodule(n).register_forward_pre_hook(record(n)) for n in TAPS]
    try:
        for shape in ((1, 3, 128, 160), (2, 3, 96, 224)):  # dynamic batch, H and W
            images = torch.randn(shape, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                expected, captured = float_model.backbone(images), program(images)
            assert expected.keys() == captured.keys()
            for name in expected:
                torch.testing.assert_close(captured[name], expected[name], atol=1e-5, rtol=1e-5)
    finally:
        for handle in handles:
            handle.remove()
    assert [seen[n][1] for n in TAPS] == [72, 120, 288, 1152]  # the taps fired on the float module


def test_pt2e_qat_runs_the_same_loop_freezes_and_converts(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    result = quantize(model, tiny_cfg, "qat", output_dir=tmp_path, engine="pt2e")
    assert len(result.history) == 3 and all(torch.isfinite(torch.tensor(h["total_loss"])) for h in result.history)
    regions = exported_regions(result.prepared)
    assert [r.region for r in regions] == list(REGION_NAMES)
    assert isinstance(result.prepared.roi_heads.box_predictor, MergedIntoRegion)
    fake_quants = [m for r in regions for m in r.program.modules() if hasattr(m, "observer_enabled")]
    assert fake_quants and all(int(m.observer_enabled) == 0 for m in fake_quants)  # frozen at iteration 2
    assert all(r.bn_frozen for r in regions)  # frozen at iteration 1
    # QAT trains against the scales convert_pt2e quantizes with (fnl.qat.pt2e.weight_fake_quant_as_converted)
    for fake_quant in fake_quants:
        torch.testing.assert_close(fake_quant.scale, fake_quant.calculate_qparams()[0].to(fake_quant.scale.dtype),
                                   rtol=1e-5, atol=0)
    # so the converted backbone computes what the fake-quant one simulated, but for rare rounding ties (float order
    # of the folded BN) that deeper layers amplify: on the finest levels (before the BiFPN's deeper paths) almost
    # every value is within one quantization step (with the fused fake-quantizers: 1.7% and 1.2% were not)
    images = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        simulated = result.prepared.eval().backbone(images)
        converted = result.int8_model.backbone(images)
    for name in ("p2", "p3"):
        value = simulated[name]
        step = max(float(value.max() - value.min()) / 255, XNNPACK_MIN_SCALE)
        assert ((value - converted[name]).abs() > 1.01 * step).float().mean() < 0.005, name
    assert (tmp_path / "qat_model_final.pth").is_file()
    assert all(isinstance(r, ExportedRegion) and r.converted for r in exported_regions(result.int8_model))
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = result.int8_model([{"image": image}])[0]
    assert set(out) == {"boxes", "scores", "classes", "densepose"}
    assert out["densepose"]["fine_segm"].shape[1:] == (25, 64, 64)


def _densepose_convs(int8_model: torch.nn.Module) -> list[torch.fx.Node]:
    region = next(r for r in exported_regions(int8_model) if r.region == "densepose_head")
    return [n for n in region.program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]


def _backbone_program(model: torch.nn.Module) -> torch.fx.GraphModule:
    return next(r for r in exported_regions(model) if r.region == "backbone").program


def _calls(program: torch.fx.GraphModule, target) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target == target)


def test_pt2e_qat_quantizes_the_densepose_predictor_transposed_convs_per_output_channel(qat_prepared):
    """The predictor's transposed convs (weights (in, out, kH, kW)) are fake-quantized per *output* channel, axis 1,
    as PTQ's observers and XNNPACK's int8 deconvolution take them: torchao passes a spec's channel axis only to a
    fake-quantizer named PerChannel (fnl.qat.pt2e.per_channel_fake_quantize)."""
    prepared = qat_prepared
    region = next(r for r in exported_regions(prepared) if r.region == "densepose_head")
    axes = {}
    for node in region.program.graph.nodes:
        if node.op == "call_function" and "conv" in str(node.target):
            weight_fake_quant = getattr(region.program, node.args[1].target)
            axes[str(node.target)] = weight_fake_quant.ch_axis
    assert axes == {"aten.conv2d.default": 0, "aten.conv_transpose2d.input": 1}
    int8_model = convert_pt2e_model(prepared)
    transposed = [n for n in _densepose_convs(int8_model) if "conv_transpose" in str(n.target)]
    assert len(transposed) == 4 and all(n.args[1].args[3] == 1 for n in transposed)  # dequantize_per_channel axis


def test_pt2e_qat_files_with_subpixel_convs_or_no_record_still_load(float_model, qat_prepared, tiny_cfg, tmp_path):
    """QAT files written while QAT held the predictor as sub-pixel convs record it and load that way; a QAT file
    written before any record existed loads with its transposed convs float and its conv-BN pairs as captured, as
    QAT held them then."""
    prepared = prepare_pt2e_model(float_model, tiny_cfg, "qat", subpixel_predictor=True)
    int8_model = convert_pt2e_model(prepared)
    convs = _densepose_convs(int8_model)
    assert not any("conv_transpose" in str(n.target) for n in convs)
    assert all("dequantize" in str(n.args[1].target) for n in convs)  # every weight int8
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    save_pt2e_checkpoint(tmp_path / "qat.pth", prepared, tiny_cfg, "qat")
    loaded, _, mode = load_pt2e_checkpoint(tmp_path / "qat.pth")
    with torch.no_grad():
        expected, got = int8_model([{"image": image}])[0], loaded([{"image": image}])[0]
    assert mode == "qat" and torch.equal(expected["boxes"], got["boxes"])
    assert torch.equal(expected["densepose"]["u"], got["densepose"]["u"])

    save_pt2e_checkpoint(tmp_path / "now.pth", qat_prepared, tiny_cfg, "qat")
    # the records are read off the model saved, not assumed from the mode
    recorded = torch.load(tmp_path / "now.pth", weights_only=True)["quantization"]
    assert (recorded[TRANSPOSED_CONVS_KEY], recorded[TRANSPOSED_CONV_WEIGHTS_KEY]) == (TRANSPOSED, "int8")
    assert recorded[CONV_BN_PAIRS_KEY] == "whole"
    assert torch.load(tmp_path / "qat.pth", weights_only=True)["quantization"][TRANSPOSED_CONVS_KEY] == SUBPIXEL

    # as files were prepared before these records: float transposed convs, conv-BN pairs as torch.export captured
    # them (the BiFPN laterals' BNs apart, float)
    before = prepare_pt2e_model(float_model, tiny_cfg, "qat", float_transposed_convs=True, whole_conv_bn_pairs=False)
    save_pt2e_checkpoint(tmp_path / "before.pth", before, tiny_cfg, "qat")
    data = torch.load(tmp_path / "before.pth", weights_only=True)
    assert data["quantization"][TRANSPOSED_CONV_WEIGHTS_KEY] == "float"
    assert data["quantization"][CONV_BN_PAIRS_KEY] == "as-captured"
    for key in (TRANSPOSED_CONVS_KEY, TRANSPOSED_CONV_WEIGHTS_KEY, CONV_BN_PAIRS_KEY):
        del data["quantization"][key]
    torch.save(data, tmp_path / "before.pth")
    old, _, _ = load_pt2e_checkpoint(tmp_path / "before.pth")
    transposed = [n for n in _densepose_convs(old) if "conv_transpose" in str(n.target)]
    assert len(transposed) == 4 and not any("dequantize" in str(n.args[1].target) for n in transposed)
    assert _calls(_backbone_program(old), torch.ops.aten.batch_norm.default) == 4


def test_pt2e_qat_prepares_every_conv_bn_pair_as_one(qat_prepared, tiny_cfg, tmp_path):
    """torch.export reads the BiFPN's resampling sizes off the lateral convs' outputs; moved onto their BNs'
    outputs, every conv-BN pair matches the quantizer's pattern and no float BN is left in the int8 graph (files
    prepared from the graph as captured keep their four: the record test above). A record of another value is
    refused by name."""
    assert _calls(_backbone_program(convert_pt2e_model(qat_prepared)), torch.ops.aten.batch_norm.default) == 0
    save_pt2e_checkpoint(tmp_path / "qat.pth", qat_prepared, tiny_cfg, "qat")
    data = torch.load(tmp_path / "qat.pth", weights_only=True)
    data["quantization"][CONV_BN_PAIRS_KEY] = "halves"
    torch.save(data, tmp_path / "qat.pth")
    with pytest.raises(CheckpointError, match="conv_bn_pairs is 'halves'"):
        load_pt2e_checkpoint(tmp_path / "qat.pth")


def test_converted_qat_graph_keeps_nothing_only_training_reads(qat_prepared):
    """A QAT capture counts batches in every BN (num_batches_tracked.add_) and its folded BNs leave parameters
    behind; the int8 graph drops both (ExecuTorch would serialize them and mutate a buffer per call), outputs
    unchanged."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    region = next(r for r in exported_regions(copy.deepcopy(qat_prepared)) if r.region == "backbone")
    region.train(False)
    program = convert_pt2e(region.program)
    assert _calls(program, torch.ops.aten.add_.Tensor) > 0
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = program(image)
        assert drop_training_state(program) > 0
        after = program(image)
    assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(before),
                                                  torch.utils._pytree.tree_leaves(after), strict=True))
    assert _calls(program, torch.ops.aten.add_.Tensor) == 0
    read = {n.target for n in program.graph.nodes if n.op == "get_attr"}
    assert {name for name, _ in [*program.named_parameters(), *program.named_buffers()]} <= read


def test_pt2e_refuses_an_eager_backend(tmp_path, capsys):
    from fnl.cli.quantize import main

    code = main(["--ckpt", str(tmp_path / "none.pth"), "--engine", "pt2e", "--backend", "x86",
                 "--output", str(tmp_path / "out")])
    assert code == 2 and "XNNPACK" in capsys.readouterr().err


def test_weight_scales_choose_the_xnnpack_weight_quantization():
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    from fnl.qat.pt2e import xnnpack_quantizer

    for weight_scales, qscheme, observer in (("per-channel", torch.per_channel_symmetric,
                                              MovingAveragePerChannelMinMaxObserver),
                                             ("per-tensor", torch.per_tensor_symmetric, MovingAverageMinMaxObserver)):
        weight = xnnpack_quantizer(True, weight_scales).global_config.weight
        constructor = weight.observer_or_fake_quant_ctr
        assert weight.qscheme == qscheme
        assert issubclass(constructor.p.func, FakeQuantize) and constructor.p.keywords["observer"] is observer
        # torchao passes the channel axis only to a constructor named PerChannel (per_channel_fake_quantize)
        assert ("PerChannel" in constructor.p.func.__name__) == (qscheme == torch.per_channel_symmetric)
    with pytest.raises(ValueError, match="QUANTIZATION.WEIGHT_SCALES must be one of"):
        xnnpack_quantizer(False, "per-row")
