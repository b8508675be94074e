"""ExecuTorch export of the PT2E int8 model: XNNPACK .pte programs per region driven by the model's float glue,
checked against the PyTorch PT2E model with fnl.export.verify's criteria, and its report row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from export_testing import DECISIVE, blank_image, fit_decisive_detector  # noqa: E402

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
    from fnl.export.executorch import ExecuTorchPredictor, verify_executorch

    predictor = ExecuTorchPredictor(pt2e_export.directory, threads=1)
    report = verify_executorch(pt2e_export.int8_model, predictor, pt2e_export.images)
    assert report.rows[0].compared > 0, report.table()
    assert report.passed, report.table()
    # Same output structure as the PyTorch model, boxes scaled to the original size.
    image = pt2e_export.images[0]
    with torch.no_grad():
        expected = pt2e_export.int8_model([{"image": image, "height": 128, "width": 128}])[0]
    output = predictor([{"image": image, "height": 128, "width": 128}])[0]
    assert set(output) == set(expected) and set(output["densepose"]) == set(expected["densepose"])
    assert output["boxes"].shape == tuple(expected["boxes"].shape)
    def by_position(boxes):  # near-tied scores may order the same detections differently
        boxes = torch.as_tensor(boxes)
        return boxes[torch.argsort(boxes[:, 0] * 1000 + boxes[:, 1])]

    torch.testing.assert_close(by_position(output["boxes"]), by_position(expected["boxes"]), atol=0.5, rtol=0)


def test_an_image_without_detections_gives_empty_outputs(pt2e_export):
    from fnl.export.executorch import ExecuTorchPredictor

    output = ExecuTorchPredictor(pt2e_export.directory, threads=1)([{"image": pt2e_export.blank}])[0]
    assert output["boxes"].shape == (0, 4) and output["densepose"]["u"].shape[0] == 0


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
        ("pytorch", "float32"), ("pytorch", "int8"), ("executorch", "int8"), ("pytorch", "int8"),
        ("executorch", "int8")]
    assert set(report["verification"]) == set(report["executorch"]) == {"executorch", "executorch_ptq"}
    assert all(result["passed"] for result in report["verification"].values())
    for name in ("executorch", "executorch_ptq"):
        assert report["executorch"][name]["files"] == ["backbone.pte", "rpn_head.pte", "box_head.pte",
                                                       "densepose_head.pte"]
        assert report["rows"][0]["size_mb"] / report["executorch"][name]["size_mb"] >= 3.5
    # the report is not overwritten without --force
    assert main(args) == 2 and "--force" in capsys.readouterr().err


def test_a_directory_without_programs_is_named(tmp_path):
    from fnl.export.executorch import ExecuTorchModelError, ExecuTorchPredictor

    with pytest.raises(ExecuTorchModelError, match="executorch.json not found"):
        ExecuTorchPredictor(tmp_path)
