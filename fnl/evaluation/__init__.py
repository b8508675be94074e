"""fnl.evaluation: box AP and DensePose GPS AP of predictions on DensePose-COCO, and the body surface behind GPS."""

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
from fnl.evaluation.surface import (
    BodySurface,
    PartVertexIndex,
    SurfaceFileError,
    UnsafePickleError,
    closest_vertices,
    geodesic_distances,
    load_body_surface,
    save_body_surface,
)

__all__ = [
    "BBOX_METRICS",
    "DENSEPOSE_METRICS",
    "GPS_SIGMA",
    "BodySurface",
    "DensePoseCOCOEvaluator",
    "PartVertexIndex",
    "Prediction",
    "SurfaceFileError",
    "UnsafePickleError",
    "closest_vertices",
    "densepose_map_region",
    "format_results_table",
    "geodesic_distances",
    "ground_truth_as_predictions",
    "load_body_surface",
    "load_densepose_coco_json",
    "save_body_surface",
    "write_results_json",
]
