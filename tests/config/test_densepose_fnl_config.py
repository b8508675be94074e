"""DensePoseFnL's YAML configs read as written: its keys mapped onto fnl's or ignored with the reason, and the
architectures fnl does not build refused by key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
from config_testing import write_user_config

from fnl.config import ConfigError, load_config
from fnl.config.densepose_fnl import is_densepose_fnl_config, load_densepose_fnl_config
from fnl.config.detectron2 import is_detectron2_config

ASSETS = Path(__file__).parents[1] / "assets"
UPSTREAM = ASSETS / "densepose_fnl_configs"


def test_mobile_parsing_rcnn_b_s3x_reads_as_fnls_config_of_that_model():
    upstream = load_densepose_fnl_config(UPSTREAM / "mobile_parsing_rcnn_b_s3x.yaml")
    assert upstream.cfg.MODEL == load_config("densepose_fnl_b_s3x").MODEL
    assert upstream.input_format == "RGB"
    model = upstream.cfg.MODEL
    assert (model.BACKBONE.NAME, model.BACKBONE.FEATURE_LOCATION, model.BACKBONE.NORM) == ("spnasnet_100",
                                                                                            "expansion", "FrozenBN")
    assert (model.NECK.BIFPN_LAYOUT, model.NECK.NUM_REPEATS, model.NECK.OUT_CHANNELS) == ("densepose-fnl", 1, 64)
    dp = model.ROI_DENSEPOSE_HEAD  # DECODER_ISSIMPLE: P2 passed through; MyDensePoseROIHeads' GN-free ASPP
    assert (dp.DECODER_ON, dp.IN_FEATURES, dp.ASPP_DILATIONS, dp.NUM_COARSE_SEGM_CHANNELS) == (False, ["p2"],
                                                                                              [6, 12, 18], 15)
    assert model.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO == 0 and model.RPN.POST_NMS_TOPK_PER == "image"
    assert sorted(upstream.ignored) == ["DATASETS.TEST", "DATASETS.TRAIN", "MODEL.FPN.IN_FEATURES",
                                        "MODEL.RESNETS.OUT_FEATURES", "MODEL.TIMMNETS.PRETRAINED",
                                        "MODEL.TIMMNETS.SCRIPTABLE", "SEED", "TEST.EVAL_PERIOD", "VERSION"]
    assert "whatever these names" in upstream.ignored["MODEL.FPN.IN_FEATURES"]


def test_densepose_fnl_configs_are_told_apart_from_detectron2s():
    assert is_densepose_fnl_config(UPSTREAM / "mobile_parsing_rcnn_b_s3x.yaml")
    assert is_densepose_fnl_config(UPSTREAM / "DensePose-Parsing-RCNN-FPN.yaml")
    assert not is_densepose_fnl_config(ASSETS / "detectron2_configs" / "densepose_rcnn_R_50_FPN_s1x.yaml")
    assert not is_densepose_fnl_config("mobile_parsing_rcnn_b")
    assert is_detectron2_config(UPSTREAM / "mobile_parsing_rcnn_b_s3x.yaml")  # why fnl-convert asks FnL first


@pytest.mark.parametrize(("config", "message"), [
    ("mobile_parsing_rcnn_b_wc2m_s3x.yaml", r"UV_CONFIDENCE\.ENABLED True is not an architecture fnl builds"),
    ("mobile_parsing_rcnn_b_cse_s3x.yaml", r"PREDICTOR_NAME 'DensePoseEmbeddingPredictor' is not an architecture"),
    ("DensePose-Parsing-RCNN-FPN.yaml", r"DEEPLAB\.NONLOCAL_ON 1: detectron2's non-local block"),
])
def test_upstream_variants_fnl_does_not_build_are_refused_naming_key_and_file(config, message):
    with pytest.raises(ConfigError, match=rf"config .*{config}: .*{message}"):
        load_densepose_fnl_config(UPSTREAM / config)


def _user_config(tmp_path: Path, body: str) -> Path:
    """A user's config on top of the upstream model B config, as DensePoseFnL's configs chain."""
    return write_user_config(tmp_path, UPSTREAM, ("Base-DensePose-RCNN-FPN.yaml", "DensePose-Parsing-RCNN-FPN.yaml",
                                                  "mobile_parsing_rcnn_b_s3x.yaml"), body)


@pytest.mark.parametrize(("body", "message"), [
    ("MODEL:\n  ROI_DENSEPOSE_HEAD:\n    DEEPLAB:\n      NORM: GN\n",
     r"MODEL\.ROI_DENSEPOSE_HEAD\.DEEPLAB\.NORM 'GN': fnl's DeepLab head"),
    ("MODEL:\n  TIMMNETS:\n    OUT_FEATURES: (0, 1, 2, 3, 4)\n",
     r"MODEL\.TIMMNETS\.OUT_FEATURES \[0, 1, 2, 3, 4\] is not \(1, 2, 3, 4\)"),
    ("MODEL:\n  TIMMNETS:\n    NAME: tf_efficientnet_b0\n",
     r"MODEL\.TIMMNETS\.NAME 'tf_efficientnet_b0': DensePoseFnL resets"),
    ("MODEL:\n  TIMMNETS:\n    DROP_RATE: 0.2\n", r"MODEL\.TIMMNETS\.DROP_RATE is not a key DensePoseFnL's config\.py"),
    ("MODEL:\n  BACKBONE:\n    NAME: build_timm_backbone\n", r"MODEL\.BACKBONE\.NAME 'build_timm_backbone' is not an "
                                                             r"architecture fnl builds"),
])
def test_a_user_config_fnl_cannot_honour_is_refused_naming_key_and_file(tmp_path, body, message):
    with pytest.raises(ConfigError, match=rf"config .*mine\.yaml: {message}"):
        load_densepose_fnl_config(_user_config(tmp_path, body))


def test_a_user_config_changing_sizes_and_thresholds_is_taken(tmp_path):
    body = ("MODEL:\n  FPN:\n    OUT_CHANNELS: 96\n  RPN:\n    NMS_THRESH_TEST: 0.3\n"
            "  TIMMNETS:\n    NAME: mobilenetv2_100\n    NORM: BN\nINPUT:\n  MIN_SIZE_TEST: 512\n")
    cfg = load_densepose_fnl_config(_user_config(tmp_path, body), ["MODEL.RPN.POST_NMS_TOPK_TEST", "100"]).cfg
    assert (cfg.MODEL.NECK.OUT_CHANNELS, cfg.MODEL.RPN.NMS_THRESH_TEST, cfg.INPUT.MIN_SIZE_TEST) == (96, 0.3, 512)
    assert (cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.NORM, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (
        "mobilenetv2_100", "BN", 100)
