import pytest

from fnl.config import CONFIGS_DIR, ConfigError, load_config
from fnl.modeling import build_model


def test_base_chain_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("SOLVER:\n  MAX_ITER: 7\n  BASE_LR: 0.5\n")
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\nSOLVER:\n  BASE_LR: 0.1\n")
    cfg = load_config(child, ["SOLVER.STEPS", "[2, 4]", "MODEL.NECK.NAME", "BiFPN"])
    assert cfg.SOLVER.MAX_ITER == 7 and cfg.SOLVER.BASE_LR == 0.1
    assert cfg.SOLVER.STEPS == [2, 4] and cfg.MODEL.NECK.NAME == "BiFPN"


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  RPN:\n    NMS_THRES: 0.3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'MODEL.RPN.NMS_THRES' in .*bad.yaml"):
        load_config(bad)


def test_wrong_type_names_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("SOLVER:\n  MAX_ITER: many\n")
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_builds_a_model(path):
    # Loading alone misses what only model construction checks (feature names, head sizes, pooler types).
    cfg = load_config(path)
    model = build_model(cfg)
    assert hasattr(model.roi_heads, "densepose_head") == cfg.MODEL.DENSEPOSE_ON


def test_frozen_config_refuses_assignment():
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.SEED = 3
