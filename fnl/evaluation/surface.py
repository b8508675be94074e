"""Queries on the body surface for the GPS metric: the nearest surface vertex of a chart point, and geodesic
distances between mesh vertices (the surface and its files: ``fnl.data.surface``)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from fnl.data.surface import NUM_PARTS, BodySurface, pdist_row_start


class PartVertexIndex:
    """Nearest surface vertex of a given chart in (U, V) space, as the official evaluator assigns points to the
    mesh; one KD-tree per chart, built once so an evaluation run does not rebuild them per image."""

    def __init__(self, surface: BodySurface) -> None:
        self._vertex_to_mesh = np.asarray(surface.vertex_to_mesh, dtype=np.int64)
        self._part_vertices: dict[int, np.ndarray] = {}
        self._part_trees: dict[int, cKDTree] = {}
        for part in range(1, NUM_PARTS + 1):
            vertices = np.flatnonzero(surface.vertex_part == part)
            if vertices.size:
                self._part_vertices[part] = vertices
                self._part_trees[part] = cKDTree(np.asarray(surface.vertex_uv, dtype=np.float64)[vertices])

    def closest(self, parts: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """(P,) mesh vertex index of each point; -1 for background (0), an unknown chart, or a chart the surface
        has no vertex on. Ties between equidistant vertices may resolve differently from the official argmin."""
        parts = np.asarray(parts).reshape(-1)
        u = np.asarray(u, dtype=np.float64).reshape(-1)
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        if not len(parts) == len(u) == len(v):
            raise ValueError(f"parts, u, v must have one length, got {len(parts)}, {len(u)}, {len(v)}")
        result = np.full(len(parts), -1, dtype=np.int64)
        for part, tree in self._part_trees.items():
            points = np.flatnonzero(parts == part)
            if points.size:
                _, nearest = tree.query(np.stack([u[points], v[points]], axis=1))
                result[points] = self._vertex_to_mesh[self._part_vertices[part][nearest]]
        return result


def closest_vertices(surface: BodySurface, parts: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(P,) mesh vertex index (into the geodesic matrix) nearest to each point (I, U, V) within its chart I;
    -1 where I == 0. Builds the per-chart search each call: hold a ``PartVertexIndex`` for repeated queries."""
    return PartVertexIndex(surface).closest(parts, u, v)


def geodesic_distances(surface: BodySurface, verts_a: np.ndarray, verts_b: np.ndarray) -> np.ndarray:
    """(P,) float64 geodesic distance between mesh vertices ``verts_a[k]`` and ``verts_b[k]``; inf where either is
    -1 (no vertex), 0 where they are equal."""
    a = np.asarray(verts_a, dtype=np.int64).reshape(-1)
    b = np.asarray(verts_b, dtype=np.int64).reshape(-1)
    if len(a) != len(b):
        raise ValueError(f"verts_a and verts_b must have one length, got {len(a)} and {len(b)}")
    n = int(surface.num_mesh_vertices)
    for name, verts in (("verts_a", a), ("verts_b", b)):
        if verts.size and (verts.min() < -1 or verts.max() >= n):
            raise IndexError(f"{name} spans {verts.min()}..{verts.max()}; the surface has mesh vertices 0..{n - 1}")
    distances = np.full(len(a), np.inf, dtype=np.float64)
    valid = (a >= 0) & (b >= 0)
    distances[valid & (a == b)] = 0.0
    distinct = valid & (a != b)
    low, high = np.minimum(a[distinct], b[distinct]), np.maximum(a[distinct], b[distinct])
    distances[distinct] = surface.geodesic[pdist_row_start(low, n) + high - low - 1]
    return distances
