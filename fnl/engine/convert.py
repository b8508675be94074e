"""Checkpoints trained elsewhere, as fnl checkpoints: detectron2's DensePose model zoo (``model_final_*.pkl``) and
DensePoseFnL's (``.pth``, detectron2 Checkpointer files: ``{"model": state_dict, "optimizer", "scheduler",
"iteration"}``, read with ``torch.load(weights_only=True)``).

A detectron2 model-zoo file is a plain pickle ``{"model": {name: numpy array}, "__author__": ...}`` (Detectron1
files hold ``"blobs"`` instead); ``fnl.engine.checkpoint.read_checkpoint`` reads both without running code. Built
from ``MODEL.BACKBONE.NAME "build_resnet_fpn_backbone"`` (``configs/densepose_rcnn_R_50_FPN_s1x.yaml``), fnl's model
has detectron2's module names, so most keys carry over unchanged; the renames and value changes are the rules below,
and every checkpoint key without a place in the model is reported by name with the reason.

DensePoseFnL's model B (``build_timm_bifpn_backbone``) is built by fnl with ``MODEL.NECK.BIFPN_LAYOUT
"densepose-fnl"`` (``configs/densepose_fnl_b_s3x.yaml``): its timm keys carry over unchanged, its BiFPN's named
nodes (``l2``, ``p4_tr``, ``fuse_p3_out``, ``down_p2``...) map onto fnl's indexed ones by the rules below, and its
heads are detectron2's (plus ``MyDensePoseROIHeads``' ASPP, whose pooling branch fnl names ``pooling``).
docs/IMPORT.md lists every rule.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fnl.config import CfgNode
from fnl.engine.checkpoint import CheckpointError, load_state, read_checkpoint, save_checkpoint
from fnl.modeling import build_model

logger = logging.getLogger("fnl")

SOURCES = ("detectron2", "densepose-fnl")
INPUT_FORMATS = ("BGR", "RGB")
STEM_WEIGHT = "backbone.bottom_up.stem.conv1.weight"
TIMM_STEM_WEIGHT = "backbone.bottom_up.conv_stem.weight"

# detectron2 name -> fnl name, applied in order (first match wins). fnl keeps conv + norm + ReLU as siblings in one
# ConvNormAct (what fusion for int8 needs), where detectron2's Conv2d holds its norm and activation inside.
DETECTRON2_RENAMES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    # DensePoseV1ConvXHead registers body_conv_fcn1..N; fnl's head keeps them in one Sequential of ConvNormAct.
    (re.compile(r"^roi_heads\.densepose_head\.body_conv_fcn(\d+)\.(weight|bias)$"),
     lambda m: f"roi_heads.densepose_head.body.{int(m[1]) - 1}.0.{m[2]}"),
    # The decoder's level heads: Sequential(Conv2d(norm, ReLU inside), Upsample, ...) -> ConvNormAct in each slot.
    (re.compile(r"^roi_heads\.decoder\.(p\d+)\.(\d+)\.(weight|bias)$"),
     lambda m: f"roi_heads.decoder.{m[1]}.{m[2]}.0.{m[3]}"),
    (re.compile(r"^roi_heads\.decoder\.(p\d+)\.(\d+)\.norm\.(.+)$"),
     lambda m: f"roi_heads.decoder.{m[1]}.{m[2]}.1.{m[3]}"),
)

# DensePoseFnL's BiFPN (fpn.py) names its one layer's nodes by level: l2..l5 laterals; top-down p4_tr, p3_tr and
# p2_out (fnl's top-down nodes 0, 1, 2: its finest top-down node is the P2 output); bottom-up p3_out..p5_out
# (fnl's bottom-up 0..2), each fed by down_p2..down_p4 (fnl's downsamples 0..2); fuse_<node> the node's fusion.
_FNL_BIFPN = "backbone.layers.0"
_TOP_DOWN_NODES = {"p4_tr": 0, "p3_tr": 1, "p2_out": 2}
_BOTTOM_UP_NODES = {"p3_out": 0, "p4_out": 1, "p5_out": 2}
# Conv3x3BnReLU = Sequential(Sequential(depthwise, pointwise), BN, ReLU); fnl's separable conv is
# Sequential(depthwise, ConvNormAct(pointwise, BN, ReLU)).
_SEPARABLE_PARTS = ((re.compile(r"^0\.0\.weight$"), "0.weight"), (re.compile(r"^0\.1\.weight$"), "1.0.weight"),
                    (re.compile(r"^1\.(.+)$"), r"1.1.\1"))


def _separable(prefix: str, rest: str) -> str | None:
    for pattern, replacement in _SEPARABLE_PARTS:
        if pattern.match(rest):
            return f"{prefix}.{pattern.sub(replacement, rest)}"
    return None


def densepose_fnl_bifpn_name(name: str) -> str | None:
    """The fnl key of a DensePoseFnL BiFPN key (None for keys outside it, and for the fusions' ``eps`` buffers)."""
    if match := re.fullmatch(r"backbone\.l([2-5])\.(weight|bias)", name):
        return f"backbone.laterals.{int(match[1]) - 2}.0.{match[2]}"
    if match := re.fullmatch(r"backbone\.fuse_(p\d_(?:tr|out))\.weight", name):
        node = match[1]
        if node in _TOP_DOWN_NODES:
            return f"{_FNL_BIFPN}.td_fusions.{_TOP_DOWN_NODES[node]}.weight"
        if node in _BOTTOM_UP_NODES:
            return f"{_FNL_BIFPN}.bu_fusions.{_BOTTOM_UP_NODES[node]}.weight"
    if match := re.fullmatch(r"backbone\.(p\d_(?:tr|out)|down_p[2-4])\.(.+)", name):
        node, rest = match[1], match[2]
        if node in _TOP_DOWN_NODES:
            return _separable(f"{_FNL_BIFPN}.td_convs.{_TOP_DOWN_NODES[node]}", rest)
        if node in _BOTTOM_UP_NODES:
            return _separable(f"{_FNL_BIFPN}.bu_convs.{_BOTTOM_UP_NODES[node]}", rest)
        return _separable(f"{_FNL_BIFPN}.downsamples.{int(node[-1]) - 2}", rest)
    return None


DENSEPOSE_FNL_RENAMES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    # MyDensePoseROIHeads' ASPPPooling is the ASPP's fifth "conv" (AdaptiveAvgPool2d, Conv2d, ReLU); fnl keeps the
    # image-pooling branch apart (its own module, as it is no conv on the RoI map) as Sequential(pool, ConvNormAct).
    (re.compile(r"^roi_heads\.densepose_head\.ASPP\.convs\.4\.1\.(weight|bias)$"),
     lambda m: f"roi_heads.densepose_head.ASPP.pooling.1.0.{m[1]}"),
)
FUSION_EPS = re.compile(r"^backbone\.fuse_p\d_(?:tr|out)\.eps$")
# A DensePoseFnL model B checkpoint holds these; a checkpoint without them is of another architecture.
DENSEPOSE_FNL_MARKERS = ("backbone.l2.weight", "backbone.p2_out.0.0.weight", "backbone.bottom_up.conv_stem.weight")

