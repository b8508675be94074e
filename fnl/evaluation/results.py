"""The evaluator's results as users and CI read them: a Markdown table and ``fnl-eval --json`` (docs/DESIGN.md,
"Machine-readable outputs"): ``{"bbox": {"AP": .., "AP50": .., "AP75": .., "APs": .., "APm": .., "APl": ..},
"densepose": {"AP": .., "AP50": .., "AP75": .., "APm": .., "APl": ..}}``, AP in percent (0-100); a figure that
could not be measured (no ground truth of that size) is ``null``, never a guess."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from fnl.utils.io import write_json_atomic

BBOX_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# DensePose AP leaves out small persons, as the official evaluator does.
DENSEPOSE_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APm", "APl")
TASK_METRICS: dict[str, tuple[str, ...]] = {"bbox": BBOX_METRICS, "densepose": DENSEPOSE_METRICS}

Results = dict[str, dict[str, float | None]]


def _metric_or_none(value: object, where: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number or None, got {value!r}") from None
    return None if math.isnan(number) else number


def normalized_results(results: Mapping[str, Mapping[str, object]]) -> Results:
    """The results' tasks and metrics in docs/DESIGN.md's layout, NaN turned into None; extra tasks and metrics are
    kept after the standard ones."""
    normalized: Results = {}
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"results[{task!r}] must be a mapping of metric name to value, got {metrics!r}")
        names = [name for name in TASK_METRICS.get(task, ()) if name in metrics]
        names += [name for name in metrics if name not in names]
        normalized[task] = {name: _metric_or_none(metrics[name], f"results[{task!r}][{name!r}]") for name in names}
    return normalized


def format_results_table(results: Mapping[str, Mapping[str, object]]) -> str:
    """Markdown table: one row per task, one column per metric, two decimals; '-' where a task has no value."""
    normalized = normalized_results(results)
    columns: list[str] = []
    for metrics in normalized.values():
        columns += [name for name in metrics if name not in columns]
    lines = ["| task | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for task, metrics in normalized.items():
        cells = [f"{metrics[name]:.2f}" if metrics.get(name) is not None else "-" for name in columns]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results_json(results: Mapping[str, Mapping[str, object]], path: str | Path) -> None:
    """Write the results atomically as JSON in docs/DESIGN.md's layout (NaN -> null)."""
    write_json_atomic(path, normalized_results(results))
