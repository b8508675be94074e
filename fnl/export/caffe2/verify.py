"""Check an exported Caffe2 model by executing it (``fnl.export.caffe2.executor``) image by image, and score it.

- float32 models are compared with ONNX Runtime running the whole-model ONNX export (``fnl.export.to_onnx``):
  detections pair up as ``fnl.export.verify`` pairs them (``FLOAT32``: same count, boxes and scores within 1e-3),
  and the DensePose outputs of paired detections must agree within 1e-3.
- int8 models are compared with the PyTorch int8 model they came from, in two parts:
  * stages: PyTorch's int8 box head and DensePose head run on the RoI features the Caffe2 net pooled (fetched from
    the executor), compared with the net's head outputs in quantization steps of each output. The tolerance is one
    step; at most ``INT8_STAGE_FAILURE_FRACTION`` of the values may lie beyond it: the executor requantizes as
    QNNPACK does (int32 bias, exact product, ties away from zero), fbgemm adds a float bias and rounds a float32
    product, so a value on a rounding tie can differ by one step in one layer, and the DensePose head stacks 12 int8
    layers. The largest difference is reported. The per-tensor export (stock Caffe2) requantizes the weights
    and changes the numerics themselves: its rows fail by the number of steps they differ, reported as such.
  * end to end: detections pair at IoU >= 0.9 (``INT8``, with its floor: the PyTorch model's own pairing on the
    image + 1 gray level, see fnl.export.verify); boxes, scores and the DensePose outputs on the very same
    boxes (PyTorch's heads run again on the net's boxes) are reported, not judged: they also carry the trunk's
    rounding differences (a one-step tie early in the backbone propagates through ~100 int8 layers), and a
    random-weight model's detections are decided by ties in its quantized scores.

Images are cropped at the bottom/right to multiples of the net's ``size_divisibility`` first: there the Caffe2 net
and the PyTorch model pad an image identically, elsewhere they do not (see ``fnl.export.caffe2.writer``), and this
check is about the conversion. How many were cropped is reported.

``caffe2_report_row`` scores the model with ``fnl.engine.benchmark.measure`` (box and DensePose AP) and leaves the
latency figures empty: the reference executor's speed says nothing about a device's.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fnl.config import CfgNode
from fnl.engine.benchmark import measure
from fnl.engine.report import ReportRow
from fnl.export.caffe2.parts import BOX_HEAD_OUTPUTS, BoxHeadForExport, DensePoseHeadForExport
from fnl.export.caffe2.predictor import Caffe2Predictor
from fnl.export.caffe2.writer import BOX_POOLED, DENSEPOSE_POOLED, INIT_NET_FILE, PREDICT_NET_FILE
from fnl.export.onnx import ExportableRCNN, model_precision, to_onnx
from fnl.export.runtime import DENSEPOSE_OUTPUTS, OnnxPredictor
from fnl.export.verify import (
    FLOAT32,
    INT8,
    Criteria,
    DecisivePairing,
    DiffRow,
    PairingFloor,
    VerificationReport,
    match_detections,
    one_gray_level_up,
)
from fnl.modeling import GeneralizedRCNN
from fnl.modeling.layers import SubPixelConvTranspose2d
from fnl.utils.errors import InvalidArgumentError
from fnl.utils.modules import eval_mode

FLOAT32_HEAD_ATOL = 1e-3
INT8_STAGE_FAILURE_FRACTION = 1e-3
BOX_HEAD_OUTPUTS_STEPS = {"cls_logits": "cls_score", "bbox_deltas": "bbox_pred"}


@dataclass
class Caffe2Verification:
    """``end_to_end`` against the reference runtime; ``stages`` (int8 only): heads on the net's own RoI features."""

    end_to_end: VerificationReport
    stages: list[DiffRow] = field(default_factory=list)
    cropped: int = 0  # images cropped to multiples of the net's size divisibility

    @property
    def stages_passed(self) -> bool:
        return all(row.passed for row in self.stages)

    @property
    def passed(self) -> bool:
        return self.end_to_end.passed and self.stages_passed

    def table(self) -> str:
        text = self.end_to_end.table()
        if self.cropped:
            text += (f"\n({self.cropped} of {self.end_to_end.images} images cropped at the bottom/right to multiples "
                     "of the net's size divisibility)")
        if self.stages:
            lines = ["", "int8 heads on the net's own pooled RoI features (PyTorch int8 vs Caffe2), in quantization "
                     "steps:", f"{'output':<12} {'compared':>9} {'max steps':>9} {'> 1 step':>8}  result"]
            lines += [f"{row.output:<12} {row.compared:>9} {_steps(row):>9} {row.failures:>8}  "
                      f"{'pass' if row.passed else 'FAIL'}" for row in self.stages]
            lines.append(f"{'PASSED' if self.stages_passed else 'FAILED'} (tolerance: one quantization step, at most "
                         f"{INT8_STAGE_FAILURE_FRACTION:.1%} of the values beyond it)")
            text += "\n" + "\n".join(lines)
        return text