# Checkpoint keys with no place in an fnl model, by prefix, and why.
DETECTRON2_UNUSED: tuple[tuple[str, str], ...] = (
    ("roi_heads.decoder.", "the checkpoint has detectron2 DensePose's decoder and --config does not: set "
                           "MODEL.ROI_DENSEPOSE_HEAD.DECODER_ON True (and IN_FEATURES p2..p5) to use it"),
    ("pixel_mean", "fnl normalizes with MODEL.PIXEL_MEAN / PIXEL_STD from the config"),
    ("pixel_std", "fnl normalizes with MODEL.PIXEL_MEAN / PIXEL_STD from the config"),
)


@dataclass
class ConversionReport:
    """What a conversion did: tensors written, and the checkpoint keys left out with the reason for each."""

    output: Path
    loaded: int
    unused: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{self.loaded} tensors converted -> {self.output}"]
        if self.unused:
            lines.append(f"{len(self.unused)} checkpoint tensors not used:")
            lines.extend(f"  {key}: {reason}" for key, reason in sorted(self.unused.items()))
        return "\n".join(lines)


def detectron2_to_fnl_name(name: str) -> str:
    """The fnl state_dict key a detectron2 key loads into (most are the same)."""
    name = name.removeprefix("module.")
    for pattern, rename in DETECTRON2_RENAMES:
        match = pattern.match(name)
        if match:
            return rename(match)
    return name


def densepose_fnl_to_fnl_name(name: str) -> str:
    """The fnl state_dict key a DensePoseFnL key loads into: its BiFPN's and ASPP's rules, then detectron2's."""
    name = name.removeprefix("module.")
    bifpn = densepose_fnl_bifpn_name(name)
    if bifpn is not None:
        return bifpn
    for pattern, rename in DENSEPOSE_FNL_RENAMES:
        if match := pattern.match(name):
            return rename(match)
    return detectron2_to_fnl_name(name)


def detectron2_unused_reason(name: str) -> str | None:
    """Why a detectron2 key has no place in fnl's model, if it is one fnl knows it leaves out."""
    if name.endswith(".num_batches_tracked"):
        return "BN's count of training batches (detectron2's FrozenBN keeps it, fnl's frozen BN has none); unused"
    return next((reason for prefix, reason in DETECTRON2_UNUSED if name.startswith(prefix)), None)


