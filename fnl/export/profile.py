"""Where inference time goes: per-operator and per-part profiles of an ONNX graph (ONNX Runtime's own profiler)
and of a PyTorch model (``torch.profiler`` for operators, forward hooks for parts), float32 beside int8.

Parts are those of the model: ``backbone+neck``, ``rpn`` (head convs, proposal decoding, NMS), ``box head``
(pooler, head, predictor), ``densepose head`` (pooler, head, predictor) and ``glue`` (normalization, padding,
detection post-processing, and whatever a runtime does between parts). In an ONNX graph a node's part is the
tag its name starts with: ``fnl.export.graph_compaction`` names every node by the module scope torch.onnx traced it
in (``PART_TAGS``), and ONNX Runtime keeps that name as the prefix of the kernels it fuses; the nodes its layout
transformer creates are named after the value they write (``<value>_nchwc``), whose writer in the file has the tag.

Figures are milliseconds per image (kernel time summed over images, divided by their number): medians are for
latency; a profile says how the time of a typical image divides.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fnl.export.runtime import INPUT_NAME, OnnxPredictor, open_session
from fnl.utils.modules import torch_threads

PARTS = ("backbone+neck", "rpn", "box head", "densepose head", "glue")
# Node-name tag (see graph_compaction.part_tag) -> part.
PART_TAGS = {"bb": "backbone+neck", "rpn": "rpn", "box": "box head", "dp": "densepose head", "g": "glue"}
# Module attributes of GeneralizedRCNN / its ROI heads -> part, for PyTorch models.
_TORCH_PART_MODULES = {
    "backbone": "backbone+neck",
    "proposal_generator": "rpn",
    "roi_heads.box_pooler": "box head", "roi_heads.box_head": "box head", "roi_heads.box_predictor": "box head",
    "roi_heads.decoder": "densepose head", "roi_heads.densepose_pooler": "densepose head",
    "roi_heads.densepose_head": "densepose head", "roi_heads.densepose_predictor": "densepose head",
}


@dataclass
class Profile:
    """One model's profile: ``by_operator`` and ``by_part`` in ms per image, ``rois`` the mean number of
    detections per image (the DensePose head runs once per detection)."""

    name: str
    runtime: str  # "onnxruntime" or "pytorch"
    images: int
    threads: int
    wall_ms: float  # mean end-to-end time per image while profiling (profiling adds a little)
    by_operator: dict[str, float] = field(default_factory=dict)
    by_part: dict[str, float] = field(default_factory=dict)
    rois: float = 0.0

    @property
    def total_ms(self) -> float:
        return sum(self.by_operator.values())

    def to_json(self) -> dict:
        return {**asdict(self), "total_ms": round(self.total_ms, 3)}


def onnx_part(node_name: str, value_parts: dict[str, str] | None = None) -> str:
    """The model part of an ONNX Runtime node: its name's tag, else the part of the value it is named after
    (``value_parts``: ``onnx_value_parts``), else ``glue`` (ONNX Runtime's own layout reorders among them)."""
    tagged = re.match(r"([a-z]+)\.", node_name)
    if tagged:
        return PART_TAGS.get(tagged.group(1), "glue")
    return (value_parts or {}).get(node_name.split("_", 1)[0], "glue")


def onnx_value_parts(path: str | Path) -> dict[str, str]:
    """The part of the node that writes each value of the ONNX file ``path``."""
    import onnx

    graph = onnx.load(str(path)).graph
    return {output: onnx_part(node.name) for node in graph.node for output in node.output}


def profile_onnx(path: str | Path, images: Sequence[np.ndarray], threads: int = 1, name: str | None = None
                 ) -> Profile:
    """Run ``images`` ((3, H, W) each, the graph's input size) once each through ``path`` in ONNX Runtime with its
    profiler on, after one unprofiled warm-up run, and sum kernel time by operator type and by part."""
    if not images:
        raise ValueError("profile_onnx needs at least one image")
    predictor = OnnxPredictor(path, threads)  # checks the file and its interface
    with tempfile.TemporaryDirectory(prefix="fnl_profile_") as directory:
        session = open_session(path, threads, profile_prefix=Path(directory) / "ort")
        inputs = [{INPUT_NAME: np.ascontiguousarray(image[None]).astype(predictor.input_dtype, copy=False)}
                  for image in images]
        session.run(predictor.output_names[:1], inputs[0])  # warm-up: profiled, dropped below by its run index
        detections = 0
        start = time.perf_counter()
        for feed in inputs:
            detections += len(session.run(predictor.output_names[:1], feed)[0])
        wall = time.perf_counter() - start
        events = json.loads(Path(session.end_profiling()).read_text())
    by_operator, by_part = _sum_onnx_events(events, onnx_value_parts(path), skip_runs=1)
    count = len(images)
    return Profile(name or Path(path).name, "onnxruntime", count, threads, 1000 * wall / count,
                   _per_image(by_operator, count), _per_image(by_part, count), detections / count)


def _sum_onnx_events(events: list[dict], value_parts: dict[str, str], skip_runs: int
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Kernel durations (us) by op type and part, from the node events after the first ``skip_runs`` model runs."""
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    after = run_starts[skip_runs] if len(run_starts) > skip_runs else 0
    by_operator: dict[str, float] = defaultdict(float)
    by_part: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time") or event["ts"] < after:
            continue
        node = event["name"][: -len("_kernel_time")]
        by_operator[event["args"]["op_name"]] += event["dur"]
        by_part[onnx_part(node, value_parts)] += event["dur"]
    return by_operator, by_part


def _per_image(totals_us: dict[str, float], images: int) -> dict[str, float]:
    return {key: round(value / 1000 / images, 3) for key, value in sorted(totals_us.items(), key=lambda kv: -kv[1])}


def profile_torch(model, images: Sequence, threads: int = 1, name: str = "pytorch") -> Profile:
    """Profile a GeneralizedRCNN (float32 or eager int8) on ``images`` ((3, H, W) uint8 tensors at the test size):
    operator self-time from ``torch.profiler``, part time from forward hooks on the model's parts (``glue`` is what
    the parts do not cover). One unprofiled warm-up run first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not images:
        raise ValueError("profile_torch needs at least one image")
    part_seconds: dict[str, float] = defaultdict(float)
    with torch_threads(threads), torch.no_grad(), _part_timers(model, part_seconds):
        model([{"image": images[0]}])
        part_seconds.clear()
        detections = 0
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for image in images:
                detections += len(model([{"image": image}])[0]["boxes"])
        wall = time.perf_counter() - start
    by_operator = {event.key: event.self_cpu_time_total for event in profiler.key_averages()}
    by_operator = {key: value for key, value in by_operator.items() if value > 0}
    by_part = {part: seconds * 1e6 for part, seconds in part_seconds.items()}
    # The profiler's own ranges are not operators; what the parts leave is glue.
    by_part["glue"] = max(wall * 1e6 - sum(by_part.values()), 0.0)
    count = len(images)
    return Profile(name, "pytorch", count, threads, 1000 * wall / count, _per_image(by_operator, count),
                   _per_image(by_part, count), detections / count)


@contextmanager
def _part_timers(model, seconds: dict[str, float]) -> Iterator[None]:
    """Forward hooks (on these module instances, removed after) adding each part's wall time to ``seconds``."""
    handles = []
    started: dict[str, float] = {}
    try:
        for attribute, part in _TORCH_PART_MODULES.items():
            try:
                module = model.get_submodule(attribute)
            except AttributeError:
                continue  # e.g. no decoder, or no DensePose head

            def before(_module, _args, key: str = attribute) -> None:
                started[key] = time.perf_counter()

            def after(_module, _args, _output, key: str = attribute, part: str = part) -> None:
                seconds[part] += time.perf_counter() - started.pop(key)

            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        yield
    finally:
        for handle in handles:
            handle.remove()


def format_profiles_markdown(profiles: Sequence[Profile], top: int = 12) -> str:
    """Two tables, profiles side by side: ms per image by operator type (the ``top`` largest of any profile, the
    rest summed) and by part, with each profile's total and detections per image."""
    if not profiles:
        return ""
    header = "| | " + " | ".join(f"{p.name} ({p.runtime}, {p.threads} thr)" for p in profiles) + " |"
    rule = "|---|" + "---:|" * len(profiles)
    ranked: dict[str, float] = defaultdict(float)
    for p in profiles:
        for operator, ms in p.by_operator.items():
            ranked[operator] = max(ranked[operator], ms)
    shown = sorted(ranked, key=lambda op: -ranked[op])[:top]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = ["By operator type (ms per image, kernel time summed):", "", header.replace("| |", "| operator |"), rule]
    for operator in shown:
        lines.append(f"| {operator} | " + " | ".join(cell(p.by_operator.get(operator)) for p in profiles) + " |")
    lines.append("| (other operators) | " + " | ".join(
        cell(sum(ms for op, ms in p.by_operator.items() if op not in shown)) for p in profiles) + " |")
    lines.append("| **total** | " + " | ".join(f"**{p.total_ms:.1f}**" for p in profiles) + " |")
    lines += ["", "By model part (ms per image):", "", header.replace("| |", "| part |"), rule]
    for part in PARTS:
        lines.append(f"| {part} | " + " | ".join(cell(p.by_part.get(part, 0.0)) for p in profiles) + " |")
    lines.append("| wall time while profiling | " + " | ".join(f"{p.wall_ms:.1f}" for p in profiles) + " |")
    lines.append("| detections (DensePose RoIs) per image | " + " | ".join(f"{p.rois:.1f}" for p in profiles)
                 + " |")
    lines.append("| DensePose head per RoI | " + " | ".join(
        cell(p.by_part.get("densepose head", 0.0) / p.rois if p.rois else None) for p in profiles) + " |")
    return "\n".join(lines) + "\n"

