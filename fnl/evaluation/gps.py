"""Geodesic Point Similarity (GPS) between a ground-truth person's DensePose points and a detection's I/U/V map.

For each annotated point of the person, the detection's (I, U, V) at that image pixel and the annotated (I, U, V)
are each mapped to the nearest surface vertex of their chart; d is the geodesic distance between the two vertices
(infinite when the detection says background there or the point lies outside its box), and the person's GPS is
the mean over its points of exp(-d^2 / (2 sigma^2)).

Point placement follows the official evaluator: ``dp_x``/``dp_y`` live on a 256-cell grid over the person's box
and are scaled by ``box size / 255`` (detectron2 ``densepose_coco_evaluation.py``, ``computeOgps``). Reading the
map follows this project's prediction contract: the point's image pixel (floor of its coordinates) minus the
map's integer origin ``(int(x0), int(y0))``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fnl.data.surface import BodySurface
from fnl.evaluation.surface import PartVertexIndex, geodesic_distances

# sigma of the DensePose paper: a geodesic error of 0.3 (about 30 cm on SMPL) gives GPS 0.5.
GPS_SIGMA = 0.255
# The official evaluators' per-part sigmas ("Mean_Distances" of the coarse groups torso, hands, feet, upper legs,
# lower legs, upper arms, lower arms, head), indexed here directly by chart I (0 = background).
_COARSE_GROUP_SIGMA = (0.0, 0.351, 0.107, 0.126, 0.237, 0.173, 0.142, 0.128, 0.150)
_CHART_COARSE_GROUP = (0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7, 8, 8)
PER_PART_GPS_SIGMA = np.array([_COARSE_GROUP_SIGMA[group] for group in _CHART_COARSE_GROUP])

GpsNormalization = Literal["constant", "per_part"]
GPS_NORMALIZATIONS: tuple[str, ...] = ("constant", "per_part")

# dp_x / dp_y are divided by this to get a fraction of the box, as the official evaluators do.
_POINT_GRID_SCALE = 255.0


def densepose_map_region(box_xyxy: Sequence[float] | np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) of the image region a detection's I/U/V map covers, per the prediction contract:
    pixel (r, c) of the map is image pixel (y0 + r, x0 + c)."""
    x0f, y0f, x1f, y1f = (float(value) for value in box_xyxy)
    return int(x0f), int(y0f), max(int(x1f - x0f), 1), max(int(y1f - y0f), 1)


