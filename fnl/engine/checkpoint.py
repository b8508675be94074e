"""Checkpoints in detectron2's format: ``{"model": state_dict, "iteration": int, ...}`` plus our config.

Loading uses ``torch.load(weights_only=True)``: a model file must not be able to run code. A plain pickle (not
torch's format: detectron2's model-zoo ``.pkl`` files, numpy arrays in dicts) is read by an unpickler that allows
numpy arrays and plain containers only, arrays becoming tensors. ``allow_unsafe=True`` (``--unsafe-load`` on the
command line) is the explicit opt-out for trusted files holding other objects; it warns on stderr before reading.

``zoo:NAME`` anywhere a checkpoint path is taken names a trained model shipped in the repository's ``model_zoo/``
(``model_zoo/NAME.pth``, with its config, evaluation and the command that regenerates it beside it).
"""

from __future__ import annotations

import codecs
import logging
import pickle
import re
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fnl
from fnl.config import CfgNode, ConfigError, load_config, stored_config
from fnl.utils.errors import UserError
from fnl.utils.io import atomic_path

logger = logging.getLogger("fnl")
ZOO_PREFIX = "zoo:"
# Package data of fnl, like the configs (see fnl.config.load.CONFIGS_DIR): fnl/model_zoo links to the top-level
# model_zoo/ in a checkout and is copied into an installed wheel.
MODEL_ZOO_DIR = Path(str(resources.files("fnl") / "model_zoo"))


class CheckpointError(UserError, ValueError):
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
    if allow_unsafe:
        _warn_unsafe_load(path)
    if head.startswith(_PICKLE_PROTOCOL_2_TO_5) and not head.startswith(_TORCH_LEGACY_MAGIC):
        data = _read_plain_pickle(path, allow_unsafe)
        return _as_checkpoint(data, path)
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
    return _as_checkpoint(data, path)


def _as_checkpoint(data: Any, path: Path) -> dict[str, Any]:
    """``{"model": state_dict, ...}`` from what a file held: the checkpoint itself, or a bare state_dict."""
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict / state_dict")
    if "model" not in data:
        if data and all(isinstance(v, torch.Tensor) for v in data.values()):
            data = {"model": data}
        else:
            raise CheckpointError(f"checkpoint {path} has no 'model' entry (keys: {_preview(sorted(data))})")
    return data


# torch.save writes a zip archive; older torch.save files and detectron2's .pkl files are pickles (protocol 2+),
# the former starting with the pickled number torch's legacy format opens with.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_2_TO_5 = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))
_TORCH_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]  # without the STOP opcode
_HEAD_BYTES = 64

# All that a plain pickle of numpy arrays in (ordered) dicts, lists, tuples and sets needs, in the numpy 1 and 2
# module names and Python 2's (detectron2's model-zoo files): none of these can run code of the file's choosing.
_PLAIN_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"), ("_codecs", "encode"),
    ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset"),
})


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle names a class or function that a plain pickle of arrays never needs."""


class _PlainPickleUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only; any other class or function is refused by name."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PLAIN_PICKLE_GLOBALS:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


_warned_unsafe: set[Path] = set()  # one warning per file, though a command reads its checkpoint several times


def _warn_unsafe_load(path: Path) -> None:
    # Straight to stderr, before anything is read: whatever logging is set up, the user sees it first.
    if path.resolve() not in _warned_unsafe:
        _warned_unsafe.add(path.resolve())
        print(f"fnl: warning: --unsafe-load: {path} is read with pickle, which runs any code the file holds; load "
              "only files from a source you trust", file=sys.stderr, flush=True)


def _read_plain_pickle(path: Path, allow_unsafe: bool) -> Any:
    """A pickle that is not torch's format (detectron2's .pkl: numpy arrays in dicts), numpy arrays as tensors."""
    import numpy as np

    unpickler = pickle.Unpickler if allow_unsafe else _PlainPickleUnpickler
    try:
        with open(path, "rb") as handle:
            # latin1: how Python 2 pickles' byte strings (numpy's array data among them) must be read.
            data = unpickler(handle, encoding="latin1").load()
    except _ForbiddenGlobal as exc:
        raise CheckpointError(f"checkpoint {path} is a pickle holding objects other than numpy arrays and plain "
                              f"containers ({exc}), so it was not loaded. If you trust its source, load it with "
                              "--unsafe-load") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable pickle (corrupt or truncated?): "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc

    def to_torch(value: Any) -> Any:
        if isinstance(value, np.ndarray | np.generic):
            if value.dtype == object:
                raise CheckpointError(f"checkpoint {path} holds a numpy array of Python objects, not numbers")
            return torch.from_numpy(np.array(value))  # a copy: writable, contiguous, one owner
        if isinstance(value, dict):
            return {key: to_torch(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(to_torch(item) for item in value)
        return value

    data = to_torch(data)
    # Detectron (Caffe2) files keep the weights under "blobs", with the solver's momenta beside them.
    if isinstance(data, dict) and "model" not in data and isinstance(data.get("blobs"), dict):
        data = {"model": {k: v for k, v in data["blobs"].items() if not k.endswith("_momentum")}}
    return data


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
    try:
        return stored_config(text, source=f"the config stored in {path}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def resolve_config(ckpt: str | Path, config: str | None, overrides: Sequence[str], allow_unsafe: bool) -> CfgNode:
    """The user's config file if given, else the one stored in the checkpoint; then the overrides."""
    if config:
        return load_config(config, overrides)
    cfg = config_from_checkpoint(ckpt, allow_unsafe)
    cfg.merge_from_list(overrides)
    return cfg.freeze()


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
