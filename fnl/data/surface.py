"""The body surface used by DensePose's GPS metric: chart coordinates of the surface vertices and their geodesic
distances, and the one owner of its file format (``fnl-data synth`` writes it, the evaluator reads it; the queries
the metric makes are ``fnl.evaluation.surface``).

On disk it has the layout of DensePose's SMPL evaluation files, so one loader serves the real SMPL files a user
downloads and the synthetic template's files that ``fnl-data synth`` writes. The layout, as the official evaluators
read it (detectron2 ``densepose/evaluation/densepose_coco_evaluation.py``, ``_loadGEval`` and ``getDistancesUV``;
facebookresearch/DensePose ``detectron/datasets/densepose_cocoeval.py``, ``getDistances``):

``SMPL_subdiv.mat`` (MATLAB v5)
    ``Part_ID_subdiv``, ``U_subdiv``, ``V_subdiv``: one entry per vertex of the subdivided mesh whose charts are cut
    open along their seams (29408 vertices for SMPL); chart 1..24 and its (U, V) in [0, 1]. The real file stores
    column vectors (V, 1) and also holds ``vertex`` and ``faces``, which the metric does not read.
``SMPL_SUBDIV_TRANSFORM.mat`` (MATLAB v5)
    ``index``: (V, 1), the 1-based vertex of the geodesic mesh (27554 for SMPL) under each subdivided vertex; the
    vertices on both sides of a seam share one.
``Pdist_matrix.pkl``
    a pickled dict ``{"Pdist_matrix": array (n * (n - 1) / 2, 1)}``: the strictly lower triangle of the geodesic
    distance matrix of the n mesh vertices, row by row: the distance between 0-based vertices i > j is entry
    ``i * (i - 1) / 2 + j``. This is *not* scipy's ``pdist`` order (upper triangle row by row), which is the order
    ``BodySurface.geodesic`` holds in memory; ``save_body_surface`` and ``load_body_surface`` convert.

The pickle is read by an unpickler that only rebuilds numpy arrays and plain containers: a downloaded file never
gets to run code.
"""

from __future__ import annotations

import importlib
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from scipy.io import loadmat, savemat

from fnl.utils.errors import UserError
from fnl.utils.io import atomic_path

NUM_PARTS = 24

SUBDIV_FILE = "SMPL_subdiv.mat"
TRANSFORM_FILE = "SMPL_SUBDIV_TRANSFORM.mat"
PDIST_FILE = "Pdist_matrix.pkl"
SURFACE_FILES = (SUBDIV_FILE, TRANSFORM_FILE, PDIST_FILE)

_PART_KEY = "Part_ID_subdiv"
_U_KEY = "U_subdiv"
_V_KEY = "V_subdiv"
_TRANSFORM_KEY = "index"
_PDIST_KEY = "Pdist_matrix"

# Python 3 writes bytes this way; numpy arrays need nothing else.
_PICKLE_PROTOCOL = 4


@dataclass
class BodySurface:
    vertex_part: np.ndarray  # (V,) int, chart index 1..24 of each (subdivided) vertex
    vertex_uv: np.ndarray  # (V, 2) float, chart coordinates (U, V) in [0, 1]
    vertex_to_mesh: np.ndarray  # (V,) int, 0-based index of each vertex in the geodesic matrix
    geodesic: np.ndarray  # condensed pairwise geodesic distances (scipy pdist order) over num_mesh_vertices
    num_mesh_vertices: int


class SurfaceFileError(UserError, ValueError):
    """A body surface file is unreadable, incomplete or inconsistent; the message names the file."""


class UnsafePickleError(SurfaceFileError, pickle.UnpicklingError):
    """A pickle asked for something other than numpy arrays and plain containers."""


# ---------------------------------------------------------------------------------------------------------------
# Geodesic matrix: condensed orders


def num_pairs(num_vertices: int) -> int:
    return num_vertices * (num_vertices - 1) // 2


