"""fnl-eval (--ckpt model.pth | --onnx model.onnx) [--data DIR] [--json OUT]: box AP and DensePose GPS AP.

The same evaluator scores float and int8 PyTorch checkpoints and ONNX Runtime sessions: it takes predictions."""

from __future__ import annotations

import argparse
import sys

from fnl.cli.common import STORED_CONFIG_HELP, add_config_arguments, ensure_dataset, run_cli
from fnl.qat.serialization import load_model_for_inference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnl-eval", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="float or int8 PyTorch checkpoint")
    source.add_argument("--onnx", help="ONNX model written by fnl-export")
    parser.add_argument("--data", help="dataset root (default: the embedded synthetic set)")
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument("--json", help="write the results here (docs/DESIGN.md layout)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unsafe-load", action="store_true", help="allow pickled objects (trusted files only)")
    add_config_arguments(parser, required=False, config_help=f"{STORED_CONFIG_HELP}; the defaults for --onnx")
    args = parser.parse_args(argv)

    def run() -> int:
        import torch

        from fnl.config import load_config
        from fnl.engine.inference import evaluate_predictor
        from fnl.evaluation import format_results_table, write_results_json

        torch.set_num_threads(args.threads)
        overrides = ["DATASETS.ROOT", ensure_dataset(args.data), *args.opts]
        if args.onnx:
            from fnl.export.runtime import OnnxPredictor

            predictor = OnnxPredictor(args.onnx, threads=args.threads)
            contract = predictor.preprocessing
            # The test sizes the file was exported for: the loader then resizes each image once, from the original.
            sizes = [] if contract is None else ["INPUT.MIN_SIZE_TEST", str(contract.min_size_test),
                                                 "INPUT.MAX_SIZE_TEST", str(contract.max_size_test)]
            cfg = load_config(args.config, [*overrides, *sizes])
        else:
            predictor, cfg = load_model_for_inference(args.ckpt, args.config, overrides, args.unsafe_load)
        results, _ = evaluate_predictor(predictor, cfg, args.split)
        print(format_results_table(results))
        if args.json:
            write_results_json(results, args.json)
        return 0

    return run_cli(run, "fnl-eval")


if __name__ == "__main__":
    sys.exit(main())
