"""Box AP and DensePose GPS AP on the tiny surface and json of evaluation_testing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from evaluation_testing import PART_SIZE, GridSurface, make_densepose_coco

from fnl.evaluation import BBOX_METRICS, DENSEPOSE_METRICS, DensePoseCOCOEvaluator, ground_truth_as_predictions
from fnl.evaluation.gps import GPS_SIGMA, PER_PART_GPS_SIGMA, gps_matrix, ground_truth_points
from fnl.evaluation.surface import PartVertexIndex


def _replace_maps(predictions: list[dict], transform) -> list[dict]:
    """Copies of the predictions with every I/U/V map passed through ``transform(map) -> map``."""
    return [{**p, "densepose": [transform(m.copy()) for m in p["densepose"]]} for p in predictions]


def _with_extra_detection(predictions: list[dict], image_id: int, box: list[float], score: float) -> list[dict]:
    """Add one confident person detection with a background-free random map to ``image_id``'s prediction."""
    rng = np.random.default_rng(0)
    result = []
    for p in predictions:
        if p["image_id"] == image_id:
            w, h = int(box[2] - box[0]), int(box[3] - box[1])
            iuv = np.concatenate([rng.integers(1, 25, (1, h, w)), rng.random((2, h, w))]).astype(np.float32)
            p = {**p, "boxes": np.vstack([p["boxes"], box]), "scores": np.append(p["scores"], score),
                 "classes": np.append(p["classes"], 0), "densepose": [*p["densepose"], iuv]}
        result.append(p)
    return result


@pytest.fixture(scope="module")
def gt_predictions(gt_json: Path) -> list[dict]:
    return ground_truth_as_predictions(gt_json)


@pytest.mark.parametrize("normalization", ["constant", "per_part"])
def test_ground_truth_fed_back_scores_100(gt_json: Path, surface_dir: Path, gt_predictions: list[dict],
                                          normalization: str) -> None:
    results = DensePoseCOCOEvaluator(gt_json, surface_dir, gps_normalization=normalization).evaluate(gt_predictions)
    assert list(results) == ["bbox", "densepose"]
    # pycocotools' precision is tp / (tp + fp + eps): "100" is 100 up to rounding.
    assert results["bbox"] == pytest.approx({name: 100.0 for name in BBOX_METRICS})
    assert results["densepose"] == pytest.approx({name: 100.0 for name in DENSEPOSE_METRICS})


def test_random_iuv_scores_near_zero(evaluator: DensePoseCOCOEvaluator, gt_predictions: list[dict]) -> None:
    rng = np.random.default_rng(0)

    def randomize(iuv: np.ndarray) -> np.ndarray:
        iuv[0] = rng.integers(0, 25, iuv.shape[1:])
        iuv[1:] = rng.random((2, *iuv.shape[1:]))
        return iuv

    results = evaluator.evaluate(_replace_maps(gt_predictions, randomize))
    assert results["bbox"]["AP"] == pytest.approx(100.0)  # the boxes are still the ground truth's
    assert results["densepose"]["AP"] < 2.0


def test_densepose_ap_falls_as_uv_noise_grows(evaluator: DensePoseCOCOEvaluator,
                                              gt_predictions: list[dict]) -> None:
    rng = np.random.default_rng(0)

    def ap_with_noise(sigma: float) -> float:
        def add_noise(iuv: np.ndarray) -> np.ndarray:
            foreground = iuv[0] > 0
            iuv[1:, foreground] = np.clip(iuv[1:, foreground] + rng.normal(0, sigma, (2, foreground.sum())), 0, 1)
            return iuv
        return evaluator.evaluate(_replace_maps(gt_predictions, add_noise))["densepose"]["AP"]

    aps = [ap_with_noise(sigma) for sigma in (0.0, 0.05, 0.1, 0.2, 0.3, 0.6)]
    assert aps[0] == pytest.approx(100.0)
    assert all(later <= earlier for earlier, later in zip(aps, aps[1:], strict=False)), aps
    assert aps[0] > aps[2] > aps[3] > aps[4], aps
    assert aps[-1] < 2.0, aps


def test_no_predictions_scores_zero_without_error(evaluator: DensePoseCOCOEvaluator,
                                                  gt_predictions: list[dict]) -> None:
    nothing_detected = [{"image_id": p["image_id"], "boxes": np.zeros((0, 4)), "scores": np.zeros(0),
                         "classes": np.zeros(0, dtype=np.int64), "densepose": []} for p in gt_predictions]
    for predictions in ([], nothing_detected):
        results = evaluator.evaluate(predictions)
        assert results["bbox"] == {name: 0.0 for name in BBOX_METRICS}
        assert results["densepose"] == {name: 0.0 for name in DENSEPOSE_METRICS}


def test_person_without_points_is_neither_a_miss_nor_a_false_positive(evaluator: DensePoseCOCOEvaluator,
                                                                      gt_predictions: list[dict]) -> None:
    # Image 2 holds a person without DensePose points (the second annotation).
    top_scored = [{**p, "scores": np.array([1.0, 5.0])} if p["image_id"] == 2 else p for p in gt_predictions]
    assert evaluator.evaluate(top_scored)["densepose"]["AP"] == pytest.approx(100.0)
    dropped = [{**p, "boxes": p["boxes"][:1], "scores": p["scores"][:1], "classes": p["classes"][:1],
                "densepose": p["densepose"][:1]} if p["image_id"] == 2 else p for p in gt_predictions]
    results = evaluator.evaluate(dropped)
    assert results["densepose"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] < 99.0  # for boxes the person is a person


