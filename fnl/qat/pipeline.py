"""``quantize(float_model, cfg)``: the whole of fnl-quantize as one call over a module tree."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from fnl.config import CfgNode
from fnl.data import build_train_loader
from fnl.qat.pt2e import convert_pt2e_model, prepare_pt2e_model
from fnl.qat.quantize import QuantizationStages, calibrate, check_int8_kernels, convert, prepare
from fnl.qat.train import quantization_aware_training
from fnl.utils.errors import InvalidArgumentError

logger = logging.getLogger("fnl")


@dataclass
class QuantizationResult:
    int8_model: nn.Module
    mode: str
    stages: QuantizationStages
    history: list[dict[str, float]] = field(default_factory=list)
    prepared: nn.Module | None = None  # the fake-quant (QAT) / observed (PTQ) model before convert
    engine: str = "eager"


ENGINES = ("eager", "pt2e")


def engine_stages(engine: str) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """(prepare, convert) of an engine: torch.ao eager mode, or torchao PT2E with the XNNPACK quantizer."""
    if engine == "eager":
        return prepare, convert
    if engine == "pt2e":
        return prepare_pt2e_model, convert_pt2e_model
    raise InvalidArgumentError(f"quantization engine must be one of {ENGINES}, got '{engine}'")


def quantize(float_model: nn.Module, cfg: CfgNode, mode: str | None = None, output_dir: str | Path | None = None,
             resume: bool = False, engine: str = "eager") -> QuantizationResult:
    """patch -> fuse -> prepare -> calibrate -> (QAT) -> convert on cfg.DATASETS.TRAIN; ``float_model`` is untouched.

    QAT checkpoints go to ``output_dir`` (required for QAT, so that ``resume`` can pick them up). ``engine`` picks
    how the int8 regions are prepared and converted; calibration and the QAT loop are the same for both.
    """
    prepare, convert = engine_stages(engine)
    mode = mode or cfg.QUANTIZATION.MODE
    stages = QuantizationStages()
    prepared = prepare(float_model.eval(), cfg, mode, stages)
    if engine == "eager":
        check_int8_kernels(prepared)  # seconds now, rather than after calibration and QAT
    if not (resume and mode == "qat"):
        seen = calibrate(prepared, iter(build_train_loader(cfg)), cfg.QUANTIZATION.CALIBRATION_IMAGES)
        logger.info("%s: observers calibrated on %d images", mode, seen)
    history: list[dict[str, float]] = []
    if mode == "qat":
        if output_dir is None:
            raise ValueError("QAT needs an output directory for its checkpoints")
        history = quantization_aware_training(prepared, cfg, output_dir, resume)
    int8 = convert(prepared, stages)
    return QuantizationResult(int8, mode, stages, history, prepared, engine)
