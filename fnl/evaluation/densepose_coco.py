"""Box AP and DensePose GPS AP of predictions on a DensePose-COCO json.

The evaluator takes predictions, not a model, so one evaluator scores the float model, the int8 model and an
ONNX Runtime session alike. Box AP is pycocotools' COCOeval. DensePose AP is the official GPS protocol (detectron2
``densepose/evaluation/densepose_coco_evaluation.py``, mode GPS) on top of the same COCOeval: GPS replaces IoU as
the similarity, and COCOeval's matching and accumulation run unchanged, with the official evaluator's extra
ignore rules added per image:

- persons without DensePose points (and crowds) are ignored: never counted as misses;
- a detection that matches no person by GPS but overlaps an ignored person with box IoU >= 0.8 is ignored, not a
  false positive (the official code decides this once, at the last threshold, for all; here per threshold);
- in an image where every person is ignored for the current area range, every detection is ignored.

Where this differs from the official evaluator: U and V are used as given (the official code reads them quantized
to 8 bits); a point is read at its image pixel minus the map's integer origin, as the prediction contract defines
the map (the official code truncates the point's offset from the float box corner); a person whose ``dp_x`` is an
empty list is ignored like one without ``dp_x``; images' ``ignore_regions`` (DensePose-PoseTrack) are not read;
only the GPS mode is implemented (not GPSm or mask IoU).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fnl.data.densepose_coco import read_coco_json
from fnl.data.surface import NUM_PARTS, BodySurface, load_body_surface
from fnl.evaluation.gps import (
    GPS_NORMALIZATIONS,
    GpsNormalization,
    GroundTruthPoints,
    annotation_points_in_image,
    densepose_map_region,
    gps_matrix,
    ground_truth_points,
    map_pixels,
)
from fnl.evaluation.results import BBOX_METRICS, DENSEPOSE_METRICS, Results
from fnl.evaluation.surface import PartVertexIndex

logger = logging.getLogger(__name__)

DENSEPOSE_FIELDS = ("dp_x", "dp_y", "dp_I", "dp_U", "dp_V")
PREDICTION_KEYS = ("image_id", "boxes", "scores", "classes", "densepose")

# The official DensePose parameters (detectron2 Params.setUvParams): 20 detections per image, no "small" range.
_DENSEPOSE_MAX_DETECTIONS = 20
_DENSEPOSE_AREA_RANGES = ([0.0, 1e5 ** 2], [32.0 ** 2, 96.0 ** 2], [96.0 ** 2, 1e5 ** 2])
_DENSEPOSE_AREA_LABELS = ("all", "medium", "large")
# Official fallback: a detection with no GPS match that covers an ignored person this well is not penalised.
_IGNORED_PERSON_BOX_IOU = 0.8
# metric -> (similarity threshold or None for the mean over 0.50:0.95, area range label)
_METRIC_DEFINITIONS = {"AP": (None, "all"), "AP50": (0.5, "all"), "AP75": (0.75, "all"),
                       "APs": (None, "small"), "APm": (None, "medium"), "APl": (None, "large")}


class Prediction(TypedDict):
    """One image's detections, the contract between predictors and the evaluator."""

    image_id: int
    boxes: np.ndarray  # (N, 4) float XYXY in original image pixels
    scores: np.ndarray  # (N,)
    classes: np.ndarray  # (N,) int, contiguous (0 = person = the json's first category)
    densepose: list[np.ndarray]  # N float32 (3, h, w) maps I, U, V over densepose_map_region(box)


# ---------------------------------------------------------------------------------------------------------------
# Ground truth


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def has_densepose_points(annotation: Mapping[str, Any]) -> bool:
    return len(annotation.get("dp_x") or ()) > 0


