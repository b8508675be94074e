"""The quantization pipeline over a module tree: patch -> fuse -> prepare -> (calibrate, train) -> convert.

Each stage is a function a reader can find by name; ``quantize`` runs them all (torchao's ``quantize_`` idea: one
call, one idea). Every stage that swaps modules is checked with the hook audit of ``fnl.hooks``: the BiFPN's
expansion taps (forward pre-hooks on timm's ``conv_pwl``) must survive all of them.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import (
    FakeQuantize,
    QConfig,
    default_per_channel_weight_fake_quant,
    default_per_channel_weight_observer,
    default_weight_fake_quant,
    default_weight_observer,
    disable_observer,
    get_default_qat_qconfig,
    get_default_qconfig,
)
from tqdm import tqdm

from fnl.config import CfgNode, ConfigError
from fnl.engine.backends import BackendPolicy, check_weight_scales, eager_backend
from fnl.hooks import (
    HookRecord,
    audit_hooks,
    convert_preserving_hooks,
    fuse_model,
    prepare_preserving_hooks,
    prepare_qat_preserving_hooks,
)
from fnl.qat.patch import (
    IMAGE,
    REGION_NAMES,
    DequantizeOutputs,
    FloatIsland,
    FloatIslandRecord,
    QuantizeInputs,
    active_regions,
    patch_for_quantization,
)
from fnl.qat.regions import RegionModules
from fnl.utils.errors import UserError
from fnl.utils.modules import eval_mode

logger = logging.getLogger("fnl")

MODES = ("qat", "ptq")


@dataclass
class QuantizationStages:
    """What happened at each stage: the float islands and the hook audit after every module swap."""

    islands: list[FloatIslandRecord] = field(default_factory=list)
    hook_audits: dict[str, list[HookRecord]] = field(default_factory=dict)


def select_backend(backend: str) -> BackendPolicy:
    """Run torch.ao's quantized ops on ``backend`` (QUANTIZATION.BACKEND); its policy."""
    policy = eager_backend(backend)
    if backend not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"quantized engine '{backend}' is not available in this PyTorch build "
                          f"(available: {torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = backend
    return policy


def qat_qconfig(backend: str, weight_scales: str = "per-channel") -> QConfig:
    """torch.ao's QAT qconfig of ``backend`` (weights ``weight_scales``) with fake-quantizers that train against the
    scales convert quantizes with: ``FakeQuantize`` over the same observers and ranges.

    The default ``FusedMovingAvgObsFakeQuantize`` chooses its scales in a fused kernel by other formulas than the
    observer's ``calculate_qparams``, which convert reads: symmetric weight scales max(|min| / 128, |max| / 127)
    against max(|min|, |max|) / 127.5 (every weight re-rounded at convert onto a grid 0.4% off the one QAT trained),
    and a smallest scale of 2^-14 that the observer does not have (activations of a narrow range). What that cost,
    and when this can go: docs/NOTES.md.
    """
    weight = default_per_channel_weight_fake_quant if weight_scales == "per-channel" else default_weight_fake_quant
    return QConfig(activation=fake_quant_as_converted(get_default_qat_qconfig(backend).activation),
                   weight=fake_quant_as_converted(weight))


def ptq_qconfig(backend: str, weight_scales: str = "per-channel") -> QConfig:
    """torch.ao's PTQ qconfig of ``backend`` (its activation observer) with ``weight_scales`` weights."""
    weight = default_per_channel_weight_observer if weight_scales == "per-channel" else default_weight_observer
    return QConfig(activation=get_default_qconfig(backend).activation, weight=weight)


def fake_quant_as_converted(constructor: Any) -> Any:
    """A ``FakeQuantize`` constructor with the observer, dtype, range and scheme of ``constructor``'s fake-quantizer;
    its training-time scales are its observer's ``calculate_qparams``."""
    template = constructor()
    observer = template.activation_post_process
    per_channel = {"ch_axis": observer.ch_axis} if hasattr(observer, "ch_axis") else {}
    return FakeQuantize.with_args(observer=type(observer), quant_min=template.quant_min,
                                  quant_max=template.quant_max, dtype=template.dtype, qscheme=template.qscheme,
                                  eps=float(observer.eps), **per_channel)


