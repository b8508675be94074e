"""The PT2E engine: torchao's ``prepare_qat_pt2e`` / ``prepare_pt2e`` + ``convert_pt2e`` with ExecuTorch's XNNPACK
quantizer, over the same int8 regions as the eager engine (``fnl.qat.patch.QUANTIZED_REGIONS``).

Each region (backbone + neck, RPN head, box head + predictor, DensePose head + predictor) is captured with
``torch.export`` as one graph (dynamic batch / H / W, or number of RoIs) and prepared; the captured program replaces
the region's first module *instance* in the model and the region's later modules become pass-throughs, so the
model's own float code (normalization, anchors, proposal decoding, NMS, RoIAlign, postprocessing) drives the programs
unchanged and the QAT loop, calibration and evaluator of the eager engine run on it as they are.

The BiFPN's expansion taps (forward pre-hooks on timm's ``conv_pwl``) run while ``torch.export`` traces the backbone,
so the features they collect are ordinary edges of the captured graph: nothing can drop them later.

Differences from the eager engine, all from the XNNPACK quantizer: weights are int8 per-channel symmetric and
activations int8 (asymmetric); every region starts from float inputs and ends in float outputs (the features leave
the backbone program in float and the RPN head program quantizes them again); ops the quantizer has no int8 pattern
for (SiLU, softmax, nearest upsampling of ASPP's pooled branch) simply stay float inside the program; transposed
convs are int8 under PTQ and QAT alike, weights per output channel (XNNPACK's int8 deconvolution matches PyTorch's
reference, tests/export/test_executorch.py). QAT used to get them on axis 0, which XNNPACK cannot run
(``per_channel_fake_quantize`` has why), and held the DensePose predictor as the eager engine's sub-pixel convs
(``fnl.qat.patch.subpixel_transposed_convs``, still there with ``subpixel_predictor=True``, and for files saved so):
int8 convs, then a float pixel shuffle and crop that cost the QAT ExecuTorch program 4 - 5 ms per image over PTQ's.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fnl.config import CfgNode, ConfigError
from fnl.engine.backends import XNNPACK, check_weight_scales
from fnl.engine.checkpoint import CheckpointError, config_from_checkpoint, read_checkpoint, save_checkpoint
from fnl.hooks import audit_hooks
from fnl.modeling import build_model
from fnl.qat.patch import (
    FloatIslandRecord,
    QuantizedRegion,
    active_regions,
    replace_submodule,
    subpixel_transposed_convs,
)
from fnl.qat.quantize import MODES, QuantizationStages
from fnl.qat.regions import RegionCapture, RegionModules, region_captures, run_per_level
from fnl.qat.serialization import SUBPIXEL, TRANSPOSED, TRANSPOSED_CONVS_KEY
from fnl.utils.errors import UserError

ENGINE = "pt2e"
BACKEND = XNNPACK.name
INSTALL_HINT = "pip install 'fnl[executorch]' (executorch==1.5.1 and torchao)"
XNNPACK_MIN_SCALE = XNNPACK.min_scale


class PT2EUnavailableError(UserError, ImportError):
    """torchao or ExecuTorch is not installed; names the extra to install."""


def require_pt2e() -> None:
    """Fail with the install command when torchao's PT2E or ExecuTorch's XNNPACK quantizer cannot be imported."""
    try:
        import executorch.backends.xnnpack.quantizer.xnnpack_quantizer  # noqa: F401
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except ImportError as exc:
        raise PT2EUnavailableError(f"the PT2E engine needs torchao and ExecuTorch's XNNPACK quantizer ({exc}): "
                                   f"{INSTALL_HINT}") from exc


def xnnpack_quantizer(qat: bool, weight_scales: str = "per-channel", float_transposed_convs: bool = False) -> Any:
    """Int8 symmetric weights (one scale per output channel, or per tensor), int8 activations: what XNNPACK's int8
    kernels take. ``float_transposed_convs`` leaves transposed convs unquantized (how QAT held them before
    ``per_channel_fake_quantize``; files saved so are rebuilt with it)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    check_weight_scales(weight_scales)
    config = get_symmetric_quantization_config(is_per_channel=weight_scales == "per-channel", is_qat=qat)
    if qat:
        config = fake_quants_as_converted(config)
    quantizer = XNNPACKQuantizer().set_global(config)
    return quantizer.set_filter_function(lambda node: has_no_scalar_tensor_operand(node)
                                         and not (float_transposed_convs and is_transposed_conv(node)))


