"""DensePoseFnL's YAML configs (github.com/zetyquickly/DensePoseFnL ``configs/*.yaml``, e.g.
``mobile_parsing_rcnn_b_s3x.yaml``, and a user's own), read as written.

DensePoseFnL is detectron2's DensePose project plus three things: a timm backbone wrapper (``MODEL.TIMMNETS``,
``build_timm_bifpn_backbone``) with its own BiFPN, ``MyDensePoseROIHeads`` (its DeepLab head without GroupNorm, ASPP
dilations 6/12/18, an optional pass-through decoder) and the keys those read. This module translates those keys
and hands the rest to ``fnl.config.detectron2``, which reads them as detectron2's (same base, same rules, same
errors). A key that would make another network than fnl builds is an error naming key and file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fnl.config.config import CfgNode, ConfigError, _load_yaml_with_base
from fnl.config.detectron2 import SUPPORTED_VALUES, Detectron2Config, flat_value, load_detectron2_config
from fnl.config.load import find_config_file

TIMM_BIFPN_BACKBONE = "build_timm_bifpn_backbone"
SUPPORTED = {
    **SUPPORTED_VALUES,
    "MODEL.BACKBONE.NAME": (*SUPPORTED_VALUES["MODEL.BACKBONE.NAME"], TIMM_BIFPN_BACKBONE),
    "MODEL.ROI_HEADS.NAME": ("MyDensePoseROIHeads", *SUPPORTED_VALUES["MODEL.ROI_HEADS.NAME"]),
}
# add_timmnets_config's defaults (DensePoseFnL config.py), for keys a YAML leaves out.
TIMMNETS_DEFAULTS = {"NAME": "spnasnet_100", "OUT_FEATURES": [], "NORM": "FrozenBN"}
# DensePoseFnL's BiFPN builds its laterals from feature_info[1..4] and unpacks exactly four maps.
TIMM_OUT_FEATURES = [1, 2, 3, 4]
# MyDensePoseROIHeads rebuilds the DeepLab head's ASPP without GroupNorm and with these dilations (not 6/12/56).
ASPP_DILATIONS_WITHOUT_NORM = [6, 12, 18]
# detectron2 DensePose's default for ROI_DENSEPOSE_HEAD.DEEPLAB.NORM.
DEEPLAB_NORM_DEFAULT = "GN"

IGNORED_TIMM = {
    "MODEL.TIMMNETS.PRETRAINED": "ImageNet weights for training; the weights come from the checkpoint",
    "MODEL.TIMMNETS.SCRIPTABLE": "a timm build flag for TorchScript; the same layers and weights",
    "MODEL.TIMMNETS.EXPORTABLE": "a timm build flag for ONNX export; the same layers and weights",
    "MODEL.FPN.IN_FEATURES": "DensePoseFnL's BiFPN reads the four timm features in order, whatever these names",
    "MODEL.FPN.NORM": "DensePoseFnL's BiFPN has plain 1x1 laterals and BN after each separable conv regardless",
    "MODEL.FPN.FUSE_TYPE": "DensePoseFnL's BiFPN fuses by fast normalized fusion regardless",
}


def is_densepose_fnl_config(path: str | Path) -> bool:
    """A YAML (with its ``_BASE_`` chain) that names DensePoseFnL's modules or keys."""
    model = _load_yaml_with_base(find_config_file(path)).get("MODEL", {})
    return ("TIMMNETS" in model or str(model.get("BACKBONE", {}).get("NAME", "")).startswith("build_timm")
            or model.get("ROI_HEADS", {}).get("NAME") == "MyDensePoseROIHeads"
            or "DECODER_ISSIMPLE" in model.get("ROI_DENSEPOSE_HEAD", {}))


def load_densepose_fnl_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Detectron2Config:
    """Read a DensePoseFnL config as an fnl config; ``overrides`` are fnl keys."""
    return load_detectron2_config(path, overrides, supported=SUPPORTED, translate=translate_densepose_fnl_keys)