def assign_qconfig(model: nn.Module, backend: str, qat: bool, weight_scales: str = "per-channel") -> None:
    """Int8 weights with one scale per output channel (or per tensor), uint8 activations; transposed convs get
    per-tensor weights, which is what torch.ao's quantized ConvTranspose2d supports. Float islands already carry
    ``qconfig = None``. (torch.ao's qnnpack default is per-tensor: ``weight_scales`` decides here, on every backend.)"""
    check_weight_scales(weight_scales)
    make_qconfig = qat_qconfig if qat else ptq_qconfig
    model.qconfig = make_qconfig(backend, weight_scales)
    per_tensor = make_qconfig(backend, "per-tensor")
    for module in model.modules():
        if isinstance(module, nn.ConvTranspose2d) and getattr(module, "qconfig", model.qconfig) is not None:
            module.qconfig = per_tensor


def prepare(float_model: nn.Module, cfg: CfgNode, mode: str | None = None,
            stages: QuantizationStages | None = None, subpixel_predictor: bool = True) -> nn.Module:
    """patch -> fuse -> prepare(_qat): the fake-quant (QAT) or observed (PTQ) model. ``float_model`` is untouched.
    ``subpixel_predictor``: the DensePose predictor's transposed convs as ordinary int8 convs (``fnl.qat.patch``);
    off only to rebuild int8 checkpoints written before that rewrite."""
    mode = mode or cfg.QUANTIZATION.MODE
    if mode not in MODES:
        raise ConfigError(f"QUANTIZATION.MODE must be one of {MODES}, got '{mode}'")
    stages = stages if stages is not None else QuantizationStages()
    backend = cfg.QUANTIZATION.BACKEND
    policy = select_backend(backend)
    qat = mode == "qat"
    patched, stages.islands = patch_for_quantization(float_model, cfg.QUANTIZATION.FLOAT_MODULES,
                                                     subpixel_predictor=subpixel_predictor, **policy.patch_options())
    stages.hook_audits["patch"] = audit_hooks(patched)
    # QAT fuses into train-mode ConvBn modules (BN keeps learning); PTQ folds BN into the conv weights.
    patched.train(qat)
    fused = fuse_model(patched, is_qat=qat, inplace=True)
    stages.hook_audits["fuse"] = audit_hooks(fused)
    assign_qconfig(fused, backend, qat, cfg.QUANTIZATION.WEIGHT_SCALES)
    prepare_stage = prepare_qat_preserving_hooks if qat else prepare_preserving_hooks
    prepared = prepare_stage(fused, inplace=True)
    stages.hook_audits["prepare"] = audit_hooks(prepared)
    prepared.train(qat)
    return prepared


@torch.no_grad()
def calibrate(prepared: nn.Module, batches: Iterable[list[dict]], num_images: int) -> int:
    """Run images through the observers in eval mode (BN statistics stay as they are); returns images seen."""
    prepared.eval()
    seen = 0
    with tqdm(total=num_images, desc="calibrate", unit="img", leave=False) as progress:
        for batch in batches:
            prepared([{k: v for k, v in x.items() if k != "instances"} for x in batch])
            seen += len(batch)
            progress.update(len(batch))
            if seen >= num_images:
                break
    return seen


@runtime_checkable
class FreezableRegion(Protocol):
    """A module that freezes its own BN statistics and observers: the PT2E engine's captured regions
    (``fnl.qat.pt2e.ExportedRegion``), whose fake-quant modules and batch norms torch.ao's functions do not know."""

    def freeze_bn_statistics(self) -> None: ...

    def freeze_observers(self) -> None: ...


def freeze_bn_statistics(model: nn.Module) -> None:
    model.apply(freeze_bn_stats)
    for module in model.modules():
        if isinstance(module, FreezableRegion):
            module.freeze_bn_statistics()


def freeze_observers(model: nn.Module) -> None:
    model.apply(disable_observer)
    for module in model.modules():
        if isinstance(module, FreezableRegion):
            module.freeze_observers()


def freeze_schedule(model: nn.Module, cfg: CfgNode):
    """The per-iteration hook of the QAT loop: freeze BN statistics, then the observers, at the configured steps."""
    q = cfg.QUANTIZATION

    def on_iteration(iteration: int) -> None:
        if iteration == q.FREEZE_BN_ITER:
            freeze_bn_statistics(model)
            logger.info("QAT iteration %d: BN statistics frozen", iteration)
        if iteration == q.FREEZE_OBSERVER_ITER:
            freeze_observers(model)
            logger.info("QAT iteration %d: observers frozen", iteration)

    return on_iteration