def fake_quants_as_converted(config: Any) -> Any:
    """``config`` (a QAT quantization config) with fake-quantizers whose training-time scales are the ones
    ``convert_pt2e`` quantizes with: ``FakeQuantize`` over the same moving-average observers, which takes its scales
    from the observer's ``calculate_qparams`` in training as convert does.

    The XNNPACK QAT configuration uses ``FusedMovingAvgObsFakeQuantize``, whose fused kernel chooses scales by its
    own formula while ``convert_pt2e`` reads the observer's: for per-channel symmetric weights 0.4% larger or smaller
    per channel (2x smaller for a channel whose weights share one sign), and the observer's minimum scale (2^-12)
    is not applied, so an activation of a narrow range trains on a finer grid than it is converted to, and convert
    re-rounds the weights QAT trained onto other scales (what that cost, and when this can go: docs/NOTES.md).
    """
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    def as_converted(spec: Any, fake_quantize: type, observer: type) -> Any:
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=fake_quantize.with_args(observer=observer,
                                                                                            eps=XNNPACK_MIN_SCALE))

    activation = as_converted(config.input_activation, FakeQuantize, MovingAverageMinMaxObserver)
    if config.weight.qscheme == torch.per_channel_symmetric:
        weight = as_converted(config.weight, per_channel_fake_quantize(), MovingAveragePerChannelMinMaxObserver)
    else:
        weight = as_converted(config.weight, FakeQuantize, MovingAverageMinMaxObserver)
    return dataclasses.replace(config, input_activation=activation, output_activation=activation, weight=weight)


@functools.cache
def per_channel_fake_quantize() -> type:
    """torchao's ``FakeQuantize`` under a class name with "PerChannel" in it: torchao's prepare passes a weight
    spec's channel axis only to such constructors (``_create_obs_or_fq_from_qspec``, torchao 0.18), and every other
    per-channel fake-quantizer gets axis 0. A transposed conv's weight is (in, out, kH, kW): the quantizer asks for
    axis 1, its output channels, as PTQ's observers get it and XNNPACK's int8 deconvolution takes it."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize

    return type("PerChannelFakeQuantize", (FakeQuantize,), {"__module__": __name__})


def is_transposed_conv(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a transposed conv (the DensePose predictor's)."""
    return node.op == "call_function" and "conv_transpose" in str(node.target)


def has_no_scalar_tensor_operand(node: torch.fx.Node) -> bool:
    """Whether the quantizer may annotate ``node``. XNNPACK's lowering cannot take a quantized 0-dim operand (its
    channels-last pass indexes the shape of every quantized graph input), so an op with one stays float: the BiFPN's
    multiply by a fusion weight; the sums after it stay int8."""
    return not any(isinstance(arg.meta.get("val"), torch.Tensor) and arg.meta["val"].dim() == 0
                   for arg in node.all_input_nodes)


class MergedIntoRegion(nn.Module):
    """Stands where a module was whose computation now runs inside the program of ``region``: passes its input on."""

    def __init__(self, region: str) -> None:
        super().__init__()
        self.region = region

    def forward(self, x: Any) -> Any:
        return x

    def extra_repr(self) -> str:
        return f"computed in region '{self.region}'"


