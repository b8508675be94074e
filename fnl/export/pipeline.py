"""``export_and_report``: the float32 and int8 models of a fnl-quantize run as ONNX, verified, next to ONNX Runtime's
own static PTQ, in one size / AP / FPS report.

From ``quantize_dir`` (``model_fp32.pth``, ``model_int8.pth``) it writes into ``export_dir``:
- ``model_fp32.onnx`` and ``model_int8.onnx`` (``fnl.export.to_onnx``), each verified against the PyTorch model it
  came from (``FLOAT32`` / ``INT8`` criteria on the first test images; box and DensePose AP on the test split);
- ``model_ort_ptq.onnx``: ONNX Runtime's ``quantize_static`` of the float graph, calibrated on training images (the
  peer our QAT int8 export is measured against);
- ``caffe2_int8/``: the int8 model as Caffe2 NetDefs (``fnl.export.caffe2``), scored by executing them;
- ``report.json`` / ``report.md`` / ``report.png`` (docs/DESIGN.md's layout) with six rows measured the same way
  (``fnl.engine.benchmark.measure``: the test split, batch 1, ``threads`` CPU threads): PyTorch float32, PyTorch
  int8, ONNX float32, ONNX int8, ONNX int8 (ORT static PTQ), Caffe2 int8 (size and AP only). The verification
  results are in ``report.json`` under ``"verification"``; a failed verification is reported there and logged, it
  does not stop the report.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from fnl.config import CfgNode
from fnl.data import build_test_loader
from fnl.engine.benchmark import measure
from fnl.engine.checkpoint import read_checkpoint
from fnl.engine.checkpointer import FLOAT32_MODEL, INT8_MODEL
from fnl.engine.report import REPORT_JSON, REPORT_MD, REPORT_PNG, ReportRow, file_megabytes, write_report
from fnl.export.caffe2 import caffe2_report_row, to_caffe2
from fnl.export.graph_compaction import compact_onnx_file
from fnl.export.onnx import DEFAULT_OPSET, to_onnx
from fnl.export.ort_quantize import ort_static_ptq
from fnl.export.runtime import OnnxPredictor, Preprocessing
from fnl.export.verify import FLOAT32, INT8, VerificationReport, ap_rows, verify_onnx
from fnl.qat.serialization import load_model_for_inference
from fnl.utils.errors import InvalidArgumentError
from fnl.utils.modules import torch_threads

logger = logging.getLogger("fnl")

FLOAT_CHECKPOINT, INT8_CHECKPOINT = FLOAT32_MODEL, INT8_MODEL
FLOAT_ONNX, INT8_ONNX, ORT_PTQ_ONNX = "model_fp32.onnx", "model_int8.onnx", "model_ort_ptq.onnx"
CAFFE2_INT8_DIR = "caffe2_int8"
OUTPUTS = (FLOAT_ONNX, INT8_ONNX, ORT_PTQ_ONNX, f"{CAFFE2_INT8_DIR}/model.pb", REPORT_JSON, REPORT_MD, REPORT_PNG)
ORT_PTQ_ROW = "ONNX int8 (ORT static PTQ)"


def export_and_report(quantize_dir: str | Path, export_dir: str | Path, data_root: str | Path, threads: int = 2,
                      input_size: int | None = None, verify_images: int = 8, calibration_images: int = 16,
                      opset: int = DEFAULT_OPSET, caffe2: bool = True) -> dict[str, Any]:
    """Export, verify, quantize with ONNX Runtime and measure; returns the ``report.json`` document.

    ``caffe2`` adds the int8 model as Caffe2 NetDefs (``export_dir/caffe2_int8``, stock Caffe2's per-tensor weight
    scales) and a row with their size and AP, scored by fnl's reference executor (no latency: it is a checker).

    ``input_size`` (the test images' shortest side) defaults to the float model's ``INPUT.MIN_SIZE_TEST``.
    ``verify_images`` test images are compared output by output; ``calibration_images`` training images calibrate
    ONNX Runtime's quantization. ``threads``: PyTorch and ONNX Runtime intra-op threads for every row.
    """
    export_dir = Path(export_dir)
    float_checkpoint, int8_checkpoint, overrides = quantize_outputs(quantize_dir, INT8_CHECKPOINT, "fnl-quantize",
                                                                    data_root, input_size)
    if verify_images < 1 or calibration_images < 1:
        raise InvalidArgumentError(f"verify_images and calibration_images must be at least 1, got {verify_images} and "
                                   f"{calibration_images}")
    with torch_threads(threads):
        float_model, cfg = load_model_for_inference(str(float_checkpoint), None, overrides)
        int8_model, _ = load_model_for_inference(str(int8_checkpoint), None, overrides)
        mode = _int8_mode(int8_checkpoint)
        test_images = split_images(cfg, cfg.DATASETS.TEST[0], verify_images)
        preprocessing = Preprocessing.from_config(cfg)
        int8_onnx = to_onnx(int8_model, export_dir / INT8_ONNX, test_images[0], opset, preprocessing=preprocessing)
        calibration = split_images(cfg, cfg.DATASETS.TRAIN[0], calibration_images)
        with tempfile.TemporaryDirectory(prefix="fnl-export-") as scratch:
            # ONNX Runtime's PTQ finds the int8 regions by node name: it gets the float graph before compaction.
            named_float_onnx = to_onnx(float_model, Path(scratch) / FLOAT_ONNX, test_images[0], opset, compact=False,
                                       preprocessing=preprocessing)
            float_onnx = compact_onnx_file(named_float_onnx, export_dir / FLOAT_ONNX)
            ort_ptq_onnx = ort_static_ptq(named_float_onnx, export_dir / ORT_PTQ_ONNX, calibration)
        verification = {FLOAT_ONNX: verify_onnx(float_model, float_onnx, test_images, FLOAT32, threads),
                        INT8_ONNX: verify_onnx(int8_model, int8_onnx, test_images, INT8, threads)}

        def onnx_row(name: str, precision: str, method: str, path: Path) -> tuple[ReportRow, dict]:
            return measure(name, "onnx", precision, method, OnnxPredictor(path, threads), cfg, file_megabytes(path))

        torch_float, torch_float_results = measure("PyTorch float32", "pytorch", "float32", "float", float_model,
                                                   cfg, file_megabytes(float_checkpoint))
        torch_int8, torch_int8_results = measure(f"PyTorch int8 ({mode.upper()})", "pytorch", "int8", mode,
                                                 int8_model, cfg, file_megabytes(int8_checkpoint))
        onnx_float, onnx_float_results = onnx_row("ONNX float32", "float32", "float", float_onnx)
        onnx_int8, onnx_int8_results = onnx_row(f"ONNX int8 ({mode.upper()})", "int8", mode, int8_onnx)
        ort_ptq, _ = onnx_row(ORT_PTQ_ROW, "int8", "ort-static-ptq", ort_ptq_onnx)
        rows = [torch_float, torch_int8, onnx_float, onnx_int8, ort_ptq]
        requantized = False
        if caffe2:
            caffe2_row, requantized = _caffe2_int8_row(int8_model, export_dir / CAFFE2_INT8_DIR, cfg, mode)
            rows.append(caffe2_row)
    verification[FLOAT_ONNX].rows.extend(ap_rows(torch_float_results, onnx_float_results, FLOAT32))
    verification[INT8_ONNX].rows.extend(ap_rows(torch_int8_results, onnx_int8_results, INT8))
    for name, report in verification.items():
        log = logger.info if report.passed else logger.warning
        log("verification of %s against PyTorch:\n%s", name, report.table())

    notes = _notes(rows, verification, cfg, threads, len(calibration), requantized)
    extra = {"verification": {name: report.as_dict() for name, report in verification.items()},
             "onnx": {"opset": opset, "files": {FLOAT_ONNX: onnx_float.name, INT8_ONNX: onnx_int8.name,
                                                ORT_PTQ_ONNX: ort_ptq.name}}}
    return write_report(export_dir, rows, cfg.INPUT.MIN_SIZE_TEST, threads,
                        "fnl-export: PyTorch, ONNX Runtime and Caffe2, float32 and int8", notes, extra)


def quantize_outputs(quantize_dir: str | Path, int8_name: str, command: str, data_root: str | Path,
                     input_size: int | None) -> tuple[Path, Path, list[str]]:
    """The float and int8 checkpoints of a ``command`` output directory (checked to exist) and the config overrides
    that evaluate them on ``data_root``'s test split at ``input_size`` on CPU."""
    quantize_dir = Path(quantize_dir)
    float_checkpoint, int8_checkpoint = quantize_dir / FLOAT_CHECKPOINT, quantize_dir / int8_name
    for checkpoint in (float_checkpoint, int8_checkpoint):
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint} not found: {quantize_dir} is not a {command} output directory "
                                    f"(it needs {FLOAT_CHECKPOINT} and {int8_name})")
    overrides = ["DATASETS.ROOT", str(data_root), "MODEL.DEVICE", "cpu"]
    if input_size is not None:
        overrides += ["INPUT.MIN_SIZE_TEST", str(input_size)]
    return float_checkpoint, int8_checkpoint, overrides


