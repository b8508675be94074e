"""One report row: run a predictor over the validation split, score it, time it."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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


def alternating_blocks(runners: dict[str, Callable[[Any], Any]], inputs: Sequence[Any], passes: int,
                       after_block: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Milliseconds of each runner on each input, the runners taking turns block by block (all ``inputs`` in a
    block; the order reversed every other pass) for ``passes`` passes, after one warm-up call each.

    Blocks, not input by input: a runtime's worker threads spin for a while after a run, and another runtime's run
    started then competes with them. ``after_block(name)`` is called after each block (a caller's per-block
    counters)."""
    for name, run in runners.items():
        run(inputs[0])
        if after_block:
            after_block(name)
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for index in range(passes):
        for name in order if index % 2 == 0 else order[::-1]:
            for item in inputs:
                start = time.perf_counter()
                runners[name](item)
                times[name].append(1000 * (time.perf_counter() - start))
            if after_block:
                after_block(name)
    return times


def block_summary(milliseconds: list[float]) -> dict[str, float]:
    """Median, p10 and p90 (ms) and the number of runs of one runner's ``alternating_blocks`` times."""
    return {"median_ms": round(statistics.median(milliseconds), 2),
            "p10_ms": round(float(np.percentile(milliseconds, 10)), 2),
            "p90_ms": round(float(np.percentile(milliseconds, 90)), 2), "runs": len(milliseconds)}


def pass_speedups(reference_ms: list[float], other_ms: list[float], block: int) -> list[float]:
    """reference median / other median of each pass of ``alternating_blocks`` (``block`` inputs per pass): two blocks
    timed next to each other, so a machine that speeds up or slows down between passes (a shared one does, at 2
    threads by up to 20%) moves both."""
    return [round(statistics.median(reference_ms[k:k + block]) / statistics.median(other_ms[k:k + block]), 3)
            for k in range(0, len(reference_ms), block)]


def speedup_header(command: str, threads: list[int], images: int, passes: int, data: str | None, input_size: str,
                   split: str, runners: str, machine: dict[str, Any], versions: dict[str, str], note: str = "") -> str:
    """The opening sentence of a speed-up benchmark's Markdown: the command that ran (``command`` plus the timing
    options), machine, input, versions and how ``runners`` were timed (``alternating_blocks``)."""
    command += ((f" --data {data}" if data else "")
                + f" --threads {' '.join(map(str, threads))} --images {images} --passes {passes}")
    return (f"One run of `{command}` on {machine['cpu']} ({machine['cpu_count']} cores; ISA flags "
            f"{', '.join(machine['isa_flags'] or [])}); input {input_size} (validation images of {split}, resized as "
            f"for evaluation{note}); versions: {versions}. Medians over {images} images x {passes} passes, the "
            f"{runners} alternating block by block; the speed-up per pass compares the two blocks of one pass.\n")


def ap_figures(row: ReportRow) -> dict[str, float | None]:
    return {"bbox_AP": row.bbox_AP, "densepose_AP": row.densepose_AP}
