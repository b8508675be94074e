"""detectron2 DensePose configs read as written (tests/assets/detectron2_configs: upstream files, unchanged)."""

from __future__ import annotations

from pathlib import Path

import pytest
from config_testing import write_user_config

from fnl.config import ConfigError, load_config
from fnl.config.detectron2 import is_detectron2_config, load_detectron2_config
from fnl.modeling import build_model
from fnl.modeling.backbone import build_bottom_up

UPSTREAM = Path(__file__).parents[1] / "assets" / "detectron2_configs"


def test_upstream_s1x_reads_as_fnls_s1x_config_with_the_ignored_keys_named():
    upstream = load_detectron2_config(UPSTREAM / "densepose_rcnn_R_50_FPN_s1x.yaml")
    assert upstream.cfg.MODEL == load_config("densepose_rcnn_R_50_FPN_s1x").MODEL
    assert upstream.input_format == "BGR"
    assert sorted(upstream.ignored) == ["DATASETS.TEST", "DATASETS.TRAIN", "MODEL.FPN.IN_FEATURES", "MODEL.WEIGHTS",
                                        "VERSION"]
    assert "checkpoint being converted" in upstream.ignored["MODEL.WEIGHTS"]
    assert upstream.cfg.DATASETS.TRAIN == ["train"]  # detectron2 catalog names do not replace fnl's splits


def test_upstream_legacy_config_sets_its_head_and_schedule_and_builds_that_model():
    cfg = load_detectron2_config(UPSTREAM / "densepose_rcnn_R_50_FPN_s1x_legacy.yaml").cfg
    head = cfg.MODEL.ROI_DENSEPOSE_HEAD
    assert (head.NUM_COARSE_SEGM_CHANNELS, head.POOLER_RESOLUTION, head.HEATMAP_SIZE, head.DECODER_ON) == \
        (15, 14, 56, False)
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.STEPS) == (0.002, [100000, 120000])  # "(100000, 120000)" in the YAML
    assert cfg.INPUT.MIN_SIZE_TRAIN == [640, 672, 704, 736, 768, 800]
    keys = build_model(cfg).state_dict()
    assert tuple(keys["roi_heads.densepose_predictor.ann_index_lowres.weight"].shape) == (512, 15, 4, 4)
    assert not any(k.startswith("roi_heads.decoder.") for k in keys)


def test_upstream_r101_config_builds_a_resnet101():
    bottom_up = build_bottom_up(load_detectron2_config(UPSTREAM / "densepose_rcnn_R_101_FPN_s1x.yaml").cfg)
    assert len(bottom_up.res4) == 23


def user_config(tmp_path: Path, body: str) -> Path:
    return write_user_config(tmp_path, UPSTREAM, ("Base-DensePose-RCNN-FPN.yaml",), body)


@pytest.mark.parametrize(("body", "message"), [
    ("MODEL:\n  RESNETS:\n    DEFORM_MODULATED: True\n",
     r"mine\.yaml: MODEL\.RESNETS\.DEFORM_MODULATED True has no fnl counterpart"),
    ("MODEL:\n  ROI_HEADS:\n    NAME: StandardROIHeads\n",
     r"mine\.yaml: MODEL\.ROI_HEADS\.NAME 'StandardROIHeads' is not an architecture fnl builds"),
    ("MODEL:\n  FPN:\n    IN_FEATURES: [res3, res4, res5]\n",
     r"mine\.yaml: MODEL\.FPN\.IN_FEATURES .* must equal MODEL\.RESNETS\.OUT_FEATURES"),
])
def test_a_model_key_fnl_cannot_honour_is_a_one_line_error_naming_key_and_file(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_detectron2_config(user_config(tmp_path, body))


@pytest.mark.parametrize(("input_format", "mean"), [("BGR", [3.0, 2.0, 1.0]), ("RGB", [1.0, 2.0, 3.0])])
def test_pixel_statistics_are_put_in_rgb_order(tmp_path, input_format, mean):
    path = user_config(tmp_path, f"INPUT:\n  FORMAT: {input_format}\nMODEL:\n  PIXEL_MEAN: [1.0, 2.0, 3.0]\n")
    upstream = load_detectron2_config(path)
    assert upstream.input_format == input_format and upstream.cfg.MODEL.PIXEL_MEAN == mean


def test_detectron2_configs_are_told_from_fnls():
    assert is_detectron2_config(UPSTREAM / "densepose_rcnn_R_50_FPN_s1x.yaml")
    assert not is_detectron2_config("densepose_rcnn_R_50_FPN_s1x")
    assert not is_detectron2_config("mobile_parsing_rcnn_b")
