"""The machine a report records: CPU name and the ISA flags that decide which int8 kernels the runtimes pick."""

from __future__ import annotations

import json
from pathlib import Path

from fnl.engine.report import KERNEL_ISA_FLAGS, ReportRow, cpu_isa_flags, machine_info, write_report

# Two processors of a /proc/cpuinfo, abridged: an Intel Xeon of the Sapphire Rapids class (AMX), as the issue's
# failing machine, listing its flags in the kernel's order, not ours.
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8 avx_vnni \
avx512_vnni avx512vl

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8 avx_vnni \
avx512_vnni avx512vl
"""
# A CPU with AVX2 only, whose flag line holds longer names that merely start like ours.
AVX2_ONLY = "model name\t: Some CPU\nflags\t\t: sse4_2 avx avx2 avx512fx amx_tiles\n"
# An ARM machine: /proc/cpuinfo has "Features", no "flags" line and no "model name".
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


def test_isa_flags_are_the_kernel_deciding_ones_in_a_fixed_order():
    assert cpu_isa_flags(SAPPHIRE_RAPIDS) == list(KERNEL_ISA_FLAGS)
    assert cpu_isa_flags(AVX2_ONLY) == ["avx2"]  # whole flag names only: avx512fx is not avx512f
    assert cpu_isa_flags("flags\t\t: fpu sse2\n") == []  # known: none of them
    assert cpu_isa_flags(ARM) is None  # unknown, not "none"


def test_machine_info_reads_the_cpu_name_and_flags_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(SAPPHIRE_RAPIDS)
    machine = machine_info(path)
    assert machine["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert machine["isa_flags"] == ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"]
    path.write_text(ARM)
    assert machine_info(path)["isa_flags"] is None
    missing = machine_info(tmp_path / "absent")  # macOS, Windows: no such file
    assert missing["isa_flags"] is None and isinstance(missing["cpu"], str)


def test_this_machines_report_records_its_isa_flags(tmp_path):
    document = write_report(tmp_path, [ReportRow("PyTorch float32", "pytorch", "float32", "float")], 64, 1)
    machine = json.loads((tmp_path / "report.json").read_text())["machine"]
    assert machine == document["machine"] and {"cpu", "cpu_count", "isa_flags"} <= set(machine)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        assert machine["isa_flags"] == cpu_isa_flags(cpuinfo.read_text())
    else:
        assert machine["isa_flags"] is None


def test_the_markdown_report_names_the_isa_flags_beside_the_cpu():
    from fnl.engine.report import format_report_markdown, machine_info

    flags = machine_info()["isa_flags"]
    text = format_report_markdown([], 512, 1, "t")
    assert f"kernel-deciding ISA flags: {', '.join(flags) if flags else 'unknown'}" in text


# Rows as the demo's report had them when its PNG stacked labels: equal and zero APs, a row without latency, one
# without size, a long name.
PLOTTED_ROWS = [
    ReportRow("PyTorch float32", "pytorch", "float32", "float", 14.2, 39.3, 0.0, 136.4, 144.0, 7.3),
    ReportRow("PyTorch int8 (QAT)", "pytorch", "int8", "qat", 3.8, 39.3, 0.0, 70.7, 74.6, 14.1),
    ReportRow("Caffe2 int8 (QAT)", "caffe2", "int8", "qat", 3.5, 40.3, 0.0),
    ReportRow("ExecuTorch int8 (PT2E PTQ, XNNPACK) with a long name", "executorch", "int8", "ptq", None, 40.4, 0.0,
              89.3, 95.0, 11.2),
]


def test_report_figure_draws_one_marker_per_measured_figure_on_its_rows_line():
    from fnl.engine.report import PLOT_PANELS, report_figure

    figure = report_figure(PLOTTED_ROWS, "t")
    axes = figure.axes[:len(PLOT_PANELS)]
    assert [ax.get_title() for ax in axes] == [label for _, label, _ in PLOT_PANELS]
    # The first row at the top: row k on line len - 1 - k, named once, on the left.
    lines = {len(PLOTTED_ROWS) - 1 - k: row for k, row in enumerate(PLOTTED_ROWS)}
    assert {tick.get_text(): tick.get_position()[1] for tick in axes[0].get_yticklabels()} == {
        row.name: float(y) for y, row in lines.items()}
    for ax, (field, _, _) in zip(axes, PLOT_PANELS, strict=True):
        markers = [line for line in ax.get_lines() if line.get_marker() not in ("None", None, "")]
        drawn = sorted((float(m.get_ydata()[0]), float(m.get_xdata()[0])) for m in markers)
        expected = sorted((float(y), getattr(row, field)) for y, row in lines.items()
                          if getattr(row, field) is not None)
        assert drawn == expected, field
        low, high = ax.get_xlim()
        assert all(low < x < high for _, x in drawn), field  # every marker inside its panel
        unmeasured = [text for text in ax.texts if text.get_text() == "not measured"]
        assert len(unmeasured) == sum(getattr(row, field) is None for row in PLOTTED_ROWS), field


def test_write_report_writes_a_png(tmp_path):
    write_report(tmp_path, PLOTTED_ROWS, 512, 1, "t")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
