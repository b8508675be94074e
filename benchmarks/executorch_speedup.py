"""ExecuTorch int8 (PT2E, XNNPACK) against ExecuTorch float32 (XNNPACK), in one run: latency at each thread count, per
region (the programs) and in the float glue between them, program sizes, AP. Writes docs/EXECUTORCH_SPEEDUP.md and
.json (machine, versions, threads, input size).

    python benchmarks/executorch_speedup.py --pt2e-dir out/b_pt2e --data data/synth2000 [--threads 1 2]
        [--images 12] [--passes 6] [--skip-ap]

``--pt2e-dir`` is an ``fnl-quantize --engine pt2e`` output: its model_fp32.pth, model_pt2e.pth (and, when QAT ran
with its PTQ baseline, model_pt2e_ptq.pth) are lowered here with ``fnl.export.executorch.to_executorch`` (to
docs/benchmark_export/executorch_speedup/, ignored by git), so the programs timed are the ones this version of fnl
writes. Timing: ``fnl.engine.benchmark.alternating_blocks`` over ``--images`` validation images for ``--passes``
passes per thread count (XNNPACK's threads; the glue runs on torch at the same count); medians. The speed-up per
pass compares the float32 and int8 blocks of one pass. Run it alone on the machine: ratios from one run are what it
is for, absolute times drift.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from fnl.cli.common import ensure_dataset
from fnl.engine.benchmark import (
    alternating_blocks,
    ap_figures,
    block_summary,
    measure,
    pass_speedups,
    speedup_header,
)
from fnl.engine.report import machine_info, versions
from fnl.export.executorch import (
    PROGRAM_PARTS,
    ExecuTorchExport,
    ExecuTorchPredictor,
    ExecuTorchRegion,
    executorch_row_name,
    to_executorch,
)
from fnl.export.pipeline import split_images
from fnl.qat.pt2e import PT2E_CHECKPOINT, PT2E_PTQ_CHECKPOINT, load_pt2e_checkpoint
from fnl.qat.serialization import load_model_for_inference
from fnl.utils.io import write_json_atomic, write_text_atomic
from fnl.utils.modules import torch_threads

ROOT = Path(__file__).resolve().parents[1]
FLOAT32 = "float32"


def export_programs(pt2e_dir: Path, export_dir: Path, data_root: str) -> tuple[dict[str, ExecuTorchExport], Any]:
    """float32 and every PT2E int8 model of ``pt2e_dir`` lowered to ``export_dir``/<float32|qat|ptq>; returns the
    exports by row name, and the config."""
    float_model, cfg = load_model_for_inference(str(pt2e_dir / "model_fp32.pth"), None, ["DATASETS.ROOT", data_root])
    exports = {executorch_row_name(FLOAT32, "float"): to_executorch(float_model, cfg, export_dir / FLOAT32,
                                                                    force=True)}
    for file in (PT2E_CHECKPOINT, PT2E_PTQ_CHECKPOINT):
        if (pt2e_dir / file).is_file():
            int8_model, _, mode = load_pt2e_checkpoint(pt2e_dir / file)
            exports[executorch_row_name("int8", mode)] = to_executorch(int8_model, cfg, export_dir / mode, force=True)
    return exports, cfg


def regions_of(predictor: ExecuTorchPredictor) -> list[ExecuTorchRegion]:
    return [module for module in predictor.model.modules() if isinstance(module, ExecuTorchRegion)]


def timed_run(predictors: dict[str, ExecuTorchPredictor], images: list[torch.Tensor], passes: int
              ) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Per-image milliseconds of each predictor (``alternating_blocks``) and, per predictor, milliseconds per image
    in each region's program over the timed blocks."""
    region_ms: dict[str, dict[str, float]] = {name: {} for name in predictors}
    warm = set()

    def after_block(name: str) -> None:
        for region in regions_of(predictors[name]):
            if name in warm:
                region_ms[name][region.region] = region_ms[name].get(region.region, 0.0) + 1000 * region.seconds
            region.seconds = 0.0
        warm.add(name)

    runners = {name: (lambda image, predictor=predictor: predictor([{"image": image}]))
               for name, predictor in predictors.items()}
    with torch.no_grad():
        times = alternating_blocks(runners, images, passes, after_block)
    runs = len(images) * passes
    return times, {name: {region: round(ms / runs, 2) for region, ms in regions.items()}
                   for name, regions in region_ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pt2e-dir", required=True)
    parser.add_argument("--data", help="dataset root (default: the embedded synthetic set)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=12, help="validation images timed per pass")
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--skip-ap", action="store_true", help="leave out AP on the validation split")
    parser.add_argument("--export-dir", default=str(ROOT / "docs" / "benchmark_export" / "executorch_speedup"))
    parser.add_argument("--output", default=str(ROOT / "docs" / "EXECUTORCH_SPEEDUP.md"))
    args = parser.parse_args()
    data_root = ensure_dataset(args.data)
    with torch_threads(1):
        exports, cfg = export_programs(Path(args.pt2e_dir), Path(args.export_dir), data_root)
    images = split_images(cfg, cfg.DATASETS.TEST[0], args.images)
    size = f"{images[0].shape[1]}x{images[0].shape[2]}"
    reference = executorch_row_name(FLOAT32, "float")

    latency, regions = {}, {}
    for threads in args.threads:
        with torch_threads(threads):
            predictors = {name: ExecuTorchPredictor(export.directory, threads) for name, export in exports.items()}
            times, regions[threads] = timed_run(predictors, images, args.passes)
        latency[threads] = {name: {**block_summary(v), "pass_speedups": pass_speedups(times[reference], v, len(images))}
                            for name, v in times.items()}
    sizes = {name: round(export.size_mb, 3) for name, export in exports.items()}
    parts = {name: export.bytes_by_part() for name, export in exports.items()}
    accuracy = {}
    if not args.skip_ap:
        with torch_threads(1):
            for name, export in exports.items():
                predictor = ExecuTorchPredictor(export.directory, 1)
                row, _ = measure(name, "executorch", predictor.precision, "", predictor, cfg, sizes[name])
                accuracy[name] = ap_figures(row)

    machine = machine_info()
    lines = ["# ExecuTorch int8 against ExecuTorch float32 (XNNPACK)\n",
             speedup_header(f"python benchmarks/executorch_speedup.py --pt2e-dir {args.pt2e_dir}", args.threads,
                            args.images, args.passes, args.data, size, cfg.DATASETS.TEST[0], "predictors", machine,
                            versions(), note=f"; the backbone program is {size} too"),
             "| threads | row | p50 | speed-up | speed-up per pass: median (min - max) | p10 / p90 |",
             "|---:|---|---:|---:|---|---|"]
    for threads, rows in latency.items():
        base = rows[reference]["median_ms"]
        for name, f in rows.items():
            per_pass = f["pass_speedups"]
            speedup = "" if name == reference else f"**{base / f['median_ms']:.2f}x**"
            spread = "" if name == reference else (f"{statistics.median(per_pass):.2f}x ({min(per_pass):.2f} - "
                                                   f"{max(per_pass):.2f})")
            lines.append(f"| {threads} | {name} | {f['median_ms']:.1f} ms | {speedup} | {spread} | "
                         f"{f['p10_ms']:.1f} / {f['p90_ms']:.1f} |")
    for threads, by_row in regions.items():
        names = list(next(iter(by_row.values())))
        lines += ["", f"Where the time goes at {threads} thread(s), ms per image (the glue: the median image minus "
                      "the mean time in the programs; RoIAlign, NMS, proposal decoding on torch):", "",
                  "| row | " + " | ".join(names) + " | glue |", "|---|" + "---:|" * (len(names) + 1)]
        for name, by_region in by_row.items():
            glue = latency[threads][name]["median_ms"] - sum(by_region.values())
            lines.append(f"| {name} | " + " | ".join(f"{by_region[r]:.1f}" for r in names) + f" | {glue:.1f} |")
    lines += ["", "Programs (.pte, all regions): " + ", ".join(f"{name} {mb:.2f} MB" for name, mb in sizes.items())
              + ". Where the bytes go (MB; in brackets, as a share of the float32 programs' total; "
              "`fnl.export.executorch.program_bytes`): tensors are the weights and biases (int8 weights, int32 "
              "biases in int8 programs), channel scales XNNPACK's float32 scale per output channel of every "
              "per-channel weight and bias, the XNNPACK graph its serialized graphs, the rest the program, the "
              "tensors' names and padding:", "",
              "| row | tensors | channel scales | XNNPACK graph | rest | total |", "|---|---:|---:|---:|---:|---:|"]
    whole = sum(parts[reference].values())
    for name, by_part in parts.items():
        cells = [*(by_part[part] for part in PROGRAM_PARTS), sum(by_part.values())]
        lines.append(f"| {name} | " + " | ".join(f"{b / 1e6:.3f} ({b / whole:.3f})" for b in cells) + " |")
    if accuracy:
        lines += ["", "| row | box AP | DensePose AP |", "|---|---:|---:|"]
        lines += [f"| {name} | {a['bbox_AP']:.2f} | {a['densepose_AP']:.2f} |" for name, a in accuracy.items()]
    write_text_atomic(args.output, "\n".join(lines) + "\n")
    write_json_atomic(Path(args.output).with_suffix(".json"), {
        "machine": machine, "versions": versions(), "input_size": size, "images": args.images,
        "passes": args.passes, "latency": latency, "regions_ms": regions, "size_mb": sizes, "size_bytes_by_part": parts,
        "accuracy": accuracy})
    print("\n".join(lines[2:]))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
