"""The RoI heads' two pieces of bookkeeping, on boxes worked out by hand: select_detections (softmax with the
background last, class-specific decoding, score threshold, per-class NMS, clipping, the per-image cap) and
sample_proposals (IoU threshold, the foreground fraction, the appended ground truth)."""

from __future__ import annotations

import math

import pytest
import torch

from fnl.config import load_config
from fnl.modeling.roi_heads import DensePoseROIHeads

STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}


def _heads(*overrides: str) -> DensePoseROIHeads:
    cfg = load_config(None, ["MODEL.DENSEPOSE_ON", "False", "MODEL.ROI_HEADS.NUM_CLASSES", "2", *overrides])
    return DensePoseROIHeads(cfg, in_channels=4, strides=STRIDES)


# --- select_detections --------------------------------------------------------------------------------------------
IMAGE_SIZE = (200, 240)  # height, width
PROPOSALS = torch.tensor([
    [10.0, 10.0, 50.0, 50.0],
    [12.0, 12.0, 52.0, 52.0],  # IoU with the first: 38^2 / (2 * 40^2 - 38^2) = 0.82
    [100.0, 100.0, 140.0, 160.0],
    [180.0, 150.0, 260.0, 220.0],  # beyond the image's right and bottom edges
])
# Class probabilities (class 0, class 1, background): the logits are their logarithms.
PROBABILITIES = torch.tensor([
    [0.70, 0.20, 0.10],
    [0.60, 0.30, 0.10],
    [0.01, 0.50, 0.49],  # class 0 under SCORE_THRESH_TEST 0.05
    [0.40, 0.01, 0.59],
])


def _deltas() -> torch.Tensor:
    """(4, 2 classes * 4). With BBOX_REG_WEIGHTS (10, 10, 5, 5): proposal 2's class-1 box moves right by 0.1 of its
    width (dx 1) and doubles its width (dw 5 ln 2); its class-0 slot holds a large shift that, if read for class 1,
    would show. All other deltas are zero: the box is the proposal."""
    deltas = torch.zeros(4, 2, 4)
    deltas[2, 1] = torch.tensor([1.0, 0.0, 5.0 * math.log(2.0), 0.0])
    deltas[2, 0] = torch.tensor([5.0, 5.0, 0.0, 0.0])
    return deltas.view(4, 8)


# Kept in decreasing score: (proposal 0, class 0, 0.7); (proposal 2, class 1, 0.5), centre x 120 + 4 and width 80;
# (proposal 3, class 0, 0.4), clipped to the image; (proposal 1, class 1, 0.3). Suppressed: proposal 1 class 0 (by
# proposal 0 class 0) and proposal 0 class 1 (by proposal 1 class 1): NMS runs per class.
EXPECTED_BOXES = torch.tensor([[10.0, 10.0, 50.0, 50.0], [84.0, 100.0, 164.0, 160.0],
                               [180.0, 150.0, 240.0, 200.0], [12.0, 12.0, 52.0, 52.0]])
EXPECTED_SCORES = torch.tensor([0.7, 0.5, 0.4, 0.3])
EXPECTED_CLASSES = [0, 1, 0, 1]


@pytest.mark.parametrize("per_image", [100, 3])
def test_select_detections_on_hand_computed_boxes(per_image: int) -> None:
    heads = _heads("MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", str(per_image))
    detections = heads.select_detections(PROBABILITIES.log(), _deltas(), PROPOSALS, IMAGE_SIZE)
    count = min(per_image, 4)
    torch.testing.assert_close(detections["boxes"], EXPECTED_BOXES[:count], rtol=0, atol=1e-4)
    torch.testing.assert_close(detections["scores"], EXPECTED_SCORES[:count])
    assert detections["classes"].tolist() == EXPECTED_CLASSES[:count]