def _steps(row: DiffRow) -> str:
    if row.max_abs_diff is None or not row.tolerance:
        return "-"
    return f"{row.max_abs_diff / row.tolerance:.2f}"


def densepose_output_steps(model: GeneralizedRCNN) -> dict[str, float | None]:
    """The quantization step of each DensePose output of an int8 model (the output scale of the quantized sub-pixel
    conv, or of the quantized transposed conv of an int8 checkpoint written before that rewrite, that produces it),
    None where that output is computed in float (a float-island predictor)."""
    predictor = getattr(model.roi_heads.densepose_predictor, "module", model.roi_heads.densepose_predictor)
    layers = ("ann_index_lowres", "index_uv_lowres", "u_lowres", "v_lowres")
    steps: dict[str, float | None] = {}
    for name, layer in zip(DENSEPOSE_OUTPUTS, layers, strict=True):
        module = getattr(predictor, layer)
        # SubPixelConvTranspose2d: its pixel shuffle and crop keep its conv's output scale
        scale = getattr(module.conv if isinstance(module, SubPixelConvTranspose2d) else module, "scale", None)
        steps[name] = float(scale) if scale is not None else None
    return steps


def verify_caffe2(model: GeneralizedRCNN, model_dir: str | Path, images: Iterable[Any],
                  onnx_path: str | Path | None = None, criteria: Criteria | None = None) -> Caffe2Verification:
    """Run the Caffe2 files in ``model_dir`` and the reference (see the module docstring) on ``images``
    ((3, H, W) RGB, already resized) and compare. For a float model without ``onnx_path``, the model is exported
    to a temporary ONNX file first."""
    predictor = Caffe2Predictor(model_dir)
    originals = [torch.as_tensor(np.asarray(image)) for image in images]
    if not originals:
        raise ValueError("verify_caffe2 needs at least one image")
    images = [_cropped(image, predictor.size_divisibility) for image in originals]
    cropped = sum(a.shape != b.shape for a, b in zip(originals, images, strict=True))
    if model_precision(model) == "int8":
        heads = _HeadRows(dict.fromkeys(DENSEPOSE_OUTPUTS)) if predictor.has_densepose else None
        stages = _StageRows(model, predictor.has_densepose)
        report = _compare(predictor, _PyTorchReference(model), images, criteria or INT8, heads, stages)
        return Caffe2Verification(report, stages.finish(), cropped)
    heads = _HeadRows(dict.fromkeys(DENSEPOSE_OUTPUTS, FLOAT32_HEAD_ATOL)) if predictor.has_densepose else None
    if onnx_path is not None:
        reference = _OnnxReference(OnnxPredictor(onnx_path, threads=1))
        return Caffe2Verification(_compare(predictor, reference, images, criteria or FLOAT32, heads), [], cropped)
    with tempfile.TemporaryDirectory(prefix="fnl-caffe2-verify-") as tmp:
        reference = _OnnxReference(OnnxPredictor(to_onnx(model, Path(tmp) / "model_fp32.onnx", images[0]), threads=1))
        return Caffe2Verification(_compare(predictor, reference, images, criteria or FLOAT32, heads), [], cropped)


