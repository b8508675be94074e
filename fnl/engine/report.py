"""The size / AP / speed report every stage writes: ``report.json`` (DESIGN.md's layout), ``report.md`` and
``report.png`` (AP against FPS). A figure that was not measured is ``null`` / "-", never a guess."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fnl.utils.io import atomic_path, write_json_atomic, write_text_atomic

FORMATS = ("pytorch", "onnx", "caffe2", "executorch")
PRECISIONS = ("float32", "int8")


@dataclass
class ReportRow:
    name: str
    format: str
    precision: str
    method: str  # "float" | "qat" | "ptq" | "ort-static-ptq" | ...
    size_mb: float | None = None
    bbox_AP: float | None = None
    densepose_AP: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p90: float | None = None
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"report row '{self.name}': format must be one of {FORMATS}, got '{self.format}'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"report row '{self.name}': precision must be one of {PRECISIONS}, got '{self.precision}'")


def latency_figures(latencies_s: list[float]) -> dict[str, float | None]:
    """Median and p90 in milliseconds and the FPS the median gives."""
    if not latencies_s:
        return {"latency_ms_p50": None, "latency_ms_p90": None, "fps": None}
    ms = np.asarray(latencies_s) * 1000.0
    p50 = float(np.percentile(ms, 50))
    return {"latency_ms_p50": round(p50, 2), "latency_ms_p90": round(float(np.percentile(ms, 90)), 2),
            "fps": round(1000.0 / p50, 3)}


def file_megabytes(path: str | Path) -> float:
    return round(Path(path).stat().st_size / 1e6, 3)


CPUINFO = Path("/proc/cpuinfo")
# The CPU features that decide which int8 kernels fbgemm / oneDNN, ONNX Runtime (MLAS) and XNNPACK run: int8 figures
# (speed, and which detections sit on a rounding tie) from machines with the same CPU name but other flags (a VM
# that hides AVX-512 or AMX) are not comparable, so reports record them beside the name.
KERNEL_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_isa_flags(cpuinfo: str) -> list[str] | None:
    """Which of ``KERNEL_ISA_FLAGS`` the ``flags`` line of ``cpuinfo`` (the text of Linux's /proc/cpuinfo) lists, in
    that order; None when it has no ``flags`` line (not an x86 CPU): unknown, which an empty list would misstate."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            present = set(value.split())
            return [flag for flag in KERNEL_ISA_FLAGS if flag in present]
    return None


def machine_info(cpuinfo: str | Path = CPUINFO) -> dict[str, Any]:
    """The machine a report was measured on: platform, CPU name and count, Python, and ``isa_flags`` (``cpu_isa_flags``
    of ``cpuinfo``; None where that file cannot be read, as on macOS and Windows)."""
    cpu = platform.processor() or ""
    isa_flags = None
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = None
    if text is not None:
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        isa_flags = cpu_isa_flags(text)
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "isa_flags": isa_flags}


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {}
    for package in ("fnl", "torch", "torchvision", "timm", "onnx", "onnxruntime", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _reference(rows: list[ReportRow]) -> ReportRow | None:
    return next((r for r in rows if r.precision == "float32" and r.format == "pytorch"), None) or next(
        (r for r in rows if r.precision == "float32"), None)


def format_report_markdown(rows: list[ReportRow], input_size: int, threads: int, title: str,
                           notes: list[str] | None = None) -> str:
    machine = machine_info()
    reference = _reference(rows)
    lines = [
        f"# {title}", "",
        f"Machine: {machine['cpu']} ({machine['cpu_count']} cores; kernel-deciding ISA flags: "
        f"{', '.join(machine['isa_flags'] or []) or 'unknown'}), {machine['platform']}; "
        f"{threads} thread(s); input: shortest side {input_size} px. "
        "Latency is per image (median and 90th percentile over the validation images), model call only.", "",
        "| model | format | precision | method | size (MB) | size ratio | box AP | DensePose AP | p50 (ms) | "
        "p90 (ms) | FPS | speed-up |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        size_ratio = speed_up = "-"
        if reference is not None and reference.size_mb and row.size_mb:
            size_ratio = f"{reference.size_mb / row.size_mb:.2f}x"
        if reference is not None and reference.latency_ms_p50 and row.latency_ms_p50:
            speed_up = f"{reference.latency_ms_p50 / row.latency_ms_p50:.2f}x"
        lines.append(
            f"| {row.name} | {row.format} | {row.precision} | {row.method} | {_fmt(row.size_mb)} | {size_ratio} | "
            f"{_fmt(row.bbox_AP)} | {_fmt(row.densepose_AP)} | {_fmt(row.latency_ms_p50, 1)} | "
            f"{_fmt(row.latency_ms_p90, 1)} | {_fmt(row.fps)} | {speed_up} |"
        )
    if reference is not None:
        lines += ["", f"Ratios are against `{reference.name}`."]
    for note in notes or []:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot_report(rows: list[ReportRow], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row.fps is None:
            continue
        for metric, marker in (("densepose_AP", "o"), ("bbox_AP", "s")):
            value = getattr(row, metric)
            if value is not None:
                ax.scatter(row.fps, value, marker=marker, s=60)
                ax.annotate(f"{row.name} ({metric.split('_')[0]})", (row.fps, value), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("FPS (median latency)")
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(output_dir: str | Path, rows: list[ReportRow], input_size: int, threads: int,
                 title: str = "fnl report", notes: list[str] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json + report.md + report.png in ``output_dir``; returns the JSON document."""
    output_dir = Path(output_dir)
    document = {"machine": machine_info(), "versions": versions(), "input_size": int(input_size),
                "threads": int(threads), "rows": [asdict(r) for r in rows], **(extra or {})}
    write_json_atomic(output_dir / "report.json", document)
    write_text_atomic(output_dir / "report.md", format_report_markdown(rows, input_size, threads, title, notes))
    plot_report(rows, output_dir / "report.png", title)
    return document
