"""Patch: turn a float GeneralizedRCNN into a quantizable one by transforming module *instances* (paper Sec. 3.4).

``QUANTIZED_REGIONS`` is the one definition of the int8 regions and their float boundaries; this module's
``patch_for_quantization`` is the eager engine's reading of it (``fnl.qat.pt2e`` is the PT2E engine's). The whole
network runs on int8 tensors except the float islands:
- the image is quantized after normalization (``backbone`` is wrapped by :class:`QuantizeInputs`);
- RPN objectness logits and anchor deltas are dequantized before proposals are decoded (``rpn_head``);
- RoI pooling dequantizes its input features, pools in float and quantizes the result (``*_pooler``);
- the box and DensePose predictors' outputs are dequantized (``box_predictor``, ``densepose_predictor``); the
  DensePose predictor's 4x4 stride-2 transposed convs become exactly equal ordinary convs
  (:class:`fnl.modeling.layers.SubPixelConvTranspose2d`, ``subpixel_transposed_convs``), which every int8 runtime
  runs in int8;
- ops without an int8 kernel run dequant -> float -> quant: the non-local block, SiLU / GELU activations, and any
  module named in ``QUANTIZATION.FLOAT_MODULES``.
Residual adds of timm's blocks and squeeze-excitation multiplies become observed int8 ops (FloatFunctional) in
replacement instances that keep the original child modules, so forward hooks on them (timm's feature taps on
``conv_pwl``) stay where they were. The necks' sums, BiFPN fusion weights and ASPP's concatenation are
quantization-ready in ``fnl.modeling`` itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

from fnl.config import ConfigError
from fnl.modeling.densepose import NonLocalBlock
from fnl.modeling.layers import SubPixelConvTranspose2d


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """Apply ``fn`` to every tensor inside nested lists / tuples / dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


class QuantizeInputs(nn.Module):
    """Quantizes the (float) input of ``module``: where the int8 region starts."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.module = module

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(self.quant(x))


class DequantizeOutputs(nn.Module):
    """Runs ``module`` on int8 tensors and dequantizes every tensor it returns: where an int8 region ends."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.dequant = DeQuantStub()

    def forward(self, *args: Any) -> Any:
        return map_tensors(self.dequant, self.module(*args))


class FloatIsland(nn.Module):
    """Dequantizes the inputs, runs ``module`` in float, and quantizes its (single tensor) output again unless the
    float result leaves the network (``quantize_output=False``)."""

    def __init__(self, module: nn.Module, quantize_output: bool = True) -> None:
        super().__init__()
        self.dequant = DeQuantStub()
        self.module = module
        # Never prepared or converted: it stays float. Every submodule says so itself, so that a qconfig assigned by
        # module type later (assign_qconfig's per-tensor one for transposed convs) cannot reach inside.
        for submodule in module.modules():
            submodule.qconfig = None
        self.quant = QuantStub() if quantize_output else nn.Identity()

    def forward(self, *args: Any) -> Any:
        # Only quantized inputs: the poolers also take float boxes. Dequantizing a float tensor is a no-op in eager
        # PyTorch, but the ONNX exporter reads every dequantize as one and fails on the boxes.
        inputs = map_tensors(lambda t: self.dequant(t) if t.is_quantized else t, args)
        return self.quant(self.module(*inputs))


# Call order of the children of timm's residual blocks (timm/models/_efficientnet_blocks.py), skip add excluded.
_TIMM_BLOCK_ORDER = {
    "InvertedResidual": ("conv_s2d", "bn_s2d", "conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3"),
    "DepthwiseSeparableConv": ("conv_s2d", "bn_s2d", "conv_dw", "bn1", "aa", "se", "conv_pw", "bn2"),
    "EdgeResidual": ("conv_exp", "bn1", "aa", "se", "conv_pwl", "bn2"),
    "ConvBnAct": ("conv", "bn1", "aa"),
}


