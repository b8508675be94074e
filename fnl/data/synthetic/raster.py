"""A numpy z-buffer rasteriser for triangles already projected to the image.

Pixel (row, col) is sampled at its centre (col + 0.5, row + 0.5). Instead of a Python loop over triangles, each
triangle's bounding box is tested at once with every triangle of the same (power-of-two) box size, and the nearest
fragment of each pixel is then picked with one sort.
"""

from __future__ import annotations

import numpy as np

_INSIDE_TOLERANCE = 1e-7  # barycentric slack, so that pixels on a shared edge are not lost to round-off


def rasterize(vertices_xy: np.ndarray, vertices_depth: np.ndarray, height: int, width: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Render triangles given by (T, 3, 2) image coordinates and (T, 3) depths (larger = nearer the camera).

    Returns ``triangle`` (H, W) int64, the index of the nearest triangle covering each pixel centre or -1, and
    ``barycentric`` (H, W, 3) float32, that pixel centre's barycentric coordinates in it (0 where uncovered).
    Both faces of a triangle are drawn: cull back faces before calling.
    """
    xy = np.asarray(vertices_xy, dtype=np.float64)
    depth = np.asarray(vertices_depth, dtype=np.float64)
    triangle_map = np.full(height * width, -1, dtype=np.int64)
    barycentric_map = np.zeros((height * width, 3), dtype=np.float32)
    if len(xy):
        fragments = _fragments(xy, depth, height, width)
        if fragments is not None:
            pixel, nearest_depth, triangle, weights = fragments
            order = np.lexsort((nearest_depth, pixel))  # by pixel, then depth; the last of each pixel is nearest
            last = np.append(pixel[order][1:] != pixel[order][:-1], True)
            winners = order[last]
            triangle_map[pixel[winners]] = triangle[winners]
            barycentric_map[pixel[winners]] = weights[winners]
    return triangle_map.reshape(height, width), barycentric_map.reshape(height, width, 3)


def _fragments(xy: np.ndarray, depth: np.ndarray, height: int, width: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    x, y = xy[..., 0], xy[..., 1]
    col_lo = np.clip(np.ceil(x.min(axis=1) - 0.5), 0, width).astype(np.int64)
    col_hi = np.clip(np.floor(x.max(axis=1) - 0.5), -1, width - 1).astype(np.int64)
    row_lo = np.clip(np.ceil(y.min(axis=1) - 0.5), 0, height).astype(np.int64)
    row_hi = np.clip(np.floor(y.max(axis=1) - 0.5), -1, height - 1).astype(np.int64)
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    box_w, box_h = col_hi - col_lo + 1, row_hi - row_lo + 1
    drawn = np.flatnonzero((box_w > 0) & (box_h > 0) & (np.abs(area) > 1e-12))
    if len(drawn) == 0:
        return None
    # Group triangles by the power-of-two size of their pixel box; one vectorised pass per group.
    bucket_w = 1 << np.ceil(np.log2(box_w[drawn])).astype(np.int64)
    bucket_h = 1 << np.ceil(np.log2(box_h[drawn])).astype(np.int64)
    bucket_key = bucket_w * (2 * max(height, width) + 2) + bucket_h
    pieces = []
    for key in np.unique(bucket_key):
        members = drawn[bucket_key == key]
        span_w, span_h = int(bucket_w[bucket_key == key][0]), int(bucket_h[bucket_key == key][0])
        offset_y, offset_x = np.divmod(np.arange(span_w * span_h), span_w)
        cols = col_lo[members, None] + offset_x[None, :]
        rows = row_lo[members, None] + offset_y[None, :]
        in_box = (offset_x[None, :] < box_w[members, None]) & (offset_y[None, :] < box_h[members, None])
        px, py = cols + 0.5, rows + 0.5
        tx, ty, tz, ta = x[members], y[members], depth[members], area[members, None]
        w0 = ((tx[:, 1:2] - px) * (ty[:, 2:3] - py) - (tx[:, 2:3] - px) * (ty[:, 1:2] - py)) / ta
        w1 = ((tx[:, 2:3] - px) * (ty[:, 0:1] - py) - (tx[:, 0:1] - px) * (ty[:, 2:3] - py)) / ta
        w2 = 1.0 - w0 - w1
        inside = in_box & (w0 >= -_INSIDE_TOLERANCE) & (w1 >= -_INSIDE_TOLERANCE) & (w2 >= -_INSIDE_TOLERANCE)
        which, where = np.nonzero(inside)
        weights = np.stack([w0[which, where], w1[which, where], w2[which, where]], axis=1)
        pieces.append((
            rows[which, where] * width + cols[which, where],
            np.einsum("ij,ij->i", weights, tz[which]),
            members[which],
            weights,
        ))
    pixel, frag_depth, triangle, weights = (np.concatenate(p) for p in zip(*pieces, strict=True))
    return pixel, frag_depth, triangle, np.clip(weights, 0.0, 1.0).astype(np.float32)
