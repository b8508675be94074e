"""detectron2 DensePose YAML configs (``projects/DensePose/configs/*.yaml`` and a user's own), read as written.

Such a file sets only what differs from detectron2's and DensePose's defaults, which fnl's defaults are not, so it
is read over ``configs/densepose_rcnn_R_50_FPN_s1x.yaml`` (those defaults in fnl's keys). Each key then lands in one
of four places: the same fnl key; a renamed one (``MODEL.FPN.OUT_CHANNELS`` -> ``MODEL.NECK.OUT_CHANNELS``); a
check that the architecture is one fnl builds (``MODEL.ROI_HEADS.NAME`` must be "DensePoseROIHeads"); or the list of
ignored keys with the reason (dataset names, MODEL.WEIGHTS, training-only settings). A model key fnl has no
counterpart for is an error naming it: ignoring it could build another network than the checkpoint's.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fnl.config.config import CfgNode, ConfigError, _load_yaml_with_base
from fnl.config.load import find_config_file, load_config

BASE_CONFIG = "densepose_rcnn_R_50_FPN_s1x"

RENAMED = {
    "MODEL.FPN.OUT_CHANNELS": "MODEL.NECK.OUT_CHANNELS",
    "MODEL.FPN.NORM": "MODEL.NECK.NORM",
    "TEST.DETECTIONS_PER_IMAGE": "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE",
}

# Keys that choose an architecture: fnl builds these values only.
SUPPORTED_VALUES: dict[str, tuple[Any, ...]] = {
    "MODEL.BACKBONE.NAME": ("build_resnet_fpn_backbone",),
    "MODEL.PROPOSAL_GENERATOR.NAME": ("RPN",),
    "MODEL.ANCHOR_GENERATOR.NAME": ("DefaultAnchorGenerator",),
    "MODEL.RPN.HEAD_NAME": ("StandardRPNHead",),
    "MODEL.ROI_HEADS.NAME": ("DensePoseROIHeads",),
    "MODEL.ROI_BOX_HEAD.NAME": ("FastRCNNConvFCHead",),
    "MODEL.ROI_BOX_HEAD.NORM": ("",),
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": (False,),
    "MODEL.ROI_DENSEPOSE_HEAD.PREDICTOR_NAME": ("DensePoseChartPredictor", "DensePoseChartWithConfidencePredictor"),
    "MODEL.ROI_DENSEPOSE_HEAD.UV_CONFIDENCE.ENABLED": (False,),
    "MODEL.ROI_DENSEPOSE_HEAD.SEGM_CONFIDENCE.ENABLED": (False,),
    "MODEL.FPN.FUSE_TYPE": ("sum",),
    "MODEL.MASK_ON": (False,),
    "MODEL.KEYPOINT_ON": (False,),
    "MODEL.LOAD_PROPOSALS": (False,),
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": ([False, False, False, False],),
}

# Left out whether or not fnl has a key of that name: these would point fnl at detectron2's files and catalogs.
IGNORED: tuple[tuple[str, str], ...] = (
    ("MODEL.WEIGHTS", "the weights come from the checkpoint being converted"),
    ("MODEL.DEVICE", "fnl chooses the device per command"),
    ("MODEL.FPN.IN_FEATURES", "fnl's FPN takes every MODEL.RESNETS.OUT_FEATURES stage (checked equal)"),
    ("MODEL.ROI_DENSEPOSE_HEAD.LOSS_NAME", "training loss; fnl's is the chart loss"),
    ("DATASETS.", "detectron2 dataset catalog names; fnl reads DATASETS.ROOT"),
    ("DATALOADER.", "training data loading"),
    ("DENSEPOSE_EVALUATION.", "evaluation settings of detectron2's tools"),
    ("BOOTSTRAP_", "DensePose bootstrapping (training data)"),
    ("VERSION", "detectron2's config version"),
    ("OUTPUT_DIR", "fnl commands take --output"),
    ("CUDNN_BENCHMARK", "no GPU settings"),
    ("VIS_PERIOD", "training visualisation"),
    ("SEED", "training seed"),
    ("GLOBAL.", "detectron2 internals"),
)
# Left out only when fnl has no key of that name (fnl's SOLVER.BASE_LR, INPUT.MIN_SIZE_TEST... are taken).
IGNORED_IF_ABSENT: tuple[tuple[str, str], ...] = (
    ("SOLVER.", "a training schedule key fnl does not have"),
    ("INPUT.", "a data augmentation key fnl does not have"),
    ("TEST.", "an evaluation setting of detectron2's tools"),
)


def _reason(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    """The reason of the first rule naming ``key`` exactly or, for a rule ending in "." or "_", a prefix of it."""
    return next((why for prefix, why in rules
                 if key == prefix or (prefix[-1] in "._" and key.startswith(prefix))), None)


@dataclass
class Detectron2Config:
    """An upstream config in fnl's keys, the channel order its model takes, and what was left out and why."""

    cfg: CfgNode
    input_format: str
    ignored: dict[str, str] = field(default_factory=dict)


