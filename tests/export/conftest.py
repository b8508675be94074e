"""Shared by the export tests: the small model B exported once per session at 128x160, and a decisive int8 model B
(fnl.qat PTQ on the tiny dataset's images) exported once per session."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from export_testing import (
    DECISIVE,
    EXPORT_SIZE,
    blank_image,
    fit_decisive_detector,
    one_intra_op_thread,
    random_image,
    tiny_model,
)

from fnl.config import CfgNode, load_config
from fnl.export.onnx import to_onnx
from fnl.modeling import GeneralizedRCNN, build_model


@dataclass
class Exported:
    model: GeneralizedRCNN
    path: Path
    warnings: list[warnings.WarningMessage]


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    model = tiny_model()
    with one_intra_op_thread(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = to_onnx(model, tmp_path_factory.mktemp("onnx") / "model_fp32.onnx", random_image(*EXPORT_SIZE))
    return Exported(model, path, caught)


@dataclass
class Int8Export:
    """A fitted (decisive) float model B, its int8 model from fnl.qat (PTQ), and the int8 ONNX file."""

    cfg: CfgNode
    float_model: GeneralizedRCNN
    int8_model: torch.nn.Module
    images: list[torch.Tensor]  # the tiny dataset's val images at 64 px, which the detector was fitted on
    blank: torch.Tensor  # an image it was fitted to find nothing on
    path: Path


@pytest.fixture(scope="session")
def int8_export(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Int8Export:
    from fnl.data import build_test_loader
    from fnl.qat import calibrate, convert, prepare

    cfg = load_config("test_tiny", ["DATASETS.ROOT", str(tiny_dataset), *DECISIVE])
    images = [item["image"] for batch in build_test_loader(cfg, "val") for item in batch]
    blank = blank_image(64, 80)
    with one_intra_op_thread(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao eager mode is deprecated
        warnings.filterwarnings("ignore", message="Please use quant_min and quant_max", category=UserWarning)
        # convert() asks the BiFPN's multiply-by-scalar FloatFunctionals, which observe nothing, for their ranges.
        warnings.filterwarnings("ignore", message="must run observer before calling", category=UserWarning)
        torch.manual_seed(0)
        float_model = fit_decisive_detector(build_model(cfg).eval(), [*images, blank])
        prepared = prepare(float_model, cfg, "ptq")
        calibrate(prepared, [[{"image": image}] for image in images], len(images))
        int8_model = convert(prepared)
        path = to_onnx(int8_model, tmp_path_factory.mktemp("int8") / "model_int8.onnx", images[0])
    return Int8Export(cfg, float_model, int8_model, images, blank, path)
