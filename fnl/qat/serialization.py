"""A compact, code-free file format for int8 state dicts.

torch pickles each quantized tensor with float64 per-channel scales and int64 zero points, and every tensor costs a
zip record: for Mobile Parsing R-CNN (B) that is ~0.7 MB on top of 3.4 MB of int8 weights. Here all int8 data goes
into one int8 buffer, all scales into one float32 buffer (the precision fbgemm/qnnpack use), non-zero zero points
into one int32 buffer and float tensors into one float32 buffer, described by a JSON index. The file holds only
plain tensors and a string, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fnl.config import CfgNode
from fnl.engine.checkpoint import (
    CheckpointError,
    config_from_checkpoint,
    load_state,
    read_checkpoint,
    resolve_config,
)
from fnl.hooks.fuse import fuse_model
from fnl.modeling import build_model
from fnl.modeling.layers import SubPixelConvTranspose2d
from fnl.qat.quantize import build_int8_structure, select_backend
from fnl.utils.io import atomic_path

FORMAT = "fnl-int8-packed-v1"
# How the int8 checkpoint's DensePose predictor computes its transposed convs, recorded under "quantization": as
# SubPixelConvTranspose2d convs (fnl.qat.patch), or, in checkpoints that do not say (written before that rewrite), as
# ConvTranspose2d modules: the structure a checkpoint is loaded into must be the one it was saved from.
TRANSPOSED_CONVS_KEY = "transposed_convs"
SUBPIXEL, TRANSPOSED = "subpixel-conv", "conv-transpose"
_DTYPES = {str(d): d for d in (torch.qint8, torch.quint8, torch.qint32, torch.float32, torch.float64, torch.int64,
                               torch.int32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.bool)}


class _Buffers:
    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {"int8": [], "float32": [], "int32": [], "raw": []}
        self.sizes = {name: 0 for name in self.parts}

    def put(self, name: str, tensor: torch.Tensor) -> dict[str, int]:
        flat = tensor.reshape(-1)
        entry = {"buffer": name, "offset": self.sizes[name], "numel": flat.numel()}
        self.parts[name].append(flat)
        self.sizes[name] += flat.numel()
        return entry


def _encode(value: Any, buffers: _Buffers) -> Any:
    if isinstance(value, torch.Tensor):
        if value.is_quantized:
            entry: dict[str, Any] = {"kind": "qtensor", "shape": list(value.shape), "dtype": str(value.dtype),
                                     "qscheme": str(value.qscheme())}
            data = value.int_repr()
            entry["data"] = buffers.put("int8", data.view(torch.int8) if data.dtype == torch.uint8 else data)
            if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                entry["axis"] = value.q_per_channel_axis()
                entry["scales"] = buffers.put("float32", value.q_per_channel_scales().float())
                zero_points = value.q_per_channel_zero_points()
                if zero_points.any():
                    entry["zero_points"] = buffers.put("int32", zero_points.int())
            else:
                entry["scale"] = value.q_scale()
                entry["zero_point"] = value.q_zero_point()
            return entry
        if value.dtype == torch.float32:
            return {"kind": "tensor", "shape": list(value.shape), "data": buffers.put("float32", value)}
        buffers.parts["raw"].append(value)
        return {"kind": "raw", "index": len(buffers.parts["raw"]) - 1}
    if isinstance(value, tuple | list):
        return {"kind": type(value).__name__, "items": [_encode(v, buffers) for v in value]}
    if isinstance(value, torch.dtype):
        return {"kind": "dtype", "value": str(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return {"kind": "value", "value": value}
    raise TypeError(f"cannot pack a {type(value).__name__} in an int8 state dict")


def pack_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``{"format", "index" (JSON), "int8", "float32", "int32", "raw_<i>"}``: plain tensors and one string."""
    buffers = _Buffers()
    index = {key: _encode(value, buffers) for key, value in state_dict.items()}
    packed: dict[str, Any] = {"format": FORMAT}
    empty = {"int8": torch.int8, "float32": torch.float32, "int32": torch.int32}
    for name, dtype in empty.items():
        parts = buffers.parts[name]
        packed[name] = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
    for i, tensor in enumerate(buffers.parts["raw"]):
        packed[f"raw_{i}"] = tensor
    packed["index"] = json.dumps(index)
    # Module versions decide how quantized modules parse their state (e.g. LinearPackedParams' v2+ layout).
    packed["metadata"] = json.dumps(getattr(state_dict, "_metadata", {}))
    return packed


def _slice(packed: dict[str, Any], ref: dict[str, int]) -> torch.Tensor:
    return packed[ref["buffer"]][ref["offset"]: ref["offset"] + ref["numel"]]


