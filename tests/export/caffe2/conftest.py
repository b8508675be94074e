"""Session fixtures of the Caffe2 export tests: the small model B exported once, float32 and int8."""

from __future__ import annotations

import pytest
from caffe2_testing import Exported, ptq_int8_model
from export_testing import one_intra_op_thread, tiny_model

from fnl.export.caffe2 import to_caffe2
from fnl.modeling import GeneralizedRCNN


@pytest.fixture(scope="session")
def caffe2_float(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    model = tiny_model()
    with one_intra_op_thread():
        return Exported(model, to_caffe2(model, tmp_path_factory.mktemp("caffe2_fp32")))


@pytest.fixture(scope="session")
def int8_model(tiny_cfg) -> GeneralizedRCNN:
    """fnl.qat's PTQ (fbgemm, per-channel weights) of a random model B on the tiny dataset."""
    return ptq_int8_model(tiny_cfg, "per-channel")


@pytest.fixture(scope="session")
def int8_model_per_tensor_weights(tiny_cfg) -> GeneralizedRCNN:
    """The same PTQ with one weight scale per layer (QUANTIZATION.WEIGHT_SCALES per-tensor), as stock Caffe2 runs."""
    return ptq_int8_model(tiny_cfg, "per-tensor")


@pytest.fixture(scope="session")
def caffe2_int8(int8_model, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Stock Caffe2 int8: weights requantized to one scale per tensor."""
    with one_intra_op_thread():
        return Exported(int8_model, to_caffe2(int8_model, tmp_path_factory.mktemp("caffe2_int8")))


@pytest.fixture(scope="session")
def caffe2_int8_per_channel(int8_model, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    with one_intra_op_thread():
        export = to_caffe2(int8_model, tmp_path_factory.mktemp("caffe2_int8_pc"), weight_scales="per-channel")
    return Exported(int8_model, export)