def num_vertices_of_condensed(length: int) -> int | None:
    """n such that n * (n - 1) / 2 == length, or None when ``length`` is not such a number."""
    n = (1 + math.isqrt(1 + 8 * length)) // 2
    return n if num_pairs(n) == length else None


def pdist_row_start(rows: np.ndarray, n: int) -> np.ndarray:
    """Offset of row i (pairs (i, j > i)) in scipy's condensed order."""
    return rows * n - rows * (rows + 1) // 2


def _lower_triangle_row_start(rows: np.ndarray) -> np.ndarray:
    """Offset of row i (pairs (i, j < i)) in the official file's order."""
    return rows * (rows - 1) // 2


def lower_triangle_to_pdist_order(lower: np.ndarray, n: int) -> np.ndarray:
    """The official file's order -> scipy's ``pdist`` order (same values, same dtype).

    Row by row, so the real SMPL matrix (380M entries) needs no index array of its own size.
    """
    lower = lower.reshape(-1)
    starts = _lower_triangle_row_start(np.arange(n, dtype=np.int64))
    out = np.empty_like(lower)
    offset = 0
    for i in range(n - 1):
        # scipy's row i holds d(i, j) for j > i; the official file keeps it in row j, column i.
        out[offset:offset + n - i - 1] = lower[starts[i + 1:] + i]
        offset += n - i - 1
    return out


def pdist_to_lower_triangle_order(condensed: np.ndarray, n: int) -> np.ndarray:
    """scipy's ``pdist`` order -> the official file's order (the inverse of ``lower_triangle_to_pdist_order``)."""
    condensed = condensed.reshape(-1)
    rows = np.arange(n, dtype=np.int64)
    starts, lower_starts = pdist_row_start(rows, n), _lower_triangle_row_start(rows)
    out = np.empty_like(condensed)
    for i in range(1, n):
        j = np.arange(i, dtype=np.int64)
        out[lower_starts[i]:lower_starts[i] + i] = condensed[starts[j] + i - j - 1]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Validation shared by save and load


def _check_surface(surface: BodySurface, where: str) -> None:
    """Raise ValueError naming ``where`` (a directory or 'BodySurface') and the field at fault."""
    num_vertices = len(surface.vertex_part)
    if surface.vertex_part.ndim != 1:
        raise ValueError(f"{where}: vertex_part must be (V,), got shape {surface.vertex_part.shape}")
    if surface.vertex_uv.shape != (num_vertices, 2):
        raise ValueError(f"{where}: vertex_uv must be ({num_vertices}, 2), got shape {surface.vertex_uv.shape}")
    if surface.vertex_to_mesh.shape != (num_vertices,):
        raise ValueError(f"{where}: vertex_to_mesh must be ({num_vertices},), got {surface.vertex_to_mesh.shape}")
    bad_parts = surface.vertex_part[(surface.vertex_part < 1) | (surface.vertex_part > NUM_PARTS)]
    if bad_parts.size:
        raise ValueError(f"{where}: vertex_part holds {bad_parts[0]}, charts are 1..{NUM_PARTS}")
    if not np.all(np.isfinite(surface.vertex_uv)):
        raise ValueError(f"{where}: vertex_uv holds a non-finite value")
    n = int(surface.num_mesh_vertices)
    if n < 1:
        raise ValueError(f"{where}: num_mesh_vertices is {n}")
    if num_vertices and (surface.vertex_to_mesh.min() < 0 or surface.vertex_to_mesh.max() >= n):
        raise ValueError(f"{where}: vertex_to_mesh spans {surface.vertex_to_mesh.min()}.."
                         f"{surface.vertex_to_mesh.max()}, the geodesic matrix has {n} vertices")
    if surface.geodesic.ndim != 1 or len(surface.geodesic) != num_pairs(n):
        raise ValueError(f"{where}: geodesic must be condensed ({num_pairs(n)},) for {n} mesh vertices, "
                         f"got shape {surface.geodesic.shape}")


# ---------------------------------------------------------------------------------------------------------------
# Save


