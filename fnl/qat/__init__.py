"""Quantization: patch (float islands) -> fuse (hook-preserving) -> prepare -> QAT / calibration -> convert to int8.

``quantize(float_model, cfg)`` runs the whole pipeline; each stage is also a function of its own.
"""

from fnl.qat.patch import FloatIsland, FloatIslandRecord, format_islands, patch_for_quantization
from fnl.qat.pipeline import QuantizationResult, quantize
from fnl.qat.quantize import QuantizationStages, calibrate, convert, prepare
from fnl.qat.serialization import load_int8_checkpoint, save_int8_checkpoint

__all__ = [
    "FloatIsland",
    "FloatIslandRecord",
    "QuantizationResult",
    "QuantizationStages",
    "calibrate",
    "convert",
    "format_islands",
    "load_int8_checkpoint",
    "patch_for_quantization",
    "prepare",
    "quantize",
    "save_int8_checkpoint",
]
