"""Per-layer numerics: the SQNR (dB) between the float model's and the int8 model's activations, layer by layer.

Matching by name through fusion. The float reference is the *patched* float model (``patch_for_quantization`` with
the same options the engine used): its stubs are identities until convert, so it computes the float function, and
its module names are the int8 model's names before fusion. Fusion puts the fused module in its first member's slot
and ``nn.Identity`` (or a kept activation) in the others, which the parent still calls in order: the int8 model's
module at a group's *last* member name therefore returns the group's output, as the float module of that name does.
Each int8 conv / linear is compared there and reported under its own (the fused module's) name.

The heads see the same boxes. The int8 model proposes and detects other boxes than the float one, so its RoI heads
would pool other regions (of another count). Every RoI pooler of the int8 run is given the boxes its float
counterpart pooled, so the heads' activations differ by quantization alone.

Engines. Eager: every int8 conv / linear and every region boundary (``FloatIslandRecord``). PT2E: each region is one
captured program, so its output is compared with the float model's region output (the last module of the region);
layers inside the programs are not compared (torchao's numeric debugger needs the handles added before capture).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fnl.config import CfgNode
from fnl.data import build_train_loader
from fnl.engine.backends import eager_backend
from fnl.hooks import find_fusion_groups
from fnl.modeling.poolers import ROIPooler
from fnl.qat.patch import FloatIslandRecord, active_regions, patch_for_quantization
from fnl.qat.quantize import WEIGHTED_INT8
from fnl.utils.io import atomic_path


@dataclass
class LayerNumerics:
    """One compared activation: ``name`` is the int8 module (a fused conv is named by its conv), ``site`` the module
    whose output was compared in both models, ``kind`` "layer" or a boundary kind of ``FloatIslandRecord``."""

    name: str
    site: str
    kind: str
    sqnr_db: float | None  # None: the activation had no elements on these images (e.g. no detection reached a head)
    elements: int


def patch_like_engine(float_model: nn.Module, cfg: CfgNode) -> nn.Module:
    """The float model patched as ``fnl.qat.prepare`` patches it for ``cfg``'s backend: the float reference."""
    options = eager_backend(cfg.QUANTIZATION.BACKEND).patch_options()
    patched, _ = patch_for_quantization(float_model, cfg.QUANTIZATION.FLOAT_MODULES, **options)
    return patched.eval()


def eager_sites(patched_float: nn.Module, int8_model: nn.Module, islands: Iterable[FloatIslandRecord]
                ) -> dict[str, tuple[str, str]]:
    """{int8 name: (compared site, kind)} for every int8 conv / linear and every boundary of ``islands``."""
    last_member = {group.name: group.qualified_members[-1]
                   for group in find_fusion_groups(patched_float, is_qat=False)}
    sites = {name: (last_member.get(name, name), "layer")
             for name, module in int8_model.named_modules() if isinstance(module, WEIGHTED_INT8)}
    for island in islands:
        name = resolve_wrapped(int8_model, island.module)
        sites.setdefault(name, (name, island.kind))
    return sites


def resolve_wrapped(model: nn.Module, name: str) -> str:
    """``name`` as it reads in ``model``, where an enclosing module was wrapped afterwards (``QuantizeInputs``,
    ``FloatIsland``, ``DequantizeOutputs`` hold it as ``.module``): QUANTIZATION.FLOAT_MODULES records name modules
    of the backbone before ``QuantizeInputs`` wraps it."""
    module, parts = model, []
    for part in name.split("."):
        if not hasattr(module, part) and hasattr(module, "module"):
            module, parts = module.module, [*parts, "module"]
        module, parts = getattr(module, part), [*parts, part]
    return ".".join(parts)


def pt2e_sites(float_model: nn.Module) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """({int8 name: (float site, kind)}, {float site: int8 module}) for the PT2E engine: each region's program (in
    its first module's slot) against the float model's output of the region's last module."""
    sites, int8_modules = {}, {}
    for region in active_regions(float_model):
        sites[region.modules[0]] = (region.modules[-1], f"region '{region.name}'")
        int8_modules[region.modules[-1]] = region.modules[0]
    return sites, int8_modules


