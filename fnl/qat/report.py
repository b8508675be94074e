"""fnl-quantize end to end: load -> float row -> quantize (QAT or PTQ) -> int8 rows -> report."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fnl.config import CfgNode, load_config
from fnl.engine.benchmark import measure, model_file_megabytes
from fnl.engine.checkpoint import config_from_checkpoint, load_state
from fnl.export.report import ReportRow, file_megabytes, write_report
from fnl.qat.patch import format_islands
from fnl.qat.pipeline import QuantizationResult, quantize
from fnl.qat.serialization import save_int8_checkpoint
from fnl.utils.logging import setup_logger

logger = logging.getLogger("fnl")


def resolve_config(ckpt: str | Path, config: str | None, overrides: Sequence[str], allow_unsafe: bool) -> CfgNode:
    """The user's config file if given, else the one stored in the checkpoint; then the overrides."""
    if config:
        return load_config(config, overrides)
    cfg = config_from_checkpoint(ckpt, allow_unsafe)
    cfg.merge_from_list(overrides)
    return cfg.freeze()


def int8_row(result: QuantizationResult, cfg: CfgNode, path: Path) -> ReportRow:
    save_int8_checkpoint(path, result.int8_model, cfg, result.mode)
    row, _ = measure(f"PyTorch int8 ({result.mode.upper()})", "pytorch", "int8", result.mode, result.int8_model, cfg,
                     file_megabytes(path))
    return row


def quantize_and_report(ckpt: str | Path, output: str | Path, config: str | None, overrides: Sequence[str],
                        threads: int = 2, resume: bool = False, allow_unsafe: bool = False,
                        ptq_baseline: bool = True) -> dict[str, Any]:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    setup_logger(output)
    torch.set_num_threads(threads)
    cfg = resolve_config(ckpt, config, overrides, allow_unsafe)
    from fnl.modeling import build_model

    float_model = build_model(cfg)
    load_state(float_model, ckpt, allow_unsafe, strict=True)
    float_model.eval()
    rows = [measure("PyTorch float32", "pytorch", "float32", "float", float_model, cfg,
                    model_file_megabytes(float_model, output / "model_fp32.pth", cfg))[0]]

    mode = cfg.QUANTIZATION.MODE
    result = quantize(float_model, cfg, mode, output, resume)
    rows.append(int8_row(result, cfg, output / "model_int8.pth"))
    if mode == "qat" and ptq_baseline:
        rows.append(int8_row(quantize(float_model, cfg, "ptq"), cfg, output / "model_int8_ptq.pth"))

    hooks = {stage: len(records) for stage, records in result.stages.hook_audits.items()}
    q = cfg.QUANTIZATION
    notes = [
        f"Backend `{q.BACKEND}`; {mode.upper()}"
        + (f" for {q.MAX_ITER} iterations at LR {q.BASE_LR} (BN frozen at {q.FREEZE_BN_ITER}, observers at "
           f"{q.FREEZE_OBSERVER_ITER})" if mode == "qat" else "")
        + f"; {q.CALIBRATION_IMAGES} calibration images.",
        "Float islands (everything else runs on int8 tensors):\n\n" + format_islands(result.stages.islands),
        "User forward hooks after each stage (the BiFPN's expansion taps): "
        + ", ".join(f"{stage} {count}" for stage, count in hooks.items()) + ".",
    ]
    return write_report(output, rows, cfg.INPUT.MIN_SIZE_TEST, threads, "fnl-quantize: float32 vs int8", notes,
                        extra={"float_islands": [asdict(i) for i in result.stages.islands], "hooks": hooks})
