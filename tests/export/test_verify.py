import copy

import numpy as np
import pytest
import torch
from export_testing import EXPORT_SIZE, random_image

from fnl.export.verify import FLOAT32, INT8, Criteria, DiffRow, ap_rows, match_detections, verify_onnx

BOXES = np.array([[0, 0, 10, 10], [5, 5, 20, 30], [40, 40, 60, 80]], dtype=np.float32)
CLASSES = np.zeros(3, dtype=np.int64)


def test_detections_pair_up_whatever_their_order():
    order = np.array([2, 0, 1])
    pairs = match_detections(BOXES, CLASSES, BOXES[order] + 5e-4, CLASSES, FLOAT32)
    assert sorted(pairs) == [(0, 1), (1, 2), (2, 0)]


def test_float32_pairs_need_boxes_within_1e_3_and_the_same_class():
    shifted = BOXES.copy()
    shifted[1, 3] += 2e-3
    assert match_detections(BOXES, CLASSES, shifted, CLASSES, FLOAT32) == [(0, 0), (2, 2)]
    other_class = np.array([0, 1, 0])
    assert match_detections(BOXES, CLASSES, BOXES, other_class, FLOAT32) == [(0, 0), (2, 2)]


def test_int8_pairs_need_iou_of_0_9():
    moved = BOXES.copy()
    moved[0] += np.array([0.2, 0, 0.2, 0], dtype=np.float32)  # IoU 0.96
    moved[2] += np.array([0, 4, 0, 4], dtype=np.float32)  # IoU 0.67
    assert match_detections(BOXES, CLASSES, moved, CLASSES, INT8) == [(0, 0), (1, 1)]


def test_a_nan_is_a_failure_and_equal_infinities_are_not():
    row = DiffRow("u", tolerance=1e-3)
    row.add(np.array([1.0, np.inf, 2.0]), np.array([1.0005, np.inf, np.nan]))
    assert row.compared == 3 and row.failures == 1 and not row.passed and np.isnan(row.max_abs_diff)
    row.add(np.array([0.0]), np.array([0.5]))
    assert np.isnan(row.max_abs_diff)


def test_criteria_pair_detections_one_way():
    with pytest.raises(ValueError, match="set exactly one of box_atol and min_iou"):
        Criteria("both", box_atol=1e-3, min_iou=0.9)


def test_a_different_head_fails_verification_on_that_output_only(tiny_export):
    # The export stands for a broken one: PyTorch's U head is shifted by 0.01 after export.
    changed = copy.deepcopy(tiny_export.model)
    with torch.no_grad():
        changed.roi_heads.densepose_predictor.u_lowres.bias += 0.01
    report = verify_onnx(changed, tiny_export.path, [random_image(*EXPORT_SIZE, seed=5)])
    assert not report.passed
    failed = {row.output for row in report.rows if not row.passed}
    assert failed == {"u"}, report.table()
    assert "FAIL" in report.table() and report.as_dict()["passed"] is False
    u = next(row for row in report.rows if row.output == "u")
    assert u.max_abs_diff == pytest.approx(0.01, abs=1e-3) and u.failures == u.compared


def test_ap_rows_judge_the_int8_tolerance_and_leave_a_missing_ap_uncompared():
    reference = {"bbox": {"AP": 40.0}, "densepose": {"AP": 30.0}}
    rows = ap_rows(reference, {"bbox": {"AP": 39.6}, "densepose": {"AP": 29.2}}, INT8)
    assert [(row.output, row.passed) for row in rows] == [("bbox AP", True), ("densepose AP", False)]
    assert rows[1].max_abs_diff == pytest.approx(0.8) and rows[1].tolerance == 0.5
    rows = ap_rows(reference, {"bbox": {"AP": None}, "densepose": {"AP": 30.0}}, INT8)
    assert rows[0].compared == 0 and rows[0].passed and rows[1].passed


def test_one_gray_level_up_touches_every_other_pixel_by_one_and_keeps_the_dtype():
    from fnl.export.verify import one_gray_level_up

    image = torch.tensor([[[0, 10, 255], [7, 254, 3]]], dtype=torch.uint8)
    up = one_gray_level_up(image)
    assert up.dtype == torch.uint8
    assert up.tolist() == [[[1, 10, 255], [7, 255, 3]]]  # (row + column) even: one up, clamped at 255


def _detections(boxes: list[list[float]], score: float = 0.6) -> dict[str, np.ndarray]:
    """Detections of one class, all scored ``score`` (0.6: below INT8's decisive score, so only the floor judges)."""
    return {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4), "classes": np.zeros(len(boxes), np.int64),
            "scores": np.full(len(boxes), score, np.float32)}


def _moved(detections: dict[str, np.ndarray], count: int, shift: float) -> dict[str, np.ndarray]:
    boxes = detections["boxes"].copy()
    boxes[:count] += shift
    return {**detections, "boxes": boxes}