def save_body_surface(surface: BodySurface, directory: str | Path) -> None:
    """Write ``surface`` as the three DensePose SMPL evaluation files in ``directory`` (created if needed).

    Each file is written atomically. Vectors are stored as (V, 1) columns like the real files; part ids and the
    1-based ``index`` as int32, U/V as float64, the distances with the dtype of ``surface.geodesic``.
    """
    directory = Path(directory)
    _check_surface(surface, "BodySurface")
    directory.mkdir(parents=True, exist_ok=True)
    column = (-1, 1)
    with atomic_path(directory / SUBDIV_FILE) as tmp, open(tmp, "wb") as f:
        savemat(f, {
            _PART_KEY: np.asarray(surface.vertex_part, dtype=np.int32).reshape(column),
            _U_KEY: np.asarray(surface.vertex_uv[:, 0], dtype=np.float64).reshape(column),
            _V_KEY: np.asarray(surface.vertex_uv[:, 1], dtype=np.float64).reshape(column),
        })
    with atomic_path(directory / TRANSFORM_FILE) as tmp, open(tmp, "wb") as f:
        savemat(f, {_TRANSFORM_KEY: (np.asarray(surface.vertex_to_mesh, dtype=np.int32) + 1).reshape(column)})
    lower = pdist_to_lower_triangle_order(np.asarray(surface.geodesic), int(surface.num_mesh_vertices))
    with atomic_path(directory / PDIST_FILE) as tmp, open(tmp, "wb") as f:
        pickle.dump({_PDIST_KEY: lower.reshape(column)}, f, protocol=_PICKLE_PROTOCOL)


# ---------------------------------------------------------------------------------------------------------------
# Load


