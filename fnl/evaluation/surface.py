"""The body surface used by DensePose's GPS metric (interface; filled in by the evaluation work).

On disk it has the layout of DensePose's SMPL evaluation files, so one loader serves the real SMPL files a user
downloads and the synthetic template's files that ``fnl-data synth`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class BodySurface:
    vertex_part: np.ndarray  # (V,) int, chart index 1..24 of each (subdivided) vertex
    vertex_uv: np.ndarray  # (V, 2) float, chart coordinates (U, V) in [0, 1]
    vertex_to_mesh: np.ndarray  # (V,) int, 0-based index of each vertex in the geodesic matrix
    geodesic: np.ndarray  # condensed pairwise geodesic distances (scipy pdist order) over num_mesh_vertices
    num_mesh_vertices: int


def save_body_surface(surface: BodySurface, directory: str | Path) -> None:
    raise NotImplementedError


def load_body_surface(directory: str | Path) -> BodySurface:
    raise NotImplementedError