class QuantizableResidualBlock(nn.Module):
    """A timm block with its ``x + shortcut`` as an observed int8 add. It owns the *same* child instances as the
    block it replaces (same names), so hooks registered on them keep firing."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        kind = type(block).__name__
        self.order = tuple(n for n in _TIMM_BLOCK_ORDER[kind] if getattr(block, n, None) is not None)
        self.source_type = kind
        for name, child in block.named_children():
            self.add_module(name, child)
        self.has_skip = bool(getattr(block, "has_skip", False))
        self.skip_add = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        for name in self.order:
            x = getattr(self, name)(x)
        if self.has_skip:
            x = self.skip_add.add(self.drop_path(x), shortcut)
        return x


class QuantizableSqueezeExcite(nn.Module):
    """timm's SqueezeExcite with its gating multiply as an observed int8 multiply."""

    def __init__(self, se: nn.Module) -> None:
        super().__init__()
        for name, child in se.named_children():
            self.add_module(name, child)
        self.gate_mul = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_expand(self.act1(self.conv_reduce(x_se)))
        return self.gate_mul.mul(x, self.gate(x_se))


# Activations with no int8 kernel in torch.ao's eager mode.
_FLOAT_ONLY_ACTIVATIONS = (nn.SiLU, nn.GELU, nn.Mish)


@dataclass
class FloatIslandRecord:
    module: str  # qualified name in the patched model
    kind: str  # "dequantize outputs" | "float island" | "quantize inputs"
    reason: str


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def make_blocks_quantizable(root: nn.Module) -> int:
    """Replace timm residual blocks and squeeze-excitation instances below ``root``; returns how many."""
    replaced = 0
    for name, module in list(root.named_modules()):
        kind = type(module).__name__
        if kind in _TIMM_BLOCK_ORDER:
            replace_submodule(root, name, QuantizableResidualBlock(module))
            replaced += 1
        elif kind == "SqueezeExcite" and hasattr(module, "conv_reduce"):
            replace_submodule(root, name, QuantizableSqueezeExcite(module))
            replaced += 1
    return replaced


@dataclass(frozen=True)
class QuantizedRegion:
    """A part of the network that runs on int8 tensors: its input is quantized where it enters and its outputs are
    dequantized where they leave for float code. The one definition both engines read: the eager engine puts stubs at
    these boundaries (``patch_for_quantization``), the PT2E engine captures each region as one exported program
    (``fnl.qat.pt2e``)."""

    name: str
    modules: tuple[str, ...]  # submodules of GeneralizedRCNN in call order; the region computes their composition
    entry: str  # where its input comes from: IMAGE, a float module (RoI pooling), or the region whose outputs it takes
    entry_reason: str
    exit_reason: str | None  # why its outputs are dequantized; None: they stay int8 for the regions that take them
    condition: str | None = None  # a flag of the model that must be true for the region to exist


IMAGE = "normalized image"
QUANTIZED_REGIONS = (
    QuantizedRegion("backbone", ("backbone",), IMAGE, "the normalized image enters int8 here", None),
    QuantizedRegion("rpn_head", ("proposal_generator.rpn_head",), "backbone", "the RPN head takes the int8 features",
                    "objectness logits and anchor deltas are decoded into proposals in float"),
    QuantizedRegion("box_head", ("roi_heads.box_head", "roi_heads.box_predictor"), "roi_heads.box_pooler",
                    "RoIAlign pools float features", "class scores and box deltas are decoded in float"),
    QuantizedRegion("densepose_head", ("roi_heads.densepose_head", "roi_heads.densepose_predictor"),
                    "roi_heads.densepose_pooler", "RoIAlign pools float features",
                    "segmentation and U/V are post-processed in float", condition="roi_heads.densepose_on"),
)
REGION_NAMES = tuple(region.name for region in QUANTIZED_REGIONS)


def active_regions(model: nn.Module) -> list[QuantizedRegion]:
    """The regions ``model`` has (the DensePose one only with the DensePose head on)."""
    def present(region: QuantizedRegion) -> bool:
        if region.condition is None:
            return True
        owner, _, flag = region.condition.rpartition(".")
        return bool(getattr(model.get_submodule(owner), flag))

    return [region for region in QUANTIZED_REGIONS if present(region)]


def subpixel_transposed_convs(model: nn.Module, names: list[str] | tuple[str, ...]) -> list[str]:
    """Replace every 4x4 stride-2 padding-1 ``nn.ConvTranspose2d`` inside the modules ``names`` of ``model`` by the
    :class:`SubPixelConvTranspose2d` that computes the same (exactly, in float); returns the replaced modules'
    names. Transposed convs of another geometry stay as they are."""
    replaced = []
    for owner in names:
        for name, module in list(model.get_submodule(owner).named_modules()):
            if isinstance(module, nn.ConvTranspose2d) and SubPixelConvTranspose2d.computes(module):
                replace_submodule(model, f"{owner}.{name}", SubPixelConvTranspose2d.from_conv_transpose(module))
                replaced.append(f"{owner}.{name}")
    return replaced


