"""Session fixtures: the tiny surface (in memory and on disk), the test json, and an evaluator over both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evaluation_testing import GridSurface, make_densepose_coco, make_grid_surface

from fnl.data.surface import save_body_surface
from fnl.evaluation import DensePoseCOCOEvaluator


@pytest.fixture(scope="session")
def grid_surface() -> GridSurface:
    return make_grid_surface()


@pytest.fixture(scope="session")
def surface_dir(tmp_path_factory: pytest.TempPathFactory, grid_surface: GridSurface) -> Path:
    directory = tmp_path_factory.mktemp("surface")
    save_body_surface(grid_surface.surface, directory)
    return directory


@pytest.fixture(scope="session")
def gt_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gt") / "densepose_test.json"
    path.write_text(json.dumps(make_densepose_coco()))
    return path


@pytest.fixture(scope="session")
def evaluator(gt_json: Path, surface_dir: Path) -> DensePoseCOCOEvaluator:
    return DensePoseCOCOEvaluator(gt_json, surface_dir)
