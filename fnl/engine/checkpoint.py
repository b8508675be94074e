"""Checkpoints in detectron2's format: ``{"model": state_dict, "iteration": int, ...}`` plus our config.

Loading uses ``torch.load(weights_only=True)``: a model file must not be able to run code. ``allow_unsafe=True``
(``--unsafe-load`` on the command line) is the explicit opt-out for trusted legacy pickles.

``zoo:NAME`` anywhere a checkpoint path is taken names a trained model shipped in the repository's ``model_zoo/``
(``model_zoo/NAME.pth``, with its config, evaluation and the command that regenerates it beside it).
"""

from __future__ import annotations

import codecs
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fnl
from fnl.config import CfgNode, ConfigError, get_cfg
from fnl.utils.io import atomic_path

logger = logging.getLogger("fnl")
ZOO_PREFIX = "zoo:"
MODEL_ZOO_DIR = Path(__file__).resolve().parents[2] / "model_zoo"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model; the message names the file."""


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: int = 0

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors loaded"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing (kept at initialisation): {_preview(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (ignored): {_preview(self.unexpected)}")
        return "; ".join(parts)


def _preview(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def save_checkpoint(path: str | Path, model: nn.Module, cfg: CfgNode | None = None, iteration: int | None = None,
                    **extra: Any) -> Path:
    """Write atomically: an interrupted save never leaves a half-written model behind."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload: dict[str, Any] = {"model": model.state_dict(), "fnl_version": fnl.__version__}
    if iteration is not None:
        payload["iteration"] = iteration
    if cfg is not None:
        payload["config"] = cfg.dump()
    payload.update(extra)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def periodic_checkpoint_name(iteration: int) -> str:
    """The file name of the periodic checkpoint written after ``iteration`` (detectron2's)."""
    return f"model_{iteration:07d}.pth"


def checkpoints_kept(cfg: CfgNode, key: str) -> int:
    """The validated value of a CHECKPOINTS_KEPT key (``key`` is its full name, e.g. "SOLVER.CHECKPOINTS_KEPT")."""
    section, name = key.split(".")
    value = cfg[section][name]
    if not isinstance(value, int) or value < 0 or value == 1:
        raise ConfigError(f"{key} must be 0 (keep every periodic checkpoint) or at least 2 (a diverging run resumes "
                          f"from the checkpoint before the last), got {value!r}")
    return value


def prune_periodic_checkpoints(directory: str | Path, keep: int, prefix: str = "") -> list[Path]:
    """Remove all but the ``keep`` newest periodic checkpoints ``{prefix}model_NNNNNNN.pth`` in ``directory``
    (``keep`` 0: remove none). Returns the files removed."""
    pattern = re.compile(re.escape(prefix) + r"model_(\d{7})\.pth")
    found = sorted((int(match.group(1)), path) for path in Path(directory).iterdir()
                   if (match := pattern.fullmatch(path.name)))
    removed = [path for _, path in found[:-keep]] if keep else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def zoo_models() -> list[str]:
    """Short names of the models in ``model_zoo/`` (``zoo:NAME``)."""
    return sorted(p.stem for p in MODEL_ZOO_DIR.glob("*.pth"))


def resolve_checkpoint(path: str | Path) -> Path:
    """``zoo:NAME`` -> ``model_zoo/NAME.pth``; any other path as given."""
    text = str(path)
    if not text.startswith(ZOO_PREFIX):
        return Path(path)
    name = text[len(ZOO_PREFIX):]
    resolved = MODEL_ZOO_DIR / f"{name}.pth"
    if not resolved.is_file():
        raise CheckpointError(f"no model '{name}' in the model zoo ({MODEL_ZOO_DIR}); "
                              f"available: {', '.join(zoo_models()) or 'none'}")
    return resolved