def patch_for_quantization(model: nn.Module, float_modules: list[str] | tuple[str, ...] = (),
                           inplace: bool = False, float_predictor: bool = False, float_1x1_pooling: bool = False,
                           subpixel_predictor: bool = True) -> tuple[nn.Module, list[FloatIslandRecord]]:
    """The quantizable model and the list of every float boundary in it (the eager engine's reading of
    ``QUANTIZED_REGIONS``).

    ``subpixel_predictor`` rewrites the transposed convs of the regions' last modules (the DensePose predictor) as
    ordinary convs (``subpixel_transposed_convs``): exact in float, and int8 on every backend and runtime. Without it
    (int8 checkpoints written before the rewrite), ``float_predictor`` keeps a region's last module in float when it
    holds transposed convs, for a backend whose quantized ConvTranspose2d computes wrong values;
    ``float_1x1_pooling`` keeps 1x1 max-pools (the necks' stride-2 ``top_block``) in float, for a backend that
    cannot create a 1x1 pooling operator. A backend's ``fnl.engine.backends.BackendPolicy.patch_options()`` sets
    both.
    """
    if not inplace:
        model = copy.deepcopy(model)
    islands: list[FloatIslandRecord] = []
    regions = active_regions(model)
    make_blocks_quantizable(model.backbone)
    if subpixel_predictor:
        subpixel_transposed_convs(model, [region.modules[-1] for region in regions if region.exit_reason])

    # A region's last module hands its outputs to float code (and may return a tuple): kept float, it stays so.
    exits = {region.modules[-1] for region in regions if region.exit_reason is not None}

    def island(name: str, reason: str) -> None:
        replace_submodule(model, name, FloatIsland(model.get_submodule(name), quantize_output=name not in exits))
        islands.append(FloatIslandRecord(name, "float island", reason))

    for name in float_modules:
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise ConfigError(f"QUANTIZATION.FLOAT_MODULES names '{name}', which is not a module of the model") from exc
        island(name, "QUANTIZATION.FLOAT_MODULES")
    for name, module in list(model.named_modules()):
        if isinstance(module, NonLocalBlock) and not _inside_island(model, name):
            island(name, "non-local block: softmax attention has no int8 kernel")
        elif isinstance(module, _FLOAT_ONLY_ACTIVATIONS) and not _inside_island(model, name):
            island(name, f"{type(module).__name__} has no int8 kernel")
        elif float_1x1_pooling and _is_1x1_max_pool(module) and not _inside_island(model, name):
            island(name, "QNNPACK cannot create a 1x1 max-pool")

    region_names = {region.name for region in regions}
    for region in regions:
        if region.entry == IMAGE:
            first = region.modules[0]
            replace_submodule(model, first, QuantizeInputs(model.get_submodule(first)))
            islands.insert(0, FloatIslandRecord(first, "quantize inputs", region.entry_reason))
        elif region.entry not in region_names:  # a float module feeds the region: it dequantizes and requantizes
            island(region.entry, region.entry_reason)
        if region.exit_reason is None:
            continue
        last = region.modules[-1]
        module = model.get_submodule(last)
        if isinstance(module, FloatIsland):  # named in QUANTIZATION.FLOAT_MODULES: its outputs are float already
            continue
        if float_predictor and any(isinstance(m, nn.ConvTranspose2d) for m in module.modules()):
            replace_submodule(model, last, FloatIsland(module, quantize_output=False))
            islands.append(FloatIslandRecord(last, "float island",
                                             "quantized ConvTranspose2d is wrong on this backend in torch 2.14"))
        else:
            replace_submodule(model, last, DequantizeOutputs(module))
            islands.append(FloatIslandRecord(last, "dequantize outputs", region.exit_reason))
    return model, islands


def _is_1x1_max_pool(module: nn.Module) -> bool:
    return isinstance(module, nn.MaxPool2d) and module.kernel_size in (1, (1, 1))


def _inside_island(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:k])), FloatIsland) for k in range(1, len(parts)))


def format_islands(islands: list[FloatIslandRecord]) -> str:
    rows = ["| module | boundary | why |", "|---|---|---|"]
    rows += [f"| `{i.module}` | {i.kind} | {i.reason} |" for i in islands]
    return "\n".join(rows)
