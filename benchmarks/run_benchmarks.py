"""Regenerate docs/BENCHMARKS.md in one run: model B at a given input size (every row of the export report), an
input-size sweep (the paper's Table 4) and a people-per-image sweep (Table 5), with machine, threads and versions.

    python benchmarks/run_benchmarks.py --quantize-dir out/demo/quantize [--pt2e-dir out/demo/quantize_pt2e]
        [--threads 2] [--sizes 200 400 512 600]

The ONNX, Caffe2 and ExecuTorch files it exports go to docs/benchmark_export/ (ignored by git).

``--quantize-dir`` is an fnl-quantize output (model_fp32.pth, model_int8.pth); ``--pt2e-dir`` an fnl-quantize
--engine pt2e one, whose ExecuTorch exports join the headline table. Figures are measured, never copied.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fnl.cli.common import ensure_dataset
from fnl.engine.benchmark import measure
from fnl.engine.report import ReportRow, format_report_markdown, machine_info, versions
from fnl.qat.serialization import load_model_for_inference
from fnl.utils.io import write_json_atomic, write_text_atomic

DOCS = Path(__file__).resolve().parents[1] / "docs"


def people_split(cfg, max_people: int) -> list[dict]:
    """Validation images holding at most ``max_people`` annotated persons (the paper's Table 5 filter)."""
    from fnl.data.build import get_dataset_dicts

    dicts = get_dataset_dicts(cfg.DATASETS.ROOT, cfg.DATASETS.TEST)
    return [d for d in dicts if len(d["annotations"]) <= max_people]


def rows_at(models: dict, data_root: str, size: int, dataset_dicts: list[dict] | None = None) -> list[ReportRow]:
    rows = []
    for (name, precision, method), (model, cfg, size_mb) in models.items():
        cfg = cfg.clone()
        cfg.merge_from_list(["DATASETS.ROOT", data_root, "INPUT.MIN_SIZE_TEST", str(size),
                             "INPUT.MAX_SIZE_TEST", str(max(2 * size, 512))])
        rows.append(measure(name, "pytorch", precision, method, model, cfg.freeze(), size_mb,
                            dataset_dicts=dataset_dicts)[0])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quantize-dir", required=True)
    parser.add_argument("--skip-export", action="store_true", help="leave out the ONNX rows (no export in this run)")
    parser.add_argument("--pt2e-dir", help="fnl-quantize --engine pt2e output: add its ExecuTorch rows")
    parser.add_argument("--data", help="dataset root (default: the embedded synthetic set)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="*", default=[200, 400, 512, 600],
                        help="input-size sweep (Table 4); none to skip it")
    parser.add_argument("--max-people", type=int, default=5,
                        help="people-per-image sweep 1..N (Table 5); 0 to skip it")
    parser.add_argument("--output", default=str(DOCS / "BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_root = ensure_dataset(args.data)
    quantize_dir = Path(args.quantize_dir)
    models = {}
    for file, key in (("model_fp32.pth", ("PyTorch float32", "float32", "float")),
                      ("model_int8.pth", ("PyTorch int8 (QAT)", "int8", "qat"))):
        model, cfg = load_model_for_inference(str(quantize_dir / file), None, ["DATASETS.ROOT", data_root])
        models[key] = (model, cfg, round((quantize_dir / file).stat().st_size / 1e6, 3))

    command = f"--quantize-dir {args.quantize_dir}" + (f" --pt2e-dir {args.pt2e_dir}" if args.pt2e_dir else "")
    sections = [f"# Benchmarks\n\nOne run of `python benchmarks/run_benchmarks.py {command}`"
                f" on {machine_info()['cpu']}, {args.threads} thread(s); versions: {json.dumps(versions())}.\n"]
    headline = rows_at(models, data_root, args.size)
    if not args.skip_export:
        # The ONNX rows come from this same run: export, verify and time them here.
        from fnl.export.pipeline import export_and_report

        exported = export_and_report(quantize_dir, Path(args.output).parent / "benchmark_export", data_root,
                                     threads=args.threads, input_size=args.size)
        headline += [ReportRow(**r) for r in exported["rows"] if r["format"] != "pytorch"]
    if args.pt2e_dir:
        from fnl.export.executorch import export_executorch_and_report

        exported = export_executorch_and_report(args.pt2e_dir, Path(args.output).parent / "benchmark_export" /
                                                "executorch", data_root, threads=args.threads, force=True,
                                                input_size=args.size)
        headline += [ReportRow(**r) for r in exported["rows"] if r["format"] == "executorch"]
    sections.append(format_report_markdown(headline, args.size, args.threads, f"Model B at {args.size} px"))
    sweep = {}
    for size in args.sizes:
        sweep[size] = rows_at(models, data_root, size)
        sections.append(format_report_markdown(sweep[size], size, args.threads, f"Input size {size} px (Table 4)"))
    cfg = next(iter(models.values()))[1]
    people = {}
    for max_people in range(1, args.max_people + 1):
        subset = people_split(cfg, max_people)
        people[max_people] = rows_at(models, data_root, args.size, subset)
        sections.append(format_report_markdown(people[max_people], args.size, args.threads,
                                               f"At most {max_people} people per image ({len(subset)} images, "
                                               "Table 5)"))
    write_text_atomic(args.output, "\n".join(sections))
    write_json_atomic(Path(args.output).with_suffix(".json"), {
        "machine": machine_info(), "versions": versions(), "threads": args.threads, "input_size": args.size,
        "rows": [r.__dict__ for r in headline],
        "size_sweep": {s: [r.__dict__ for r in rows] for s, rows in sweep.items()},
        "people_sweep": {p: [r.__dict__ for r in rows] for p, rows in people.items()},
    })
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
