"""Geometric transforms of an image and its DensePose annotations: shortest-edge resizing and horizontal flips.

A flip mirrors more than pixels: the person's left becomes their right, so part labels swap through DensePose's
symmetry tables, and a point's chart coordinates (U, V) move to the mirrored chart through the UV symmetry file
(``UV_symmetry_transforms.mat``), exactly as detectron2's ``DensePoseTransformData`` does it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from fnl.data.densepose_coco import DatasetError
from fnl.data.parts import MASK_LABEL_SYMMETRIES, MASK_SIZE, NUM_FINE_PARTS, POINT_LABEL_SYMMETRIES
from fnl.utils.io import write_bytes_atomic

UV_TABLE_SIZE = 256  # the tables sample U and V at k / 255, k = 0..255
UV_TRANSFORM_KEYS = ("U_transforms", "V_transforms")
MAT_HEADER_TEXT_BYTES = 116  # MATLAB 5 files start with a free-text header of this size


@dataclass(frozen=True)
class DensePoseTransformData:
    """Left/right symmetries used by horizontal flips.

    ``u_transforms[i - 1][row, col]`` is the U, in the mirrored chart ``POINT_LABEL_SYMMETRIES[i]``, of the point
    of chart ``i`` at ``U = col / 255, V = row / 255``; ``v_transforms`` likewise gives its V.
    """

    u_transforms: np.ndarray  # (24, 256, 256) float32
    v_transforms: np.ndarray  # (24, 256, 256) float32
    point_label_symmetries: tuple[int, ...] = POINT_LABEL_SYMMETRIES
    mask_label_symmetries: tuple[int, ...] = MASK_LABEL_SYMMETRIES

    @classmethod
    def load(cls, path: str | Path) -> DensePoseTransformData:
        """Read DensePose's ``UV_symmetry_transforms.mat``: ``U_transforms`` and ``V_transforms`` are each a 1x24
        MATLAB cell of 256x256 arrays."""
        path = Path(path)
        try:
            content = scipy.io.loadmat(str(path))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot read the UV symmetry file ({exc})") from exc
        tables = [_stack_cells(content.get(key), key, path) for key in UV_TRANSFORM_KEYS]
        return cls(*tables)

    def flip_uv(self, part: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(U, V) of points of charts ``part`` (1..24) in their mirrored charts.

        The tables are looked up at the nearest grid cell; detectron2 truncates ``u * 255`` instead, which biases
        the result by half a cell and lets float32 round-off move a point on the grid down a cell.
        """
        chart = np.asarray(part, dtype=np.int64) - 1
        col = np.clip(np.rint(np.asarray(u, dtype=np.float64) * (UV_TABLE_SIZE - 1)), 0, UV_TABLE_SIZE - 1)
        row = np.clip(np.rint(np.asarray(v, dtype=np.float64) * (UV_TABLE_SIZE - 1)), 0, UV_TABLE_SIZE - 1)
        col, row = col.astype(np.int64), row.astype(np.int64)
        return self.u_transforms[chart, row, col], self.v_transforms[chart, row, col]


def _stack_cells(cells: np.ndarray | None, key: str, path: Path) -> np.ndarray:
    expected = f"a 1x{NUM_FINE_PARTS} cell of {UV_TABLE_SIZE}x{UV_TABLE_SIZE} arrays"
    if cells is None:
        raise DatasetError(f"{path}: no '{key}' (expected {expected})")
    tables = list(cells.reshape(-1)) if cells.dtype == object else list(np.asarray(cells))
    if len(tables) != NUM_FINE_PARTS or any(np.shape(t) != (UV_TABLE_SIZE, UV_TABLE_SIZE) for t in tables):
        shapes = sorted({np.shape(t) for t in tables})
        raise DatasetError(f"{path}: '{key}' must be {expected}, got {len(tables)} arrays of shapes {shapes}")
    return np.stack([np.asarray(t, dtype=np.float32) for t in tables])


def save_uv_symmetry(path: str | Path, u_transforms: np.ndarray, v_transforms: np.ndarray) -> None:
    """Write tables of shape (24, 256, 256) in the layout of DensePose's ``UV_symmetry_transforms.mat``."""
    content = {}
    for key, tables in zip(UV_TRANSFORM_KEYS, (u_transforms, v_transforms), strict=True):
        tables = np.asarray(tables, dtype=np.float64)
        if tables.shape != (NUM_FINE_PARTS, UV_TABLE_SIZE, UV_TABLE_SIZE):
            raise ValueError(f"{key} must have shape ({NUM_FINE_PARTS}, {UV_TABLE_SIZE}, {UV_TABLE_SIZE}), "
                             f"got {tables.shape}")
        cells = np.empty((1, NUM_FINE_PARTS), dtype=object)  # an object array is what savemat writes as a cell
        for chart in range(NUM_FINE_PARTS):
            cells[0, chart] = tables[chart]
        content[key] = cells
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, content, do_compression=True)
    # The 116-byte text header holds the writing time; a fixed text makes the file reproducible byte for byte.
    data = bytearray(buffer.getvalue())
    data[:MAT_HEADER_TEXT_BYTES] = b"MATLAB 5.0 MAT-file, written by fnl".ljust(MAT_HEADER_TEXT_BYTES)
    write_bytes_atomic(path, bytes(data))


# --- resizing ----------------------------------------------------------------------------------------------------
def shortest_edge_size(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Output (height, width) that makes the short side ``short_edge`` while the long side stays <= ``max_size``
    (detectron2's ``ResizeShortestEdge``)."""
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(int(new_h + 0.5), 1), max(int(new_w + 0.5), 1)


def resize_image(image: Image.Image, height: int, width: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BILINEAR)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def scale_boxes(boxes_xyxy: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    return boxes_xyxy * np.asarray([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)


# --- horizontal flip ---------------------------------------------------------------------------------------------
def hflip_boxes(boxes_xyxy: np.ndarray, image_width: float) -> np.ndarray:
    flipped = boxes_xyxy.copy()
    flipped[:, 0] = image_width - boxes_xyxy[:, 2]
    flipped[:, 2] = image_width - boxes_xyxy[:, 0]
    return flipped


def hflip_densepose(densepose: dict, transform_data: DensePoseTransformData) -> dict:
    """Mirror one person's DensePose annotation (box-relative, so the box's own flip is all the image does):
    x -> 256 - x, parts through the label symmetries, (U, V) through the UV tables, the part map mirrored."""
    part = np.asarray(densepose["i"], dtype=np.int64)
    u, v = transform_data.flip_uv(part, densepose["u"], densepose["v"])
    point_symmetry = np.asarray(transform_data.point_label_symmetries, dtype=np.int64)
    mask_symmetry = np.asarray(transform_data.mask_label_symmetries, dtype=np.uint8)
    return {
        "x": (MASK_SIZE - np.asarray(densepose["x"], dtype=np.float32)).astype(np.float32),
        "y": np.asarray(densepose["y"], dtype=np.float32).copy(),
        "i": point_symmetry[part],
        "u": u.astype(np.float32),
        "v": v.astype(np.float32),
        "segm": mask_symmetry[np.asarray(densepose["segm"])[:, ::-1]],
    }
