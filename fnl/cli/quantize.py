"""fnl-quantize --ckpt model.pth [--config F] [--data DIR] [--iters N] [--engine eager|pt2e]
[--backend x86|fbgemm|qnnpack] [--mode qat|ptq] --output DIR: patch -> fuse -> QAT (or PTQ) -> int8, and a
float32-vs-int8 report.

--engine eager (default): torch.ao eager mode on the --backend's kernels; writes model_int8.pth (+ model_int8_ptq.pth).
--engine pt2e: torchao PT2E with ExecuTorch's XNNPACK quantizer over the same int8 regions, the same QAT loop and
evaluator; writes model_pt2e.pth (+ model_pt2e_ptq.pth), the prepared state that `fnl-export executorch`
lowers to XNNPACK .pte programs. Needs the executorch extra (pip install 'fnl[executorch]')."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fnl.cli.common import STORED_CONFIG_HELP, add_config_arguments, ensure_dataset, run_cli
from fnl.engine.backends import BACKENDS
from fnl.qat.pipeline import ENGINES
from fnl.qat.quantize import MODES
from fnl.utils.errors import InvalidArgumentError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fnl-quantize", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="float checkpoint (fnl-train / detectron2 format)")
    parser.add_argument("--data", help="dataset root (default: the embedded synthetic set)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--iters", type=int, help="QAT iterations (QUANTIZATION.MAX_ITER)")
    parser.add_argument("--engine", choices=ENGINES, default="eager",
                        help="torch.ao eager mode (default) or torchao PT2E for ExecuTorch / XNNPACK")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="QUANTIZATION.BACKEND of the eager engine (default fbgemm)")
    parser.add_argument("--mode", choices=MODES, default="qat", help="QAT (default) or calibration only")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the latency figures (default 2)")
    parser.add_argument("--sensitivity", action="store_true",
                        help="first measure box / DensePose AP per layer group int8 alone and all int8 but it "
                             "(PTQ, resumable in --output/sensitivity; docs/SENSITIVITY.md)")
    parser.add_argument("--max-ap-drop", type=float, metavar="POINTS",
                        help="keep float the fewest layer groups that bring int8 within POINTS of float32 (box and "
                             "DensePose AP), quantize with them, export ONNX and time it (implies --sensitivity)")
    parser.add_argument("--sensitivity-groups", metavar="G1,G2,...",
                        type=lambda text: [name for name in text.split(",") if name],
                        help="measure only these layer groups, comma-separated (stem, stage0.., neck, rpn_head, "
                             "box_head, densepose_head, predictor; default all)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted QAT run in --output")
    parser.add_argument("--force", action="store_true", help="overwrite an existing int8 model in --output")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="load a checkpoint that holds arbitrary pickled objects (only for trusted files)")
    add_config_arguments(parser, required=False, config_help=STORED_CONFIG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), "fnl-quantize")


def run(args: argparse.Namespace) -> int:
    from fnl.engine.checkpoint import read_checkpoint
    from fnl.qat.report import check_float_checkpoint, int8_checkpoint_names, quantize_and_report
    from fnl.utils.io import check_output_dir

    # Conflicting options first: they need no file to be refused.
    if args.engine == "pt2e" and args.backend:
        raise InvalidArgumentError(f"--backend {args.backend} selects a torch.ao eager engine; --engine pt2e always "
                                   "quantizes for XNNPACK (ExecuTorch's quantizer and kernels): drop --backend")
    if args.max_ap_drop is not None and not args.max_ap_drop >= 0:
        raise InvalidArgumentError(f"--max-ap-drop is a number of AP points, 0 or more; got {args.max_ap_drop}")
    check_output_dir(args.output)
    # Before the dataset, which may be generated on first use: a wrong checkpoint must fail in seconds.
    check_float_checkpoint(args.ckpt, read_checkpoint(args.ckpt, args.unsafe_load))
    if args.engine == "pt2e":
        from fnl.qat.pt2e import require_pt2e

        require_pt2e()
    output = Path(args.output)
    int8_path = output / int8_checkpoint_names(args.engine)[0]
    if int8_path.exists() and not (args.force or args.resume):
        raise FileExistsError(f"{int8_path} already exists; pass --force to overwrite it or --resume")
    data_root = ensure_dataset(args.data)
    overrides = ["DATASETS.ROOT", data_root, "OUTPUT_DIR", str(output)]
    if args.iters is not None:
        overrides += ["QUANTIZATION.MAX_ITER", str(args.iters)]
    if args.backend:
        overrides += ["QUANTIZATION.BACKEND", args.backend]
    overrides += ["QUANTIZATION.MODE", args.mode, *args.opts]
    document = quantize_and_report(args.ckpt, output, args.config, overrides, threads=args.threads,
                                   resume=args.resume, allow_unsafe=args.unsafe_load, engine=args.engine,
                                   sensitivity=args.sensitivity or bool(args.sensitivity_groups),
                                   max_ap_drop=args.max_ap_drop, sensitivity_groups=args.sensitivity_groups)
    print((output / "report.md").read_text())
    print(f"int8 model: {int8_path}\nreport: {output / 'report.json'}")
    if args.max_ap_drop is not None and args.engine == "eager":
        from fnl.export.pipeline import export_and_report

        # The budget's latency in ONNX Runtime: the mixed model exported, verified and timed as any int8 model.
        export_and_report(output, output / "onnx", data_root, threads=args.threads, calibration_images=4,
                          caffe2=False)
        print((output / "onnx" / "report.md").read_text())
    return 0 if document else 1


if __name__ == "__main__":
    sys.exit(main())