def _decode(entry: dict[str, Any], packed: dict[str, Any]) -> Any:
    kind = entry["kind"]
    if kind == "qtensor":
        dtype = _DTYPES[entry["dtype"]]
        data = _slice(packed, entry["data"]).reshape(entry["shape"])
        if dtype == torch.quint8:
            data = data.view(torch.uint8)
        if "axis" in entry:
            scales = _slice(packed, entry["scales"]).double()
            zero_points = (_slice(packed, entry["zero_points"]).long() if "zero_points" in entry
                           else torch.zeros(len(scales), dtype=torch.int64))
            return torch._make_per_channel_quantized_tensor(data.clone(), scales, zero_points, entry["axis"])
        return torch._make_per_tensor_quantized_tensor(data.clone(), entry["scale"], entry["zero_point"])
    if kind == "tensor":
        return _slice(packed, entry["data"]).reshape(entry["shape"]).clone()
    if kind == "raw":
        return packed[f"raw_{entry['index']}"]
    if kind in ("tuple", "list"):
        items = [_decode(item, packed) for item in entry["items"]]
        return tuple(items) if kind == "tuple" else items
    if kind == "dtype":
        return _DTYPES[entry["value"]]
    return entry["value"]


def unpack_state_dict(packed: dict[str, Any]) -> dict[str, Any]:
    if packed.get("format") != FORMAT:
        raise ValueError(f"not an int8 state dict of format {FORMAT} (format: {packed.get('format')!r})")
    state = OrderedDict((key, _decode(entry, packed)) for key, entry in json.loads(packed["index"]).items())
    state._metadata = OrderedDict(json.loads(packed.get("metadata", "{}")))
    return state


def save_int8_checkpoint(path: str | Path, int8_model: nn.Module, cfg: CfgNode, mode: str) -> Path:
    """``{"model": packed int8 state, "config", "quantization": {mode, backend, format, transposed_convs}}``,
    written atomically."""
    subpixel = any(isinstance(module, SubPixelConvTranspose2d) for module in int8_model.modules())
    payload = {"model": pack_state_dict(int8_model.state_dict()), "config": cfg.dump(),
               "quantization": {"mode": mode, "backend": cfg.QUANTIZATION.BACKEND, "format": FORMAT,
                                TRANSPOSED_CONVS_KEY: SUBPIXEL if subpixel else TRANSPOSED}}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def is_int8_checkpoint(data: dict[str, Any]) -> bool:
    return isinstance(data.get("quantization"), dict) and data["quantization"].get("format") == FORMAT


def load_int8_checkpoint(path: str | Path, allow_unsafe: bool = False) -> tuple[nn.Module, CfgNode]:
    """Rebuild the int8 module tree from the stored config (patch -> fuse -> prepare -> convert on a fresh float
    model) and load the int8 weights: an int8 model reloads in a new process with nothing but the file."""
    data = read_checkpoint(path, allow_unsafe)
    if not is_int8_checkpoint(data):
        raise CheckpointError(f"{path} is not an int8 checkpoint written by fnl-quantize (no 'quantization' entry "
                              f"of format {FORMAT}); load float checkpoints with load_state")
    cfg = config_from_checkpoint(path, allow_unsafe)
    cfg.QUANTIZATION.BACKEND = data["quantization"]["backend"]
    select_backend(cfg.QUANTIZATION.BACKEND)
    transposed_convs = data["quantization"].get(TRANSPOSED_CONVS_KEY, TRANSPOSED)
    if transposed_convs not in (SUBPIXEL, TRANSPOSED):
        raise CheckpointError(f"int8 checkpoint {path}: quantization.{TRANSPOSED_CONVS_KEY} is "
                              f"'{transposed_convs}', expected '{SUBPIXEL}' or '{TRANSPOSED}'")
    model = build_int8_structure(build_model(cfg).eval(), cfg, data["quantization"]["mode"],
                                 subpixel_predictor=transposed_convs == SUBPIXEL)
    try:
        state = unpack_state_dict(data["model"])
        model.load_state_dict(state, strict=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"int8 checkpoint {path} does not fit the model its config describes: "
                              f"{str(exc)[:400]}") from exc
    return model.eval(), cfg.freeze()


def load_model_for_inference(ckpt: str | Path, config: str | None, overrides: Sequence[str],
                             allow_unsafe: bool = False) -> tuple[nn.Module, CfgNode]:
    """A float or int8 PyTorch model from a checkpoint, ready for inference (eval mode; a float model's batch norms
    folded into its convs), with its config (the stored one unless ``config``). It lives here, not in fnl.engine,
    because an int8 checkpoint is rebuilt by fnl.qat (patch -> fuse -> prepare -> convert)."""
    data = read_checkpoint(ckpt, allow_unsafe)
    if is_int8_checkpoint(data):
        model, stored = load_int8_checkpoint(ckpt, allow_unsafe)
        cfg = stored.clone()
        if config:
            cfg.merge_from_file(config)
        cfg.merge_from_list(overrides)
        return model, cfg.freeze()
    cfg = resolve_config(ckpt, config, overrides, allow_unsafe)
    model = build_model(cfg)
    load_state(model, ckpt, allow_unsafe, data=data)
    # BN folded into the convs, as ONNX Runtime and XNNPACK do at load: the eager model ran each BN as its own op
    # (model B 2.5% faster folded at 1 thread, docs/PROFILE.md). Hooks move with their modules (fnl.hooks.fuse).
    return fuse_model(model.eval(), is_qat=False, inplace=True), cfg
