"""The float32-vs-int8 AP gate users put in CI: int8 box AP and DensePose AP may fall at most ``max_drop`` points
below float32."""

from __future__ import annotations

from dataclasses import dataclass

METRICS = (("bbox", "AP"), ("densepose", "AP"))


@dataclass
class GateResult:
    passed: bool
    rows: list[tuple[str, float | None, float | None, float | None]]  # metric, float, int8, drop
    max_drop: float

    def table(self) -> str:
        lines = ["| metric | float32 | int8 | drop | allowed |", "|---|---:|---:|---:|---:|"]
        for metric, fp32, int8, drop in self.rows:
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(f"| {metric} | {fmt(fp32)} | {fmt(int8)} | {fmt(drop)} | {self.max_drop:.2f} |")
        return "\n".join(lines) + f"\n\n{'PASS' if self.passed else 'FAIL'}"


def check_ap_drop(float_results: dict, int8_results: dict, max_drop: float) -> GateResult:
    """Results in fnl-eval's JSON layout (AP in percent). A metric missing on either side fails the gate."""
    rows = []
    passed = True
    for task, key in METRICS:
        fp32 = (float_results.get(task) or {}).get(key)
        int8 = (int8_results.get(task) or {}).get(key)
        drop = None if fp32 is None or int8 is None else fp32 - int8
        passed &= drop is not None and drop <= max_drop
        rows.append((f"{task} {key}", fp32, int8, drop))
    return GateResult(passed, rows, max_drop)
