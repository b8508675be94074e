"""fnl.engine.benchmark's block timing: runners take turns block by block, the order reversing every other pass, and
the per-pass speed-up compares the blocks of one pass."""

from __future__ import annotations

from fnl.engine.benchmark import alternating_blocks, block_summary, pass_speedups, speedup_header


def test_alternating_blocks_order_and_counts() -> None:
    calls: list[tuple[str, int]] = []
    blocks: list[str] = []
    runners = {name: (lambda item, name=name: calls.append((name, item))) for name in ("a", "b")}
    times = alternating_blocks(runners, [0, 1, 2], passes=3, after_block=blocks.append)
    # one warm-up call each, then a, b | b, a | a, b blocks of all three inputs
    assert calls[:2] == [("a", 0), ("b", 0)]
    assert [name for name, _ in calls[2::3]] == ["a", "b", "b", "a", "a", "b"]
    assert [item for _, item in calls[2:5]] == [0, 1, 2]
    assert blocks == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {name: len(ms) for name, ms in times.items()} == {"a": 9, "b": 9}
    assert all(ms >= 0 for values in times.values() for ms in values)


def test_pass_speedups_compare_the_blocks_of_each_pass() -> None:
    reference = [10.0, 12.0, 11.0, 20.0, 22.0, 21.0]  # the second pass ran on a slower machine
    other = [5.0, 6.0, 5.5, 10.0, 11.0, 10.5]
    assert pass_speedups(reference, other, block=3) == [2.0, 2.0]


def test_block_summary() -> None:
    assert block_summary([float(v) for v in range(1, 12)]) == {"median_ms": 6.0, "p10_ms": 2.0, "p90_ms": 10.0,
                                                              "runs": 11}


def test_speedup_header_names_the_command_machine_and_timing() -> None:
    machine = {"cpu": "Some CPU", "cpu_count": 2, "isa_flags": ["avx2", "avx512_vnni"]}
    header = speedup_header("python benchmarks/x.py --dir d", [1, 2], 12, 6, "data/set", "512x512", "val",
                            "two sessions", machine, {"torch": "2.14.1"}, note="; extra")
    assert header.startswith("One run of `python benchmarks/x.py --dir d --data data/set --threads 1 2 --images 12 "
                             "--passes 6` on Some CPU (2 cores; ISA flags avx2, avx512_vnni); input 512x512 "
                             "(validation images of val, resized as for evaluation; extra); versions: "
                             "{'torch': '2.14.1'}. Medians over 12 images x 6 passes, the two sessions alternating")
