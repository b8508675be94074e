"""The "where int8 hurts" section of docs/BENCHMARKS.md: the sensitivity ranking of a model and, per AP budget, the
float islands `fnl-quantize --max-ap-drop X` chose with their size and speed against the all-int8 model.

    fnl-quantize --ckpt zoo:synth_b_512 --data data/synth2000 --output out/b_budget05 --mode ptq --max-ap-drop 0.5
    fnl-quantize ... --output out/b_budget02 --mode ptq --max-ap-drop 0.2   # reuses copied sensitivity/ results
    python benchmarks/budget_figures.py out/b_budget05 out/b_budget02 [--output docs/BENCHMARKS.md]

Each directory is one budget run (its report.json, and onnx/report.json from the export of the mix). The section is
put between two markers in the output file, replacing an earlier one, so that run_benchmarks.py's sections stay.
Figures are read from the runs' reports, never typed in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fnl.utils.io import write_text_atomic

DOCS = Path(__file__).resolve().parents[1] / "docs"
BEGIN, END = "<!-- budget-figures: benchmarks/budget_figures.py -->", "<!-- /budget-figures -->"
METRICS = (("bbox_AP", "box AP"), ("densepose_AP", "DensePose AP"))


def read_run(directory: Path) -> dict[str, Any]:
    report = json.loads((directory / "report.json").read_text())
    if "budget" not in report:
        raise SystemExit(f"{directory}/report.json has no AP budget: run fnl-quantize --max-ap-drop X into it")
    onnx = directory / "onnx" / "report.json"
    report["onnx"] = json.loads(onnx.read_text()) if onnx.exists() else None
    return report


def row(report: dict[str, Any], name_start: str, fmt: str = "pytorch", precision: str = "int8") -> dict | None:
    rows = report["rows"] if fmt == "pytorch" else (report["onnx"] or {}).get("rows", [])
    return next((r for r in rows if r["name"].startswith(name_start) and r["format"] == fmt
                 and r["precision"] == precision), None)


def sensitivity_table(sensitivity: dict[str, Any]) -> list[str]:
    float_scores, int8_scores = sensitivity["float"]["scores"], sensitivity["int8"]["scores"]
    lines = ["| rank | group | " + " | ".join(f"{label}: only this int8 | {label}: all int8 but this"
                                              for _, label in METRICS) + " |",
             "|---:|---|" + "---:|" * (2 * len(METRICS))]
    for rank, group in enumerate(sensitivity["ranking"], start=1):
        cells = " | ".join(f"{sensitivity['only'][group]['scores'][m]:.2f} | "
                           f"{sensitivity['all_but'][group]['scores'][m]:.2f}" for m, _ in METRICS)
        lines.append(f"| {rank} | {group} | {cells} |")
    lines += ["", "Float32: " + ", ".join(f"{label} {float_scores[m]:.2f}" for m, label in METRICS) + "; all int8: "
              + ", ".join(f"{label} {int8_scores[m]:.2f}" for m, label in METRICS) + "."]
    return lines


def budget_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | float groups | size (MB) | box AP | DensePose AP | PyTorch p50 (ms) | ONNX Runtime p50 (ms) | "
             "ONNX Runtime float32 p50 (ms) | verified |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    first = runs[0]
    float32, all_int8 = row(first, "PyTorch float32", precision="float32"), row(first, "PyTorch int8 (PTQ), no")
    for label, groups, r in (("float32", "all", float32), ("all int8 (PTQ)", "none", all_int8)):
        lines.append(f"| {label} | {groups} | {r['size_mb']:.2f} | {r['bbox_AP']:.2f} | {r['densepose_AP']:.2f} | "
                     f"{r['latency_ms_p50']:.1f} | | | |")
    for run in runs:
        budget, mix = run["budget"], row(run, "PyTorch int8 (PTQ)")
        onnx_int8, onnx_float = row(run, "ONNX int8", "onnx"), row(run, "ONNX float32", "onnx", "float32")
        checks = (run["onnx"] or {}).get("verification", {})
        verified = next((c["passed"] for name, c in checks.items() if "int8" in name), None)
        within = "" if budget["within_budget"] else " (NOT within)"
        lines.append(
            f"| budget {budget['max_ap_drop']} AP points{within} | {', '.join(budget['float_groups']) or 'none'} | "
            f"{mix['size_mb']:.2f} | {mix['bbox_AP']:.2f} | {mix['densepose_AP']:.2f} | {mix['latency_ms_p50']:.1f} | "
            + (f"{onnx_int8['latency_ms_p50']:.1f} | {onnx_float['latency_ms_p50']:.1f} | "
               f"{'yes' if verified else 'no' if verified is False else '-'} |" if onnx_int8 and onnx_float
               else "- | - | - |"))
    return lines


def section(runs: list[dict[str, Any]], directories: list[Path]) -> str:
    first = runs[0]
    machine = first["machine"]
    lines = [BEGIN, "## Where int8 hurts: sensitivity and AP budgets (`fnl-quantize --sensitivity --max-ap-drop`)", "",
             f"`python benchmarks/budget_figures.py {' '.join(str(d) for d in directories)}`, from the reports of "
             f"those `fnl-quantize --mode ptq --max-ap-drop X` runs; {machine['cpu']}, {first['threads']} thread(s), "
             f"{first['input_size']} px, versions {json.dumps(first['versions'])}. AP on the validation images the "
             "runs evaluated (`TEST.MAX_IMAGES`, 0: all); every configuration is a PTQ calibrated on "
             "`QUANTIZATION.CALIBRATION_IMAGES` training images. What the method is: docs/SENSITIVITY.md.", "",
             "### Sensitivity by layer group, most sensitive first", "", *sensitivity_table(first["sensitivity"]), "",
             "### AP budgets: the chosen float islands against the all-int8 model", "", *budget_table(runs), "",
             "Float modules each budget wrote to its output config (`QUANTIZATION.FLOAT_MODULES`):", ""]
    for run in runs:
        modules = ", ".join(f"`{m}`" for m in run["budget"]["float_modules"]) or "none"
        lines.append(f"- budget {run['budget']['max_ap_drop']}: {modules}")
    return "\n".join(lines + ["", END])


def replace_section(document: str, new_section: str) -> str:
    if BEGIN in document and END in document:
        head, rest = document.split(BEGIN, 1)
        return head + new_section + rest.split(END, 1)[1]
    return document.rstrip("\n") + "\n\n" + new_section + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+", type=Path, help="fnl-quantize --max-ap-drop output directories")
    parser.add_argument("--output", type=Path, default=DOCS / "BENCHMARKS.md")
    args = parser.parse_args()
    runs = [read_run(d) for d in args.directories]
    document = args.output.read_text() if args.output.exists() else ""
    write_text_atomic(args.output, replace_section(document, section(runs, args.directories)))
    print(section(runs, args.directories))


if __name__ == "__main__":
    main()
