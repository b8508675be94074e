import pytest
import torch

from fnl.config import load_config
from fnl.engine.train import build_optimizer
from fnl.modeling import build_model


@pytest.mark.parametrize("name, kind", [("SGD", torch.optim.SGD), ("AdamW", torch.optim.AdamW)])
def test_solver_optimizer_chooses_the_optimizer_and_keeps_norm_layers_undecayed(name, kind):
    cfg = load_config("mobile_parsing_rcnn_b", ["SOLVER.OPTIMIZER", name, "SOLVER.WEIGHT_DECAY", "0.001"])
    optimizer = build_optimizer(cfg, build_model(cfg))
    assert isinstance(optimizer, kind)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.001, 0.0]


def test_unknown_optimizer_names_the_key():
    cfg = load_config("mobile_parsing_rcnn_b", ["SOLVER.OPTIMIZER", "Adagrad"])
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER 'Adagrad' is not one of SGD, AdamW"):
        build_optimizer(cfg, build_model(cfg))


def test_qat_fine_tunes_with_sgd_whatever_trained_the_float_model():
    from fnl.qat.train import qat_solver_config

    cfg = load_config("synth_mobile_parsing_rcnn_b_512")
    assert cfg.SOLVER.OPTIMIZER == "AdamW"
    assert qat_solver_config(cfg).SOLVER.OPTIMIZER == "SGD"
