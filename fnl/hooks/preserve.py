"""Keep user forward hooks alive through torch.ao's eager ``prepare`` / ``prepare_qat`` / ``convert``.

What torch 2.14 does by itself (checked in ``tests/hooks/test_torch_native_hooks.py``): ``swap_module`` re-registers
the pre-hooks and forward hooks of a swapped module on its replacement (observer hooks excepted), so plain hooks
survive ``prepare_qat`` and ``convert``. It re-registers them *without* their ``with_kwargs`` / ``always_call``
flags, so a ``with_kwargs`` hook is then called with the wrong arguments; and ``prepare``'s custom-module path
(``prepare_custom_config_dict``'s float-to-observed mapping) swaps modules without copying any hook.

The wrappers below snapshot the hooks (the callables themselves), run the torch.ao stage in place, then restore,
on the module now at each hooked qualified name, whatever is missing or mis-flagged, without duplicating what torch
already carried over, and finally compare hook audits (``HookPreservationError`` on any difference). Observer and
fake-quant hooks stay first, as torch.ao registers them, so a user forward hook sees the fake-quantized output
during QAT and the quantized output after ``convert``, as torch intends. A replaced module's hook dictionaries stay
referenced from its replacement, so the handles hook owners keep stay valid and the model stays deep-copyable
(see ``fnl.hooks.registry.keep_hook_dictionaries_alive``).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.ao.quantization as ao
from torch import nn

from fnl.hooks.audit import HookRecord, assert_same_hooks, audit_hooks, describe_callable
from fnl.hooks.registry import (
    HOOK_KINDS,
    HookKind,
    LiveHook,
    has_retired_hook_dictionaries,
    is_quantization_observer_hook,
    keep_hook_dictionaries_alive,
    module_hooks,
    register_hook,
    remove_hook,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HookSnapshot:
    """The user hooks of a model, by (qualified module name, kind), as live callables with their flags."""

    hooks: Mapping[tuple[str, HookKind], tuple[LiveHook, ...]]
    audit: tuple[HookRecord, ...]


def snapshot_hooks(model: nn.Module) -> HookSnapshot:
    """Records the user hooks of ``model`` (observer / fake-quant hooks left out) for ``restore_hooks``."""
    hooks = {}
    for name, module in model.named_modules():
        for kind in HOOK_KINDS:
            user_hooks = _user_hooks(module, kind)
            if user_hooks:
                hooks[(name, kind)] = tuple(user_hooks)
    return HookSnapshot(hooks, tuple(audit_hooks(model)))


def restore_hooks(
    model: nn.Module, snapshot: HookSnapshot, renamed: Mapping[str, str] | None = None
) -> list[HookRecord]:
    """Re-attaches the snapshot's hooks that are missing or carry other flags on the module now at the same name
    (or at ``renamed[name]``), keeping their order; returns what it re-attached.

    A hook counts as present when the very same callable is registered with the same flags; torch.ao's
    ``swap_module`` re-registers the same callables, so those are not duplicated. Hooks the snapshot does not know
    (observers, or hooks added since) are left in place, ahead of the restored ones.
    """
    renamed = renamed or {}
    restored = []
    for (name, kind), expected in snapshot.hooks.items():
        target_name = renamed.get(name, name)
        try:
            module = model.get_submodule(target_name)
        except AttributeError as error:
            raise LookupError(
                f"{kind} hooks of '{name}' cannot be restored: there is no module '{target_name}' any more"
            ) from error
        current = _user_hooks(module, kind)
        if [_signature(hook) for hook in current if _is_one_of(hook, expected)] == [_signature(h) for h in expected]:
            continue
        present = {_signature(hook) for hook in current}
        # Remove the snapshot's callables wherever they are, then append them in order with their flags: the
        # simplest way to get both the flags and the relative order right.
        others = 0
        for hook in current:
            if _is_one_of(hook, expected):
                remove_hook(module, hook)
            else:
                others += 1
        for position, hook in enumerate(expected, start=others):
            register_hook(module, hook)
            if _signature(hook) not in present:
                restored.append(
                    HookRecord(target_name, type(module).__name__, kind, position, describe_callable(hook.fn),
                               hook.with_kwargs, hook.always_call)
                )
    if restored:
        logger.info("re-attached %d hook(s) lost by a torch.ao stage: %s", len(restored),
                    ", ".join(f"{r.module} [{r.kind}] {r.description}" for r in restored))
    return restored


def apply_preserving_hooks(
    model: nn.Module,
    stage: Callable[[nn.Module], nn.Module | None],
    renamed: Mapping[str, str] | None = None,
    what: str = "",
) -> nn.Module:
    """Runs ``stage`` on ``model`` (in place; it may also return a new root), restores lost hooks, and checks the
    hook audit. Use it for any module-swapping stage; the wrappers below are this around torch.ao's functions."""
    renamed = renamed or {}
    snapshot = snapshot_hooks(model)
    hooked_names = {name for name, _ in snapshot.hooks}
    hooked_modules = {
        name: module
        for name, module in model.named_modules()
        if name in hooked_names or has_retired_hook_dictionaries(module)
    }
    result = stage(model)
    if result is not None:
        model = result
    for name, module in hooked_modules.items():
        replacement = _submodule_or_none(model, renamed.get(name, name))
        if replacement is not None and replacement is not module:
            keep_hook_dictionaries_alive(module, replacement)
    restore_hooks(model, snapshot, renamed)
    assert_same_hooks(list(snapshot.audit), audit_hooks(model), renamed, what=what or getattr(stage, "__name__", ""))
    return model


