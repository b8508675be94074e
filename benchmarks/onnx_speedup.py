"""ONNX Runtime int8 against ONNX Runtime float32, in one run: latency at each thread count, file sizes, AP, and where
the time goes. Writes docs/ONNX_SPEEDUP.md and .json (machine, versions, threads, input size).

    python benchmarks/onnx_speedup.py --quantize-dir out/b_int8 --data data/synth2000 [--threads 1 2]
        [--images 12] [--passes 10] [--profile-images 12] [--skip-ap]

``--quantize-dir`` is an fnl-quantize output: its model_fp32.pth and model_int8.pth are exported here with
``fnl.export.onnx.to_onnx`` (to docs/benchmark_export/speedup/, ignored by git), so the graphs timed are the ones this
version of fnl writes. Timing: for each thread count, each session runs every one of ``--images`` validation images
in turn, the sessions alternating block by block for ``--passes`` passes; the table gives medians. Blocks, not image
by image: ONNX Runtime's worker threads spin for a while after a run, and a second session's run started then
competes with them (at 2 threads on 2 cores the float32 graph timed interleaved image by image ran 87.5 ms, alone
61.6). Run it alone on the machine: ratios from one run are what it is for, absolute times drift. Even alone, a
shared 2-core machine's speed at 2 threads moves between passes (float32 block medians of 62 to 74 ms in one run), so
the table also gives the speed-up of each pass, float32 and int8 timed next to each other, and its spread.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from fnl.cli.common import ensure_dataset
from fnl.engine.benchmark import (
    alternating_blocks,
    ap_figures,
    block_summary,
    measure,
    pass_speedups,
    speedup_header,
)
from fnl.engine.report import file_megabytes, machine_info, versions
from fnl.export.onnx import to_onnx
from fnl.export.pipeline import split_images
from fnl.export.profile import format_profiles_markdown, profile_onnx
from fnl.export.runtime import INPUT_NAME, OnnxPredictor
from fnl.qat.serialization import load_model_for_inference
from fnl.utils.io import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = {"float32": "model_fp32.pth", "int8": "model_int8.pth"}


def block_latencies(paths: dict[str, Path], images: list[np.ndarray], threads: int, passes: int
                    ) -> dict[str, list[float]]:
    """Milliseconds per image for each graph, sessions alternating in blocks of all ``images`` (see the docstring)."""
    predictors = {name: OnnxPredictor(path, threads) for name, path in paths.items()}
    feeds = {name: [{INPUT_NAME: np.ascontiguousarray(image[None]).astype(predictor.input_dtype)}
                    for image in images] for name, predictor in predictors.items()}
    runners = {name: (lambda index, session=predictor.session, feed=feeds[name]: session.run(None, feed[index]))
               for name, predictor in predictors.items()}
    return alternating_blocks(runners, range(len(images)), passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize-dir", required=True)
    parser.add_argument("--data", help="dataset root (default: the embedded synthetic set)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=12, help="validation images timed per pass")
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--profile-images", type=int, default=12, help="0 to skip the profile")
    parser.add_argument("--skip-ap", action="store_true", help="leave out AP on the validation split")
    parser.add_argument("--export-dir", default=str(ROOT / "docs" / "benchmark_export" / "speedup"))
    parser.add_argument("--output", default=str(ROOT / "docs" / "ONNX_SPEEDUP.md"))
    args = parser.parse_args()
    data_root = ensure_dataset(args.data)
    quantize_dir, export_dir = Path(args.quantize_dir), Path(args.export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)

    paths, cfg = {}, None
    for name, file in GRAPHS.items():
        model, cfg = load_model_for_inference(str(quantize_dir / file), None, ["DATASETS.ROOT", data_root])
        sample = split_images(cfg, cfg.DATASETS.TEST[0], 1)[0]
        paths[name] = to_onnx(model, export_dir / f"{name}.onnx", sample)
    images = [image.numpy() for image in split_images(cfg, cfg.DATASETS.TEST[0], args.images)]
    size = f"{images[0].shape[1]}x{images[0].shape[2]}"

    latency = {}
    for threads in args.threads:
        times = block_latencies(paths, images, threads, args.passes)
        latency[threads] = {name: block_summary(v) for name, v in times.items()}
        latency[threads]["pass_speedups"] = pass_speedups(times["float32"], times["int8"], len(images))
    sizes = {name: file_megabytes(path) for name, path in paths.items()}
    accuracy = {}
    if not args.skip_ap:
        for name, path in paths.items():
            row, _ = measure(f"ONNX {name}", "onnx", name, "", OnnxPredictor(path, 1), cfg, sizes[name])
            accuracy[name] = ap_figures(row)

    machine = machine_info()
    lines = ["# ONNX Runtime int8 against ONNX Runtime float32\n",
             speedup_header(f"python benchmarks/onnx_speedup.py --quantize-dir {args.quantize_dir}", args.threads,
                            args.images, args.passes, args.data, size, cfg.DATASETS.TEST[0], "two sessions", machine,
                            versions()),
             "| threads | float32 p50 | int8 p50 | int8 speed-up | speed-up per pass: median (min - max) | "
             "float32 p10 / p90 | int8 p10 / p90 |",
             "|---:|---:|---:|---:|---|---|---|"]
    for threads, figures in latency.items():
        f, q, per_pass = figures["float32"], figures["int8"], figures["pass_speedups"]
        lines.append(f"| {threads} | {f['median_ms']:.1f} ms | {q['median_ms']:.1f} ms | "
                     f"**{f['median_ms'] / q['median_ms']:.2f}x** | {statistics.median(per_pass):.2f}x "
                     f"({min(per_pass):.2f} - {max(per_pass):.2f}) | {f['p10_ms']:.1f} / {f['p90_ms']:.1f} | "
                     f"{q['p10_ms']:.1f} / {q['p90_ms']:.1f} |")
    lines += ["", f"File size: float32 {sizes['float32']:.2f} MB, int8 {sizes['int8']:.2f} MB "
                  f"({sizes['int8'] / sizes['float32']:.4f} of float32)."]
    if accuracy:
        lines += ["", "| graph | box AP | DensePose AP |", "|---|---:|---:|"]
        lines += [f"| ONNX {name} | {a['bbox_AP']:.2f} | {a['densepose_AP']:.2f} |" for name, a in accuracy.items()]
    profiles = []
    if args.profile_images > 0:
        threads = args.threads[0]
        profiles = [profile_onnx(path, images[: args.profile_images], threads, f"ONNX {name}")
                    for name, path in paths.items()]
        lines += ["", f"## Where the time goes ({size}, {threads} thread(s), {args.profile_images} images)", "",
                  format_profiles_markdown(profiles, top=16)]
    write_text_atomic(args.output, "\n".join(lines) + "\n")
    write_json_atomic(Path(args.output).with_suffix(".json"), {
        "machine": machine, "versions": versions(), "input_size": size, "images": args.images,
        "passes": args.passes, "latency": latency, "size_mb": sizes, "accuracy": accuracy,
        "profile": [p.to_json() for p in profiles]})
    print("\n".join(lines[2:2 + 2 + len(latency)]))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
