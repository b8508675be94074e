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