def _numpy_internal(module: str, name: str) -> Any:
    """numpy 2 moved ``numpy.core`` to ``numpy._core``; pickles from either name the function by its old home."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


# Everything a pickled numpy array (Python 2 or 3, protocols 0-5) refers to, and nothing that can run code.
_ARRAY_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_internal("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_internal("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_internal("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_internal("numeric", "_frombuffer"),
    # Protocol 2 from Python 3 spells bytes as _codecs.encode(str, "latin1"); it only converts text.
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, path: Path) -> None:
        # latin1: the real file comes from Python 2, whose numpy arrays carry their bytes as str.
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        make = _ARRAY_PICKLE_GLOBALS.get((module, name))
        if make is None:
            raise UnsafePickleError(
                f"{self._path}: refusing to load '{module}.{name}': this file may only hold numpy arrays "
                f"(a pickle that names other objects can run code when loaded)")
        return make()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refusing a persistent id ({pid!r}); only numpy arrays are allowed")


def load_array_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only numpy arrays and plain containers (dict, list, str, numbers)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _ArrayOnlyUnpickler(f, path).load()
    except (UnsafePickleError, FileNotFoundError):
        raise
    except Exception as e:  # a truncated or foreign file fails in many ways; all mean the same to the user
        raise SurfaceFileError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing. A body surface directory holds {', '.join(SURFACE_FILES)} (the DensePose SMPL "
            f"evaluation files, downloaded by the user, or the synthetic template's, written by 'fnl-data synth')")


def _load_mat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        contents = loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, NotImplementedError (v7.3), ... on bad files
        raise SurfaceFileError(f"{path}: not a readable MATLAB v5 .mat file ({type(e).__name__}: {e})") from e
    missing = [key for key in keys if key not in contents]
    if missing:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise SurfaceFileError(f"{path}: missing key(s) {missing}; found {found}")
    return {key: contents[key] for key in keys}


def _as_vector(array: Any, path: Path, key: str) -> np.ndarray:
    """(V,), (V, 1) or (1, V) -> (V,); the real files hold columns, MATLAB and scipy default to rows."""
    array = np.asarray(array)
    if array.ndim > 2 or (array.ndim == 2 and min(array.shape) > 1) or array.dtype == object:
        raise SurfaceFileError(f"{path}: '{key}' must be a vector, got shape {array.shape} dtype {array.dtype}")
    return array.reshape(-1)


def _as_int_vector(array: Any, path: Path, key: str) -> np.ndarray:
    vector = _as_vector(array, path, key)
    if vector.dtype.kind == "f":  # MATLAB stores integers as doubles unless told otherwise
        if not np.all(np.isfinite(vector)) or not np.all(vector == np.round(vector)):
            raise SurfaceFileError(f"{path}: '{key}' must hold integers, found a fractional value")
    elif vector.dtype.kind not in "iu":
        raise SurfaceFileError(f"{path}: '{key}' must hold integers, got dtype {vector.dtype}")
    return vector.astype(np.int64)


def load_body_surface(directory: str | Path) -> BodySurface:
    """Read the three DensePose SMPL evaluation files (real or synthetic) from ``directory``.

    Raises FileNotFoundError naming a missing file, SurfaceFileError naming a corrupt or inconsistent one
    (UnsafePickleError when the pickle asks for anything but numpy arrays).
    """
    directory = Path(directory)
    subdiv_path, transform_path, pdist_path = (directory / name for name in SURFACE_FILES)
    for path in (subdiv_path, transform_path, pdist_path):
        _require_file(path)

    subdiv = _load_mat(subdiv_path, (_PART_KEY, _U_KEY, _V_KEY))
    vertex_part = _as_int_vector(subdiv[_PART_KEY], subdiv_path, _PART_KEY)
    u = _as_vector(subdiv[_U_KEY], subdiv_path, _U_KEY).astype(np.float64)
    v = _as_vector(subdiv[_V_KEY], subdiv_path, _V_KEY).astype(np.float64)
    if not len(vertex_part) == len(u) == len(v):
        raise SurfaceFileError(f"{subdiv_path}: {_PART_KEY}, {_U_KEY}, {_V_KEY} have different lengths "
                               f"({len(vertex_part)}, {len(u)}, {len(v)})")
    bad_parts = vertex_part[(vertex_part < 1) | (vertex_part > NUM_PARTS)]
    if bad_parts.size:
        raise SurfaceFileError(f"{subdiv_path}: '{_PART_KEY}' holds {bad_parts[0]}, charts are 1..{NUM_PARTS}")

    index = _as_int_vector(_load_mat(transform_path, (_TRANSFORM_KEY,))[_TRANSFORM_KEY], transform_path,
                           _TRANSFORM_KEY)
    if len(index) != len(vertex_part):
        raise SurfaceFileError(f"{transform_path}: '{_TRANSFORM_KEY}' has {len(index)} entries, "
                               f"{subdiv_path} has {len(vertex_part)} vertices")

    contents = load_array_pickle(pdist_path)
    if not isinstance(contents, dict) or _PDIST_KEY not in contents:
        found = sorted(contents) if isinstance(contents, dict) else type(contents).__name__
        raise SurfaceFileError(f"{pdist_path}: expected a dict with key '{_PDIST_KEY}', found {found}")
    lower = _as_vector(contents[_PDIST_KEY], pdist_path, _PDIST_KEY)
    if lower.dtype.kind != "f":
        raise SurfaceFileError(f"{pdist_path}: '{_PDIST_KEY}' must hold floats, got dtype {lower.dtype}")
    n = num_vertices_of_condensed(len(lower))
    if n is None:
        raise SurfaceFileError(f"{pdist_path}: '{_PDIST_KEY}' has {len(lower)} entries, which is not "
                               f"n * (n - 1) / 2 for any number of vertices n")
    if index.size and (index.min() < 1 or index.max() > n):
        raise SurfaceFileError(f"{transform_path}: '{_TRANSFORM_KEY}' spans {index.min()}..{index.max()}, "
                               f"but {pdist_path} holds distances over vertices 1..{n}")

    return BodySurface(
        vertex_part=vertex_part,
        vertex_uv=np.stack([u, v], axis=1),
        vertex_to_mesh=index - 1,
        geodesic=lower_triangle_to_pdist_order(lower, n),
        num_mesh_vertices=n,
    )
