"""The size / AP / speed report every stage writes: ``report.json`` (docs/DESIGN.md's layout), ``report.md`` and
``report.png`` (box AP, DensePose AP, size and FPS of every row). A figure that was not measured is ``null`` / "-",
never a guess."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fnl.utils.io import atomic_path, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"  # in every reporting run directory
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
    for package in ("fnl", "torch", "torchvision", "timm", "onnx", "onnxruntime", "executorch", "torchao", "numpy"):
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


# The panels of report.png: (ReportRow field, panel title, how a value is printed beside its marker).
PLOT_PANELS = (("bbox_AP", "box AP (%)", "{:.2f}"), ("densepose_AP", "DensePose AP (%)", "{:.2f}"),
               ("size_mb", "size (MB)", "{:.2f}"), ("fps", "FPS (median latency)", "{:.1f}"))
FORMAT_COLOURS = {"pytorch": "tab:blue", "onnx": "tab:orange", "caffe2": "tab:green", "executorch": "tab:purple"}
PRECISION_MARKERS = {"float32": "o", "int8": "s"}


def report_figure(rows: list[ReportRow], title: str) -> Figure:
    """One line per row, its name written once on the left, and one panel per figure (box AP, DensePose AP, size,
    FPS), each with its own scale: rows never overlap however close their values are, and a figure that was not
    measured is an empty place. Colour says the format, the marker the precision; the dashed line is the float32
    reference that the report's ratios use."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot state, no GUI backend
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    reference = _reference(rows)
    positions = np.arange(len(rows))[::-1]  # the first row at the top, as in report.md
    height = 1.6 + 0.38 * max(len(rows), 1)
    fig = Figure(figsize=(3.0 * len(PLOT_PANELS) + 2.5, height))
    axes = fig.subplots(1, len(PLOT_PANELS), sharey=True, squeeze=False)
    for ax, (field, label, number) in zip(axes[0], PLOT_PANELS, strict=True):
        values = [getattr(row, field) for row in rows]
        measured = [v for v in values if v is not None]
        for row, y, value in zip(rows, positions, values, strict=True):
            if value is None:
                ax.annotate("not measured", (0.5, y), xycoords=("axes fraction", "data"), ha="center",
                            va="center", color="0.5", fontsize=7)
                continue
            ax.plot(value, y, linestyle="none", marker=PRECISION_MARKERS[row.precision], markersize=8,
                    color=FORMAT_COLOURS[row.format])
            ax.annotate(number.format(value), (value, y), xytext=(7, 0), textcoords="offset points",
                        va="center", fontsize=7, bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
        if reference is not None and getattr(reference, field) is not None:
            ax.axvline(getattr(reference, field), color="0.4", linestyle="--", linewidth=0.8)
        if measured:
            low, high = min(measured), max(measured)
            pad = max((high - low) * 0.15, abs(high) * 0.02, 0.25)
            ax.set_xlim(low - pad, high + pad * 2.5)  # room on the right for the printed value
        ax.set_title(label, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
        ax.set_ylim(-0.7, len(rows) - 0.3)
    axes[0][0].set_yticks(positions, [row.name for row in rows], fontsize=8)
    legend = [Line2D([], [], linestyle="none", marker="o", color=colour, label=fmt)
              for fmt, colour in FORMAT_COLOURS.items() if any(row.format == fmt for row in rows)]
    legend += [Line2D([], [], linestyle="none", marker=marker, color="0.3", label=precision)
               for precision, marker in PRECISION_MARKERS.items() if any(row.precision == precision for row in rows)]
    if reference is not None:
        legend.append(Line2D([], [], color="0.4", linestyle="--", linewidth=0.8, label=f"{reference.name}"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1))  # 0.4 inch at the bottom for the legend
    return fig


def plot_report(rows: list[ReportRow], path: str | Path, title: str) -> None:
    """``report_figure`` as a PNG at ``path``."""
    with atomic_path(path) as tmp:
        report_figure(rows, title).savefig(tmp, format="png", dpi=120)


def write_report(output_dir: str | Path, rows: list[ReportRow], input_size: int, threads: int,
                 title: str = "fnl report", notes: list[str] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json + report.md + report.png in ``output_dir``; returns the JSON document."""
    output_dir = Path(output_dir)
    document = {"machine": machine_info(), "versions": versions(), "input_size": int(input_size),
                "threads": int(threads), "rows": [asdict(r) for r in rows], **(extra or {})}
    write_json_atomic(output_dir / REPORT_JSON, document)
    write_text_atomic(output_dir / REPORT_MD, format_report_markdown(rows, input_size, threads, title, notes))
    plot_report(rows, output_dir / REPORT_PNG, title)
    return document