def test_select_detections_score_threshold_is_the_config_value() -> None:
    heads = _heads("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.45")
    detections = heads.select_detections(PROBABILITIES.log(), _deltas(), PROPOSALS, IMAGE_SIZE)
    assert detections["scores"].tolist() == pytest.approx([0.7, 0.5])


# --- sample_proposals ---------------------------------------------------------------------------------------------
GT_BOXES = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 120.0, 120.0]])


def _target() -> dict:
    return {"boxes": GT_BOXES, "classes": torch.tensor([0, 0])}


def _with_scores(boxes: list[list[float]]) -> torch.Tensor:
    # Proposals carry an objectness score in a fifth column that sampling ignores.
    return torch.cat([torch.tensor(boxes), torch.ones(len(boxes), 1)], dim=1)


def _sampled(heads: DensePoseROIHeads, proposals: torch.Tensor) -> dict[tuple[float, ...], tuple[int, float]]:
    """What sampling kept, as {box: (matched GT index, IoU)}."""
    (boxes,), (matched,), (ious,) = heads.sample_proposals([proposals], [_target()])
    return {tuple(b.tolist()): (int(m), round(float(i), 4)) for b, m, i in zip(boxes, matched, ious, strict=True)}


def test_iou_of_one_half_is_foreground_and_just_below_is_background() -> None:
    heads = _heads("MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", "False")
    proposals = _with_scores([
        [0.0, 0.0, 10.0, 12.0],  # IoU 100 / 120 with GT 0
        [0.0, 0.0, 10.0, 20.0],  # 100 / 200: exactly the threshold
        [0.0, 0.0, 10.0, 20.5],  # 100 / 205
        [100.0, 100.0, 120.0, 140.0],  # 400 / 800 with GT 1
        [50.0, 50.0, 60.0, 60.0],  # no overlap
    ])
    assert _sampled(heads, proposals) == {
        (0.0, 0.0, 10.0, 12.0): (0, 0.8333), (0.0, 0.0, 10.0, 20.0): (0, 0.5), (0.0, 0.0, 10.0, 20.5): (-1, 0.4878),
        (100.0, 100.0, 120.0, 140.0): (1, 0.5), (50.0, 50.0, 60.0, 60.0): (-1, 0.0),
    }


def test_appended_ground_truth_is_the_foreground_when_no_proposal_is() -> None:
    proposals = _with_scores([[50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 30.0, 30.0]])  # IoU 0 and 1/9
    background = {(50.0, 50.0, 60.0, 60.0): (-1, 0.0), (0.0, 0.0, 30.0, 30.0): (-1, 0.1111)}
    assert _sampled(_heads("MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", "False"), proposals) == background
    assert _sampled(_heads(), proposals) == {**background, (0.0, 0.0, 10.0, 10.0): (0, 1.0),
                                             (100.0, 100.0, 120.0, 120.0): (1, 1.0)}


@pytest.mark.parametrize(("num_foreground", "num_background", "expected"), [
    (10, 20, (2, 6)),  # both plentiful: 8 * 0.25 foreground, the rest background
    (1, 20, (1, 7)),  # too few foreground: background fills the batch
    (10, 3, (2, 3)),  # too few background: the batch stays short, foreground keeps its fraction
])
def test_foreground_fraction_of_the_sampled_batch(num_foreground: int, num_background: int,
                                                  expected: tuple[int, int]) -> None:
    heads = _heads("MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", "False", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8",
                   "MODEL.ROI_HEADS.POSITIVE_FRACTION", "0.25")
    foreground = [[0.0, 0.0, 10.0, 10.0 + 0.1 * k] for k in range(num_foreground)]  # IoU > 0.99 with GT 0
    background = [[200.0 + k, 200.0, 210.0 + k, 210.0] for k in range(num_background)]
    torch.manual_seed(0)
    sampled = _sampled(heads, _with_scores(foreground + background))
    matched = [m for m, _ in sampled.values()]
    assert (sum(m == 0 for m in matched), matched.count(-1)) == expected