def _check_densepose_fields(annotation: dict[str, Any], where: str) -> None:
    missing = [key for key in DENSEPOSE_FIELDS if key not in annotation]
    if missing:
        raise ValueError(f"{where}: has dp_x but no {missing}")
    lengths = {key: len(annotation[key]) for key in DENSEPOSE_FIELDS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{where}: DensePose fields differ in length {lengths}")
    parts = np.asarray(annotation["dp_I"], dtype=np.float64)
    bad = parts[(parts < 1) | (parts > NUM_PARTS) | (parts != np.round(parts))]
    if bad.size:
        raise ValueError(f"{where}: dp_I holds {bad[0]}, charts are integers 1..{NUM_PARTS}")
    for key in DENSEPOSE_FIELDS:
        if not np.all(np.isfinite(np.asarray(annotation[key], dtype=np.float64))):
            raise ValueError(f"{where}: {key} holds a non-finite value")


def load_densepose_coco_json(path: str | Path) -> dict[str, Any]:
    """Read and check a DensePose-COCO json; errors name the file, the annotation and the key at fault.

    ``iscrowd`` defaults to 0 when absent; everything else COCOeval reads (``bbox``, ``area``) is required.
    """
    path = Path(path)
    dataset = read_coco_json(path)
    if not dataset["categories"]:
        raise ValueError(f"{path}: 'categories' is empty")
    image_ids = [image.get("id") for image in dataset["images"]]
    category_ids = [category.get("id") for category in dataset["categories"]]
    for kind, ids in (("image", image_ids), ("category", category_ids)):
        if any(not isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"{path}: {kind} ids must be unique integers")
    known_images, known_categories, seen = set(image_ids), set(category_ids), set()
    for n, annotation in enumerate(dataset["annotations"]):
        where = f"{path}: annotation {annotation.get('id', f'#{n}')}"
        if not isinstance(annotation.get("id"), int) or annotation["id"] in seen:
            raise ValueError(f"{where}: 'id' must be a unique integer")
        seen.add(annotation["id"])
        if annotation.get("image_id") not in known_images:
            raise ValueError(f"{where}: image_id {annotation.get('image_id')!r} is not in 'images'")
        if annotation.get("category_id") not in known_categories:
            raise ValueError(f"{where}: category_id {annotation.get('category_id')!r} is not in 'categories'")
        box = annotation.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(map(_is_number, box)) or min(box[2:]) < 0:
            raise ValueError(f"{where}: bbox must be [x, y, w, h] with w, h >= 0, got {box!r}")
        if not _is_number(annotation.get("area")):
            raise ValueError(f"{where}: area must be a number, got {annotation.get('area')!r}")
        annotation.setdefault("iscrowd", 0)
        if "dp_x" in annotation:
            _check_densepose_fields(annotation, where)
    return dataset


def _coco_from_dataset(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


# ---------------------------------------------------------------------------------------------------------------
# Predictions


def _as_array(prediction: Mapping[str, Any], key: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    array = np.asarray(prediction[key], dtype=np.float64)
    if array.size == 0:
        array = array.reshape((0, *shape[1:]))
    if array.shape != shape or not np.all(np.isfinite(array)):
        raise ValueError(f"{where}: '{key}' must be finite with shape {shape}, got shape {array.shape}")
    return array


def _checked_iuv_map(iuv_map: Any, box: np.ndarray, where: str) -> np.ndarray:
    iuv_map = np.asarray(iuv_map, dtype=np.float32)
    _, _, width, height = densepose_map_region(box)
    # One pixel of slack: a producer computing int(x1 - x0) in float32 may land one below the float64 value.
    if (iuv_map.ndim != 3 or iuv_map.shape[0] != 3 or abs(iuv_map.shape[1] - height) > 1
            or abs(iuv_map.shape[2] - width) > 1 or min(iuv_map.shape[1:]) < 1):
        raise ValueError(f"{where}: map must be (3, {height}, {width}) (I, U, V over the box), "
                         f"got shape {iuv_map.shape}")
    parts = iuv_map[0]
    bad = parts[(parts < 0) | (parts > NUM_PARTS + 0.5) | np.isnan(parts)]
    if bad.size:
        raise ValueError(f"{where}: channel I holds {bad[0]}, labels are 0 (background) .. {NUM_PARTS}")
    return iuv_map


def detections_from_predictions(predictions: Sequence[Mapping[str, Any]], image_ids: set[int],
                                category_ids: Sequence[int]) -> tuple[list[dict[str, Any]], list[int]]:
    """Check predictions against the contract; return COCO-style detection dicts (with their ``iuv`` map and
    ``box_xyxy``) and the predicted image ids, in order."""
    detections: list[dict[str, Any]] = []
    predicted_images: list[int] = []
    for k, prediction in enumerate(predictions):
        missing = [key for key in PREDICTION_KEYS if key not in prediction]
        if missing:
            raise ValueError(f"predictions[{k}]: missing {missing}")
        image_id = int(prediction["image_id"])
        where = f"predictions[{k}] (image_id {image_id})"
        if image_id not in image_ids:
            raise ValueError(f"{where}: image_id is not in the ground truth")
        if image_id in predicted_images:
            raise ValueError(f"{where}: a second prediction for this image")
        predicted_images.append(image_id)
        num_boxes = len(np.asarray(prediction["scores"]).reshape(-1))
        boxes = _as_array(prediction, "boxes", (num_boxes, 4), where)
        scores = _as_array(prediction, "scores", (num_boxes,), where)
        classes = _as_array(prediction, "classes", (num_boxes,), where)
        bad = classes[(classes < 0) | (classes >= len(category_ids)) | (classes != np.round(classes))]
        if bad.size:
            raise ValueError(f"{where}: class {bad[0]} is not one of 0..{len(category_ids) - 1} (the json's "
                             f"categories in id order)")
        maps = prediction["densepose"]
        if len(maps) != num_boxes:
            raise ValueError(f"{where}: {len(maps)} densepose maps for {num_boxes} boxes")
        for j in range(num_boxes):
            box = boxes[j]
            if box[2] < box[0] or box[3] < box[1]:
                raise ValueError(f"{where}: box {j} {box.tolist()} is not XYXY with x1 >= x0, y1 >= y0")
            width, height = box[2] - box[0], box[3] - box[1]
            detections.append({
                "id": len(detections) + 1, "image_id": image_id, "category_id": category_ids[int(classes[j])],
                "bbox": [float(box[0]), float(box[1]), float(width), float(height)], "area": float(width * height),
                "score": float(scores[j]), "iscrowd": 0, "box_xyxy": box,
                "iuv": _checked_iuv_map(maps[j], box, f"{where}: detection {j}"),
            })
    return detections, predicted_images


# ---------------------------------------------------------------------------------------------------------------
# COCOeval with GPS as the similarity


def _highest_scoring(detections: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """COCOeval's own ordering (stable by descending score), so our matrices line up with its matching."""
    order = np.argsort([-d["score"] for d in detections], kind="mergesort")
    return [detections[i] for i in order[:limit]]


_NO_POINTS = GroundTruthPoints(x=np.zeros(0), y=np.zeros(0), mesh_vertex=np.zeros(0, dtype=np.int64),
                               sigma=np.zeros(0))


class _GpsCOCOeval(COCOeval):
    """COCOeval whose similarity is GPS, with the official DensePose ignore rules (see the module docstring)."""

    def __init__(self, coco_gt: COCO, coco_dt: COCO, surface: BodySurface, vertex_index: PartVertexIndex,
                 points_of: Mapping[int, GroundTruthPoints], person_category_id: int, image_ids: list[int]) -> None:
        super().__init__(coco_gt, coco_dt, iouType="bbox")
        self._surface = surface
        self._vertex_index = vertex_index
        self._points_of = points_of  # annotation id -> its DensePose points; persons without them are absent
        self._box_ious: dict[tuple[int, int], np.ndarray] = {}
        params = self.params
        params.imgIds = list(image_ids)
        params.catIds = [person_category_id]
        params.maxDets = [_DENSEPOSE_MAX_DETECTIONS]
        params.areaRng = [list(r) for r in _DENSEPOSE_AREA_RANGES]
        params.areaRngLbl = list(_DENSEPOSE_AREA_LABELS)

    def _prepare(self) -> None:
        super()._prepare()
        for persons in self._gts.values():
            for annotation in persons:
                annotation["ignore"] = bool(annotation["ignore"]) or annotation["id"] not in self._points_of

    # COCOeval calls these two by name; their camelCase is its.
    def computeIoU(self, imgId: int, catId: int) -> np.ndarray | list:
        persons = self._gts[imgId, catId]
        detections = _highest_scoring(self._dts[imgId, catId], self.params.maxDets[-1])
        if not persons or not detections:
            return []
        points = [_NO_POINTS if person["ignore"] else self._points_of[person["id"]] for person in persons]
        self._box_ious[imgId, catId] = mask_utils.iou([d["bbox"] for d in detections], [p["bbox"] for p in persons],
                                                      [int(p["iscrowd"]) for p in persons])
        return gps_matrix(self._surface, self._vertex_index, points,
                          [(d["box_xyxy"], d["iuv"]) for d in detections])

    def evaluateImg(self, imgId: int, catId: int, aRng: list[float], maxDet: int) -> dict | None:
        result = super().evaluateImg(imgId, catId, aRng, maxDet)
        if result is None or not result["dtIds"]:
            return result
        dt_ignore = np.array(result["dtIgnore"], dtype=bool)
        person_ignored = np.asarray(result["gtIgnore"], dtype=bool)
        if person_ignored.all():
            # No person of this image counts here, so none of its detections can be right or wrong.
            result["dtIgnore"] = np.ones_like(dt_ignore)
            return result
        persons = self._gts[imgId, catId]
        column_of = {person["id"]: column for column, person in enumerate(persons)}
        columns = [column_of[person_id] for person_id in result["gtIds"]]
        box_iou = self._box_ious[imgId, catId][:len(result["dtIds"])][:, columns]
        crowd = np.array([bool(persons[c]["iscrowd"]) for c in columns])
        for t in range(len(self.params.iouThrs)):
            taken = result["gtMatches"][t] > 0
            for d in np.flatnonzero(result["dtMatches"][t] == 0):
                candidates = (box_iou[d] >= _IGNORED_PERSON_BOX_IOU) & (~taken | crowd)
                if not candidates.any():
                    continue
                best = int(np.argmax(np.where(candidates, box_iou[d], -1.0)))
                if person_ignored[best]:
                    dt_ignore[t, d] = True
                    if not crowd[best]:
                        taken[best] = True
        result["dtIgnore"] = dt_ignore
        return result


def _summary(coco_eval: COCOeval, metric_names: Iterable[str]) -> dict[str, float | None]:
    """AP in percent per metric, at the largest max-detections setting; None where no ground truth counts
    (COCOeval's -1, which detectron2 prints as NaN)."""
    params = coco_eval.params
    precision = coco_eval.eval["precision"]  # (thresholds, recalls, categories, areas, max detections)
    summary: dict[str, float | None] = {}
    for name in metric_names:
        threshold, area = _METRIC_DEFINITIONS[name]
        values = precision[:, :, :, params.areaRngLbl.index(area), -1]
        if threshold is not None:
            values = values[np.flatnonzero(np.isclose(params.iouThrs, threshold))]
        values = values[values > -1]
        summary[name] = float(values.mean() * 100) if values.size else None
    return summary


def _run(coco_eval: COCOeval) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and timings
        coco_eval.evaluate()
        coco_eval.accumulate()


# ---------------------------------------------------------------------------------------------------------------
# The evaluator


class DensePoseCOCOEvaluator:
    """Box AP and DensePose GPS AP of predictions (``Prediction`` dicts) on a DensePose-COCO json.

    ``surface_dir`` holds the body surface files (see ``fnl.data.surface``). ``gps_normalization``:
    "constant" (sigma 0.255, as docs/DESIGN.md and the DensePose paper state it) or "per_part" (the per-part sigmas
    that detectron2's and the DensePose repository's evaluators apply to I/U/V predictions).
    Contiguous class c is the json's c-th category in id order; DensePose AP scores class 0, the person.
    """

    def __init__(self, gt_json_path: str | Path, surface_dir: str | Path, *,
                 gps_normalization: GpsNormalization = "constant") -> None:
        if gps_normalization not in GPS_NORMALIZATIONS:
            raise ValueError(f"gps_normalization must be one of {GPS_NORMALIZATIONS}, got {gps_normalization!r}")
        self.gt_json_path = Path(gt_json_path)
        self._dataset = load_densepose_coco_json(self.gt_json_path)
        self._coco_gt = _coco_from_dataset(self._dataset)
        self.category_ids: list[int] = sorted(c["id"] for c in self._dataset["categories"])
        self.image_ids: list[int] = [image["id"] for image in self._dataset["images"]]
        self.surface = load_body_surface(surface_dir)
        self._vertex_index = PartVertexIndex(self.surface)
        annotated = [a for a in self._dataset["annotations"]
                     if a["category_id"] == self.category_ids[0] and has_densepose_points(a)]
        self._points_of = dict(zip((a["id"] for a in annotated),
                                ground_truth_points(annotated, self._vertex_index, gps_normalization), strict=True))

    def evaluate(self, predictions: Sequence[Mapping[str, Any]], *,
                 image_ids: Iterable[int] | None = None) -> Results:
        """``{"bbox": {AP, AP50, AP75, APs, APm, APl}, "densepose": {AP, AP50, AP75, APm, APl}}`` in percent.

        Images scored: ``image_ids`` if given, else the images that have a prediction (detectron2's convention,
        so a run over the first k images scores those k); an image with a prediction of zero detections counts
        its persons as missed. With no predictions at all, every image of the json is scored: AP is 0, not an
        error. A metric is None where no ground truth falls in its range (e.g. APs without small persons).
        """
        detections, predicted_images = detections_from_predictions(predictions, set(self.image_ids),
                                                                   self.category_ids)
        if image_ids is not None:
            scored = [int(i) for i in image_ids]
            unknown = sorted(set(scored) - set(self.image_ids))
            if unknown:
                raise ValueError(f"image_ids {unknown[:5]} are not in {self.gt_json_path}")
        else:
            scored = predicted_images or list(self.image_ids)
        if len(scored) < len(self.image_ids):
            logger.info("evaluating %d of the %d images of %s", len(scored), len(self.image_ids), self.gt_json_path)
        coco_dt = _coco_from_dataset({"images": self._dataset["images"], "categories": self._dataset["categories"],
                                      "annotations": detections})

        box_eval = COCOeval(self._coco_gt, coco_dt, iouType="bbox")
        box_eval.params.imgIds = list(scored)
        _run(box_eval)
        gps_eval = _GpsCOCOeval(self._coco_gt, coco_dt, self.surface, self._vertex_index, self._points_of,
                                self.category_ids[0], scored)
        _run(gps_eval)
        return {"bbox": _summary(box_eval, BBOX_METRICS), "densepose": _summary(gps_eval, DENSEPOSE_METRICS)}


# ---------------------------------------------------------------------------------------------------------------
# Ground truth as predictions (tests, sanity checks of a pipeline)


def ground_truth_as_predictions(gt_json_path: str | Path) -> list[Prediction]:
    """The json's non-crowd annotations as predictions: boxes, score 1, and I/U/V maps that hold each annotated
    point's (I, U, V) at its pixel and background elsewhere (a person without points gets an all-background map).

    Fed back to the evaluator they score box AP 100 and DensePose AP 100, provided no two points of a person
    share a pixel and every point lies inside its box's map region."""
    dataset = load_densepose_coco_json(gt_json_path)
    class_of = {category_id: c for c, category_id in enumerate(sorted(c["id"] for c in dataset["categories"]))}
    per_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in dataset["images"]}
    for annotation in dataset["annotations"]:
        if not annotation["iscrowd"]:
            per_image[annotation["image_id"]].append(annotation)
    predictions: list[Prediction] = []
    for image_id, persons in per_image.items():
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in persons)],
                         dtype=np.float64).reshape(-1, 4)
        maps = [_ground_truth_map(annotation, box) for annotation, box in zip(persons, boxes, strict=True)]
        predictions.append(Prediction(image_id=image_id, boxes=boxes, scores=np.ones(len(persons)),
                                      classes=np.array([class_of[a["category_id"]] for a in persons],
                                                       dtype=np.int64),
                                      densepose=maps))
    return predictions


def _ground_truth_map(annotation: Mapping[str, Any], box_xyxy: np.ndarray) -> np.ndarray:
    origin_x, origin_y, width, height = densepose_map_region(box_xyxy)
    iuv_map = np.zeros((3, height, width), dtype=np.float32)
    if has_densepose_points(annotation):
        x, y = annotation_points_in_image(annotation)
        rows, cols, inside = map_pixels(origin_x, origin_y, height, width, x, y)
        for channel, key in enumerate(("dp_I", "dp_U", "dp_V")):
            iuv_map[channel, rows[inside], cols[inside]] = np.asarray(annotation[key], dtype=np.float32)[inside]
    return iuv_map