class _Accumulator:
    """Signal and noise energy of one site, summed over images."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.elements = 0

    def add(self, reference: list[torch.Tensor], quantized: list[torch.Tensor]) -> None:
        if len(reference) != len(quantized):
            return
        for a, b in zip(reference, quantized, strict=True):
            if a.shape != b.shape:
                return
        for a, b in zip(reference, quantized, strict=True):
            a, b = a.double(), b.double()
            self.signal += float((a * a).sum())
            self.noise += float(((a - b) ** 2).sum())
            self.elements += a.numel()

    def sqnr_db(self) -> float | None:
        if self.elements == 0:
            return None
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested outputs, dequantized, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj.dequantize() if obj.is_quantized else obj]
    if isinstance(obj, dict):
        return [t for key in sorted(obj) for t in _tensors(obj[key])]
    if isinstance(obj, list | tuple) or hasattr(obj, "_fields"):
        return [t for item in obj for t in _tensors(item)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for key in obj.__dataclass_fields__ for t in _tensors(getattr(obj, key))]
    return []


@contextmanager
def _recording(model: nn.Module, sites: Iterable[str], store: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Record the outputs of the modules named ``sites`` of ``model`` into ``store`` (the last call of each)."""
    handles = []
    for site in set(sites):
        def record(module: nn.Module, args: Any, output: Any, site: str = site) -> None:
            store[site] = [t.detach().clone() for t in _tensors(output)]
        handles.append(model.get_submodule(site).register_forward_hook(record))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _same_boxes(float_model: nn.Module, int8_model: nn.Module) -> Iterator[None]:
    """The float run records its proposals and the boxes every RoI pooler takes; the int8 run takes those."""
    boxes: dict[str, Any] = {}
    handles = []
    int8_poolers = dict(int8_model.named_modules())
    for name, pooler in float_model.named_modules():
        if not isinstance(pooler, ROIPooler) or not isinstance(int8_poolers.get(name), ROIPooler):
            continue

        def remember(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            boxes[name] = args[1]

        def substitute(module: nn.Module, args: tuple[Any, ...], name: str = name) -> tuple[Any, ...] | None:
            return (args[0], boxes[name], *args[2:]) if name in boxes else None

        handles += [pooler.register_forward_pre_hook(remember),
                    int8_poolers[name].register_forward_pre_hook(substitute)]
    # The proposals too: the box head's outputs are split per image by the proposal counts.
    proposals: dict[str, Any] = {}

    def remember_proposals(module: nn.Module, args: Any, output: Any) -> None:
        proposals["output"] = output

    def substitute_proposals(module: nn.Module, args: Any, output: Any) -> Any:
        return proposals.get("output", output)

    if hasattr(float_model, "proposal_generator") and hasattr(int8_model, "proposal_generator"):
        handles += [float_model.proposal_generator.register_forward_hook(remember_proposals),
                    int8_model.proposal_generator.register_forward_hook(substitute_proposals)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def compare_activations(float_model: nn.Module, int8_model: nn.Module, sites: dict[str, tuple[str, str]],
                        batches: Iterable[list[dict]], num_images: int,
                        int8_sites: dict[str, str] | None = None) -> list[LayerNumerics]:
    """SQNR of every site over ``num_images`` images of ``batches``, lowest (worst) first.

    ``sites``: {reported name: (float site, kind)}; the int8 model is read at the same site name, or at
    ``int8_sites[float site]`` where the two models name it differently (PT2E)."""
    int8_sites = int8_sites or {}
    float_names = [site for site, _ in sites.values()]
    accumulators = {site: _Accumulator() for site in float_names}
    seen = 0
    float_model.eval()
    int8_model.eval()
    with _same_boxes(float_model, int8_model):
        for batch in batches:
            inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batch]
            reference: dict[str, list[torch.Tensor]] = {}
            with _recording(float_model, float_names, reference):
                float_model(inputs)
            int8_names = {int8_sites.get(site, site): site for site in float_names}
            int8_store: dict[str, list[torch.Tensor]] = {}
            with _recording(int8_model, int8_names, int8_store):
                int8_model(inputs)
            quantized = {int8_names[name]: value for name, value in int8_store.items()}
            for site, accumulator in accumulators.items():
                if site in reference and site in quantized:
                    accumulator.add(reference[site], quantized[site])
            seen += len(batch)
            if seen >= num_images:
                break
    rows = [LayerNumerics(name, site, kind, accumulators[site].sqnr_db(), accumulators[site].elements)
            for name, (site, kind) in sites.items()]
    return sorted(rows, key=lambda row: math.inf if row.sqnr_db is None else row.sqnr_db)


def layer_numerics(float_model: nn.Module, int8_model: nn.Module, cfg: CfgNode, engine: str,
                   islands: Iterable[FloatIslandRecord], batches: Iterable[list[dict]], num_images: int
                   ) -> list[LayerNumerics]:
    """Per-layer (eager) or per-region (PT2E) SQNR of ``int8_model`` against ``float_model`` on ``num_images``
    images; worst first."""
    if engine == "pt2e":
        sites, int8_sites = pt2e_sites(float_model)
        return compare_activations(float_model, int8_model, sites, batches, num_images, int8_sites)
    patched = patch_like_engine(float_model, cfg)
    return compare_activations(patched, int8_model, eager_sites(patched, int8_model, islands), batches, num_images)


def format_sqnr(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) and value > 0 else f"{value:.1f}"


def format_numerics_table(rows: list[LayerNumerics], limit: int | None = None) -> str:
    """Markdown table, worst first (``limit`` rows at most)."""
    shown = rows[:limit] if limit else rows
    lines = ["| module | compared at | kind | SQNR (dB) |", "|---|---|---|---:|"]
    lines += [f"| `{row.name}` | `{row.site}` | {row.kind} | {format_sqnr(row.sqnr_db)} |" for row in shown]
    if limit and len(rows) > limit:
        lines.append(f"| ... {len(rows) - limit} more in report.json | | | |")
    return "\n".join(lines)


def numerics_json(rows: list[LayerNumerics]) -> list[dict[str, Any]]:
    """JSON-safe rows: an infinite SQNR (bit-exact) is written as null with ``exact: true``."""
    return [{"module": row.name, "site": row.site, "kind": row.kind,
             "sqnr_db": None if row.sqnr_db is None or math.isinf(row.sqnr_db) else round(row.sqnr_db, 3),
             "exact": row.sqnr_db is not None and math.isinf(row.sqnr_db) and row.sqnr_db > 0,
             "elements": row.elements} for row in rows]


def plot_numerics(rows: list[LayerNumerics], path: Any, title: str) -> None:
    """A horizontal bar per compared activation (finite SQNR), worst at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [row for row in rows if row.sqnr_db is not None and math.isfinite(row.sqnr_db)]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.16 * len(finite) + 1)))
    ax.barh(range(len(finite)), [row.sqnr_db for row in finite], color="tab:blue")
    ax.set_yticks(range(len(finite)), [row.name for row in finite], fontsize=5)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR float vs int8 (dB), higher is better")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


NUMERICS_IMAGES = 4  # calibration images the activations are compared on


def numerics_section(float_model: nn.Module, int8_model: nn.Module, cfg: CfgNode, engine: str,
                     islands: Iterable[FloatIslandRecord], output_dir: Any) -> tuple[str, list[dict[str, Any]]]:
    """fnl-quantize's report part: (markdown note with the worst layers, all rows for report.json); writes
    ``numerics.png`` in ``output_dir``."""
    from pathlib import Path


    images = min(NUMERICS_IMAGES, cfg.QUANTIZATION.CALIBRATION_IMAGES)
    rows = layer_numerics(float_model, int8_model, cfg, engine, islands, iter(build_train_loader(cfg)), images)
    plot_numerics(rows, Path(output_dir) / "numerics.png", f"per-layer SQNR, {engine} int8 vs float32")
    what = ("each region's program output (PT2E: the layers inside a program are not compared)" if engine == "pt2e"
            else "each int8 conv / linear (a fused one compared at its group's last member) and each float boundary")
    note = (f"Per-layer numerics: SQNR (dB) between float32 and int8 activations of {what}, on {images} calibration "
            "images, the heads given the float model's boxes; worst first (all in report.json under `numerics`, "
            "plot: `numerics.png`):\n\n" + format_numerics_table(rows, limit=15))
    return note, numerics_json(rows)
