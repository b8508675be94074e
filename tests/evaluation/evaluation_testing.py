"""Helpers of the evaluation tests (test helper modules are named <folder>_testing.py): a tiny body surface and a
DensePose-COCO json, so the evaluator is tested without downloads.

The surface is a flat strip: chart p is a (GRID x GRID) vertex grid over a PART_SIZE square placed at
x = (p - 1) * PART_SIZE, so neighbouring charts share their seam column (two chart vertices, one mesh vertex, as
in the real SMPL files) and geodesic distance is plain Euclidean distance in the plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import pdist

from fnl.data.surface import BodySurface

GRID = 11
PART_SIZE = 1.0


@dataclass
class GridSurface:
    surface: BodySurface
    mesh_positions: np.ndarray  # (n, 2) plane coordinates of the mesh vertices


def make_grid_surface(parts: range = range(1, 25), grid: int = GRID, part_size: float = PART_SIZE,
                      seed: int = 0) -> GridSurface:
    steps = np.linspace(0.0, 1.0, grid)
    u, v = (a.reshape(-1) for a in np.meshgrid(steps, steps, indexing="ij"))
    vertex_part = np.repeat(np.array(list(parts)), len(u))
    vertex_uv = np.tile(np.stack([u, v], axis=1), (len(parts), 1))
    plane = np.stack([(vertex_part - 1 + vertex_uv[:, 0]) * part_size, vertex_uv[:, 1] * part_size], axis=1)
    # Seam vertices of neighbouring charts coincide: they become one mesh vertex.
    mesh_positions, vertex_to_mesh = np.unique(np.round(plane, 9), axis=0, return_inverse=True)
    # Shuffle the mesh order so that a wrong use of vertex_to_mesh cannot go unnoticed.
    order = np.random.default_rng(seed).permutation(len(mesh_positions))
    new_index = np.empty_like(order)
    new_index[order] = np.arange(len(order))
    mesh_positions = mesh_positions[order]
    vertex_to_mesh = new_index[vertex_to_mesh.reshape(-1)]
    surface = BodySurface(vertex_part=vertex_part, vertex_uv=vertex_uv, vertex_to_mesh=vertex_to_mesh,
                          geodesic=pdist(mesh_positions).astype(np.float32),
                          num_mesh_vertices=len(mesh_positions))
    return GridSurface(surface=surface, mesh_positions=mesh_positions)


# (image id, [(box x, y, w, h), number of DensePose points (0: none), iscrowd])
_IMAGES = [
    (1, [((40, 30, 200, 300), 60, 0), ((300, 50, 150, 260), 50, 0)]),
    (2, [((10, 20, 60, 80), 40, 0), ((200, 100, 180, 240), 0, 0)]),  # a medium person, one without points
    (3, [((100.3, 40.7, 50.6, 70.2), 30, 0), ((5, 5, 20, 30), 10, 0), ((300, 10, 200, 200), 0, 1)]),  # + small, crowd
    (4, [((50, 60, 220, 300), 60, 0), ((150, 80, 200, 290), 60, 0), ((400, 40, 100, 180), 45, 0)]),
    (5, []),  # no person
]


def _points_in_box(box: tuple[float, float, float, float], count: int, rng: np.random.Generator) -> tuple:
    """dp_x, dp_y of ``count`` points at distinct pixel centres inside the box's map region."""
    x, y, w, h = box
    x0, y0 = int(x), int(y)
    width, height = max(int(x + w - x), 1), max(int(y + h - y), 1)
    columns = np.arange(int(np.ceil(x)) - x0, width)
    rows = np.arange(int(np.ceil(y)) - y0, height)
    pixels = rng.choice(len(columns) * len(rows), size=count, replace=False)
    px = x0 + columns[pixels % len(columns)] + 0.5
    py = y0 + rows[pixels // len(columns)] + 0.5
    return ((px - x) * 255.0 / w).tolist(), ((py - y) * 255.0 / h).tolist()


def make_densepose_coco(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id, persons in _IMAGES:
        images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": 640, "height": 480})
        for box, num_points, iscrowd in persons:
            annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": list(box),
                          "area": 0.6 * box[2] * box[3], "iscrowd": iscrowd}
            if num_points:
                dp_x, dp_y = _points_in_box(box, num_points, rng)
                annotation.update(dp_x=dp_x, dp_y=dp_y, dp_I=rng.integers(1, 25, num_points).tolist(),
                                  dp_U=rng.random(num_points).tolist(), dp_V=rng.random(num_points).tolist())
            annotations.append(annotation)
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}
