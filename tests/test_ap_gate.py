"""The float32-vs-int8 AP gate (run by .ci/run): QAT of the committed gate model must keep box AP and DensePose AP
within FNL_GATE_MAX_DROP points (default 1.0) of float32, and the same gate must fail when quantization is
deliberately broken (4-bit fake quantization forced).

The float checkpoint tests/assets/gate_float.pth fits the 8 training images of a fixed 10-image synthetic set (box AP
~80, DensePose AP ~30 on them) and is scored, quantized and scored again on those images: int8 has to keep what the
float model computes, where a model at DensePose AP ~1 on unseen images would let any int8 error pass as noise
(configs/gate_mobile_parsing_rcnn_b_tiny.yaml says why and how to regenerate it).
"""

from __future__ import annotations

import os

import pytest
import torch

from fnl.engine.gate import check_ap_drop

MAX_DROP = float(os.environ.get("FNL_GATE_MAX_DROP", "1.0"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gate_setup(gate_model, tmp_path_factory):
    cfg, model = gate_model
    torch.manual_seed(0)
    return cfg, model, tmp_path_factory.mktemp("gate")


def _evaluate(model, cfg):
    from fnl.engine.inference import evaluate_model

    with torch.no_grad():
        return evaluate_model(model, cfg, split="train")


@pytest.fixture(scope="module")
def float_results(gate_setup):
    cfg, model, _ = gate_setup
    return _evaluate(model, cfg)


def test_float_gate_model_is_trained(float_results):
    # A gate on an untrained model would pass trivially (0 - 0): the committed model must find the persons and
    # their parts well enough that losing one AP point is a real loss (random I/U/V maps score DensePose AP 0.0).
    assert float_results["bbox"]["AP"] >= 50 and float_results["densepose"]["AP"] >= 20, float_results


def test_int8_after_qat_is_within_the_allowed_drop(gate_setup, float_results):
    from fnl.qat import quantize

    cfg, model, output = gate_setup
    torch.manual_seed(0)
    result = quantize(model, cfg, "qat", output_dir=output / "qat")
    gate = check_ap_drop(float_results, _evaluate(result.int8_model, cfg), MAX_DROP)
    print(gate.table())  # shown with pytest -s / -rP
    assert gate.passed, gate.table()


def test_gate_fails_when_quantization_is_broken(gate_setup, float_results):
    """Force every activation and weight fake-quantizer to 4 bits after calibration: the gate must catch it."""
    from fnl.data import build_train_loader
    from fnl.qat import calibrate, convert, prepare

    cfg, model, _ = gate_setup
    prepared = prepare(model, cfg, "ptq")
    calibrate(prepared, iter(build_train_loader(cfg)), cfg.QUANTIZATION.CALIBRATION_IMAGES)
    for observer in prepared.modules():
        if hasattr(observer, "quant_min") and hasattr(observer, "calculate_qparams"):
            signed = observer.quant_min < 0
            observer.quant_min, observer.quant_max = (-8, 7) if signed else (0, 15)
    gate = check_ap_drop(float_results, _evaluate(convert(prepared), cfg), MAX_DROP)
    assert not gate.passed, gate.table()