def test_false_positives_count_except_in_images_without_annotated_persons(evaluator: DensePoseCOCOEvaluator,
                                                                          gt_predictions: list[dict]) -> None:
    far_from_everyone = [500.0, 400.0, 600.0, 470.0]
    with_false_positive = evaluator.evaluate(_with_extra_detection(gt_predictions, 1, far_from_everyone, 9.0))
    assert with_false_positive["densepose"]["AP"] < 99.0
    assert with_false_positive["bbox"]["AP"] < 99.0
    # As the official evaluator: in an image where no person counts, detections are ignored for DensePose AP.
    on_empty_image = evaluator.evaluate(_with_extra_detection(gt_predictions, 5, far_from_everyone, 9.0))
    assert on_empty_image["densepose"]["AP"] == pytest.approx(100.0)
    assert on_empty_image["bbox"]["AP"] < 99.0


def test_images_scored_are_the_predicted_ones_unless_given(evaluator: DensePoseCOCOEvaluator,
                                                           gt_predictions: list[dict]) -> None:
    first_image = [p for p in gt_predictions if p["image_id"] == 1]
    assert evaluator.evaluate(first_image)["densepose"]["AP"] == pytest.approx(100.0)
    assert evaluator.evaluate(first_image, image_ids=[1, 2])["densepose"]["AP"] < 99.0
    with pytest.raises(ValueError, match="999"):
        evaluator.evaluate(first_image, image_ids=[999])


@pytest.mark.parametrize("normalization, sigma", [("constant", GPS_SIGMA), ("per_part", PER_PART_GPS_SIGMA[3])])
def test_gps_of_a_known_geodesic_error(grid_surface: GridSurface, normalization: str, sigma: float) -> None:
    """Two points on chart 3: one predicted exactly, one 0.2 chart units (0.2 * PART_SIZE on the strip) away."""
    # A 255-pixel box makes dp_x, dp_y image coordinates.
    person = {"bbox": [0, 0, 255, 255], "dp_x": [10.5, 20.5], "dp_y": [5.5, 5.5], "dp_I": [3, 3],
              "dp_U": [0.2, 0.5], "dp_V": [0.3, 0.5]}
    index = PartVertexIndex(grid_surface.surface)
    people = ground_truth_points([person], index, normalization)
    iuv = np.zeros((3, 255, 255), dtype=np.float32)
    iuv[:, 5, 10] = (3, 0.2, 0.3)
    iuv[:, 5, 20] = (3, 0.7, 0.5)
    cropped = iuv[:, :15, :15]  # a box that leaves the second point outside: it scores 0
    gps = gps_matrix(grid_surface.surface, index, people,
                     [(np.array([0.0, 0.0, 255.0, 255.0]), iuv), (np.array([0.0, 0.0, 15.0, 15.0]), cropped)])
    distance = 0.2 * PART_SIZE
    np.testing.assert_allclose(gps[:, 0], [(1 + np.exp(-distance ** 2 / (2 * sigma ** 2))) / 2, 0.5], rtol=1e-5)


def test_predictions_that_break_the_contract_are_named(evaluator: DensePoseCOCOEvaluator,
                                                       gt_predictions: list[dict]) -> None:
    first = gt_predictions[0]
    transposed = {**first, "densepose": [m.transpose(0, 2, 1) for m in first["densepose"]]}
    with pytest.raises(ValueError, match=r"image_id 1\).*detection 0.*\(3, 300, 200\)"):
        evaluator.evaluate([transposed])
    with pytest.raises(ValueError, match="image_id 999"):
        evaluator.evaluate([{**first, "image_id": 999}])
    with pytest.raises(ValueError, match="second prediction"):
        evaluator.evaluate([first, first])
    with pytest.raises(ValueError, match="class 3"):
        evaluator.evaluate([{**first, "classes": np.array([0, 3])}])
    with pytest.raises(ValueError, match="1 densepose maps for 2 boxes"):
        evaluator.evaluate([{**first, "densepose": first["densepose"][:1]}])
    with pytest.raises(ValueError, match="missing \\['densepose'\\]"):
        evaluator.evaluate([{k: v for k, v in first.items() if k != "densepose"}])
    bad_labels = {**first, "densepose": [np.full_like(m, 30.0) for m in first["densepose"]]}
    with pytest.raises(ValueError, match="channel I holds 30"):
        evaluator.evaluate([bad_labels])


def test_broken_ground_truth_is_named(tmp_path: Path, surface_dir: Path) -> None:
    dataset = make_densepose_coco()
    dataset["annotations"][2]["dp_U"] = dataset["annotations"][2]["dp_U"][:-1]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match=r"broken\.json: annotation 3: DensePose fields differ in length"):
        DensePoseCOCOEvaluator(path, surface_dir)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        DensePoseCOCOEvaluator(tmp_path / "missing.json", surface_dir)
