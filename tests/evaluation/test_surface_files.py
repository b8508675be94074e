"""Body surface files: the layout of DensePose's SMPL evaluation files, loading them safely, and the queries."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from evaluation_testing import GridSurface, make_grid_surface
from scipy.io import loadmat, savemat
from scipy.spatial.distance import cdist, squareform

from fnl.data.surface import (
    PDIST_FILE,
    SUBDIV_FILE,
    SURFACE_FILES,
    TRANSFORM_FILE,
    SurfaceFileError,
    UnsafePickleError,
    load_body_surface,
    save_body_surface,
)
from fnl.evaluation import PartVertexIndex, closest_vertices, geodesic_distances


def _assert_same_surface(loaded, expected) -> None:
    np.testing.assert_array_equal(loaded.vertex_part, expected.vertex_part)
    np.testing.assert_array_equal(loaded.vertex_uv, expected.vertex_uv)
    np.testing.assert_array_equal(loaded.vertex_to_mesh, expected.vertex_to_mesh)
    np.testing.assert_array_equal(loaded.geodesic, expected.geodesic)
    assert loaded.num_mesh_vertices == expected.num_mesh_vertices


def test_round_trip(surface_dir: Path, grid_surface: GridSurface) -> None:
    _assert_same_surface(load_body_surface(surface_dir), grid_surface.surface)


def test_files_have_the_official_layout(surface_dir: Path, grid_surface: GridSurface) -> None:
    surface = grid_surface.surface
    num_vertices, n = len(surface.vertex_part), surface.num_mesh_vertices
    subdiv = loadmat(surface_dir / SUBDIV_FILE)
    for key in ("Part_ID_subdiv", "U_subdiv", "V_subdiv"):
        assert subdiv[key].shape == (num_vertices, 1), key  # columns, like the real file
    assert subdiv["Part_ID_subdiv"].dtype.kind == "i"
    index = loadmat(surface_dir / TRANSFORM_FILE)["index"]
    assert index.shape == (num_vertices, 1)
    assert index.min() == 1 and index.max() == n  # 1-based
    with open(surface_dir / PDIST_FILE, "rb") as f:
        stored = pickle.load(f, encoding="latin1")["Pdist_matrix"]  # how the official evaluator reads it
    assert stored.shape == (n * (n - 1) // 2, 1)
    # The official lookup: vertices i > j (0-based) at i * (i - 1) / 2 + j, i.e. not scipy's pdist order.
    distances = squareform(surface.geodesic)
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, n, 500), rng.integers(0, n, 500)
    i, j = np.maximum(i, j), np.minimum(i, j)
    keep = i != j
    i, j = i[keep], j[keep]
    np.testing.assert_array_equal(stored[i * (i - 1) // 2 + j, 0], distances[i, j])


def _python2_array_pickle(key: str, array: np.ndarray) -> bytes:
    """``{key: array}`` as Python 2's cPickle (protocol 2) writes it, which is how the real Pdist_matrix.pkl came
    to be: strings as BINSTRING (Python 3 reads them back as latin1 str) and numpy's functions under numpy.core."""
    def string(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text if len(text) < 256 else b"T" + struct.pack("<i", len(text)) + text

    def integer(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    array = np.ascontiguousarray(array)
    dtype = (b"cnumpy\ndtype\n" + string(array.dtype.str[1:].encode()) + integer(0) + integer(1) + b"\x87R"
             + b"(" + integer(3) + string(b"<") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb")
    reconstructed = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + integer(0) + b"\x85"
                     + string(b"b") + b"\x87R")
    state = (b"(" + integer(1) + b"(" + b"".join(integer(d) for d in array.shape) + b"t" + dtype + b"\x89"
             + string(array.tobytes()) + b"tb")
    return b"\x80\x02}" + string(key.encode()) + reconstructed + state + b"s."


def _python3_protocol2_pickle(key: str, array: np.ndarray) -> bytes:
    return pickle.dumps({key: array}, protocol=2)  # bytes travel as _codecs.encode(str, "latin1")


@pytest.mark.parametrize("pickle_writer", [_python2_array_pickle, _python3_protocol2_pickle])
def test_loads_files_written_the_way_matlab_and_python2_tools_write_them(tmp_path: Path, pickle_writer) -> None:
    """Row vectors, integers stored as doubles, extra keys, float64 distances in a protocol-2 pickle."""
    expected = make_grid_surface(parts=range(1, 4), grid=4).surface
    save_body_surface(expected, tmp_path / "reference")
    n = expected.num_mesh_vertices
    savemat(tmp_path / SUBDIV_FILE, {"Part_ID_subdiv": expected.vertex_part.astype(np.float64)[None, :],
                                     "U_subdiv": expected.vertex_uv[None, :, 0],
                                     "V_subdiv": expected.vertex_uv[None, :, 1],
                                     "vertex": np.zeros((3, len(expected.vertex_part)))})
    savemat(tmp_path / TRANSFORM_FILE, {"index": (expected.vertex_to_mesh + 1).astype(np.float64)[None, :]})
    with open(tmp_path / "reference" / PDIST_FILE, "rb") as f:
        stored = pickle.load(f)["Pdist_matrix"]
    (tmp_path / PDIST_FILE).write_bytes(pickle_writer("Pdist_matrix", stored.astype(np.float64)))
    loaded = load_body_surface(tmp_path)
    assert loaded.num_mesh_vertices == n
    np.testing.assert_array_equal(loaded.vertex_part, expected.vertex_part)
    np.testing.assert_array_equal(loaded.vertex_to_mesh, expected.vertex_to_mesh)
    np.testing.assert_allclose(loaded.geodesic, expected.geodesic.astype(np.float64))


@pytest.fixture
def small_surface_dir(tmp_path: Path) -> Path:
    save_body_surface(make_grid_surface(parts=range(1, 4), grid=4).surface, tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", SURFACE_FILES)
def test_missing_file_is_named(small_surface_dir: Path, name: str) -> None:
    (small_surface_dir / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        load_body_surface(small_surface_dir)


@pytest.mark.parametrize("name", SURFACE_FILES)
def test_corrupt_file_is_named(small_surface_dir: Path, name: str) -> None:
    (small_surface_dir / name).write_bytes(b"\x00this is not what it claims to be" * 10)
    with pytest.raises(SurfaceFileError, match=name):
        load_body_surface(small_surface_dir)


def test_truncated_pickle_is_named(small_surface_dir: Path) -> None:
    path = small_surface_dir / PDIST_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SurfaceFileError, match=PDIST_FILE):
        load_body_surface(small_surface_dir)


def test_missing_key_is_named(small_surface_dir: Path) -> None:
    contents = loadmat(small_surface_dir / SUBDIV_FILE)
    savemat(small_surface_dir / SUBDIV_FILE, {"Part_ID_subdiv": contents["Part_ID_subdiv"],
                                              "U_subdiv": contents["U_subdiv"]})
    with pytest.raises(SurfaceFileError, match=rf"{SUBDIV_FILE}.*V_subdiv"):
        load_body_surface(small_surface_dir)


def test_inconsistent_files_are_named(small_surface_dir: Path) -> None:
    with open(small_surface_dir / PDIST_FILE, "wb") as f:
        pickle.dump({"Pdist_matrix": np.zeros((7, 1))}, f)  # 7 is no n * (n - 1) / 2
    with pytest.raises(SurfaceFileError, match=PDIST_FILE):
        load_body_surface(small_surface_dir)
    with open(small_surface_dir / PDIST_FILE, "wb") as f:
        pickle.dump({"Pdist_matrix": np.zeros((3, 1))}, f)  # 3 vertices, fewer than the index refers to
    with pytest.raises(SurfaceFileError, match=TRANSFORM_FILE):
        load_body_surface(small_surface_dir)


class _RunsCode:
    """Unpickling this calls os.mkdir: what a hostile Pdist_matrix.pkl could do with os.system."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


@pytest.mark.parametrize("wrap", [lambda evil: evil, lambda evil: {"Pdist_matrix": np.zeros((1, 1)), "x": evil}])
def test_malicious_pickle_is_refused_without_running_it(small_surface_dir: Path, wrap) -> None:
    target = small_surface_dir / "pwned"
    with open(small_surface_dir / PDIST_FILE, "wb") as f:
        pickle.dump(wrap(_RunsCode(target)), f)
    with pytest.raises(UnsafePickleError, match=rf"{PDIST_FILE}.*mkdir"):
        load_body_surface(small_surface_dir)
    assert not target.exists()


def test_closest_vertices_is_the_nearest_vertex_of_the_same_chart(grid_surface: GridSurface) -> None:
    surface = grid_surface.surface
    rng = np.random.default_rng(0)
    parts, u, v = rng.integers(0, 25, 300), rng.random(300), rng.random(300)
    found = closest_vertices(surface, parts, u, v)
    for k in range(300):
        if parts[k] == 0:
            assert found[k] == -1
            continue
        on_part = np.flatnonzero(surface.vertex_part == parts[k])
        nearest = on_part[np.argmin(cdist(surface.vertex_uv[on_part], [[u[k], v[k]]])[:, 0])]
        assert found[k] == surface.vertex_to_mesh[nearest]


def test_closest_vertices_of_a_chart_without_vertices_is_none() -> None:
    surface = make_grid_surface(parts=range(1, 4), grid=4).surface
    found = PartVertexIndex(surface).closest(np.array([1, 5, 0]), np.array([0.0, 0.5, 0.5]), np.array([0.0] * 3))
    assert found[0] >= 0 and found[1] == -1 and found[2] == -1


def test_geodesic_distances(grid_surface: GridSurface) -> None:
    surface, positions = grid_surface.surface, grid_surface.mesh_positions
    rng = np.random.default_rng(0)
    a, b = rng.integers(-1, surface.num_mesh_vertices, (2, 1000))
    a[:10] = b[:10]
    found = geodesic_distances(surface, a, b)
    assert found.dtype == np.float64 and found.shape == (1000,)
    valid = (a >= 0) & (b >= 0)
    assert np.all(np.isinf(found[~valid]))
    expected = np.linalg.norm(positions[a[valid]] - positions[b[valid]], axis=1)
    np.testing.assert_allclose(found[valid], expected, rtol=1e-6)
    assert np.all(found[:10][valid[:10]] == 0)


def test_save_refuses_an_inconsistent_surface(tmp_path: Path) -> None:
    surface = make_grid_surface(parts=range(1, 3), grid=3).surface
    surface.geodesic = surface.geodesic[:-1]
    with pytest.raises(ValueError, match="geodesic"):
        save_body_surface(surface, tmp_path)
    assert not any(tmp_path.iterdir())
