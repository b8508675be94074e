"""ExecuTorch export of the PT2E int8 model: XNNPACK .pte programs per region driven by the model's float glue,
checked against the PyTorch PT2E model with fnl.export.verify's criteria, and its report row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from export_testing import (  # noqa: E402
    DECISIVE,
    blank_image,
    fit_decisive_detector,
    unpaired_decisive_detections,
)

from fnl.config import CfgNode, load_config  # noqa: E402
from fnl.modeling import build_model  # noqa: E402


@dataclass
class PT2EExport:
    cfg: CfgNode
    float_model: torch.nn.Module
    prepared: torch.nn.Module  # PT2E PTQ, calibrated
    int8_model: torch.nn.Module
    images: list[torch.Tensor]
    blank: torch.Tensor
    directory: Path
    float_megabytes: float


@pytest.fixture(scope="module")
def pt2e_export(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> PT2EExport:
    """A decisive float model B (fitted on the tiny dataset's val images at 64 px), PT2E PTQ, lowered once."""
    from fnl.data import build_test_loader
    from fnl.engine.benchmark import model_file_megabytes
    from fnl.export.executorch import to_executorch
    from fnl.qat import calibrate
    from fnl.qat.pt2e import convert_pt2e_model, prepare_pt2e_model

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config("test_tiny", ["DATASETS.ROOT", str(tiny_dataset), *DECISIVE])
        images = [item["image"] for batch in build_test_loader(cfg, "val") for item in batch]
        blank = blank_image(64, 80)
        torch.manual_seed(0)
        float_model = fit_decisive_detector(build_model(cfg).eval(), [*images, blank])
        prepared = prepare_pt2e_model(float_model, cfg, "ptq")
        calibrate(prepared, [[{"image": image}] for image in images], len(images))
        int8_model = convert_pt2e_model(prepared)
        directory = tmp_path_factory.mktemp("executorch")
        to_executorch(int8_model, cfg, directory, image_size=(64, 96))
        megabytes = model_file_megabytes(float_model, directory.parent / "model_fp32.pth", cfg)
    finally:
        torch.set_num_threads(previous)
    return PT2EExport(cfg, float_model, prepared, int8_model, images, blank, directory, megabytes)


def test_programs_are_small_and_refuse_overwrite(pt2e_export):
    from fnl.export.executorch import MANIFEST, ExecuTorchPredictor, to_executorch

    files = sorted(p.name for p in pt2e_export.directory.glob("*.pte"))
    assert files == ["backbone.pte", "box_head.pte", "densepose_head.pte", "rpn_head.pte"]
    predictor = ExecuTorchPredictor(pt2e_export.directory, threads=1)
    size = sum(p.stat().st_size for p in predictor.files) / 2**20
    assert pt2e_export.float_megabytes / size >= 3.5
    with pytest.raises(FileExistsError, match="--force"):
        to_executorch(pt2e_export.int8_model, pt2e_export.cfg, pt2e_export.directory)
    assert (pt2e_export.directory / MANIFEST).is_file()


def test_executorch_matches_the_pytorch_pt2e_model(pt2e_export):
    """End to end, by fnl.export.verify's INT8 criteria. XNNPACK's int8 kernels and PyTorch's reference int8 ops
    round ties differently (and the backbone program zero-pads the image to its fixed size), so near-threshold
    detections come and go between them, differently on each CPU: how many detections an image gets is not compared
    (XNNPACK 2, PyTorch 3 on an AMX Xeon; 2 and 2 on an AMD EPYC). The kernels themselves are compared in
    quantization steps by test_every_int8_head_computes_what_pytorch_computes_within_a_step."""
    from fnl.export.executorch import ExecuTorchPredictor, verify_executorch

    predictor = ExecuTorchPredictor(pt2e_export.directory, threads=1)
    report = verify_executorch(pt2e_export.int8_model, predictor, pt2e_export.images)
    assert report.rows[0].compared > 0, report.table()
    assert report.passed, report.table()
    # The fitted objects, far from the threshold, are found by both.
    decisive, unpaired = unpaired_decisive_detections(pt2e_export.int8_model, predictor.run_image, pt2e_export.images)
    assert decisive >= 3 and unpaired == [], unpaired
    # Same output structure as the PyTorch model, whatever number of detections each side has.
    inputs = [{"image": pt2e_export.images[0], "height": 128, "width": 128}]
    with torch.no_grad():
        expected = pt2e_export.int8_model(inputs)[0]
    output = predictor(inputs)[0]
    assert set(output) == set(expected) and set(output["densepose"]) == set(expected["densepose"])
    count = len(output["boxes"])
    assert output["boxes"].shape == (count, 4) and output["scores"].shape == output["classes"].shape == (count,)
    for name, value in expected["densepose"].items():
        assert output["densepose"][name].shape == (count, *value.shape[1:]), name
    # Boxes come back in the original size: the program's own detections on the 64 px input, doubled (one runtime
    # on one input both times, the same kernels: exactly).
    graph = predictor.run_image(pt2e_export.images[0].numpy())
    np.testing.assert_array_equal(output["boxes"], graph["boxes"] * 2)
    np.testing.assert_array_equal(output["scores"], graph["scores"])


def _output_steps(program: torch.fx.GraphModule, name: str) -> list[float]:
    """The quantization step of each output of a converted PT2E graph, in its output order: the scale of the
    dequantize that produces it."""
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    (output,) = [node for node in program.graph.nodes if node.op == "output"]
    nodes = pytree.tree_leaves(output.args)
    assert all(node.target == dequantize for node in nodes), f"{name} has a float output"
    return [float(node.args[1]) for node in nodes]


def _differences_in_steps(region: torch.nn.Module, reference: Any, test: Any) -> torch.Tensor:
    """|reference - test| of a region's outputs, each in quantization steps of that output, all in one tensor. A
    per-level region (the RPN head) returns, per output, a list of levels."""
    def items(outputs: Any) -> list[Any]:
        return list(outputs.values()) if isinstance(outputs, dict) else list(outputs)

    differences = []
    steps = _output_steps(region.program, f"region {region.region}")
    for step, expected, actual in zip(steps, items(reference), items(test), strict=True):
        for e, a in zip(pytree.tree_leaves(expected), pytree.tree_leaves(actual), strict=True):
            assert a.shape == e.shape, (region.region, a.shape, e.shape)
            differences.append(((a - e).abs() / step).flatten())
    return torch.cat(differences)


def test_every_int8_head_computes_what_pytorch_computes_within_a_step(pt2e_export):
    """Each head's .pte program against its PyTorch PT2E region on the inputs PyTorch's regions received on the
    verification images. XNNPACK requantizes an exact int32 sum (bias on the int32 grid) in fp32, PyTorch's reference
    ops quantize a float32 convolution of the dequantized tensors: a value on a rounding tie lands one step apart,
    and a tie can move a later layer's value by another step. So: within two steps, and at most the share of values
    beyond one step that fnl.export.caffe2.verify allows its int8 stages (measured on an AMD EPYC: the RPN and box
    heads equal, the DensePose head within one step).

    Not so the backbone, dozens of int8 layers deep: one tie early on moves everything after it (on a 64 x 96
    input, every value within one step for one random image, up to 18 steps for another), as a one-gray-level change
    of the image does; hence the pairing floor of the end-to-end criteria. Of the backbone, what both must agree on
    is checked: its outputs and their shapes on an image of the program's own size (nothing padded)."""
    from fnl.export.caffe2.verify import INT8_STAGE_FAILURE_FRACTION
    from fnl.export.executorch import ExecuTorchPredictor, ExecuTorchRegion
    from fnl.qat.pt2e import exported_regions

    model = pt2e_export.int8_model
    regions = {region.region: region for region in exported_regions(model)}
    predictor = ExecuTorchPredictor(pt2e_export.directory, threads=1)
    programs = {m.region: m for m in predictor.model.modules() if isinstance(m, ExecuTorchRegion)}
    assert set(programs) == set(regions) == {"backbone", "rpn_head", "box_head", "densepose_head"}

    inputs: dict[str, list[Any]] = {name: [] for name in ("rpn_head", "box_head", "densepose_head")}
    hooks = [regions[name].register_forward_pre_hook(lambda _, args, name=name: inputs[name].append(args[0]))
             for name in inputs]
    try:
        with torch.no_grad():
            for image in pt2e_export.images:  # one at a time: the programs take one image, as the predictor runs
                model([{"image": image}])
    finally:
        for hook in hooks:
            hook.remove()
    assert all(len(x) for x in inputs["densepose_head"])  # PyTorch's detections of the fitted objects
    for name, batches in inputs.items():
        with torch.no_grad():
            steps = torch.cat([_differences_in_steps(regions[name], regions[name](x), programs[name](x))
                               for x in batches])
        beyond_one = int((steps > 1.0001).sum())
        assert steps.numel() > 0 and float(steps.max()) <= 2.0001, (name, float(steps.max()))
        assert beyond_one <= INT8_STAGE_FAILURE_FRACTION * steps.numel(), (name, beyond_one, steps.numel())

    height, width = programs["backbone"].image_size
    first, second = pt2e_export.images[:2]
    image = torch.cat([first, second], dim=-1)[..., :height, :width]  # of the dataset's pixels
    features = model.preprocess_image([{"image": image}])[0]
    assert tuple(features.shape[-2:]) == (height, width)
    with torch.no_grad():
        expected, actual = regions["backbone"](features), programs["backbone"](features)
    assert {name: tuple(value.shape) for name, value in actual.items()} == {
        name: tuple(value.shape) for name, value in expected.items()}


def test_roi_programs_are_planned_for_their_upper_bound_and_run_more_rois_in_chunks(pt2e_export):
    """The box head takes POST_NMS_TOPK_TEST proposals of every RPN level in one call (up to MAX_PLANNED_ROIS), the
    DensePose head DETECTIONS_PER_IMAGE detections (planned for those bounds, not for the capture's example,
    docs/NOTES.md); more RoIs than that run in chunks of the planned size, and any count gives what one RoI at a time
    gives."""
    from fnl.export.executorch import MAX_PLANNED_ROIS, ExecuTorchPredictor, ExecuTorchRegion

    cfg = pt2e_export.cfg.MODEL
    predictor = ExecuTorchPredictor(pt2e_export.directory, threads=1)
    programs = {m.region: m for m in predictor.model.modules() if isinstance(m, ExecuTorchRegion)}
    capacity = {name: int(programs[name].method.metadata.input_tensor_meta(0).sizes()[0])
                for name in ("box_head", "densepose_head")}
    assert capacity == {"box_head": min(cfg.RPN.POST_NMS_TOPK_TEST * len(cfg.RPN.IN_FEATURES), MAX_PLANNED_ROIS),
                        "densepose_head": cfg.ROI_HEADS.DETECTIONS_PER_IMAGE}
    box_head = programs["box_head"]
    rois = torch.randn(2 * capacity["box_head"] + 3, *box_head.method.metadata.input_tensor_meta(0).sizes()[1:],
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = box_head(rois)
        one_by_one = [box_head(roi[None]) for roi in rois[:5]]
    for outputs, parts in zip(pytree.tree_flatten(together)[0], zip(*[pytree.tree_flatten(o)[0] for o in one_by_one],
                                                                         strict=True), strict=True):
        assert outputs.shape[0] == rois.shape[0]
        torch.testing.assert_close(outputs[:5], torch.cat(parts), rtol=0, atol=1e-5)


def test_an_image_without_detections_gives_empty_outputs(pt2e_export):
    from fnl.export.executorch import ExecuTorchPredictor

    predictor = ExecuTorchPredictor(pt2e_export.directory, threads=1)
    # A score threshold no sigmoid exceeds: the image has no detection whatever XNNPACK's kernels score on this CPU
    # (the blank image alone is fitted to score far below 0.5, which would still leave that to its scores).
    predictor.model.roi_heads.score_thresh = 1.0
    output = predictor([{"image": pt2e_export.blank}])[0]
    assert output["boxes"].shape == (0, 4) and output["scores"].shape == output["classes"].shape == (0,)
    assert {name: value.shape for name, value in output["densepose"].items()} == {
        "coarse_segm": (0, 2, 64, 64), "fine_segm": (0, 25, 64, 64), "u": (0, 25, 64, 64), "v": (0, 25, 64, 64)}


def test_report_row(pt2e_export):
    from fnl.export.executorch import executorch_row

    row, results = executorch_row(pt2e_export.directory, pt2e_export.cfg, "ptq", threads=1)
    assert (row.format, row.precision, row.method) == ("executorch", "int8", "ptq")
    assert row.size_mb and row.latency_ms_p50 and row.bbox_AP is not None
    assert "densepose" in results


@pytest.mark.slow
def test_from_quantize_exports_every_pt2e_model_and_writes_the_report(pt2e_export, tiny_dataset, tmp_path, capsys):
    """fnl-export --from-quantize on a fnl-quantize --engine pt2e directory: the int8 model and its PTQ baseline
    each lowered, verified and measured beside float32 (here both files hold the same PTQ model)."""
    import json

    from fnl.cli.export import main
    from fnl.engine.checkpoint import save_checkpoint
    from fnl.qat.pt2e import PT2E_CHECKPOINT, PT2E_PTQ_CHECKPOINT, save_pt2e_checkpoint

    quantize_dir, output = tmp_path / "quantize", tmp_path / "export"
    save_checkpoint(quantize_dir / "model_fp32.pth", pt2e_export.float_model, pt2e_export.cfg)
    for name in (PT2E_CHECKPOINT, PT2E_PTQ_CHECKPOINT):
        save_pt2e_checkpoint(quantize_dir / name, pt2e_export.prepared, pt2e_export.cfg, "ptq")
    args = ["--from-quantize", str(quantize_dir), "--format", "executorch", "--output", str(output), "--data",
            str(tiny_dataset), "--input-size", "64", "--verify-images", "2", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| ExecuTorch int8 (PT2E PTQ, XNNPACK) | executorch | int8 |" in out
    report = json.loads((output / "report.json").read_text())
    assert [(r["format"], r["precision"]) for r in report["rows"]] == [
        ("pytorch", "float32"), ("executorch", "float32"), ("pytorch", "int8"), ("executorch", "int8"),
        ("pytorch", "int8"), ("executorch", "int8")]
    assert set(report["verification"]) == set(report["executorch"]) == {"executorch_fp32", "executorch",
                                                                        "executorch_ptq"}
    assert all(result["passed"] for result in report["verification"].values())
    for name in ("executorch_fp32", "executorch", "executorch_ptq"):
        assert report["executorch"][name]["files"] == ["backbone.pte", "rpn_head.pte", "box_head.pte",
                                                       "densepose_head.pte"]
    for name in ("executorch", "executorch_ptq"):
        assert report["rows"][0]["size_mb"] / report["executorch"][name]["size_mb"] >= 3.5
    # the report is not overwritten without --force
    assert main(args) == 2 and "--force" in capsys.readouterr().err


def test_a_float32_checkpoint_exports_float32_programs_that_compute_what_pytorch_does(pt2e_export, tiny_dataset,
                                                                                      tmp_path, capsys):
    """fnl-export executorch of a float checkpoint: the same region split with XNNPACK's float32 kernels (what int8
    is compared against in the same runtime), verified by the float32 criteria: boxes, scores and heads within 1e-3
    of PyTorch float32 (the verification images are the backbone program's size, so nothing is zero-padded)."""
    from fnl.cli.export import main
    from fnl.engine.checkpoint import save_checkpoint
    from fnl.export.executorch import (
        PROGRAM_PARTS,
        ExecuTorchPredictor,
        executorch_row,
        program_bytes,
        verify_executorch,
    )
    from fnl.export.verify import FLOAT32

    save_checkpoint(tmp_path / "model_fp32.pth", pt2e_export.float_model, pt2e_export.cfg)
    assert main(["executorch", "--ckpt", str(tmp_path / "model_fp32.pth"), "--output", str(tmp_path / "export"),
                 "--verify", "--data", str(tiny_dataset), "--input-size", "64", "--threads", "1"]) == 0
    assert "(float32, XNNPACK" in capsys.readouterr().out
    directory = tmp_path / "export" / "executorch_fp32"
    predictor = ExecuTorchPredictor(directory, threads=1)
    assert predictor.precision == "float32"
    # float32 weights: several times the int8 programs
    megabytes = {path: sum(p.stat().st_size for p in path.glob("*.pte")) for path in (directory, pt2e_export.directory)}
    assert megabytes[directory] > 3 * megabytes[pt2e_export.directory]
    # where the bytes go: every byte in one part; only int8 programs carry per-channel scales
    parts = {path: [program_bytes(p) for p in sorted(path.glob("*.pte"))] for path in megabytes}
    for path, programs in parts.items():
        assert sum(sum(program.values()) for program in programs) == megabytes[path]
        assert all(set(program) == set(PROGRAM_PARTS) and min(program.values()) >= 0 for program in programs)
    float_parts, int8_parts = ({part: sum(p[part] for p in parts[path]) for part in PROGRAM_PARTS}
                               for path in megabytes)
    assert float_parts["channel_scales"] == 0 < int8_parts["channel_scales"]
    assert float_parts["xnnpack_graph"] > 0 and int8_parts["xnnpack_graph"] > 0
    assert int8_parts["tensors"] < 0.3 * float_parts["tensors"]  # int8 weights, int32 biases
    report = verify_executorch(pt2e_export.float_model, predictor, pt2e_export.images, FLOAT32)
    assert report.rows[0].compared > 0 and report.passed, report.table()
    row, _ = executorch_row(directory, pt2e_export.cfg, "float", threads=1)
    assert (row.name, row.format, row.precision) == ("ExecuTorch float32 (XNNPACK)", "executorch", "float32")


def test_a_directory_without_programs_is_named(tmp_path):
    from fnl.export.executorch import ExecuTorchModelError, ExecuTorchPredictor

    with pytest.raises(ExecuTorchModelError, match="executorch.json not found"):
        ExecuTorchPredictor(tmp_path)


class _PooledBranch(torch.nn.Module):
    """ASPP's shape in small: a conv and a global average pool read the same input, so the pool's input is int8."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x), self.pool(x)


def test_an_int8_global_pool_is_right_when_the_number_of_rois_grows(tmp_path):
    """XNNPACK's int8 global average pooling (executorch 1.5.1) gives garbage for some RoIs of a call once an
    earlier call had fewer (5 RoIs then 7: the last 3 wrong by ~40x the output range; the DensePose head's ASPP
    pooling, docs/NOTES.md); fnl keeps such a pool float in programs of dynamic batch size."""
    from executorch.runtime import Runtime
    from torch.export import Dim
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from fnl.export.executorch import int8_global_pools, lower_to_xnnpack
    from fnl.qat.pt2e import xnnpack_quantizer

    torch.manual_seed(0)
    rois = torch.randn(10, 8, 6, 6)
    dynamic_shapes = ({0: Dim("rois", min=0, max=10)},)
    program = torch.export.export(_PooledBranch(8).eval(), (rois[:2],), dynamic_shapes=dynamic_shapes).module()
    program = prepare_pt2e(program, xnnpack_quantizer(qat=False))
    program(rois)
    program = convert_pt2e(program)
    assert len(int8_global_pools(program)) == 1  # the condition, or this test tests nothing
    (tmp_path / "pooled.pte").write_bytes(lower_to_xnnpack(program, (rois[:2],), dynamic_shapes)[0])
    pooled_step = _output_steps(program, "the pooled branch")[1]
    for calls in ([5, 7], [3, 4, 5]):  # a fresh method each time: the fault depends on the earlier calls
        method = Runtime.get().load_program(tmp_path / "pooled.pte").load_method("forward")
        for count in calls:
            with torch.no_grad():
                expected = program(rois[:count])[1]
            actual = method.execute([rois[:count].contiguous()])[1]
            steps = float((actual - expected).abs().max()) / pooled_step
            assert steps <= 1.0001, (calls, count, steps)