def is_detectron2_config(path: str | Path) -> bool:
    """A YAML whose keys (with its ``_BASE_`` chain) name detectron2 modules fnl's own configs never do."""
    data = _load_yaml_with_base(find_config_file(path))
    model = data.get("MODEL", {})
    return any(k in model for k in ("FPN", "PROPOSAL_GENERATOR")) or "NAME" in model.get("ROI_HEADS", {})


# A dialect's translation of its own keys: given the config file, its flattened keys and the base config, it pops
# the keys it handles from the flat dict and returns the fnl updates they make (applied last) and those it ignored.
Translate = Callable[[Path, dict[str, Any], CfgNode], tuple[dict[str, Any], dict[str, str]]]


def load_detectron2_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                           supported: dict[str, tuple[Any, ...]] | None = None,
                           translate: Translate | None = None) -> Detectron2Config:
    """Read a detectron2 DensePose config (with its ``_BASE_`` chain) as an fnl config; ``overrides`` are fnl keys.

    A project built on detectron2 (``fnl.config.densepose_fnl``) passes the architecture values it adds to
    ``supported`` and translates its own keys with ``translate``; everything else is read as detectron2's."""
    path = find_config_file(path)
    flat = dict(_flatten(_load_yaml_with_base(path)))
    supported = SUPPORTED_VALUES if supported is None else supported
    cfg = load_config(BASE_CONFIG, freeze=False)
    dialect_updates, ignored = translate(path, flat, cfg) if translate else ({}, {})
    updates: dict[str, Any] = {}
    for key, raw in flat.items():
        value = _parse_tuple_string(raw)
        if key in supported:
            if value not in supported[key]:
                raise ConfigError(f"config {path}: {key} {value!r} is not an architecture fnl builds "
                                  f"(supported: {', '.join(map(repr, supported[key]))})")
            if key != "MODEL.BACKBONE.NAME":
                continue
        reason = _reason(key, IGNORED)
        key = RENAMED.get(key, key)
        if reason is None and _has_key(cfg, key):
            updates[key] = value
            continue
        reason = reason or _reason(key, IGNORED_IF_ABSENT)
        if reason is None:
            raise ConfigError(f"config {path}: {key} {value!r} has no fnl counterpart; fnl would build another "
                              "model than this config describes")
        ignored[key] = reason
    input_format = str(updates.pop("INPUT.FORMAT", "BGR"))
    if input_format not in ("BGR", "RGB"):
        raise ConfigError(f"config {path}: INPUT.FORMAT '{input_format}' is not BGR or RGB")
    for key in ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"):
        if key in updates and input_format == "BGR":  # fnl feeds RGB: the same statistics in RGB order
            updates[key] = list(reversed(updates[key]))
    if "MODEL.ROI_HEADS.IN_FEATURES" in updates:  # detectron2's DensePose head reads the RoI heads' features
        updates["MODEL.ROI_DENSEPOSE_HEAD.IN_FEATURES"] = updates["MODEL.ROI_HEADS.IN_FEATURES"]
    fpn_in = flat.get("MODEL.FPN.IN_FEATURES")
    out_features = updates.get("MODEL.RESNETS.OUT_FEATURES", cfg.MODEL.RESNETS.OUT_FEATURES)
    if fpn_in is not None and list(_parse_tuple_string(fpn_in)) != list(out_features):
        raise ConfigError(f"config {path}: MODEL.FPN.IN_FEATURES {fpn_in} must equal MODEL.RESNETS.OUT_FEATURES "
                          f"{out_features}: fnl's FPN takes every bottom-up stage")
    cfg.merge_from_dict(_nest({**updates, **dialect_updates}), source=str(path))
    cfg.merge_from_list(overrides)
    return Detectron2Config(cfg.freeze(), input_format, ignored)


def flat_value(flat: dict[str, Any], key: str, default: Any = None) -> Any:
    """A flattened config value with detectron2's tuple strings parsed."""
    return _parse_tuple_string(flat.get(key, default))


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _nest(flat: dict[str, Any]) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _has_key(cfg: CfgNode, key: str) -> bool:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _parse_tuple_string(value: Any) -> Any:
    """detectron2 configs write tuples as YAML strings, ``(100000, 120000)``; yacs evaluates them, so do we."""
    if isinstance(value, str) and value.strip().startswith(("(", "[")):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
        return list(parsed) if isinstance(parsed, tuple) else parsed
    return value