def translate_densepose_fnl_keys(path: Path, flat: dict[str, Any], base: CfgNode
                                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """Pop DensePoseFnL's own keys from ``flat``; return the fnl updates they make and the keys ignored, with why."""
    updates: dict[str, Any] = {}
    ignored: dict[str, str] = {}
    timm_keys = {k: flat.pop(k) for k in [k for k in flat if k.startswith("MODEL.TIMMNETS.")]}
    if flat.get("MODEL.BACKBONE.NAME") == TIMM_BIFPN_BACKBONE:
        flat.pop("MODEL.BACKBONE.NAME")
        updates.update(_timm_bifpn_backbone(path, {k.removeprefix("MODEL.TIMMNETS."): v for k, v in timm_keys.items()}))
        ignored.update({k: IGNORED_TIMM[k] for k in timm_keys if k in IGNORED_TIMM})
        for key in [k for k in flat if k in IGNORED_TIMM]:
            flat.pop(key)
            ignored[key] = IGNORED_TIMM[key]
        for key in [k for k in flat if k.startswith("MODEL.RESNETS.")]:
            flat.pop(key)
            ignored[key] = f"detectron2's ResNet section; the backbone is timm's ({updates['MODEL.BACKBONE.NAME']})"
    else:
        ignored.update({k: f"MODEL.BACKBONE.NAME is not {TIMM_BIFPN_BACKBONE}; nothing reads it" for k in timm_keys})
    updates.update(_roi_heads(path, flat, base))
    return updates, ignored


def _timm_bifpn_backbone(path: Path, timm: dict[str, Any]) -> dict[str, Any]:
    """build_timm_bifpn_backbone: timm's model with features before conv_pwl, under DensePoseFnL's BiFPN."""
    settings = {key: flat_value(timm, key, default) for key, default in TIMMNETS_DEFAULTS.items()}
    unknown = sorted(set(timm) - set(TIMMNETS_DEFAULTS) - {k.removeprefix("MODEL.TIMMNETS.") for k in IGNORED_TIMM})
    if unknown:
        raise ConfigError(f"config {path}: MODEL.TIMMNETS.{unknown[0]} is not a key DensePoseFnL's config.py defines")
    name = str(settings["NAME"])
    if list(settings["OUT_FEATURES"]) != TIMM_OUT_FEATURES:
        raise ConfigError(f"config {path}: MODEL.TIMMNETS.OUT_FEATURES {settings['OUT_FEATURES']} is not "
                          f"{tuple(TIMM_OUT_FEATURES)}: DensePoseFnL's BiFPN takes timm features 1..4 only")
    if "tf" in name:
        raise ConfigError(f"config {path}: MODEL.TIMMNETS.NAME '{name}': DensePoseFnL resets the BN epsilon and "
                          "momentum of 'tf' models to TensorFlow's, which fnl does not reproduce")
    if settings["NORM"] not in ("FrozenBN", "BN", "SyncBN"):
        raise ConfigError(f"config {path}: MODEL.TIMMNETS.NORM '{settings['NORM']}' is not FrozenBN, BN or SyncBN")
    return {
        "MODEL.BACKBONE.NAME": name,
        "MODEL.BACKBONE.PRETRAINED": False,
        "MODEL.BACKBONE.FEATURE_LOCATION": "expansion",
        "MODEL.BACKBONE.OUT_INDICES": TIMM_OUT_FEATURES,
        "MODEL.BACKBONE.NORM": settings["NORM"],
        "MODEL.NECK.NAME": "BiFPN",
        "MODEL.NECK.BIFPN_LAYOUT": "densepose-fnl",
        "MODEL.NECK.NUM_REPEATS": 1,
        "MODEL.NECK.NORM": "",
        "MODEL.NECK.FUSE_EPS": 1e-4,
    }


def _roi_heads(path: Path, flat: dict[str, Any], base: CfgNode) -> dict[str, Any]:
    """MyDensePoseROIHeads' changes to detectron2's DensePose RoI heads."""
    updates: dict[str, Any] = {}
    head = flat.get("MODEL.ROI_DENSEPOSE_HEAD.NAME", base.MODEL.ROI_DENSEPOSE_HEAD.NAME)
    simple = flat_value(flat, "MODEL.ROI_DENSEPOSE_HEAD.DECODER_ISSIMPLE", False)
    flat.pop("MODEL.ROI_DENSEPOSE_HEAD.DECODER_ISSIMPLE", None)
    decoder_on = flat_value(flat, "MODEL.ROI_DENSEPOSE_HEAD.DECODER_ON", base.MODEL.ROI_DENSEPOSE_HEAD.DECODER_ON)
    if simple and decoder_on:  # SimpleDecoder passes the first RoI feature through: the head pools that level only
        flat.pop("MODEL.ROI_DENSEPOSE_HEAD.DECODER_ON", None)
        in_features = flat_value(flat, "MODEL.ROI_HEADS.IN_FEATURES", base.MODEL.ROI_HEADS.IN_FEATURES)
        updates["MODEL.ROI_DENSEPOSE_HEAD.DECODER_ON"] = False
        updates["MODEL.ROI_DENSEPOSE_HEAD.IN_FEATURES"] = [in_features[0]]
    nonlocal_on = flat_value(flat, "MODEL.ROI_DENSEPOSE_HEAD.DEEPLAB.NONLOCAL_ON", False)
    flat.pop("MODEL.ROI_DENSEPOSE_HEAD.DEEPLAB.NONLOCAL_ON", None)
    norm = flat_value(flat, "MODEL.ROI_DENSEPOSE_HEAD.DEEPLAB.NORM", DEEPLAB_NORM_DEFAULT)
    flat.pop("MODEL.ROI_DENSEPOSE_HEAD.DEEPLAB.NORM", None)
    if head == "DensePoseDeepLabHead":
        if nonlocal_on:
            raise ConfigError(f"config {path}: MODEL.ROI_DENSEPOSE_HEAD.DEEPLAB.NONLOCAL_ON {nonlocal_on}: "
                              "detectron2's non-local block (BN, max-pooled keys) is not one fnl builds")
        if norm != "":
            raise ConfigError(f"config {path}: MODEL.ROI_DENSEPOSE_HEAD.DEEPLAB.NORM '{norm}': fnl's DeepLab head "
                              "has no GroupNorm (DensePoseFnL's models set it to \"\")")
        updates["MODEL.ROI_DENSEPOSE_HEAD.ASPP_DILATIONS"] = ASPP_DILATIONS_WITHOUT_NORM
        updates["MODEL.ROI_DENSEPOSE_HEAD.NORM"] = ""
        updates["MODEL.ROI_DENSEPOSE_HEAD.NONLOCAL_ON"] = False
    return updates