@pytest.mark.parametrize(("floor_moves", "export_moves", "passed"), [
    (0, 1, False),  # the model is stable under the gray level: the export must pair 95%, 9 of 10 fail it
    (5, 5, True),  # the model itself keeps only half its boxes: the export may do the same...
    (5, 7, False),  # ...but not worse than that floor minus the margin (0.5 - 0.1)
])
def test_int8_pairing_is_judged_against_the_models_own_sensitivity(floor_moves, export_moves, passed):
    from fnl.export.verify import _Comparison

    reference = _detections([[10 * i, 0, 10 * i + 8, 8] for i in range(10)])
    comparison = _Comparison(INT8, densepose=False)
    comparison.add(reference, _moved(reference, export_moves, 3), reference)  # IoU 0.24 for 8-pixel boxes
    comparison.floor.add(reference, _moved(reference, floor_moves, 3))
    detections, floor, decisive = comparison.finish()[:3]
    assert floor.output.startswith("detections, PyTorch vs PyTorch") and floor.failures == floor_moves
    assert detections.failures == export_moves and detections.passed is passed
    assert decisive.output.startswith("decisive detections") and decisive.compared == 0 and decisive.passed


@pytest.mark.parametrize(("export_moves", "shift", "passed"), [
    (10, 1, True),  # every box 1 px off (IoU 0.6): rounding, whatever the model's own stability
    (1, 3, True),  # one decisive box of ten lost its partner on each side: within the 10% allowed
    (2, 3, False),  # two of ten: a broken export, even though the model's own floor asks for nothing
])
def test_decisive_detections_bound_the_floor_of_an_unstable_model(export_moves, shift, passed):
    from fnl.export.verify import _Comparison

    reference = _detections([[10 * i, 0, 10 * i + 8, 8] for i in range(10)], score=0.9)
    comparison = _Comparison(INT8, densepose=False)
    comparison.add(reference, _moved(reference, export_moves, shift), reference)
    comparison.floor.add(reference, _moved(reference, 10, 3))  # the model pairs none of its own: floor 0%
    detections, floor, decisive = comparison.finish()[:3]
    assert detections.passed  # the floor alone would pass anything here
    assert decisive.compared == 20 and decisive.failures == (0 if shift == 1 else 2 * export_moves)
    assert decisive.passed is passed


def test_int8_verification_refuses_to_judge_on_too_few_images():
    from fnl.export.verify import VerificationInputError, require_images

    require_images(INT8, INT8.min_images)
    require_images(FLOAT32, 1)
    with pytest.raises(VerificationInputError, match="needs at least 8 images to judge, got 1"):
        require_images(INT8, 1)


def _weights_scaled(layer: torch.nn.Module, factor: float) -> None:
    """``layer`` (an eager int8 conv) computing with its weights ``factor`` times too large: its int8 values kept,
    its weight scale(s) wrong."""
    weight = layer.weight()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        wrong = torch._make_per_channel_quantized_tensor(weight.int_repr(), weight.q_per_channel_scales() * factor,
                                                         weight.q_per_channel_zero_points(),
                                                         weight.q_per_channel_axis())
    else:
        wrong = torch._make_per_tensor_quantized_tensor(weight.int_repr(), weight.q_scale() * factor,
                                                        weight.q_zero_point())
    layer.set_weight_bias(wrong, layer.bias())


@pytest.mark.slow
def test_an_int8_export_with_one_wrong_scale_fails_verification_on_the_gate_model(gate_model, tmp_path):
    from torch.ao.nn import quantized as nnq

    from fnl.data import build_train_loader
    from fnl.export import to_onnx
    from fnl.export.pipeline import split_images
    from fnl.qat import calibrate, convert, prepare

    cfg, model = gate_model
    torch.manual_seed(0)
    prepared = prepare(model, cfg, "ptq")
    calibrate(prepared, iter(build_train_loader(cfg)), cfg.QUANTIZATION.CALIBRATION_IMAGES)
    int8_model = convert(prepared)
    images = split_images(cfg, "train", INT8.min_images)
    correct = verify_onnx(int8_model, to_onnx(int8_model, tmp_path / "correct.onnx", images[0]), images, INT8)
    assert correct.passed, correct.table()

    # The broken export: the stem's weight scales 4x too large while exporting, right again for PyTorch. (The model
    # is changed in place, not deep-copied: a copy would not carry timm's feature hooks.)
    stem = next(m for m in int8_model.backbone.modules() if isinstance(m, nnq.Conv2d))
    weight, bias = stem.weight(), stem.bias()
    _weights_scaled(stem, 4.0)
    broken = to_onnx(int8_model, tmp_path / "broken.onnx", images[0])
    stem.set_weight_bias(weight, bias)
    report = verify_onnx(int8_model, broken, images, INT8)
    decisive = next(row for row in report.rows if row.output.startswith("decisive"))
    assert decisive.compared >= 20 and not decisive.passed and not report.passed, report.table()
