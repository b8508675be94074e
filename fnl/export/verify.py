"""Check an exported ONNX model against the PyTorch model it came from, image by image.

Both run on the same resized images; outputs are compared in the input image's pixels. Detections are compared as
sets: each PyTorch detection pairs with at most one ONNX Runtime detection of the same class (greedily, in PyTorch's
score order). The DensePose head outputs are compared on the very same boxes: PyTorch's head is run again on the
boxes ONNX Runtime returned. So near-tied scores that only reorder detections do not fail a correct export, while any
real difference in boxes, scores or head outputs still does.

- ``FLOAT32``: every detection pairs up (same count) with boxes and scores within 1e-3, head outputs within 1e-3.
- ``INT8``: at least 95% of detections pair up at IoU >= 0.9 -- or, for a model whose own detections are less stable
  than that, as many as pair between PyTorch on the image and PyTorch on the image with one gray level added on a
  checkerboard of pixels, minus 0.1 (the sampling noise of a few hundred detections). Whatever that floor, 90% of
  the detections either side scores >= 0.7 must find a partner at IoU >= 0.5 (``DecisivePairing``): a floor that
  can sink to 0% on an unstable model can no longer fail, and a wrong scale anywhere moves confident boxes far
  more than rounding does. Other differences are reported, not judged. On a dataset, box AP and DensePose AP (the
  same evaluator scoring both) must also agree within 0.5 AP points (``ap_rows``). An int8 verification judges on
  at least 8 images (``require_images``).

Why that floor: two int8 runtimes round a few values per layer differently (fbgemm adds a float bias to a float32
product, ONNX Runtime an int32 bias to an int32 sum; ties fall differently), and a deep int8 network amplifies one
step of difference layer after layer, as it amplifies any one-step change of its input: on a trained model B two
correct int8 runtimes pair under half of the detections at IoU 0.9 while agreeing on AP (the measurements:
docs/NOTES.md). So on such a model the 95% target measures the model's sensitivity, not the export; the floor
measures that sensitivity on the same images and the export must do as well.

Detections are only comparable where they are decisive: an int8 model that scores many candidates alike (random
weights: every score 0.5 +- 1e-4, a few int8 steps apart) ranks them by rounding, and two int8 runtimes then keep
different ones. The INT8 criteria are meant for trained models.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fnl.export.onnx import ExportableRCNN, model_precision
from fnl.export.runtime import DENSEPOSE_OUTPUTS, GraphPredictor, OnnxPredictor
from fnl.modeling import GeneralizedRCNN
from fnl.utils.errors import UserError
from fnl.utils.modules import eval_mode


@dataclass(frozen=True)
class Criteria:
    """When an export passes. Detections pair up by coordinates (``box_atol``) or by overlap (``min_iou``);
    a tolerance of None means that output is reported but not judged."""

    name: str
    box_atol: float | None = None
    min_iou: float | None = None
    score_atol: float | None = None
    head_atol: float | None = None
    min_matched: float = 1.0  # fraction of detections (of the larger of the two sets) that must pair up
    ap_tolerance: float | None = None  # AP points (0-100) box and DensePose AP may differ by on a dataset
    # With a margin: where the PyTorch model's own pairing under a one-gray-level input change is below min_matched,
    # that pairing minus the margin is required instead (see the module docstring).
    noise_floor_margin: float | None = None
    # The bound under that floor, which no model lowers: detections either side scores at least decisive_score must
    # find a partner of the same class at IoU >= decisive_min_iou on the other side, decisive_min_matched of them.
    decisive_score: float | None = None
    decisive_min_iou: float = 0.5
    decisive_min_matched: float = 0.9
    # Fewest images a verification judges on: pairing rates and AP of fewer images are noise (``require_images``).
    min_images: int = 1

    def __post_init__(self) -> None:
        if (self.box_atol is None) == (self.min_iou is None):
            raise ValueError(f"criteria '{self.name}': set exactly one of box_atol and min_iou")
        if not 0.0 <= self.min_matched <= 1.0:
            raise ValueError(f"criteria '{self.name}': min_matched must be in [0, 1], got {self.min_matched}")

    def pairing(self) -> str:
        return f"max |box diff| <= {self.box_atol:g}" if self.box_atol is not None else f"IoU >= {self.min_iou:g}"


FLOAT32 = Criteria("float32", box_atol=1e-3, score_atol=1e-3, head_atol=1e-3, min_matched=1.0)
INT8 = Criteria("int8", min_iou=0.9, min_matched=0.95, ap_tolerance=0.5, noise_floor_margin=0.1,
                decisive_score=0.7, decisive_min_iou=0.5, decisive_min_matched=0.9, min_images=8)


def criteria_for(model: torch.nn.Module) -> Criteria:
    """The criteria an export of ``model`` is judged by: ``INT8`` for an int8 model, else ``FLOAT32``."""
    return INT8 if model_precision(model) == "int8" else FLOAT32


class VerificationInputError(UserError, ValueError):
    """A verification asked to judge on too little: fewer images than its criteria need."""


def require_images(criteria: Criteria, count: int) -> None:
    """Refuse to judge ``count`` images under ``criteria`` when that is fewer than it needs (``min_images``)."""
    if count < criteria.min_images:
        raise VerificationInputError(
            f"{criteria.name} verification needs at least {criteria.min_images} images to judge, got {count}: "
            f"pairing rates and AP over fewer images are noise (use --verify-images {criteria.min_images} or more)")

# Evaluator metrics compared by ``ap_rows``: (row name, evaluator task).
AP_METRICS = (("bbox AP", "bbox"), ("densepose AP", "densepose"))


@dataclass
class DiffRow:
    """One output over all images: how many values were compared, the largest absolute difference, and how many
    values were beyond the tolerance (for ``detections``: detections left without a pair)."""

    output: str
    compared: int = 0
    max_abs_diff: float | None = None
    tolerance: float | None = None
    failures: int = 0
    passed: bool = True

    def add(self, reference: np.ndarray, test: np.ndarray) -> None:
        if reference.size == 0:
            return
        reference, test = reference.astype(np.float64), test.astype(np.float64)
        with np.errstate(invalid="ignore"):  # inf - inf: equal values count as no difference below
            diff = np.where(reference == test, 0.0, np.abs(reference - test))
        self.compared += diff.size
        previous = [] if self.max_abs_diff is None else [self.max_abs_diff]
        self.max_abs_diff = float(np.max([*previous, diff.max()]))  # np.max keeps a NaN visible
        if self.tolerance is not None:
            # Written so that a NaN on either side counts as beyond the tolerance.
            self.failures += int((~(diff <= self.tolerance)).sum())
            self.passed = self.failures == 0


@dataclass
class VerificationReport:
    criteria: Criteria
    rows: list[DiffRow]
    images: int
    torch_latency_ms: list[float] = field(default_factory=list)
    onnx_latency_ms: list[float] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def table(self) -> str:
        lines = [f"{'output':<12} {'compared':>9} {'max_abs_diff':>12} {'tolerance':>9} {'failures':>8}  result"]
        for row in self.rows:
            diff = "-" if row.max_abs_diff is None else f"{row.max_abs_diff:.3g}"
            tolerance = "-" if row.tolerance is None else f"{row.tolerance:g}"
            lines.append(f"{row.output:<12} {row.compared:>9} {diff:>12} {tolerance:>9} {row.failures:>8}  "
                         f"{'pass' if row.passed else 'FAIL'}")
        verdict = "PASSED" if self.passed else "FAILED"
        ap = ""
        if self.criteria.ap_tolerance is not None and any(row.output in dict(AP_METRICS) for row in self.rows):
            ap = f", AP within {self.criteria.ap_tolerance:g}"
        required = f"at least {self.criteria.min_matched:.0%} paired"
        detections = self.rows[0]
        if self.criteria.noise_floor_margin is not None and detections.tolerance is not None:
            required = (f"at least min({self.criteria.min_matched:.0%}, PyTorch's own pairing on the image + 1 gray "
                        f"level - {self.criteria.noise_floor_margin:g}) = {1 - detections.tolerance:.0%} paired")
        lines.append(f"{verdict} ({self.criteria.name} criteria: detections paired at {self.criteria.pairing()}, "
                     f"{required}{ap}; {self.images} images)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"criteria": asdict(self.criteria), "passed": self.passed, "images": self.images,
                "rows": [asdict(row) for row in self.rows],
                "latency_ms_p50": {"pytorch": _median(self.torch_latency_ms), "onnx": _median(self.onnx_latency_ms)}}


def verify_onnx(model: GeneralizedRCNN, onnx_path: str | Path, images: Iterable[Any],
                criteria: Criteria = FLOAT32, threads: int = 2) -> VerificationReport:
    """Run ``model`` and the ONNX file on ``images`` ((3, H, W) RGB, already resized, tensors or arrays) and compare.

    ``model`` is the one the file was exported from (float32, or the eager int8 model with ``INT8`` criteria).
    """
    predictor = OnnxPredictor(onnx_path, threads=threads)
    wrapper = ExportableRCNN(model)
    if tuple(predictor.output_names) != wrapper.output_names:
        raise ValueError(f"{onnx_path} has outputs {predictor.output_names}, the model gives {wrapper.output_names}: "
                         "was it exported from another model?")
    return verify_predictor(model, predictor, images, criteria)


def verify_predictor(model: GeneralizedRCNN, predictor: GraphPredictor, images: Iterable[Any],
                     criteria: Criteria) -> VerificationReport:
    """``model`` against any exported form of it that answers ``run_image`` with the graph outputs by name (ONNX
    Runtime, ExecuTorch), image by image: detections paired, DensePose heads compared on the export's boxes, and for
    int8 criteria the pairing floor of the model on the image + 1 gray level."""
    wrapper = ExportableRCNN(model)

    def run_model(image: torch.Tensor) -> dict[str, np.ndarray]:
        outputs = wrapper(image[None])
        return {name: t.cpu().numpy() for name, t in zip(wrapper.output_names, outputs, strict=True)}

    comparison = _Comparison(criteria, predictor.has_densepose)
    torch_ms, export_ms = [], []
    with eval_mode(model), torch.no_grad():
        for image in images:
            image = torch.as_tensor(np.asarray(image))
            start = time.perf_counter()
            reference = run_model(image)
            torch_ms.append(1000 * (time.perf_counter() - start))
            start = time.perf_counter()
            test = predictor.run_image(image.numpy())
            export_ms.append(1000 * (time.perf_counter() - start))
            on_test_boxes = reference  # PyTorch's heads already ran on these very boxes when they are equal
            if predictor.has_densepose and not np.array_equal(reference["boxes"], test["boxes"]):
                heads = wrapper.densepose_on_boxes(image[None], torch.from_numpy(test["boxes"]))
                on_test_boxes = {name: t.cpu().numpy() for name, t in heads.items()}
            comparison.add(reference, test, on_test_boxes)
            if criteria.noise_floor_margin is not None:
                comparison.floor.add(reference, run_model(one_gray_level_up(image)))
    return VerificationReport(criteria, comparison.finish(), len(torch_ms), torch_ms, export_ms)


def one_gray_level_up(image: torch.Tensor) -> torch.Tensor:
    """``image`` (C, H, W, 0-255) with one gray level added on a checkerboard of pixels (clamped at 255): a change
    below what anyone sees, whose effect on the detections is the model's own sensitivity."""
    height, width = image.shape[-2:]
    checkerboard = (torch.arange(height)[:, None] + torch.arange(width)[None]) % 2 == 0
    return (image.to(torch.float32) + checkerboard).clamp(max=255).to(image.dtype)


