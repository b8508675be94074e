"""Session fixtures: the tiny surface, in memory and on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_densepose import GridSurface, make_grid_surface

from fnl.evaluation import save_body_surface


@pytest.fixture(scope="session")
def grid_surface() -> GridSurface:
    return make_grid_surface()


@pytest.fixture(scope="session")
def surface_dir(tmp_path_factory: pytest.TempPathFactory, grid_surface: GridSurface) -> Path:
    directory = tmp_path_factory.mktemp("surface")
    save_body_surface(grid_surface.surface, directory)
    return directory
