"""Reading, registering and removing the forward hooks of one module instance.

``torch.nn.Module`` has public methods to *register* hooks but none to *list* or *move* them, so this module is the
one place in ``fnl`` that reads the hook dictionaries torch keeps on every module (``_forward_pre_hooks``,
``_forward_hooks`` and their flag dictionaries ``*_with_kwargs`` / ``_forward_hooks_always_called``). Registering
always goes through the public ``register_forward_pre_hook`` / ``register_forward_hook`` so the flags are honoured.
torch.ao's own fuser and ``swap_module`` read the same dictionaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from torch import nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase
from torch.ao.quantization.quantize import _observer_forward_hook, _observer_forward_pre_hook
from torch.utils.hooks import RemovableHandle

HookKind = Literal["forward_pre", "forward"]
HOOK_KINDS: tuple[HookKind, ...] = ("forward_pre", "forward")

# The hooks torch.ao's ``prepare`` registers to run a module's ``activation_post_process`` (observer or
# fake-quant). ``convert`` / ``_remove_qconfig`` drop them again by identity, so identity is the primary test;
# the name test covers a reloaded torch.ao module, whose functions are new objects with the same names.
_OBSERVER_HOOKS = (_observer_forward_hook, _observer_forward_pre_hook)
_OBSERVER_HOOK_NAMES = {(fn.__module__, fn.__qualname__) for fn in _OBSERVER_HOOKS}

# Instance attribute listing the hook dictionaries of the modules this one replaced (keep_hook_dictionaries_alive).
RETIRED_HOOK_DICTIONARIES = "_fnl_retired_hook_dictionaries"


@dataclass(frozen=True)
class LiveHook:
    """One hook as registered on a module: the callable itself plus the flags it was registered with."""

    kind: HookKind
    handle_id: int
    fn: Callable[..., Any]
    with_kwargs: bool
    always_call: bool  # only forward hooks can have it


def module_hooks(module: nn.Module, kind: HookKind) -> list[LiveHook]:
    """The module's own hooks of one kind, in the order ``Module.__call__`` runs them (global hooks excluded)."""
    if kind == "forward_pre":
        return [
            LiveHook(kind, handle_id, fn, handle_id in module._forward_pre_hooks_with_kwargs, False)
            for handle_id, fn in module._forward_pre_hooks.items()
        ]
    return [
        LiveHook(
            kind,
            handle_id,
            fn,
            handle_id in module._forward_hooks_with_kwargs,
            handle_id in module._forward_hooks_always_called,
        )
        for handle_id, fn in module._forward_hooks.items()
    ]


def register_hook(module: nn.Module, hook: LiveHook) -> RemovableHandle:
    """Appends ``hook`` to ``module`` with its original flags (a new handle id: handles are per dictionary)."""
    if hook.kind == "forward_pre":
        return module.register_forward_pre_hook(hook.fn, with_kwargs=hook.with_kwargs)
    return module.register_forward_hook(hook.fn, with_kwargs=hook.with_kwargs, always_call=hook.always_call)


def remove_hook(module: nn.Module, hook: LiveHook) -> None:
    """Removes the hook with ``hook.handle_id`` from ``module``, flags included, as ``RemovableHandle.remove`` does."""
    if hook.kind == "forward_pre":
        dictionaries = (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs)
    else:
        dictionaries = (module._forward_hooks, module._forward_hooks_with_kwargs, module._forward_hooks_always_called)
    for dictionary in dictionaries:
        dictionary.pop(hook.handle_id, None)


def move_hooks(source: nn.Module, target: nn.Module, kind: HookKind) -> None:
    """Re-registers every ``kind`` hook of ``source`` on ``target`` (appended, same order, same flags), then removes
    them from ``source`` so an instance that is reused inside a fused module does not fire them a second time."""
    hooks = module_hooks(source, kind)
    for hook in hooks:
        register_hook(target, hook)
        remove_hook(source, hook)
    if hooks:
        keep_hook_dictionaries_alive(source, target)


def keep_hook_dictionaries_alive(replaced: nn.Module, replacement: nn.Module) -> None:
    """Makes ``replacement`` reference the hook dictionaries of ``replaced`` (and of whatever that one replaced).

    A ``RemovableHandle`` holds *weak* references to the dictionaries of the module its hook was registered on, and
    hook owners keep their handles (timm's ``FeatureHooks._handles``). Once the module is replaced and collected,
    ``copy.deepcopy`` of anything holding such a handle fails in ``RemovableHandle.__setstate__`` (torch 2.14;
    ``weakref.ref(None)`` for the dead flag dictionaries; when this can go: docs/NOTES.md), so
    ``prepare(inplace=False)`` / ``convert(...)`` of the fused model would crash at random, whenever the garbage
    collector has run. Keeping the dictionaries referenced
    from the model keeps those handles valid (removing through them is a no-op) and the model copyable.
    """
    retired = replacement.__dict__.setdefault(RETIRED_HOOK_DICTIONARIES, [])
    retired.extend(
        (
            replaced._forward_pre_hooks,
            replaced._forward_pre_hooks_with_kwargs,
            replaced._forward_hooks,
            replaced._forward_hooks_with_kwargs,
            replaced._forward_hooks_always_called,
        )
    )
    retired.extend(replaced.__dict__.get(RETIRED_HOOK_DICTIONARIES, ()))


def has_retired_hook_dictionaries(module: nn.Module) -> bool:
    return bool(module.__dict__.get(RETIRED_HOOK_DICTIONARIES))


def has_forward_hooks(module: nn.Module, kind: HookKind) -> bool:
    return bool(module._forward_pre_hooks if kind == "forward_pre" else module._forward_hooks)


def has_backward_hooks(module: nn.Module) -> bool:
    return bool(module._backward_hooks or module._backward_pre_hooks)


def is_quantization_observer_hook(fn: Callable[..., Any]) -> bool:
    """True for the hooks torch.ao's ``prepare`` / ``prepare_qat`` add to call observers or fake-quants.

    Also counts a hook that is a bound method of an observer / fake-quant module (or a ``functools.partial`` of one),
    the other way a quantization tool can attach one.
    """
    while isinstance(fn, partial):
        fn = fn.func
    if any(fn is observer_hook for observer_hook in _OBSERVER_HOOKS):
        return True
    if (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)) in _OBSERVER_HOOK_NAMES:
        return True
    return isinstance(getattr(fn, "__self__", None), ObserverBase | FakeQuantizeBase)