def map_detectron2_state(state: dict[str, torch.Tensor], input_format: str = "BGR",
                         to_fnl_name: Callable[[str], str] = detectron2_to_fnl_name) -> dict[str, torch.Tensor]:
    """detectron2 state_dict -> fnl names. A model trained on BGR images (detectron2's INPUT.FORMAT default) gets
    its first conv's input channels reversed: fnl feeds RGB, and conv(BGR, W) = conv(RGB, W with input channels
    reversed).
    """
    if input_format not in INPUT_FORMATS:
        raise CheckpointError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, got '{input_format}'")
    mapped = {to_fnl_name(k): v for k, v in state.items()}
    if input_format == "BGR":
        for stem in (STEM_WEIGHT, TIMM_STEM_WEIGHT):
            if stem in mapped:
                mapped[stem] = mapped[stem].flip(1)
    return mapped


def _densepose_fnl_state(state: dict[str, torch.Tensor], cfg: CfgNode, path: str | Path
                         ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Refuse a checkpoint of another architecture than DensePoseFnL's model B (or a config that is not its model)
    by name; drop the fusions' ``eps`` buffers once they are checked equal to MODEL.NECK.FUSE_EPS (returned with
    that reason)."""
    neck = cfg.MODEL.NECK
    has_bifpn = [k for k in DENSEPOSE_FNL_MARKERS if k in state]
    if has_bifpn and (neck.NAME != "BiFPN" or neck.BIFPN_LAYOUT != "densepose-fnl" or neck.NUM_REPEATS != 1):
        raise CheckpointError(f"checkpoint {path} has DensePoseFnL's BiFPN ({has_bifpn[0]}) but --config builds "
                              f"neck {neck.NAME} (layout {neck.BIFPN_LAYOUT}, {neck.NUM_REPEATS} layers): pass the "
                              "DensePoseFnL YAML it was trained with, or configs/densepose_fnl_b_s3x.yaml")
    if neck.NAME == "BiFPN" and neck.BIFPN_LAYOUT == "densepose-fnl" and len(has_bifpn) < len(DENSEPOSE_FNL_MARKERS):
        lacking = [k for k in DENSEPOSE_FNL_MARKERS if k not in state]
        raise CheckpointError(f"checkpoint {path} is not a DensePoseFnL model B checkpoint (timm backbone + its "
                              f"BiFPN): it has no {', '.join(lacking)}. Its keys look like "
                              f"{', '.join(sorted(state)[:3])}. DensePoseFnL's 2020 code (geffnet backbones, "
                              "SharedROIHeads) is not supported (docs/IMPORT.md)")
    kept, checked = {}, {}
    for key, value in state.items():
        if FUSION_EPS.match(key.removeprefix("module.")):
            eps = float(value)  # a float32 buffer: equal to the config's value up to float32 rounding
            if abs(eps - neck.FUSE_EPS) > 1e-6 * neck.FUSE_EPS:
                raise CheckpointError(f"checkpoint {path}: {key} is {eps:.6g}, MODEL.NECK.FUSE_EPS is "
                                      f"{neck.FUSE_EPS}; set MODEL.NECK.FUSE_EPS {eps:.6g}")
            checked[key] = "a constant buffer, equal to MODEL.NECK.FUSE_EPS (fnl's fusion takes it from the config)"
            continue
        kept[key] = value
    return kept, checked


def convert_checkpoint(path: str | Path, cfg: CfgNode, output: str | Path, source: str = "detectron2",
                       input_format: str = "BGR", allow_unsafe: bool = False) -> ConversionReport:
    """Read ``path`` (no code runs unless ``allow_unsafe``), load it into the model ``cfg`` builds, write an fnl
    checkpoint (with ``cfg``) to ``output`` atomically. Model weights the checkpoint lacks are an error naming them:
    a converted model with weights left at initialisation would compute something else."""
    if source not in SOURCES:
        raise CheckpointError(f"--from must be one of {', '.join(SOURCES)}, got '{source}'")
    data = read_checkpoint(path, allow_unsafe)
    state = data["model"]
    non_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if non_tensors:
        raise CheckpointError(f"checkpoint {path}: its 'model' holds entries that are not arrays: "
                              f"{', '.join(non_tensors[:5])}")
    checked: dict[str, str] = {}
    if source == "densepose-fnl":
        state, checked = _densepose_fnl_state(state, cfg, path)
    to_fnl_name = densepose_fnl_to_fnl_name if source == "densepose-fnl" else detectron2_to_fnl_name
    mapped = map_detectron2_state(state, input_format, to_fnl_name)
    model = build_model(cfg)
    report = load_state(model, path, data={**data, "model": mapped})
    missing = [k for k in report.missing if not k.endswith("num_batches_tracked")]  # a training counter
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} weights of the model '{source}' "
                              f"conversion builds: {', '.join(missing[:10])}"
                              f"{' ...' if len(missing) > 10 else ''}; is --config the model it was trained as?")
    original_names = {to_fnl_name(k): k for k in state}
    unused = {original_names[key]: detectron2_unused_reason(original_names[key])
              or "no module of this name in the fnl model" for key in report.unexpected}
    unused.update(checked)
    save_checkpoint(output, model, cfg, converted_from=str(path), converted_source=source)
    result = ConversionReport(Path(output), report.loaded, unused)
    logger.info("%s", result.summary())
    return result
