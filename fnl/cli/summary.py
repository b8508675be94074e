"""fnl-summary --config FILE [--input-size N] [--json]: parameters by part, fp32 size, GFLOPs."""

from __future__ import annotations

import argparse
import json
import sys

from fnl.cli.common import add_config_arguments, config_from_args, run_cli
from fnl.utils.errors import InvalidArgumentError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnl-summary", description=__doc__)
    parser.add_argument("--input-size", type=int, default=512, help="square input side for GFLOPs (default 512)")
    parser.add_argument("--json", action="store_true", help="print docs/DESIGN.md's machine-readable JSON")
    add_config_arguments(parser)
    args = parser.parse_args(argv)

    def run() -> int:
        from fnl.engine.summary import format_summary, summarize
        from fnl.modeling import build_model

        if args.input_size < 32:
            raise InvalidArgumentError(f"--input-size must be at least 32, got {args.input_size}")
        summary = summarize(build_model(config_from_args(args, ["MODEL.DEVICE", "cpu"])), args.input_size)
        print(json.dumps(summary) if args.json else format_summary(args.config, summary))
        return 0

    return run_cli(run, "fnl-summary")


if __name__ == "__main__":
    sys.exit(main())
