"""fnl-quantize end to end: load -> float row -> quantize (QAT or PTQ) -> int8 rows -> report."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fnl.config import CfgNode
from fnl.engine.benchmark import measure, model_file_megabytes
from fnl.engine.checkpoint import (
    CheckpointError,
    checkpoints_kept,
    load_state,
    prune_periodic_checkpoints,
    read_checkpoint,
    resolve_config,
)
from fnl.engine.checkpointer import CONFIG_FILE, FLOAT32_MODEL, INT8_MODEL, INT8_PTQ_MODEL
from fnl.engine.report import ReportRow, file_megabytes, write_report
from fnl.engine.train import NonFiniteLossError, rewind_to_last_good
from fnl.modeling import build_model
from fnl.qat.numerics import numerics_section
from fnl.qat.patch import format_islands
from fnl.qat.pipeline import QuantizationResult, quantize
from fnl.qat.pt2e import PT2E_CHECKPOINT, PT2E_PTQ_CHECKPOINT, is_pt2e_checkpoint, save_pt2e_checkpoint
from fnl.qat.sensitivity import analyse, with_float_modules
from fnl.qat.serialization import is_int8_checkpoint, save_int8_checkpoint
from fnl.qat.train import QAT_LAST_CHECKPOINT, QAT_PREFIX
from fnl.utils.io import remove_stale_temporaries, write_text_atomic
from fnl.utils.logging import setup_logger
from fnl.utils.modules import torch_threads

logger = logging.getLogger("fnl")


def int8_row(result: QuantizationResult, cfg: CfgNode, path: Path) -> ReportRow:
    """Save the int8 model and measure it. A PT2E model is saved as its prepared state (weights and observer
    ranges, reloaded by ``fnl.qat.pt2e.load_pt2e_checkpoint``), which is not an int8 file: its size is left
    unmeasured here and the deployable int8 file is the ExecuTorch export (``fnl-export --format executorch``)."""
    if result.engine == "pt2e":
        save_pt2e_checkpoint(path, result.prepared, cfg, result.mode)
        row, _ = measure(f"PyTorch int8 (PT2E {result.mode.upper()})", "pytorch", "int8", result.mode,
                         result.int8_model, cfg, None)
        return row
    save_int8_checkpoint(path, result.int8_model, cfg, result.mode)
    row, _ = measure(f"PyTorch int8 ({result.mode.upper()})", "pytorch", "int8", result.mode, result.int8_model, cfg,
                     file_megabytes(path))
    return row


def int8_checkpoint_names(engine: str) -> tuple[str, str]:
    """The files fnl-quantize writes for the int8 model and its PTQ baseline."""
    if engine == "pt2e":
        return PT2E_CHECKPOINT, PT2E_PTQ_CHECKPOINT
    return INT8_MODEL, INT8_PTQ_MODEL


def check_float_checkpoint(path: str | Path, data: dict[str, Any]) -> None:
    """fnl-quantize starts from a float model: an int8 model, a PT2E state or a QAT training state is refused with
    the file to use instead."""
    if is_int8_checkpoint(data) or is_pt2e_checkpoint(data):
        kind = "an int8 model" if is_int8_checkpoint(data) else "a PT2E quantized model state"
    elif any(key.endswith(".zero_point") for key in data["model"]):
        kind = "a QAT (fake-quantized) training state"
    else:
        return
    beside = Path(path).parent / FLOAT32_MODEL
    source = (f"(fnl-quantize left it beside this one: {beside})" if beside.is_file()
              else "(fnl-train's model_final.pth)")
    raise CheckpointError(f"checkpoint {path} is already {kind}: quantize its float checkpoint {source}")


def quantize_and_report(ckpt: str | Path, output: str | Path, config: str | None, overrides: Sequence[str],
                        threads: int = 2, resume: bool = False, allow_unsafe: bool = False,
                        ptq_baseline: bool = True, engine: str = "eager", sensitivity: bool = False,
                        max_ap_drop: float | None = None, sensitivity_groups: Sequence[str] | None = None
                        ) -> dict[str, Any]:
    """Quantize ``ckpt`` and write the float32-vs-int8 report (per-layer SQNR included).

    ``sensitivity``: first measure box / DensePose AP per layer group (``fnl.qat.sensitivity``; ``sensitivity_groups``:
    only these); ``max_ap_drop``: also choose the float groups that keep int8 within that many AP points of float32
    and quantize with them (written to ``config.yaml`` as QUANTIZATION.FLOAT_MODULES)."""
    output = Path(output)
    check_float_checkpoint(ckpt, read_checkpoint(ckpt, allow_unsafe))
    cfg = resolve_config(ckpt, config, overrides, allow_unsafe)
    keep = checkpoints_kept(cfg, "QUANTIZATION.CHECKPOINTS_KEPT")
    float_model = build_model(cfg)
    load_state(float_model, ckpt, allow_unsafe, strict=True)
    float_model.eval()
    # Only now that the inputs are known good: a refused run leaves no empty output directory behind.
    output.mkdir(parents=True, exist_ok=True)
    setup_logger(output)
    for stale in remove_stale_temporaries(output):
        logger.info("removed %s, left by an interrupted write", stale)
    analysis, all_int8_cfg = None, cfg
    if sensitivity or max_ap_drop is not None:
        analysis = analyse(float_model, cfg, output, engine, max_ap_drop, sensitivity_groups)
        if analysis.float_modules is not None:
            cfg = with_float_modules(cfg, analysis.float_modules)
            write_text_atomic(output / CONFIG_FILE, cfg.dump())

    mode = cfg.QUANTIZATION.MODE
    int8_name, ptq_name = int8_checkpoint_names(engine)
    # Quantize before measuring the float model: what the int8 engine cannot run fails in seconds, not minutes.
    try:
        result = quantize(float_model, cfg, mode, output, resume, engine)
    except NonFiniteLossError as exc:
        raise rewind_to_last_good(exc, output, QAT_LAST_CHECKPOINT, file_prefix=QAT_PREFIX) from None
    finally:
        # fnl.qat.train saves every QUANTIZATION.CHECKPOINT_PERIOD iterations and keeps them all.
        prune_periodic_checkpoints(output, keep, prefix=QAT_PREFIX)
    with torch_threads(threads):  # the report's latencies; training and analysis keep the process's threads
        rows = [measure("PyTorch float32", "pytorch", "float32", "float", float_model, cfg,
                        model_file_megabytes(float_model, output / FLOAT32_MODEL, cfg))[0],
                int8_row(result, cfg, output / int8_name)]
        if mode == "qat" and ptq_baseline:
            rows.append(int8_row(quantize(float_model, cfg, "ptq", engine=engine), cfg, output / ptq_name))

        if analysis is not None and analysis.float_modules is not None:
            # What the float islands cost: the same PTQ without them.
            all_int8 = int8_row(quantize(float_model, all_int8_cfg, "ptq", engine=engine), all_int8_cfg,
                                output / f"all_int8_{ptq_name}")
            rows.append(dataclasses.replace(all_int8, name=f"{all_int8.name}, no budget islands"))

    hooks = {stage: len(records) for stage, records in result.stages.hook_audits.items()}
    q = cfg.QUANTIZATION
    backend = (f"Engine PT2E (torchao `prepare{'_qat' if mode == 'qat' else ''}_pt2e` / `convert_pt2e`, ExecuTorch's "
               f"XNNPACK quantizer: int8 {q.WEIGHT_SCALES} symmetric weights, int8 activations; each region below is "
               "one `torch.export` program)" if engine == "pt2e"
               else f"Backend `{q.BACKEND}`, int8 {q.WEIGHT_SCALES} weights, uint8 activations")
    notes = [
        f"{backend}; {mode.upper()}"
        + (f" for {q.MAX_ITER} iterations at LR {q.BASE_LR} (BN frozen at {q.FREEZE_BN_ITER}, observers at "
           f"{q.FREEZE_OBSERVER_ITER})" if mode == "qat" else "")
        + f"; {q.CALIBRATION_IMAGES} calibration images.",
        "Float islands (everything else runs on int8 tensors):\n\n" + format_islands(result.stages.islands),
        "User forward hooks after each stage (the BiFPN's expansion taps): "
        + ", ".join(f"{stage} {count}" for stage, count in hooks.items())
        + ("; `torch.export` traces the hooks present at capture into the backbone program, where the features they "
           "collect are graph edges." if engine == "pt2e" else "."),
    ]
    numerics_note, numerics = numerics_section(float_model, result.int8_model, cfg, engine, result.stages.islands,
                                               output)
    notes.append(numerics_note)
    extra = {"float_islands": [asdict(i) for i in result.stages.islands], "hooks": hooks, "engine": engine,
             "numerics": numerics}
    if analysis is not None:
        notes += analysis.notes
        extra.update(analysis.extra)
    return write_report(output, rows, cfg.INPUT.MIN_SIZE_TEST, threads, "fnl-quantize: float32 vs int8", notes,
                        extra=extra)
