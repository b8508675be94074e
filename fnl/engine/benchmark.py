"""One report row: run a predictor over the validation split, score it, time it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fnl.config import CfgNode
from fnl.engine.checkpoint import save_checkpoint
from fnl.engine.inference import Predictor, evaluate_predictor
from fnl.engine.report import ReportRow, file_megabytes, latency_figures

logger = logging.getLogger("fnl")


def measure(name: str, fmt: str, precision: str, method: str, predictor: Predictor, cfg: CfgNode,
            size_mb: float | None, split: str | None = None, dataset_dicts: list[dict] | None = None
            ) -> tuple[ReportRow, dict]:
    """AP of ``predictor`` on ``split`` (or on ``dataset_dicts``, a subset of it) and its per-image latency
    (batch 1, torch threads as set by the caller)."""
    description = f"{name} on {split or cfg.DATASETS.TEST[0]}"
    results, latencies = evaluate_predictor(predictor, cfg, split, dataset_dicts, description, warmup=True)
    row = ReportRow(name=name, format=fmt, precision=precision, method=method, size_mb=size_mb,
                    bbox_AP=_round(results["bbox"]["AP"]), densepose_AP=_round(results["densepose"]["AP"]),
                    **latency_figures(latencies))
    logger.info("%s: box AP %s, DensePose AP %s, p50 %s ms", name, row.bbox_AP, row.densepose_AP,
                row.latency_ms_p50)
    return row, results


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def model_file_megabytes(model: torch.nn.Module, path: Path, cfg: CfgNode) -> float:
    """Save the float model as users ship it (weights + config, no optimizer state) and return its size."""
    save_checkpoint(path, model, cfg)
    return file_megabytes(path)
