"""fnl.evaluation: box AP and DensePose GPS AP of predictions on DensePose-COCO, and the body-surface queries behind
GPS (the surface and its files: fnl.data.surface)."""

from fnl.evaluation.densepose_coco import (
    DensePoseCOCOEvaluator,
    Prediction,
    ground_truth_as_predictions,
    load_densepose_coco_json,
)
from fnl.evaluation.gps import GPS_SIGMA, densepose_map_region
from fnl.evaluation.results import (
    BBOX_METRICS,
    DENSEPOSE_METRICS,
    format_results_table,
    write_results_json,
)
from fnl.evaluation.surface import PartVertexIndex, closest_vertices, geodesic_distances

__all__ = [
    "BBOX_METRICS",
    "DENSEPOSE_METRICS",
    "GPS_SIGMA",
    "DensePoseCOCOEvaluator",
    "PartVertexIndex",
    "Prediction",
    "closest_vertices",
    "densepose_map_region",
    "format_results_table",
    "geodesic_distances",
    "ground_truth_as_predictions",
    "load_densepose_coco_json",
    "write_results_json",
]
