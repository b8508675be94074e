"""fnl-demo --output DIR: the whole pipeline on the embedded synthetic set, in one command.

generate data -> the shipped trained model B (zoo:synth_b_512; --ckpt another, or --train a short float run
instead) -> QAT + PTQ -> int8 -> export ONNX and Caffe2 -> verify; PT2E PTQ -> ExecuTorch (XNNPACK) -> verify -> one
report with every row (DIR/report.json, report.md, report.png). Finished stages are reused when their inputs
(config, checkpoint bytes) are unchanged; --force reruns everything."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fnl.cli.common import ensure_dataset, run_cli
from fnl.engine.checkpointer import FINAL_CHECKPOINT, FLOAT32_MODEL, INT8_MODEL
from fnl.engine.report import REPORT_JSON, REPORT_MD

DEFAULT_CKPT = "zoo:synth_b_512"
# --train: a short float schedule that shows training in minutes, at the cost of a model that does little DensePose.
DEMO_TRAIN = ["SOLVER.MAX_ITER", "300", "SOLVER.STEPS", "[240, 280]", "SOLVER.WARMUP_ITERS", "50",
              "SOLVER.CHECKPOINT_PERIOD", "100"]
# A short QAT (40 iterations at the model's training sizes) to keep the demo near its 10-minute budget on 2 cores; the
# README's figures come from 100 iterations (the commands above its results table).
DEMO_QUANTIZE = ["QUANTIZATION.MAX_ITER", "40", "QUANTIZATION.FREEZE_BN_ITER", "0",
                 "QUANTIZATION.FREEZE_OBSERVER_ITER", "32", "QUANTIZATION.CALIBRATION_IMAGES", "16"]
DEMO_CONFIG = "synth_mobile_parsing_rcnn_b"
# --stop-after: the stages in order; "data" ends once the dataset and the float checkpoint are ready.
STAGES = ("data", "quantize", "export")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_stage(directory: Path, key: dict[str, Any], outputs: list[str], run: Callable[[], None],
                 force: bool) -> bool:
    """Run a stage unless ``directory/stage.json`` records the same key and its outputs exist; True if it ran."""
    marker = directory / "stage.json"
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    if not force and marker.is_file() and json.loads(marker.read_text()).get("key") == fingerprint and all(
        (directory / o).exists() for o in outputs
    ):
        print(f"[fnl-demo] {directory.name}: unchanged inputs, reusing {', '.join(outputs)}")
        return False
    directory.mkdir(parents=True, exist_ok=True)
    run()
    from fnl.utils.io import write_json_atomic

    write_json_atomic(marker, {"key": fingerprint, "inputs": key})
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnl-demo", description=__doc__)
    parser.add_argument("--output", default="out/demo", help="output directory (default out/demo)")
    parser.add_argument("--data", help="dataset root (default: the embedded synthetic set)")
    parser.add_argument("--ckpt", default=DEFAULT_CKPT,
                        help=f"float model to quantize and export (default {DEFAULT_CKPT}, the shipped model B)")
    parser.add_argument("--train", action="store_true",
                        help=f"train a float model briefly ({DEMO_CONFIG}) instead of using --ckpt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument("--stop-after", choices=STAGES,
                        help="end after this stage (data: the dataset generated and the float model ready, no "
                             "report; quantize, export: the report of the stages run so far)")
    args = parser.parse_args(argv)
    return run_cli(lambda: run(args), "fnl-demo")


def run(args: argparse.Namespace) -> int:
    import torch

    from fnl.engine.checkpoint import config_from_checkpoint, resolve_checkpoint
    from fnl.utils.logging import setup_logger

    # Read --ckpt's config once, before the dataset and any output: a missing or unreadable file is one line naming
    # it, and the report needs its test size.
    test_size = None if args.train else config_from_checkpoint(resolve_checkpoint(args.ckpt)).INPUT.MIN_SIZE_TEST
    output = Path(args.output)
    setup_logger(output)
    torch.set_num_threads(args.threads)
    data_root = ensure_dataset(args.data)

    checkpoint = train_briefly(output, data_root, args.force) if args.train else resolve_checkpoint(args.ckpt)
    if test_size is None:
        test_size = config_from_checkpoint(checkpoint).INPUT.MIN_SIZE_TEST
    if args.stop_after == "data":
        print(f"[fnl-demo] data: dataset {data_root}, float model {checkpoint}")
        return 0

    quantize_dir = output / "quantize"
    overrides = ["DATASETS.ROOT", data_root, "OUTPUT_DIR", str(quantize_dir), *DEMO_QUANTIZE]

    def quantize_stage() -> None:
        from fnl.qat.report import quantize_and_report

        quantize_and_report(checkpoint, quantize_dir, None, overrides, threads=args.threads)

    cached_stage(quantize_dir, {"checkpoint": file_digest(checkpoint), "overrides": overrides},
                 [INT8_MODEL, REPORT_JSON], quantize_stage, args.force)

    rows = json.loads((quantize_dir / REPORT_JSON).read_text())["rows"]
    if args.stop_after != "quantize":
        rows += export_rows(output, quantize_dir, data_root, args)
    if args.stop_after is None:
        rows += executorch_rows(output, checkpoint, data_root, args)
    from fnl.engine.report import ReportRow, write_report

    source = "a short float run" if args.train else args.ckpt
    write_report(output, [ReportRow(**r) for r in rows], test_size, args.threads,
                 f"fnl-demo: Mobile Parsing R-CNN (B) on the synthetic set, from {source}")
    print((output / REPORT_MD).read_text())
    return 0


def train_briefly(output: Path, data_root: str, force: bool) -> Path:
    """--train: DEMO_CONFIG's float model trained for DEMO_TRAIN's short schedule; its final checkpoint."""
    from fnl.config import load_config

    train_dir = output / "train"
    train_cfg = load_config(DEMO_CONFIG, ["DATASETS.ROOT", data_root, "OUTPUT_DIR", str(train_dir), *DEMO_TRAIN])

    def train_stage() -> None:
        from fnl.engine.train import train

        train(train_cfg, evaluate=False)

    cached_stage(train_dir, {"config": train_cfg.dump()}, [FINAL_CHECKPOINT], train_stage, force)
    return train_dir / FINAL_CHECKPOINT


def export_rows(output: Path, quantize_dir: Path, data_root: str, args: argparse.Namespace) -> list[dict]:
    """The export report's rows beyond PyTorch's: ONNX float32, int8 QAT, ONNX Runtime's own static PTQ, Caffe2
    int8."""
    from fnl.export.pipeline import export_and_report

    export_dir = output / "export"
    key = {"fp32": file_digest(quantize_dir / FLOAT32_MODEL), "int8": file_digest(quantize_dir / INT8_MODEL)}

    def export_stage() -> None:
        export_and_report(quantize_dir, export_dir, data_root, threads=args.threads)

    cached_stage(export_dir, key, [REPORT_JSON], export_stage, args.force)
    return [r for r in json.loads((export_dir / REPORT_JSON).read_text())["rows"] if r["format"] != "pytorch"]


def executorch_rows(output: Path, checkpoint: Path, data_root: str, args: argparse.Namespace) -> list[dict]:
    """The modern mobile path on the same float model: PT2E PTQ (torchao, XNNPACK quantizer) and its ExecuTorch
    export; rows PyTorch int8 (PT2E PTQ) and ExecuTorch int8."""
    from fnl.export.executorch import export_executorch_and_report
    from fnl.qat.pt2e import PT2E_CHECKPOINT
    from fnl.qat.report import quantize_and_report

    quantize_dir = output / "quantize_pt2e"
    # PTQ here: a second QAT run would add minutes to the demo, and the eager rows above already show QAT.
    overrides = ["DATASETS.ROOT", data_root, "OUTPUT_DIR", str(quantize_dir), *DEMO_QUANTIZE,
                 "QUANTIZATION.MODE", "ptq"]

    def quantize_stage() -> None:
        quantize_and_report(checkpoint, quantize_dir, None, overrides, threads=args.threads, engine="pt2e",
                            ptq_baseline=False)

    cached_stage(quantize_dir, {"checkpoint": file_digest(checkpoint), "overrides": overrides},
                 [PT2E_CHECKPOINT, REPORT_JSON], quantize_stage, args.force)
    export_dir = output / "export_executorch"

    def export_stage() -> None:
        export_executorch_and_report(quantize_dir, export_dir, data_root, threads=args.threads, force=True)

    cached_stage(export_dir, {"pt2e": file_digest(quantize_dir / PT2E_CHECKPOINT)}, [REPORT_JSON], export_stage,
                 args.force)
    return [r for r in json.loads((export_dir / REPORT_JSON).read_text())["rows"] if r["precision"] == "int8"]


if __name__ == "__main__":
    sys.exit(main())
