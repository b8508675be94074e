"""fnl-gate --float A --int8 B [--max-drop 1.0] [--data DIR]: fail (exit 1) when int8 box AP or DensePose AP falls
more than --max-drop points below float32. A and B are fnl-eval JSON files, or checkpoints to evaluate on --data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fnl.cli.common import ensure_dataset, run_cli
from fnl.qat.serialization import load_model_for_inference
from fnl.utils.errors import InvalidArgumentError


def results_of(source: str, data: str | None, threads: int) -> dict:
    path = Path(source)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"results file not found: {path}")
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"{path} is not JSON: {exc}") from exc
        if not isinstance(results, dict):
            raise InvalidArgumentError(f"{path} is not fnl-eval results: it holds a JSON {type(results).__name__}, "
                                       "not an object with 'bbox' and 'densepose'")
        return results
    import torch

    from fnl.engine.inference import evaluate_model

    torch.set_num_threads(threads)
    model, cfg = load_model_for_inference(source, None, ["DATASETS.ROOT", ensure_dataset(data)])
    return evaluate_model(model, cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnl-gate", description=__doc__)
    parser.add_argument("--float", dest="float_source", required=True, help="float32 results JSON or checkpoint")
    parser.add_argument("--int8", dest="int8_source", required=True, help="int8 results JSON or checkpoint")
    parser.add_argument("--max-drop", type=float, default=1.0, help="allowed AP drop in points (default 1.0)")
    parser.add_argument("--data", help="dataset root for checkpoints (default: the embedded synthetic set)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    def run() -> int:
        from fnl.engine.gate import check_ap_drop

        result = check_ap_drop(results_of(args.float_source, args.data, args.threads),
                               results_of(args.int8_source, args.data, args.threads), args.max_drop)
        print(result.table())
        return 0 if result.passed else 1

    return run_cli(run, "fnl-gate")


if __name__ == "__main__":
    sys.exit(main())
