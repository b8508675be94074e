"""fnl-train --config FILE [--resume] [KEY VALUE ...]: train a float model (torchrun for several processes)."""

from __future__ import annotations

import argparse
import sys

from fnl.cli.common import add_config_arguments, config_from_args, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnl-train", description=__doc__)
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last_checkpoint")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    parser.add_argument("--output", help="shorthand for OUTPUT_DIR")
    add_config_arguments(parser)
    args = parser.parse_args(argv)

    def run() -> int:
        from fnl.engine.train import train
        from fnl.utils.io import check_output_dir

        cfg = config_from_args(args, ["OUTPUT_DIR", args.output] if args.output else [])
        check_output_dir(cfg.OUTPUT_DIR)
        result = train(cfg, resume=args.resume, evaluate=not args.no_eval)
        if result["metrics"]:
            from fnl.evaluation import format_results_table

            print(format_results_table(result["metrics"]))
        print(f"final checkpoint: {result['final_checkpoint']}")
        return 0

    return run_cli(run, "fnl-train")


if __name__ == "__main__":
    sys.exit(main())