class PairingFloor:
    """How well the PyTorch model's detections pair with its own on the image + 1 gray level (``one_gray_level_up``),
    and the pairing it makes the export's detections need (``criteria.noise_floor_margin``)."""

    def __init__(self, criteria: Criteria) -> None:
        self.criteria = criteria
        self.row = DiffRow("detections, PyTorch vs PyTorch on the image + 1 gray level")
        self.paired = 0

    def add(self, reference: dict[str, np.ndarray], perturbed: dict[str, np.ndarray]) -> None:
        pairs = match_detections(reference["boxes"], reference["classes"], perturbed["boxes"], perturbed["classes"],
                                 self.criteria)
        largest = max(len(reference["boxes"]), len(perturbed["boxes"]))
        self.paired += len(pairs)
        self.row.compared += largest
        self.row.failures += largest - len(pairs)

    def judge(self, detections: DiffRow, paired: int) -> list[DiffRow]:
        """Set ``detections``' verdict (``paired`` of its ``compared`` paired up); returns the floor's row, if any."""
        required = self.criteria.min_matched
        rows = [self.row] if self.row.compared else []
        if rows:
            own = self.paired / self.row.compared
            if own < required:  # a model less stable than the target: as stable as the model is, less the margin
                required = max(0.0, own - self.criteria.noise_floor_margin)
            self.row.tolerance = self.criteria.noise_floor_margin  # shown in the table: the margin below it
        detections.tolerance = round(1 - required, 4)  # the fraction that may stay unpaired
        detections.passed = detections.compared == 0 or paired / detections.compared >= required
        return rows


