"""A small detectron2-compatible config node.

Kept here rather than taken from yacs/fvcore so that an unknown key names both the key and the file it came from,
and so that ``_BASE_`` chains resolve relative to the file that names them.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from fnl.utils.errors import UserError

BASE_KEY = "_BASE_"


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the key and where it came from."""


class CfgNode(dict):
    """Nested dict with attribute access; keys are fixed by the defaults, values are type-checked on merge."""

    def __init__(self, init: dict | None = None) -> None:
        super().__init__()
        for key, value in (init or {}).items():
            self[key] = CfgNode(value) if isinstance(value, dict) else value
        self.__dict__["_frozen"] = False

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"config is frozen; cannot set {name}={value!r}")
        self[name] = value

    def freeze(self) -> CfgNode:
        self.__dict__["_frozen"] = True
        for value in self.values():
            if isinstance(value, CfgNode):
                value.freeze()
        return self

    def clone(self) -> CfgNode:
        return CfgNode(copy.deepcopy(self.to_dict()))

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, CfgNode) else copy.deepcopy(v) for k, v in self.items()}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # --- merging ---------------------------------------------------------------------------------------------
    def merge_from_dict(self, other: dict, source: str = "<dict>", prefix: str = "") -> None:
        for key, value in other.items():
            full_key = f"{prefix}{key}"
            if key not in self:
                raise ConfigError(f"unknown config key '{full_key}' in {source}")
            current = self[key]
            if isinstance(current, CfgNode):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{full_key}' in {source} must be a mapping, got {value!r}")
                current.merge_from_dict(value, source, prefix=f"{full_key}.")
            else:
                self[key] = _coerce(value, current, full_key, source)

    def merge_from_file(self, path: str | Path) -> None:
        self.merge_from_dict(_load_yaml_with_base(Path(path)), source=str(path))

    def merge_from_list(self, pairs: Iterable[str]) -> None:
        """``["SOLVER.MAX_ITER", "100", ...]`` as detectron2's command line takes them."""
        items = list(pairs)
        if len(items) % 2:
            raise ConfigError(f"overrides come as KEY VALUE pairs; got an odd number: {items}")
        for key, raw in zip(items[0::2], items[1::2], strict=True):
            node = self
            parts = key.split(".")
            for depth, part in enumerate(parts[:-1]):
                if part not in node or not isinstance(node[part], CfgNode):
                    raise ConfigError(f"unknown config key '{'.'.join(parts[: depth + 1])}' on the command line")
                node = node[part]
            leaf = parts[-1]
            if leaf not in node:
                raise ConfigError(f"unknown config key '{key}' on the command line")
            node[leaf] = _coerce(_parse_literal(raw), node[leaf], key, "the command line")


def _parse_literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Accept a value when its type fits the default's; ints widen to floats, lists and tuples interchange."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, list | tuple) and isinstance(value, list | tuple):
        return list(value)
    raise ConfigError(
        f"config key '{key}' in {source}: expected {type(default).__name__} like {default!r}, got {value!r}"
    )


def _load_yaml_with_base(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in _seen:
        raise ConfigError(f"_BASE_ cycle: {' -> '.join(map(str, (*_seen, path)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    merged = _load_yaml_with_base(path.parent / base, (*_seen, path))
    _deep_update(merged, data)
    return merged


def _deep_update(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value