def apply_frozen_state(model: nn.Module, cfg: CfgNode, iteration: int) -> None:
    """Re-apply the freezes a resumed QAT run had already passed."""
    if iteration > cfg.QUANTIZATION.FREEZE_BN_ITER:
        freeze_bn_statistics(model)
    if iteration > cfg.QUANTIZATION.FREEZE_OBSERVER_ITER:
        freeze_observers(model)


def convert(prepared: nn.Module, stages: QuantizationStages | None = None, snap: bool = True) -> nn.Module:
    """The real int8 model (torch.ao quantized modules), hooks kept, biases on the integer runtimes' grid
    (``snap_biases``; ``snap=False`` for a structure whose weights are loaded afterwards)."""
    prepared.eval()
    int8 = convert_preserving_hooks(prepared, inplace=False)
    if snap:
        snap_biases(int8)
    if stages is not None:
        stages.hook_audits["convert"] = audit_hooks(int8)
    return int8.eval()


WEIGHTED_INT8 = (nnq.Conv2d, nnq.ConvTranspose2d, nnq.Linear)  # the fused ConvReLU2d / LinearReLU included


@torch.no_grad()
def snap_biases(int8_model: nn.Module) -> int:
    """Put every int8 conv / linear bias on the int32 grid of input scale x weight scale; returns how many.

    Integer runtimes keep biases as int32 at that scale (QNNPACK and Caffe2's Int8 ops, XNNPACK, ONNX's QLinearConv
    and QDQ convs); fbgemm adds the float bias. Snapped, the PyTorch int8 model computes the integer sums the
    exports compute, instead of differing by up to half a grid step in every layer (which rounding ties then carry
    through the DensePose head's 12 int8 layers). The input scale of each layer is static (its producer's output
    scale): it is read by running every int8 region once on example inputs.
    """
    input_scales: dict[nn.Module, float] = {}

    def record_input_scale(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        input_scales.setdefault(module, float(args[0].q_scale()))

    handles = [module.register_forward_pre_hook(record_input_scale)
               for module in int8_model.modules() if isinstance(module, WEIGHTED_INT8)]
    try:
        _run_int8_regions(int8_model)
    finally:
        for handle in handles:
            handle.remove()
    for module, input_scale in input_scales.items():
        weight, bias = module.weight(), module.bias()
        if bias is None:
            continue
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            weight_scales = weight.q_per_channel_scales().to(torch.float64)
        else:
            weight_scales = torch.tensor(weight.q_scale(), dtype=torch.float64)
        grid = input_scale * weight_scales
        module.set_weight_bias(weight, (torch.round(bias.to(torch.float64) / grid) * grid).to(torch.float32))
    return len(input_scales)


class Int8KernelError(UserError, ValueError):
    """A module of an int8 region has no int8 kernel in eager mode; names the module, its path and what to do."""


def check_int8_kernels(prepared: nn.Module) -> None:
    """Convert a copy of ``prepared`` (``prepare``'s output, calibrated or not) and run every int8 region once, so
    that a module without an int8 kernel (timm's MixedConv2d followed by its norm, CondConv2d, Conv2dSame) fails
    in seconds with :class:`Int8KernelError`, not after calibration or QAT. ``prepared`` is left as it was."""
    with warnings.catch_warnings():
        # Observers that saw no data yet give default ranges: enough to find the kernels.
        warnings.filterwarnings("ignore", message="must run observer before calling", category=UserWarning)
        convert(copy.deepcopy(prepared))


@contextmanager
def _naming_the_module_without_int8_kernel(model: nn.Module) -> Iterator[None]:
    """Turn torch's "Could not run 'aten::...' with arguments from the 'QuantizedCPU' backend" inside ``model``
    into :class:`Int8KernelError` naming the innermost module that was running."""
    names = {module: name for name, module in model.named_modules()}
    hooked = {record.module for record in audit_hooks(model)}  # the user's hooks, before ours join them
    running: list[nn.Module] = []

    def enter(module: nn.Module, args: Any) -> None:
        running.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:  # None: the output stays as it is
        running.pop()

    handles = [hook for module in names
               for hook in (module.register_forward_pre_hook(enter), module.register_forward_hook(leave))]
    try:
        yield
    except NotImplementedError as exc:
        if "QuantizedCPU" not in str(exc) or not running:
            raise
        raise Int8KernelError(_describe_missing_kernel(model, names, hooked, running[-1], str(exc))) from exc
    finally:
        for handle in handles:
            handle.remove()


def _describe_missing_kernel(model: nn.Module, names: dict[nn.Module, str], hooked: set[str], module: nn.Module,
                             error: str) -> str:
    """The error line: the unsupported module (or the conv that left a norm unfused) and the way out: every module
    that has to stay in float, as QUANTIZATION.FLOAT_MODULES takes them, unless one of them carries hooks (the
    BiFPN's feature taps), which would see float tensors inside a float island; then only the PT2E engine."""
    operator = error.split("'")[1] if error.count("'") >= 2 else "an operator"
    path = names[module]
    previous = _neighbour(model, path, -1)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and previous is not None and type(previous[1]) not in (
            nn.Conv2d, nn.Linear):
        # A norm left unfused behind a conv that fusion does not know (timm's MixedConv2d, whose torch.cat of int8
        # splits would also mix their scales): that conv is the cause.
        culprit, culprit_path = previous[1], previous[0]
        message = (f"{type(culprit).__name__} at {_float_path(model, culprit_path)} (the {type(module).__name__} "
                   f"after it has no int8 kernel for {operator}: fusion folds a norm only into a plain Conv2d)")
    else:
        culprit, culprit_path = module, path
        message = f"{type(module).__name__} at {_float_path(model, path)} (no int8 kernel for {operator})"
    # Every module of that type goes float, with the norm after it (which then has no conv to fold into).
    floats = []
    for other, name in names.items():
        if type(other) is type(culprit):
            following = _neighbour(model, name, +1)
            floats.append(name)
            if following is not None and isinstance(following[1], nn.modules.batchnorm._BatchNorm):
                floats.append(following[0])
    listed = [_float_path(model, name) for name in floats]
    tapped = [_float_path(model, name) for name in floats if name in hooked]
    if tapped:
        return (f"unsupported by the eager int8 engine: {message}. Quantize with --engine pt2e: {len(listed)} "
                f"module(s) would have to stay in float, among them {_preview(tapped)}, whose hooks (the backbone's "
                "feature taps) must see int8 tensors")
    return (f"unsupported by the eager int8 engine: {message}. Keep the {len(listed)} module(s) it concerns in "
            f"float, QUANTIZATION.FLOAT_MODULES \"{listed}\", or quantize with --engine pt2e")


def _preview(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _neighbour(model: nn.Module, path: str, step: int) -> tuple[str, nn.Module] | None:
    """(path, module) of the sibling registered ``step`` places from the module at ``path``, if any."""
    parent_path, _, child = path.rpartition(".")
    if not parent_path:
        return None
    siblings = list(model.get_submodule(parent_path).named_children())
    position = [name for name, _ in siblings].index(child) + step
    if not 0 <= position < len(siblings):
        return None
    return f"{parent_path}.{siblings[position][0]}", siblings[position][1]


def _float_path(model: nn.Module, path: str) -> str:
    """``path`` in the int8 model as the float model (and QUANTIZATION.FLOAT_MODULES) names it: without the
    ``module`` attribute of the patch's wrappers."""
    kept, current = [], model
    for part in path.split("."):
        if not (part == "module" and isinstance(current, QuantizeInputs | DequantizeOutputs | FloatIsland)):
            kept.append(part)
        current = getattr(current, part)
    return ".".join(kept)


def _run_int8_regions(int8_model: nn.Module) -> None:
    """Every int8 region of the eager model once: the backbone and RPN head on a blank image, each RoI head from its
    pooler's quantization on random pooled features (the heads run whether or not anything is detected)."""
    side = 4 * max(int8_model.size_divisibility, 32)  # room for every pyramid level
    with eval_mode(int8_model), _naming_the_module_without_int8_kernel(int8_model):
        features = int8_model.backbone(torch.zeros(1, 3, side, side))
        rpn = int8_model.proposal_generator
        rpn.rpn_head([features[name] for name in rpn.in_features])
        channels = features[rpn.in_features[0]].shape[1]
        for region in active_regions(int8_model):
            pooler = int8_model.get_submodule(region.entry) if region.entry not in (IMAGE, *REGION_NAMES) else None
            if isinstance(pooler, FloatIsland):  # RoI pooling, a float island that quantizes its output
                side = pooler.module.output_size
                pooled = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))
                RegionModules([int8_model.get_submodule(name) for name in region.modules])(pooler.quant(pooled))


def build_int8_structure(float_model: nn.Module, cfg: CfgNode, mode: str, subpixel_predictor: bool = True
                         ) -> nn.Module:
    """The int8 module tree for ``cfg`` (weights not yet loaded): how an int8 checkpoint is reloaded."""
    prepared = prepare(float_model, cfg, mode, subpixel_predictor=subpixel_predictor)
    return convert(prepared, snap=False)