def prepare_qat_preserving_hooks(
    model: nn.Module, mapping: dict[Any, Any] | None = None, inplace: bool = False
) -> nn.Module:
    """``torch.ao.quantization.prepare_qat`` that keeps every user forward (pre-)hook with its flags."""
    model = model if inplace else copy.deepcopy(model)
    return apply_preserving_hooks(
        model, lambda m: _eager_ao(ao.prepare_qat, m, mapping=mapping, inplace=True), what="prepare_qat"
    )


def prepare_preserving_hooks(model: nn.Module, inplace: bool = False, **prepare_kwargs: Any) -> nn.Module:
    """``torch.ao.quantization.prepare`` (post-training observers) that keeps every user forward (pre-)hook."""
    model = model if inplace else copy.deepcopy(model)
    return apply_preserving_hooks(
        model, lambda m: _eager_ao(ao.prepare, m, inplace=True, **prepare_kwargs), what="prepare"
    )


def convert_preserving_hooks(
    model: nn.Module, mapping: dict[Any, Any] | None = None, inplace: bool = False, **convert_kwargs: Any
) -> nn.Module:
    """``torch.ao.quantization.convert`` that keeps every user forward (pre-)hook with its flags.

    After conversion the hooks of quantized modules receive quantized tensors (``torch.quint8``).
    """
    model = model if inplace else copy.deepcopy(model)
    return apply_preserving_hooks(
        model, lambda m: _eager_ao(ao.convert, m, mapping=mapping, inplace=True, **convert_kwargs), what="convert"
    )


def _eager_ao(function: Callable[..., nn.Module], model: nn.Module, **kwargs: Any) -> nn.Module:
    # torch 2.14 marks the eager-mode API deprecated; docs/DESIGN.md chose it deliberately (int8 ONNX export needs it),
    # so the warning is silenced for this call only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return function(model, **kwargs)


def _submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _user_hooks(module: nn.Module, kind: HookKind) -> list[LiveHook]:
    return [hook for hook in module_hooks(module, kind) if not is_quantization_observer_hook(hook.fn)]


def _signature(hook: LiveHook) -> tuple[int, bool, bool]:
    return (id(hook.fn), hook.with_kwargs, hook.always_call)


def _is_one_of(hook: LiveHook, expected: tuple[LiveHook, ...]) -> bool:
    return any(hook.fn is other.fn for other in expected)
