"""The results as CI reads them: fnl-eval's JSON layout and the Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fnl.evaluation import format_results_table, write_results_json

RESULTS = {
    "bbox": {"AP": 41.5, "AP50": 60.25, "AP75": 44.0, "APs": float("nan"), "APm": 30.0, "APl": 50.0},
    "densepose": {"AP": 35.125, "AP50": 70.0, "AP75": 30.0, "APm": None, "APl": 36.0},
}


def test_json_has_the_documented_layout_with_null_for_missing_figures(tmp_path: Path) -> None:
    path = tmp_path / "out" / "eval.json"
    write_results_json(RESULTS, path)
    written = json.loads(path.read_text())
    assert list(written) == ["bbox", "densepose"]
    assert list(written["bbox"]) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert list(written["densepose"]) == ["AP", "AP50", "AP75", "APm", "APl"]
    assert written["bbox"]["APs"] is None and written["densepose"]["APm"] is None
    assert written["densepose"]["AP"] == 35.125
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temporary file left behind


def test_json_refuses_a_value_that_is_not_a_number(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"results\['bbox'\]\['AP'\]"):
        write_results_json({"bbox": {"AP": "high"}}, tmp_path / "eval.json")


def test_markdown_table() -> None:
    table = format_results_table(RESULTS)
    lines = table.strip().splitlines()
    assert lines[0] == "| task | AP | AP50 | AP75 | APs | APm | APl |"
    assert lines[2] == "| bbox | 41.50 | 60.25 | 44.00 | - | 30.00 | 50.00 |"
    assert lines[3] == "| densepose | 35.12 | 70.00 | 30.00 | - | - | 36.00 |"
