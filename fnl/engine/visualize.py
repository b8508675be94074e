"""Overlays as DensePose's apply_net draws them: boxes, the part index I as a colour map, U and V iso-contours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fnl.utils.io import atomic_path


def _part_colours() -> np.ndarray:
    import matplotlib

    palette = matplotlib.colormaps["tab20"](np.linspace(0, 1, 20))[:, :3]
    extra = matplotlib.colormaps["Set1"](np.linspace(0, 1, 9))[:4, :3]
    return (np.concatenate([np.zeros((1, 3)), palette, extra]) * 255).astype(np.uint8)  # 0 = background


PART_COLOURS = _part_colours()


def _uv_contours(u: np.ndarray, v: np.ndarray, inside: np.ndarray, levels: int = 10) -> np.ndarray:
    """Pixels where U or V crosses one of ``levels`` iso-lines (a cheap stand-in for contour plotting)."""
    edges = np.zeros_like(inside)
    for channel in (u, v):
        quantized = np.floor(channel * levels)
        edges[:, 1:] |= quantized[:, 1:] != quantized[:, :-1]
        edges[1:, :] |= quantized[1:, :] != quantized[:-1, :]
    return edges & inside


def draw_densepose(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, iuv_maps: list[np.ndarray],
                   alpha: float = 0.6) -> Image.Image:
    """``image`` (H, W, 3) uint8; ``iuv_maps`` (3, h, w) per box as ``fnl.modeling.densepose_to_iuv`` returns."""
    canvas = image.astype(np.float32).copy()
    height, width = image.shape[:2]
    for box, iuv in zip(boxes, iuv_maps, strict=True):
        x0, y0 = int(box[0]), int(box[1])
        h, w = iuv.shape[1:]
        y1, x1 = min(y0 + h, height), min(x0 + w, width)
        if y1 <= y0 or x1 <= x0:
            continue
        parts = iuv[0, : y1 - y0, : x1 - x0].astype(np.int64)
        inside = parts > 0
        region = canvas[y0:y1, x0:x1]
        region[inside] = (1 - alpha) * region[inside] + alpha * PART_COLOURS[parts[inside]]
        contour = _uv_contours(iuv[1, : y1 - y0, : x1 - x0], iuv[2, : y1 - y0, : x1 - x0], inside)
        region[contour] = (255, 255, 255)
    overlay = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(overlay)
    for box, score in zip(boxes, scores, strict=True):
        draw.rectangle([float(c) for c in box[:4]], outline=(255, 255, 0), width=2)
        draw.text((float(box[0]) + 2, float(box[1]) + 1), f"{score:.2f}", fill=(255, 255, 0))
    return overlay


def save_png(image: Image.Image, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
