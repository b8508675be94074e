"""Rendered ground truth -> DensePose-COCO annotations, sampled the way the real set was annotated: a tight box of
the visible person, and for persons large and visible enough up to ~100 points with (I, U, V) plus the 14 coarse
part masks on the 256x256 grid of the box."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fnl.data.densepose_coco import encode_dp_masks
from fnl.data.parts import MASK_SIZE, fine_to_coarse
from fnl.data.synthetic.scene import SceneRender


@dataclass(frozen=True)
class AnnotationPolicy:
    min_visible_pixels: int = 20  # fewer: the person is dropped (nobody would have boxed it)
    min_box_side: float = 4.0
    min_densepose_pixels: int = 150  # fewer visible pixels: a box without DensePose fields, as in the real set
    min_densepose_box_side: float = 12.0
    max_points: int = 100


def box_grid_pixels(bbox: list[float], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the image pixels under the centres of the 256x256 grid cells over ``bbox``."""
    x, y, w, h = bbox
    centres = (np.arange(MASK_SIZE) + 0.5) / MASK_SIZE
    cols = np.clip(np.floor(x + centres * w), 0, width - 1).astype(np.int64)
    rows = np.clip(np.floor(y + centres * h), 0, height - 1).astype(np.int64)
    return rows, cols


def annotate_person(render: SceneRender, person_index: int, rng: np.random.Generator,
                    policy: AnnotationPolicy = AnnotationPolicy()) -> dict | None:
    """The json annotation (without ``id`` and ``image_id``) of one rendered person, or None to drop it."""
    visible = render.person == person_index
    rows, cols = np.nonzero(visible)
    if len(rows) < policy.min_visible_pixels:
        return None
    x0, y0 = int(cols.min()), int(rows.min())
    box_w, box_h = int(cols.max()) + 1 - x0, int(rows.max()) + 1 - y0
    if min(box_w, box_h) < policy.min_box_side:
        return None
    bbox = [float(x0), float(y0), float(box_w), float(box_h)]
    annotation = {"category_id": 1, "iscrowd": 0, "bbox": bbox, "area": float(len(rows))}
    if len(rows) < policy.min_densepose_pixels or min(box_w, box_h) < policy.min_densepose_box_side:
        return annotation
    chosen = np.sort(rng.choice(len(rows), size=min(policy.max_points, len(rows)), replace=False))
    point_rows, point_cols = rows[chosen], cols[chosen]
    # Points sit at pixel centres, where the renderer sampled I, U and V.
    annotation["dp_x"] = _floats((point_cols + 0.5 - x0) / box_w * MASK_SIZE, 3)
    annotation["dp_y"] = _floats((point_rows + 0.5 - y0) / box_h * MASK_SIZE, 3)
    annotation["dp_I"] = _floats(render.part[point_rows, point_cols], 1)  # floats, as in the released files
    annotation["dp_U"] = _floats(render.u[point_rows, point_cols], 6)
    annotation["dp_V"] = _floats(render.v[point_rows, point_cols], 6)
    grid_rows, grid_cols = box_grid_pixels(bbox, *visible.shape)
    coarse = fine_to_coarse(render.part[np.ix_(grid_rows, grid_cols)]) * visible[np.ix_(grid_rows, grid_cols)]
    annotation["dp_masks"] = encode_dp_masks(coarse)
    return annotation


def _floats(values: np.ndarray, digits: int) -> list[float]:
    return [round(float(value), digits) for value in np.asarray(values, dtype=np.float64)]
