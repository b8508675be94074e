"""Regenerate docs/BENCHMARKS.md in one run: model B at a given input size (every row of the export report), an
input-size sweep (the paper's Table 4) and a people-per-image sweep (Table 5), with machine, threads and versions.

    python benchmarks/run_benchmarks.py --quantize-dir out/demo/quantize [--pt2e-dir out/demo/quantize_pt2e]
        [--threads 2] [--sizes 200 400 512 600] [--profile-images 12]

The ONNX, Caffe2 and ExecuTorch files it exports go to docs/benchmark_export/ (ignored by git).

``--quantize-dir`` is an fnl-quantize output (model_fp32.pth, model_int8.pth); ``--pt2e-dir`` an fnl-quantize
--engine pt2e one, whose ExecuTorch exports (XNNPACK float32 and int8) join the headline table. The people-per-image
sweep has the ONNX and ExecuTorch rows too (the exported graphs and programs on the same subsets).
``--profile-images N`` adds where the time goes (fnl.export.profile): ONNX Runtime's profiler on both ONNX graphs
and torch.profiler on both PyTorch models, by operator and by model part, on the first N validation images.
Figures are measured, never copied.
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
    """One row per model: ``models`` maps (name, format, precision, method) to (predictor, cfg, size_mb)."""
    rows = []
    for (name, fmt, precision, method), (model, cfg, size_mb) in models.items():
        rows.append(measure(name, fmt, precision, method, model, at_size(cfg, data_root, size), size_mb,
                            dataset_dicts=dataset_dicts)[0])
    return rows


def at_size(cfg, data_root: str, size: int):
    cfg = cfg.clone()
    cfg.merge_from_list(["DATASETS.ROOT", data_root, "INPUT.MIN_SIZE_TEST", str(size),
                         "INPUT.MAX_SIZE_TEST", str(max(2 * size, 512))])
    return cfg.freeze()


def profile_section(models: dict, onnx_files: dict[str, Path], data_root: str, size: int, threads: int,
                    count: int) -> tuple[str, list[dict]]:
    """Markdown and JSON of the profiles of the PyTorch models and the ONNX graphs on ``count`` validation images."""
    from fnl.export.pipeline import split_images
    from fnl.export.profile import format_profiles_markdown, profile_onnx, profile_torch

    cfg = at_size(next(iter(models.values()))[1], data_root, size)
    images = split_images(cfg, cfg.DATASETS.TEST[0], count)
    profiles = [profile_torch(model, images, threads, name) for (name, *_), (model, _, _) in models.items()]
    profiles += [profile_onnx(path, [image.numpy() for image in images], threads, name)
                 for name, path in onnx_files.items()]
    text = (f"## Where the time goes ({size} px, {threads} thread(s), {len(images)} validation images)\n\n"
            + format_profiles_markdown(profiles, top=16))
    return text, [p.to_json() for p in profiles]


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
    parser.add_argument("--profile-images", type=int, default=12,
                        help="profile by operator and part on this many validation images; 0 to skip")
    parser.add_argument("--output", default=str(DOCS / "BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_root = ensure_dataset(args.data)
    quantize_dir = Path(args.quantize_dir)
    models = {}
    for file, key in (("model_fp32.pth", ("PyTorch float32", "pytorch", "float32", "float")),
                      ("model_int8.pth", ("PyTorch int8 (QAT)", "pytorch", "int8", "qat"))):
        model, cfg = load_model_for_inference(str(quantize_dir / file), None, ["DATASETS.ROOT", data_root])
        models[key] = (model, cfg, round((quantize_dir / file).stat().st_size / 1e6, 3))

    command = f"--quantize-dir {args.quantize_dir}" + (f" --pt2e-dir {args.pt2e_dir}" if args.pt2e_dir else "")
    sections = [f"# Benchmarks\n\nOne run of `python benchmarks/run_benchmarks.py {command}`"
                f" on {machine_info()['cpu']}, {args.threads} thread(s); versions: {json.dumps(versions())}.\n"]
    headline = rows_at(models, data_root, args.size)
    graphs = {}  # the exported ONNX graphs as predictors: the people sweep times them too
    onnx_files: dict[str, Path] = {}
    if not args.skip_export:
        # The ONNX rows come from this same run: export, verify and time them here.
        from fnl.export.pipeline import FLOAT_ONNX, INT8_ONNX, export_and_report
        from fnl.export.runtime import OnnxPredictor

        export_dir = Path(args.output).parent / "benchmark_export"
        exported = export_and_report(quantize_dir, export_dir, data_root, threads=args.threads, input_size=args.size)
        headline += [ReportRow(**r) for r in exported["rows"] if r["format"] != "pytorch"]
        onnx_files = {"ONNX float32": export_dir / FLOAT_ONNX, "ONNX int8 (QAT)": export_dir / INT8_ONNX}
        kinds = (("float32", "float"), ("int8", "qat"))
        float_cfg = next(iter(models.values()))[1]
        graphs = {(name, "onnx", precision, method): (OnnxPredictor(path, args.threads), float_cfg,
                                                      round(path.stat().st_size / 1e6, 3))
                  for (name, path), (precision, method) in zip(onnx_files.items(), kinds, strict=True)}
    if args.pt2e_dir:
        from fnl.export.executorch import ExecuTorchPredictor, export_executorch_and_report

        executorch_dir = Path(args.output).parent / "benchmark_export" / "executorch"
        exported = export_executorch_and_report(args.pt2e_dir, executorch_dir, data_root, threads=args.threads,
                                                force=True, input_size=args.size)
        executorch_rows = [ReportRow(**r) for r in exported["rows"] if r["format"] == "executorch"]
        headline += executorch_rows
        # The same programs in the people sweep (float32, then each int8 model: the report's order of rows).
        float_cfg = next(iter(models.values()))[1]
        programs = exported["executorch"]
        graphs.update({(row.name, row.format, row.precision, row.method): (
            ExecuTorchPredictor(executorch_dir / name, args.threads), float_cfg, programs[name]["size_mb"])
            for row, name in zip(executorch_rows, programs, strict=True)})
    sections.append(format_report_markdown(headline, args.size, args.threads, f"Model B at {args.size} px"))
    sweep = {}
    for size in args.sizes:
        sweep[size] = rows_at(models, data_root, size)
        sections.append(format_report_markdown(sweep[size], size, args.threads, f"Input size {size} px (Table 4)"))
    cfg = next(iter(models.values()))[1]
    people = {}
    for max_people in range(1, args.max_people + 1):
        subset = people_split(cfg, max_people)
        people[max_people] = rows_at({**models, **graphs}, data_root, args.size, subset)
        sections.append(format_report_markdown(people[max_people], args.size, args.threads,
                                               f"At most {max_people} people per image ({len(subset)} images, "
                                               "Table 5)"))
    profiles: list[dict] = []
    if args.profile_images > 0:
        text, profiles = profile_section(models, onnx_files, data_root, args.size, args.threads, args.profile_images)
        sections.append(text)
    write_text_atomic(args.output, "\n".join(sections))
    write_json_atomic(Path(args.output).with_suffix(".json"), {
        "machine": machine_info(), "versions": versions(), "threads": args.threads, "input_size": args.size,
        "rows": [r.__dict__ for r in headline],
        "size_sweep": {s: [r.__dict__ for r in rows] for s, rows in sweep.items()},
        "people_sweep": {p: [r.__dict__ for r in rows] for p, rows in people.items()},
        "profile": profiles,
    })
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