class DecisivePairing:
    """The floor's lower bound: detections that either side scores at least ``criteria.decisive_score`` must find a
    partner of the same class at IoU >= ``decisive_min_iou`` on the other side (at any score), at least
    ``decisive_min_matched`` of them. Kernels that round differently move a confident box by a few pixels, or a
    near-threshold one across the threshold; an export with a wrong scale or a broken layer moves confident boxes
    away or drops them, however unstable the model is under a one-gray-level change. Where neither side scores
    anything that high there is nothing to judge, and the row says so (compared 0)."""

    def __init__(self, criteria: Criteria) -> None:
        self.criteria = criteria
        self.loose = Criteria(f"{criteria.name} decisive", min_iou=criteria.decisive_min_iou)
        self.row = DiffRow(f"decisive detections (score >= {criteria.decisive_score}, IoU >= "
                           f"{criteria.decisive_min_iou:g})", tolerance=round(1 - criteria.decisive_min_matched, 4))

    def add(self, reference: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> None:
        if self.criteria.decisive_score is None:
            return
        for side, other in ((reference, test), (test, reference)):
            decisive = side["scores"] >= self.criteria.decisive_score
            pairs = match_detections(side["boxes"][decisive], side["classes"][decisive], other["boxes"],
                                     other["classes"], self.loose)
            self.row.compared += int(decisive.sum())
            self.row.failures += int(decisive.sum()) - len(pairs)

    def judge(self) -> list[DiffRow]:
        if self.criteria.decisive_score is None:
            return []
        paired = self.row.compared - self.row.failures
        self.row.passed = paired >= self.criteria.decisive_min_matched * self.row.compared - 1e-9  # 0.9 * 20 = 17.99..
        return [self.row]


class _Comparison:
    """The diff rows, filled image by image."""

    def __init__(self, criteria: Criteria, densepose: bool) -> None:
        self.criteria = criteria
        self.detections = DiffRow("detections")
        self.boxes = DiffRow("boxes", tolerance=criteria.box_atol)
        self.scores = DiffRow("scores", tolerance=criteria.score_atol)
        self.heads = [DiffRow(name, tolerance=criteria.head_atol) for name in DENSEPOSE_OUTPUTS] if densepose else []
        self.paired = 0
        self.floor = PairingFloor(criteria)
        self.decisive = DecisivePairing(criteria)

    def add(self, reference: dict[str, np.ndarray], test: dict[str, np.ndarray],
            reference_on_test_boxes: dict[str, np.ndarray]) -> None:
        """``reference_on_test_boxes``: PyTorch's head outputs on the boxes in ``test``."""
        pairs = np.array(match_detections(reference["boxes"], reference["classes"], test["boxes"], test["classes"],
                                          self.criteria), dtype=np.int64).reshape(-1, 2)
        ref_index, test_index = pairs[:, 0], pairs[:, 1]
        largest = max(len(reference["boxes"]), len(test["boxes"]))
        self.paired += len(pairs)
        self.detections.compared += largest
        self.detections.failures += largest - len(pairs)
        self.decisive.add(reference, test)
        self.boxes.add(reference["boxes"][ref_index], test["boxes"][test_index])
        self.scores.add(reference["scores"][ref_index], test["scores"][test_index])
        for row in self.heads:
            row.add(reference_on_test_boxes[row.output], test[row.output])

    def finish(self) -> list[DiffRow]:
        floor = self.floor.judge(self.detections, self.paired)
        return [self.detections, *floor, *self.decisive.judge(), self.boxes, self.scores, *self.heads]


def ap_rows(reference: dict[str, Any], test: dict[str, Any], criteria: Criteria) -> list[DiffRow]:
    """Box and DensePose AP of the export (``test``) against the model's (``reference``), both evaluator results
    (``{"bbox": {"AP": ..}, "densepose": {"AP": ..}}``, AP in points); judged within ``criteria.ap_tolerance``.
    An AP the evaluator could not compute (None) is left uncompared."""
    rows = []
    for name, task in AP_METRICS:
        row = DiffRow(name, tolerance=criteria.ap_tolerance)
        reference_ap, test_ap = reference[task]["AP"], test[task]["AP"]
        if reference_ap is not None and test_ap is not None:
            row.add(np.array([reference_ap], dtype=np.float64), np.array([test_ap], dtype=np.float64))
        rows.append(row)
    return rows


def match_detections(ref_boxes: np.ndarray, ref_classes: np.ndarray, test_boxes: np.ndarray,
                     test_classes: np.ndarray, criteria: Criteria) -> list[tuple[int, int]]:
    """One-to-one pairs (reference index, test index) of the same class: in reference order, each detection takes
    the closest unpaired test detection (smallest largest-coordinate difference, or highest IoU) within criteria."""
    if len(ref_boxes) == 0 or len(test_boxes) == 0:
        return []
    if criteria.box_atol is not None:
        cost = np.abs(ref_boxes[:, None, :].astype(np.float64) - test_boxes[None, :, :]).max(axis=-1)
        allowed = cost <= criteria.box_atol
    else:
        iou = box_iou(ref_boxes, test_boxes)
        cost = -iou
        allowed = iou >= criteria.min_iou
    allowed &= ref_classes[:, None] == test_classes[None, :]
    pairs = []
    free = np.ones(len(test_boxes), dtype=bool)
    for i in range(len(ref_boxes)):
        candidates = np.flatnonzero(allowed[i] & free)
        if candidates.size:
            j = int(candidates[np.argmin(cost[i, candidates])])
            free[j] = False
            pairs.append((i, j))
    return pairs


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) XYXY -> (N, M) IoU."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(axis=-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None