def annotation_points_in_image(annotation: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates (x, y) of a DensePose-COCO annotation's points (``dp_x``, ``dp_y`` over its ``bbox``)."""
    box_x, box_y, box_w, box_h = (float(value) for value in annotation["bbox"])
    x = box_x + np.asarray(annotation["dp_x"], dtype=np.float64) * box_w / _POINT_GRID_SCALE
    y = box_y + np.asarray(annotation["dp_y"], dtype=np.float64) * box_h / _POINT_GRID_SCALE
    return x, y


def map_pixels(origin_x: int, origin_y: int, map_height: int, map_width: int, x: np.ndarray,
               y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and in-map mask of image points (x, y) in a map whose pixel (0, 0) is image pixel
    (origin_y, origin_x). Rows and columns of points outside the map are set to 0."""
    rows = np.floor(y).astype(np.int64) - origin_y
    cols = np.floor(x).astype(np.int64) - origin_x
    inside = (rows >= 0) & (rows < map_height) & (cols >= 0) & (cols < map_width)
    return np.where(inside, rows, 0), np.where(inside, cols, 0), inside


def sample_iuv(iuv_map: np.ndarray, box_xyxy: Sequence[float] | np.ndarray, x: np.ndarray,
               y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(I, U, V) of a detection's map at image points (x, y); I = 0 where a point falls outside the map.

    The map's own height and width bound it (they may differ by a pixel from the contract's box size when the
    producer rounded in float32)."""
    origin_x, origin_y, _, _ = densepose_map_region(box_xyxy)
    rows, cols, inside = map_pixels(origin_x, origin_y, iuv_map.shape[1], iuv_map.shape[2], x, y)
    parts = np.rint(iuv_map[0, rows, cols]).astype(np.int64)
    parts[~inside] = 0
    return parts, iuv_map[1, rows, cols].astype(np.float64), iuv_map[2, rows, cols].astype(np.float64)


@dataclass
class GroundTruthPoints:
    """One person's annotated points, ready for GPS: image coordinates, their mesh vertices and sigmas."""

    x: np.ndarray  # (P,) image x
    y: np.ndarray  # (P,) image y
    mesh_vertex: np.ndarray  # (P,) nearest mesh vertex of the annotated (I, U, V)
    sigma: np.ndarray  # (P,) GPS normalisation of each point


def gps_sigmas(parts: np.ndarray, normalization: GpsNormalization) -> np.ndarray:
    """Per-point sigma: the constant 0.255, or the official per-part value of each point's chart."""
    if normalization == "constant":
        return np.full(len(parts), GPS_SIGMA)
    if normalization == "per_part":
        return PER_PART_GPS_SIGMA[np.asarray(parts, dtype=np.int64)]
    raise ValueError(f"gps normalization must be one of {GPS_NORMALIZATIONS}, got {normalization!r}")


def ground_truth_points(annotations: Sequence[Mapping[str, Any]], vertex_index: PartVertexIndex,
                        normalization: GpsNormalization) -> list[GroundTruthPoints]:
    """GroundTruthPoints of each annotation (which must carry ``dp_*`` fields); one vertex search for all."""
    parts = [np.asarray(a["dp_I"], dtype=np.int64) for a in annotations]
    if not parts:
        return []
    vertices = vertex_index.closest(np.concatenate(parts),
                                    np.concatenate([np.asarray(a["dp_U"], dtype=np.float64) for a in annotations]),
                                    np.concatenate([np.asarray(a["dp_V"], dtype=np.float64) for a in annotations]))
    people = []
    offset = 0
    for annotation, person_parts in zip(annotations, parts, strict=True):
        x, y = annotation_points_in_image(annotation)
        people.append(GroundTruthPoints(x=x, y=y, mesh_vertex=vertices[offset:offset + len(person_parts)],
                                        sigma=gps_sigmas(person_parts, normalization)))
        offset += len(person_parts)
    return people


def gps_matrix(surface: BodySurface, vertex_index: PartVertexIndex, people: Sequence[GroundTruthPoints],
               detections: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """(D, G) GPS of every detection (box XYXY, I/U/V map) against every person; 0 for a person with no points.

    All pairs of an image go through one vertex search and one distance lookup."""
    num_people = len(people)
    gps = np.zeros((len(detections), num_people))
    point_counts = np.array([len(person.x) for person in people], dtype=np.int64)
    if not len(detections) or not point_counts.sum():
        return gps
    all_x = np.concatenate([person.x for person in people])
    all_y = np.concatenate([person.y for person in people])
    person_of_point = np.repeat(np.arange(num_people), point_counts)
    sampled = [sample_iuv(iuv_map, box, all_x, all_y) for box, iuv_map in detections]
    predicted_vertex = vertex_index.closest(np.concatenate([s[0] for s in sampled]),
                                            np.concatenate([s[1] for s in sampled]),
                                            np.concatenate([s[2] for s in sampled]))
    num_detections = len(detections)
    true_vertex = np.tile(np.concatenate([person.mesh_vertex for person in people]), num_detections)
    sigma = np.tile(np.concatenate([person.sigma for person in people]), num_detections)
    distance = geodesic_distances(surface, true_vertex, predicted_vertex)
    with np.errstate(over="ignore"):
        point_gps = np.exp(-distance ** 2 / (2 * sigma ** 2))
    pair = (np.repeat(np.arange(num_detections), len(all_x)) * num_people
            + np.tile(person_of_point, num_detections))
    sums = np.bincount(pair, weights=point_gps, minlength=num_detections * num_people)
    counts = np.tile(point_counts, num_detections)
    has_points = counts > 0
    flat = np.zeros(num_detections * num_people)
    flat[has_points] = sums[has_points] / counts[has_points]
    return flat.reshape(num_detections, num_people)

