"""The backend policies: the facts measured on each int8 backend, and every command offering exactly those."""

from __future__ import annotations

import pytest

from fnl.cli.quantize import build_parser
from fnl.config import ConfigError
from fnl.engine.backends import BACKENDS, CAFFE2_INT8, WEIGHT_SCALES, XNNPACK, check_weight_scales, eager_backend


def test_each_eager_backend_keeps_float_what_it_cannot_run_in_int8():
    # torch 2.14: quantized ConvTranspose2d is right on fbgemm only; QNNPACK cannot create a 1x1 max-pool.
    assert {name: eager_backend(name).patch_options() for name in BACKENDS} == {
        "x86": {"float_predictor": True, "float_1x1_pooling": False},
        "fbgemm": {"float_predictor": False, "float_1x1_pooling": False},
        "qnnpack": {"float_predictor": True, "float_1x1_pooling": True},
    }


def test_xnnpack_quantizes_transposed_convs_under_ptq_and_qat_and_caffe2_is_qnnpack():
    assert XNNPACK.engine == "pt2e" and XNNPACK.transposed_conv and XNNPACK.qat_transposed_conv
    assert XNNPACK.min_scale == 2**-12
    assert CAFFE2_INT8 is eager_backend("qnnpack") and not CAFFE2_INT8.pools_1x1


def test_an_unknown_backend_or_weight_scale_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"QUANTIZATION.BACKEND must be one of \('x86', 'fbgemm', 'qnnpack'\)"):
        eager_backend("onednn")
    with pytest.raises(ConfigError, match="QUANTIZATION.WEIGHT_SCALES must be one of"):
        check_weight_scales("per-row")
    for weight_scales in WEIGHT_SCALES:
        check_weight_scales(weight_scales)


def test_fnl_quantize_offers_the_lists_the_code_validates_against():
    from fnl.qat.pipeline import ENGINES
    from fnl.qat.quantize import MODES

    choices = {action.dest: action.choices for action in build_parser()._actions if action.choices}
    assert choices == {"engine": ENGINES, "backend": BACKENDS, "mode": MODES}