def _caffe2_int8_row(int8_model: torch.nn.Module, directory: Path, cfg: CfgNode, mode: str
                     ) -> tuple[ReportRow, bool]:
    """The stock (per-tensor) Caffe2 export's row, and whether its weights had to be requantized for it."""
    export = to_caffe2(int8_model, directory)
    row, _ = caffe2_report_row(f"Caffe2 int8 ({mode.upper()})", directory, cfg, "int8", mode)
    return row, any(r.max_abs_error > 0 for r in export.weight_requantization)


def verification_passed(document: dict[str, Any]) -> bool:
    """Whether every export in a ``report.json`` document of ``export_and_report`` passed its verification."""
    return all(result["passed"] for result in document["verification"].values())


def _int8_mode(path: Path) -> str:
    """"qat" or "ptq", as fnl-quantize recorded it in the int8 checkpoint."""
    return str(read_checkpoint(path)["quantization"]["mode"])


def split_images(cfg: CfgNode, split: str, count: int) -> list[torch.Tensor]:
    """The first ``count`` images of ``split``, resized as for evaluation (what the exported graph takes)."""
    limited = cfg.clone()  # an unfrozen copy
    limited.TEST.MAX_IMAGES = count
    return [item["image"] for batch in build_test_loader(limited, split) for item in batch]


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def _notes(rows: list[ReportRow], verification: dict[str, VerificationReport], cfg: CfgNode, threads: int,
           calibration_images: int, caffe2_requantized: bool = False) -> list[str]:
    onnx_float = next(row for row in rows if row.format == "onnx" and row.precision == "float32")
    against_onnx = ", ".join(
        f"`{row.name}` {_ratio(onnx_float.size_mb, row.size_mb)} smaller, "
        f"{_ratio(onnx_float.latency_ms_p50, row.latency_ms_p50)} faster"
        for row in rows if row.format == "onnx" and row.precision == "int8")
    tables = "\n\n".join(f"`{name}`:\n\n```\n{report.table()}\n```" for name, report in verification.items())
    torch_float, torch_int8, _, onnx_int8 = rows[:4]
    # Two int8 runtimes round differently in a few outputs per layer and a deep int8 network spreads that: the
    # int8 model's own distance from float32 says how large such differences are for this model.
    scale = (f"For scale, box / DensePose AP of `{torch_int8.name}` minus `{torch_float.name}`: "
             f"{_difference(torch_int8.bbox_AP, torch_float.bbox_AP)} / "
             f"{_difference(torch_int8.densepose_AP, torch_float.densepose_AP)}; of `{onnx_int8.name}` minus "
             f"`{torch_int8.name}`: {_difference(onnx_int8.bbox_AP, torch_int8.bbox_AP)} / "
             f"{_difference(onnx_int8.densepose_AP, torch_int8.densepose_AP)}.")
    return [
        f"Against `{onnx_float.name}` (same runtime): {against_onnx}.",
        f"PyTorch rows run with {threads} intra-op thread(s), ONNX rows in ONNX Runtime's CPU provider with "
        f"{threads} intra-op thread(s); test split `{cfg.DATASETS.TEST[0]}` of `{cfg.DATASETS.ROOT}`.",
        f"`{ORT_PTQ_ONNX}`: ONNX Runtime `quantize_static` of `{FLOAT_ONNX}` (QDQ, per-channel int8 weights, uint8 "
        f"activations, min/max calibration on {calibration_images} `{cfg.DATASETS.TRAIN[0]}` images), over the "
        "regions fnl.qat runs in int8; detection glue (proposal decoding, NMS, RoIAlign) stays float.",
        "Verification against the PyTorch model each file was exported from (detections and DensePose outputs on "
        "the first test images, AP on the test split; also in report.json under `verification`):\n\n" + tables,
        scale,
        *([f"`Caffe2 int8`: `{CAFFE2_INT8_DIR}/` model.pb + model_init.pb, QNNPACK-style int8 ops with stock "
           "Caffe2's per-tensor weight scales"
           + (" (the model's per-channel weights requantized to one scale per tensor: for a Caffe2 target, quantize "
              "with `QUANTIZATION.WEIGHT_SCALES per-tensor` so that QAT trains the weights Caffe2 runs)"
              if caffe2_requantized else "")
           + ", scored by executing the nets with fnl's reference executor; no latency: the executor is a checker, "
           "not a device runtime."] if any(row.format == "caffe2" for row in rows) else []),
    ]


def _difference(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{value - reference:+.2f}"