def _cropped(image: torch.Tensor, divisibility: int) -> torch.Tensor:
    """(3, H, W) cropped at the bottom/right to multiples of ``divisibility``."""
    height, width = (n // divisibility * divisibility for n in image.shape[-2:])
    if not (height and width):
        raise InvalidArgumentError(f"an image of size {tuple(image.shape[-2:])} is smaller than the net's size "
                                   f"divisibility ({divisibility}): use larger verification images")
    return image[..., :height, :width]


class _OnnxReference:
    """Detections and head outputs of ONNX Runtime; heads compared on paired detections."""

    def __init__(self, predictor: OnnxPredictor) -> None:
        self.predictor = predictor

    def run(self, image: torch.Tensor) -> dict[str, np.ndarray]:
        return self.predictor.run_image(image.numpy())

    def heads_on(self, image: torch.Tensor, reference: dict[str, np.ndarray], test: dict[str, np.ndarray],
                 pairs: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Reference head rows aligned with the test detections they paired with, and those detections."""
        ref_index = np.array([i for i, _ in pairs], dtype=np.int64)
        test_index = np.array([j for _, j in pairs], dtype=np.int64)
        return {name: reference[name][ref_index] for name in DENSEPOSE_OUTPUTS}, test_index


class _PyTorchReference:
    """Detections of the PyTorch model; heads run again on the test boxes, so every test detection is compared."""

    def __init__(self, model: GeneralizedRCNN) -> None:
        self.wrapper = ExportableRCNN(model)
        self.model = model

    def run(self, image: torch.Tensor) -> dict[str, np.ndarray]:
        with eval_mode(self.model), torch.no_grad():
            outputs = self.wrapper(image[None])
        return {name: t.cpu().numpy() for name, t in zip(self.wrapper.output_names, outputs, strict=True)}

    def heads_on(self, image: torch.Tensor, reference: dict[str, np.ndarray], test: dict[str, np.ndarray],
                 pairs: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        with eval_mode(self.model), torch.no_grad():
            heads = self.wrapper.densepose_on_boxes(image[None], torch.from_numpy(test["boxes"]))
        return {name: t.cpu().numpy() for name, t in heads.items()}, np.arange(len(test["boxes"]))


class _HeadRows:
    """One DiffRow per DensePose output, each with its tolerance (None: reported, not judged)."""

    def __init__(self, tolerances: dict[str, float | None]) -> None:
        self.rows = [DiffRow(name, tolerance=tolerances[name]) for name in DENSEPOSE_OUTPUTS]

    def add(self, reference: dict[str, np.ndarray], test: dict[str, np.ndarray], test_index: np.ndarray) -> None:
        for row in self.rows:
            row.add(reference[row.output], test[row.output][test_index])


class _StageRows:
    """int8: PyTorch's int8 heads on the RoI features the net pooled, against the net's head outputs; tolerance one
    quantization step of each output (an output computed in float is reported, not judged)."""

    def __init__(self, model: GeneralizedRCNN, densepose: bool) -> None:
        self.box_head = BoxHeadForExport(model)
        self.densepose_head = DensePoseHeadForExport(model) if densepose else None
        self.model = model
        box_predictor = getattr(model.roi_heads.box_predictor, "module", model.roi_heads.box_predictor)
        steps = {name: _scale_of(getattr(box_predictor, layer)) for name, layer in BOX_HEAD_OUTPUTS_STEPS.items()}
        if densepose:
            steps.update(densepose_output_steps(model))
        self.rows = {name: DiffRow(name, tolerance=None if step is None else step * (1 + 1e-4))
                     for name, step in steps.items()}

    @property
    def fetch(self) -> list[str]:
        return [BOX_POOLED, *BOX_HEAD_OUTPUTS] + ([DENSEPOSE_POOLED] if self.densepose_head is not None else [])

    def add(self, test: dict[str, np.ndarray]) -> None:
        stages = [(self.box_head, BOX_POOLED, BOX_HEAD_OUTPUTS)]
        if self.densepose_head is not None:
            stages.append((self.densepose_head, DENSEPOSE_POOLED, DENSEPOSE_OUTPUTS))
        with eval_mode(self.model), torch.no_grad():
            for head, pooled, names in stages:
                features = torch.from_numpy(test[pooled]).permute(0, 3, 1, 2)  # the int8 net pools NHWC
                for name, value in zip(names, head(features), strict=True):
                    self.rows[name].add(value.numpy(), test[name])

    def finish(self) -> list[DiffRow]:
        for row in self.rows.values():
            if row.tolerance is not None:
                row.passed = row.failures <= INT8_STAGE_FAILURE_FRACTION * row.compared
        return list(self.rows.values())


def _scale_of(layer: Any) -> float | None:
    scale = getattr(layer, "scale", None)
    return float(scale) if scale is not None else None


def _compare(predictor: Caffe2Predictor, reference: _OnnxReference | _PyTorchReference, images: list[torch.Tensor],
             criteria: Criteria, heads: _HeadRows | None, stages: _StageRows | None = None) -> VerificationReport:
    detections = DiffRow("detections")
    boxes = DiffRow("boxes", tolerance=criteria.box_atol)
    scores = DiffRow("scores", tolerance=criteria.score_atol)
    floor = PairingFloor(criteria)
    decisive = DecisivePairing(criteria)
    paired = 0
    for image in images:
        expected = reference.run(image)
        if criteria.noise_floor_margin is not None and isinstance(reference, _PyTorchReference):
            floor.add(expected, reference.run(one_gray_level_up(image)))
        test = predictor.run_image(image.numpy(), fetch=stages.fetch if stages is not None else ())
        pairs = match_detections(expected["boxes"], expected["classes"], test["boxes"], test["classes"], criteria)
        largest = max(len(expected["boxes"]), len(test["boxes"]))
        paired += len(pairs)
        detections.compared += largest
        detections.failures += largest - len(pairs)
        decisive.add(expected, test)
        ref_index = np.array([i for i, _ in pairs], dtype=np.int64)
        test_index = np.array([j for _, j in pairs], dtype=np.int64)
        boxes.add(expected["boxes"][ref_index], test["boxes"][test_index])
        scores.add(expected["scores"][ref_index], test["scores"][test_index])
        if heads is not None:
            reference_rows, compared_index = reference.heads_on(image, expected, test, pairs)
            heads.add(reference_rows, test, compared_index)
        if stages is not None:
            stages.add(test)
    floor_rows = floor.judge(detections, paired)
    return VerificationReport(criteria, [detections, *floor_rows, *decisive.judge(), boxes, scores,
                                         *(heads.rows if heads is not None else [])], len(images))


def caffe2_report_row(name: str, model_dir: str | Path, cfg: CfgNode, precision: str, method: str,
                      split: str | None = None) -> tuple[ReportRow, dict]:
    """Box and DensePose AP of the Caffe2 files in ``model_dir`` on ``split`` (``fnl.engine.benchmark.measure``
    with a predictor over the reference executor); size = model.pb + model_init.pb; latency fields None."""
    model_dir = Path(model_dir)
    size_mb = round(sum((model_dir / f).stat().st_size for f in (PREDICT_NET_FILE, INIT_NET_FILE)) / 1e6, 3)
    row, results = measure(name, "caffe2", precision, method, Caffe2Predictor(model_dir), cfg, size_mb, split)
    return dataclasses.replace(row, latency_ms_p50=None, latency_ms_p90=None, fps=None), results
