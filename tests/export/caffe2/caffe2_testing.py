"""Helpers of the Caffe2 export tests: verification images, the exported models, expected warnings.

Images are 128x128, 128x192 and 192x128: multiples of the nets' size divisibility (64), where the Caffe2 net and
the PyTorch model pad the same way (see fnl.export.caffe2.writer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from export_testing import SMALL, one_intra_op_thread, random_image

from fnl.export.caffe2 import Caffe2Export
from fnl.modeling import GeneralizedRCNN

IMAGE_SIZES = [(128, 128), (128, 192), (192, 128)]

# torch.ao eager quantization is what fnl.qat builds on: its deprecation notices, and the default qparams of the
# BiFPN's unobserved multiply-by-scalar (fnl.modeling.necks.WeightedFusion), are expected where int8 models are built.
QUANTIZATION_WARNINGS = [pytest.mark.filterwarnings(f"ignore:{message}") for message in (
    "torch.ao.quantization is deprecated", ".*quantized tensor creation functions",
    "Please use quant_min and quant_max", "must run observer before calling calculate_qparams")]


@dataclass
class Exported:
    model: GeneralizedRCNN
    export: Caffe2Export

    @property
    def directory(self) -> Path:
        return self.export.predict_net.parent


def verification_images() -> list[torch.Tensor]:
    return [random_image(h, w, seed=k + 1) for k, (h, w) in enumerate(IMAGE_SIZES)]


def ptq_int8_model(tiny_cfg, weight_scales: str, backend: str = "fbgemm") -> GeneralizedRCNN:
    """fnl.qat's PTQ of a random model B (seed 0) on the tiny dataset."""
    from fnl.data import build_train_loader
    from fnl.modeling import build_model
    from fnl.qat import calibrate, convert, prepare

    cfg = tiny_cfg.clone()
    cfg.merge_from_list([*SMALL, "QUANTIZATION.BACKEND", backend, "QUANTIZATION.WEIGHT_SCALES", weight_scales])
    torch.manual_seed(0)
    with one_intra_op_thread():
        prepared = prepare(build_model(cfg).eval(), cfg, "ptq")
        calibrate(prepared, iter(build_train_loader(cfg)), cfg.QUANTIZATION.CALIBRATION_IMAGES)
        return convert(prepared)