def read_checkpoint(path: str | Path, allow_unsafe: bool = False) -> dict[str, Any]:
    """The raw checkpoint dict; a bare state_dict is wrapped as ``{"model": ...}``. ``path`` may be ``zoo:NAME``."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pth"))
        hint = f": pass one of its files ({_preview(inside, 3)})" if inside else ""
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    if not head.startswith((_ZIP_MAGIC, *_PICKLE_PROTOCOL_2_TO_5)):
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint: it is {_describe_content(head)}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=not allow_unsafe)
    except pickle.UnpicklingError as exc:
        if allow_unsafe:
            raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from exc
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain containers, so it was not loaded "
            f"(weights_only=True). If you trust its source, load it with --unsafe-load. Detail: {str(exc)[:300]}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch file (corrupt or truncated?): "
                              f"{str(exc)[:300]}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict / state_dict")
    if "model" not in data:
        if data and all(isinstance(v, torch.Tensor) for v in data.values()):
            data = {"model": data}
        else:
            raise CheckpointError(f"checkpoint {path} has no 'model' entry (keys: {_preview(sorted(data))})")
    return data


# torch.save writes a zip archive; older torch.save files and detectron2's .pkl files are pickles (protocol 2+).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_2_TO_5 = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))
_HEAD_BYTES = 64


def _describe_content(head: bytes) -> str:
    """What a file that is neither a zip nor a pickle seems to hold, from its first bytes, for the error line."""
    if not head:
        return "an empty file"
    try:
        # Incremental: a multi-byte character cut at the end of ``head`` is still text.
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        text = None
    if text is None or not all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"binary data of another kind (first bytes {head[:8].hex(' ')})"
    kind = "a JSON file" if text.lstrip().startswith(("{", "[")) else "a text file"
    return f"{kind} (starts with {text.strip()[:40]!r})"


def config_from_checkpoint(path: str | Path, allow_unsafe: bool = False) -> CfgNode:
    """The config a checkpoint was trained with (fnl checkpoints carry it)."""
    data = read_checkpoint(path, allow_unsafe)
    text = data.get("config")
    if not isinstance(text, str):
        raise CheckpointError(f"checkpoint {path} carries no config; pass --config")
    import yaml

    cfg = get_cfg()
    try:
        cfg.merge_from_dict(yaml.safe_load(text), source=f"the config stored in {path}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    return cfg


def load_state(model: nn.Module, path: str | Path, allow_unsafe: bool = False, strict: bool = False,
               data: dict[str, Any] | None = None) -> LoadReport:
    """Load ``path``'s weights into ``model`` and report missing / unexpected keys.

    A shape mismatch is always an error naming the key and both shapes; a checkpoint sharing less than half of its
    keys with the model is reported as one of another architecture. ``strict`` also refuses missing/unexpected keys.
    """
    data = data if data is not None else read_checkpoint(path, allow_unsafe)
    state = {k.removeprefix("module."): v for k, v in data["model"].items()}
    target = model.state_dict()
    shared = [k for k in state if k in target]
    if len(shared) < 0.5 * len(target):
        arch = _architecture_hint(data)
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (another architecture?): only {len(shared)} of the model's "
            f"{len(target)} keys are in it{arch}. Model keys look like {_preview(sorted(target), 3)}; checkpoint keys "
            f"look like {_preview(sorted(state), 3)}"
        )
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in shared if hasattr(state[k], "shape") and state[k].shape != target[k].shape]
    if mismatched:
        raise CheckpointError(f"checkpoint {path} has {len(mismatched)} tensors of the wrong shape: "
                              + "; ".join(mismatched[:5]) + _architecture_hint(data))
    report = LoadReport(missing=sorted(set(target) - set(state)), unexpected=sorted(set(state) - set(target)),
                        loaded=len(shared))
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"checkpoint {path} does not match the model exactly: {report.summary()}")
    model.load_state_dict({k: state[k] for k in shared}, strict=False)
    logger.info("loaded %s: %s", path, report.summary())
    return report


def _architecture_hint(data: dict[str, Any]) -> str:
    text = data.get("config")
    if not isinstance(text, str):
        return ""
    import yaml

    model_cfg = (yaml.safe_load(text) or {}).get("MODEL", {})
    backbone = model_cfg.get("BACKBONE", {}).get("NAME", "?")
    neck = model_cfg.get("NECK", {})
    return f" (it was saved for backbone '{backbone}', neck {neck.get('NAME', '?')} {neck.get('OUT_CHANNELS', '?')})"
