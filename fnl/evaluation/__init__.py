"""fnl.evaluation: box AP and DensePose GPS AP of predictions on DensePose-COCO, and the body surface behind GPS."""

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
    "BodySurface",
    "PartVertexIndex",
    "SurfaceFileError",
    "UnsafePickleError",
    "closest_vertices",
    "geodesic_distances",
    "load_body_surface",
    "save_body_surface",
]
