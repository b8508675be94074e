"""Shared by the export tests: the small model B exported once per session at 128x160."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from export_testing import EXPORT_SIZE, one_intra_op_thread, random_image, tiny_model

from fnl.export.onnx import to_onnx
from fnl.modeling import GeneralizedRCNN


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