class ExportedRegion(nn.Module):
    """One region as a captured, prepared (fake-quant or observed) and later converted graph.

    A captured graph has no train/eval flags of its own: ``train(mode)`` switches its batch-norm (and dropout) ops
    with torchao's ``move_exported_model_to_train`` / ``_eval``; once BN statistics are frozen the batch norms stay
    in their eval form (running statistics), as torch.ao's ``freeze_bn_stats`` does for the eager engine.
    """

    def __init__(self, name: str, program: torch.fx.GraphModule, capture: RegionCapture,
                 whole_conv_bn_pairs: bool = True) -> None:
        super().__init__()
        self.region = name
        self.program = program
        self.capture = capture
        self.whole_conv_bn_pairs = whole_conv_bn_pairs  # prepared after shape_reads_after_batch_norms
        self.bn_frozen = False
        self.converted = False

    def train(self, mode: bool = True) -> ExportedRegion:
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        self.training = mode
        if mode and not self.bn_frozen and not self.converted:
            move_exported_model_to_train(self.program)
        else:
            move_exported_model_to_eval(self.program)
        return self

    def freeze_bn_statistics(self) -> None:
        self.bn_frozen = True
        self.train(self.training)

    def freeze_observers(self) -> None:
        from torchao.quantization.pt2e import disable_observer

        self.program.apply(disable_observer)

    def convert(self) -> None:
        """The int8 graph (quantize / dequantize ops around int8-ready ops, which XNNPACK lowers)."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        self.train(False)
        self.program = convert_pt2e(self.program)
        drop_training_state(self.program)
        self.converted = True

    def forward(self, x: Any) -> Any:
        if self.capture.per_level:
            return run_per_level(self.program, x)
        return self.program(x)

    def extra_repr(self) -> str:
        return f"region='{self.region}', converted={self.converted}, per_level={self.capture.per_level}"


def shape_reads_after_batch_norms(program: torch.fx.GraphModule) -> int:
    """Read every conv output's shape that a batch norm follows from the batch norm's output instead (the same
    shape); returns how many reads moved. ``torch.export`` reads a symbolic size from the first tensor that has it:
    the BiFPN's resamplings read their sizes off the lateral convs' outputs, and with that second user a lateral's
    conv and BN no longer match the quantizer's conv-BN pattern. ``prepare_qat_pt2e`` then fake-quantizes the conv
    alone and the BN runs in float after its int8 output, in training and in the XNNPACK program (for model B: four
    float BNs, and the laterals' weights 66 KB larger there). Values are unchanged."""
    order = {node: index for index, node in enumerate(program.graph.nodes)}
    moved = 0
    for conv in list(program.graph.nodes):
        if conv.op != "call_function" or conv.target not in (torch.ops.aten.conv2d.default,
                                                              torch.ops.aten.conv_transpose2d.input):
            continue
        norms = [user for user in conv.users if user.target == torch.ops.aten.batch_norm.default]
        reads = [user for user in conv.users if user.target == torch.ops.aten.sym_size.int]
        if len(norms) != 1 or len(norms) + len(reads) != len(conv.users):
            continue
        norm = norms[0]
        for read in reads:
            if all(order[user] > order[norm] for user in read.users):
                read.replace_input_with(conv, norm)
                norm.append(read)
                moved += 1
    program.graph.lint()
    program.recompile()
    return moved


def drop_training_state(program: torch.fx.GraphModule) -> int:
    """Remove what only training reads from a converted graph; returns how many tensors went. A QAT capture (train
    mode) counts batches in every batch norm (``num_batches_tracked.add_(1)``, kept through ``convert_pt2e``), and
    the batch norms folded into their convs leave their parameters and statistics on the graph module. ExecuTorch
    would serialize them all: 0.17 MB of float statistics in model B's QAT backbone program, and 63 buffers mutated
    outside XNNPACK on every call. Outputs are unchanged: no remaining op reads them."""
    graph = program.graph
    for node in list(graph.nodes):
        counter = node.args[0] if node.op == "call_function" and node.args else None
        if (node.target in (torch.ops.aten.add_.Tensor, torch.ops.aten.add_.Scalar) and not node.users
                and getattr(counter, "op", None) == "get_attr" and counter.target.endswith("num_batches_tracked")):
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    read = {node.target for node in graph.nodes if node.op == "get_attr"}
    unread = [name for name, _ in [*program.named_parameters(), *program.named_buffers()] if name not in read]
    for name in unread:
        owner, _, attribute = name.rpartition(".")
        delattr(program.get_submodule(owner), attribute)
    program.delete_all_unused_submodules()
    program.recompile()
    return len(unread)


def region_records(regions: list[QuantizedRegion]) -> list[FloatIslandRecord]:
    """The float boundaries of the PT2E model, in the eager engine's record form for the report."""
    records = []
    for region in regions:
        entry = region.entry if region.entry not in {r.name for r in regions} else f"region {region.entry}"
        records.append(FloatIslandRecord(region.modules[0], "quantize inputs",
                                         f"{region.entry_reason} (from {entry}; program '{region.name}')"))
        exit_reason = region.exit_reason or "the features leave the program in float for the RPN head and RoIAlign"
        records.append(FloatIslandRecord(region.modules[-1], "dequantize outputs", exit_reason))
    return records


def install_region(model: nn.Module, modules: list[str] | tuple[str, ...], program: nn.Module) -> None:
    """``program`` (its ``region`` attribute names the region) in place of the region's first module; the later
    modules become pass-throughs."""
    first, *rest = modules
    replace_submodule(model, first, program)
    for name in rest:
        replace_submodule(model, name, MergedIntoRegion(program.region))


def capture_region(model: nn.Module, region: QuantizedRegion, capture: RegionCapture) -> torch.fx.GraphModule:
    """The region's modules of ``model`` as one ``torch.export`` graph, in the mode ``model`` is in."""
    composed = RegionModules([model.get_submodule(name) for name in region.modules])
    exported = torch.export.export(composed, capture.args, dynamic_shapes=capture.dynamic_shapes)
    return exported.module()


def prepare_pt2e_model(float_model: nn.Module, cfg: CfgNode, mode: str | None = None,
                       stages: QuantizationStages | None = None, subpixel_predictor: bool | None = None,
                       float_transposed_convs: bool | None = None, whole_conv_bn_pairs: bool = True) -> nn.Module:
    """The PT2E counterpart of ``fnl.qat.prepare``: every region captured and prepared (fake-quant for QAT, observed
    for PTQ) inside a copy of ``float_model``; in train mode for QAT, eval mode for PTQ. ``subpixel_predictor``
    (default ``subpixel_for``: no mode, with XNNPACK's policy) rewrites the DensePose predictor's transposed convs as
    sub-pixel convs; ``float_transposed_convs`` (default: for QAT where the policy has no ``qat_transposed_conv``)
    leaves transposed convs float. ``whole_conv_bn_pairs`` prepares every conv-BN pair as one
    (``shape_reads_after_batch_norms``). The options other than the default exist to rebuild files saved in those
    forms (``load_pt2e_checkpoint``)."""
    require_pt2e()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    mode = mode or cfg.QUANTIZATION.MODE
    if mode not in MODES:
        raise ConfigError(f"QUANTIZATION.MODE must be one of {MODES}, got '{mode}'")
    qat = mode == "qat"
    if float_transposed_convs is None:
        float_transposed_convs = qat and not XNNPACK.qat_transposed_conv
    stages = stages if stages is not None else QuantizationStages()
    model = copy.deepcopy(float_model)
    regions = active_regions(model)
    if subpixel_for(mode) if subpixel_predictor is None else subpixel_predictor:
        subpixel_transposed_convs(model, [region.modules[-1] for region in regions if region.exit_reason])
    stages.islands = region_records(regions)
    stages.hook_audits["capture"] = audit_hooks(model)  # these hooks run inside the captured backbone graph
    captures = region_captures(model, cfg)
    # QAT captures train-mode batch norm (folded into the convs as fake-quant conv-BN by prepare_qat_pt2e).
    model.train(qat)
    for region in regions:
        program = capture_region(model, region, captures[region.name])
        if whole_conv_bn_pairs:
            shape_reads_after_batch_norms(program)
        prepare = prepare_qat_pt2e if qat else prepare_pt2e
        prepared = prepare(program, xnnpack_quantizer(qat, cfg.QUANTIZATION.WEIGHT_SCALES, float_transposed_convs))
        install_region(model, region.modules,
                       ExportedRegion(region.name, prepared, captures[region.name], whole_conv_bn_pairs))
    return model.train(qat)


def convert_pt2e_model(prepared: nn.Module, stages: QuantizationStages | None = None) -> nn.Module:
    """The int8 model: every region's graph through ``convert_pt2e``; ``prepared`` is untouched."""
    int8 = copy.deepcopy(prepared).eval()
    for module in exported_regions(int8):
        module.convert()
    if stages is not None:
        stages.hook_audits["convert"] = audit_hooks(int8)
    return int8.eval()


def exported_regions(model: nn.Module) -> list[ExportedRegion]:
    return [module for module in model.modules() if isinstance(module, ExportedRegion)]


PT2E_CHECKPOINT, PT2E_PTQ_CHECKPOINT = "model_pt2e.pth", "model_pt2e_ptq.pth"
PT2E_STATE = "pt2e-prepared"
TRANSPOSED_CONV_WEIGHTS_KEY = "transposed_conv_weights"
INT8_WEIGHTS, FLOAT_WEIGHTS = "int8", "float"
CONV_BN_PAIRS_KEY = "conv_bn_pairs"
WHOLE_PAIRS, PAIRS_AS_CAPTURED = "whole", "as-captured"


def subpixel_for(mode: str) -> bool:
    """Whether ``prepare_pt2e_model`` rewrites the DensePose predictor's transposed convs by default: for QAT where
    the backend policy keeps transposed convs float under QAT (``is_transposed_conv``)."""
    return mode == "qat" and not XNNPACK.qat_transposed_conv


def save_pt2e_checkpoint(path: str | Path, prepared: nn.Module, cfg: CfgNode, mode: str) -> Path:
    """The prepared PT2E model's state (float weights, observer / fake-quant ranges) with its config: converting
    is deterministic, so this is the int8 model in the form the capture can rebuild (``load_pt2e_checkpoint``).
    How its transposed convs are held is recorded, read off its programs: transposed convs, or none left (the
    predictor's rewritten as sub-pixel convs); and whether their weights are quantized (observed or fake-quantized)
    or float; and whether every conv-BN pair was prepared as one."""
    regions = exported_regions(prepared)
    transposed = [node for region in regions for node in region.program.graph.nodes
                  if is_transposed_conv(node)]
    quantized = all(node.args[1].op == "call_module" for node in transposed)  # the weight through its observer
    return save_checkpoint(path, prepared, cfg, quantization={
        "engine": ENGINE, "mode": mode, "format": PT2E_STATE,
        TRANSPOSED_CONVS_KEY: TRANSPOSED if transposed else SUBPIXEL,
        TRANSPOSED_CONV_WEIGHTS_KEY: INT8_WEIGHTS if quantized else FLOAT_WEIGHTS,
        CONV_BN_PAIRS_KEY: WHOLE_PAIRS if all(region.whole_conv_bn_pairs for region in regions) else PAIRS_AS_CAPTURED})


def is_pt2e_checkpoint(data: dict[str, Any]) -> bool:
    return isinstance(data.get("quantization"), dict) and data["quantization"].get("format") == PT2E_STATE


def load_pt2e_checkpoint(path: str | Path, allow_unsafe: bool = False) -> tuple[nn.Module, CfgNode, str]:
    """(int8 PT2E model, config, mode) from ``save_pt2e_checkpoint``'s file: capture and prepare a fresh model of
    the stored config, load the state, convert."""
    data = read_checkpoint(path, allow_unsafe)
    if not is_pt2e_checkpoint(data):
        raise CheckpointError(f"{path} is not a PT2E checkpoint written by fnl-quantize --engine pt2e (no "
                              f"'quantization' entry of format {PT2E_STATE})")
    cfg = config_from_checkpoint(path, allow_unsafe)
    mode = data["quantization"]["mode"]
    # Files written before the QAT rewrite have no record of it: their transposed convs are transposed convs. Files
    # written before the weights' record are float there under QAT (per_channel_fake_quantize), int8 under PTQ.
    # Files written before the conv-BN record were prepared from the graph as captured.
    subpixel = _recorded(data, path, TRANSPOSED_CONVS_KEY, TRANSPOSED, (TRANSPOSED, SUBPIXEL)) == SUBPIXEL
    weights = _recorded(data, path, TRANSPOSED_CONV_WEIGHTS_KEY, FLOAT_WEIGHTS if mode == "qat" else INT8_WEIGHTS,
                        (INT8_WEIGHTS, FLOAT_WEIGHTS))
    pairs = _recorded(data, path, CONV_BN_PAIRS_KEY, PAIRS_AS_CAPTURED, (WHOLE_PAIRS, PAIRS_AS_CAPTURED))
    prepared = prepare_pt2e_model(build_model(cfg).eval(), cfg, mode, subpixel_predictor=subpixel,
                                  float_transposed_convs=weights == FLOAT_WEIGHTS,
                                  whole_conv_bn_pairs=pairs == WHOLE_PAIRS)
    try:
        prepared.load_state_dict(data["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"PT2E checkpoint {path} does not fit the model its config describes: "
                              f"{str(exc)[:400]}") from exc
    return convert_pt2e_model(prepared), cfg.freeze(), mode


def _recorded(data: dict[str, Any], path: str | Path, key: str, default: str, allowed: tuple[str, ...]) -> str:
    """A PT2E file's record ``key`` (``default`` in files from before it), one of ``allowed``."""
    value = data["quantization"].get(key, default)
    if value not in allowed:
        raise CheckpointError(f"PT2E checkpoint {path}: quantization.{key} is '{value}', expected one of "
                              f"{', '.join(repr(a) for a in allowed)}")
    return value
