"""Checkpoints trained elsewhere, as fnl checkpoints: detectron2's DensePose model zoo (``model_final_*.pkl``).

A detectron2 model-zoo file is a plain pickle ``{"model": {name: numpy array}, "__author__": ...}`` (Detectron1
files hold ``"blobs"`` instead); ``fnl.engine.checkpoint.read_checkpoint`` reads both without running code. Built
from ``MODEL.BACKBONE.NAME "build_resnet_fpn_backbone"`` (``configs/densepose_rcnn_R_50_FPN_s1x.yaml``), fnl's model
has detectron2's module names, so most keys carry over unchanged; the renames and value changes are the rules below,
and every checkpoint key without a place in the model is reported by name with the reason.
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

SOURCES = ("detectron2",)
INPUT_FORMATS = ("BGR", "RGB")
STEM_WEIGHT = "backbone.bottom_up.stem.conv1.weight"

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


def detectron2_unused_reason(name: str) -> str | None:
    """Why a detectron2 key has no place in fnl's model, if it is one fnl knows it leaves out."""
    return next((reason for prefix, reason in DETECTRON2_UNUSED if name.startswith(prefix)), None)


def map_detectron2_state(state: dict[str, torch.Tensor], input_format: str = "BGR") -> dict[str, torch.Tensor]:
    """detectron2 state_dict -> fnl names. A model trained on BGR images (detectron2's INPUT.FORMAT default) gets
    its stem's input channels reversed: fnl feeds RGB, and conv(BGR, W) = conv(RGB, W with input channels reversed).
    """
    if input_format not in INPUT_FORMATS:
        raise CheckpointError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, got '{input_format}'")
    mapped = {detectron2_to_fnl_name(k): v for k, v in state.items()}
    if input_format == "BGR" and STEM_WEIGHT in mapped:
        mapped[STEM_WEIGHT] = mapped[STEM_WEIGHT].flip(1)
    return mapped


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
    mapped = map_detectron2_state(state, input_format)
    model = build_model(cfg)
    report = load_state(model, path, data={**data, "model": mapped})
    if report.missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(report.missing)} weights of the model '{source}' "
                              f"conversion builds: {', '.join(report.missing[:10])}"
                              f"{' ...' if len(report.missing) > 10 else ''}; is --config the model it was trained as?")
    original_names = {detectron2_to_fnl_name(k): k for k in state}
    unused = {original_names[key]: detectron2_unused_reason(original_names[key])
              or "no module of this name in the fnl model" for key in report.unexpected}
    save_checkpoint(output, model, cfg, converted_from=str(path), converted_source=source)
    result = ConversionReport(Path(output), report.loaded, unused)
    logger.info("%s", result.summary())
    return result
