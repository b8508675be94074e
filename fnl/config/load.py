"""How a config is made: the defaults, then a file (the user's, or one shipped with fnl), then ``KEY VALUE``
overrides."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import yaml

from fnl.config.config import CfgNode, ConfigError
from fnl.config.defaults import _C, RETIRED_KEYS

# The shipped configs, package data of fnl: in a checkout fnl/configs links to the top-level configs/ (the files
# users see and edit), in an installed wheel they are copied into the package. fnl is installed as plain files
# (never zipped), so the resource is a directory on disk.
CONFIGS_DIR = Path(str(resources.files("fnl") / "configs"))


def get_cfg() -> CfgNode:
    """A fresh copy of the defaults."""
    return _C.clone()


def stored_config(text: str, source: str) -> CfgNode:
    """The config a checkpoint or an export stored (``CfgNode.dump()``'s YAML) over the defaults. Keys fnl no longer
    has (``RETIRED_KEYS``) are dropped: files written by an older fnl still load."""
    data = yaml.safe_load(text) or {}
    for key in RETIRED_KEYS:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    cfg = get_cfg()
    cfg.merge_from_dict(data, source=source)
    return cfg


def find_config_file(name: str | Path) -> Path:
    """A path as given, or a file name / stem looked up in the shipped configs."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIGS_DIR / path, CONFIGS_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name} (looked also in {CONFIGS_DIR})")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), freeze: bool = True) -> CfgNode:
    """Defaults, then the file (with its ``_BASE_`` chain), then ``KEY VALUE`` overrides."""
    cfg = get_cfg()
    if path is not None:
        cfg.merge_from_file(find_config_file(path))
    cfg.merge_from_list(overrides)
    return cfg.freeze() if freeze else cfg
