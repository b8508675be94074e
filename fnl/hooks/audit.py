"""An inventory of the user forward hooks in a module tree, to check that a transformation kept them.

The records describe each hook by a stable text (no memory addresses), so an audit taken before fusion /
``prepare_qat`` / ``convert`` can be compared with one taken after, even though those stages create new module
instances and ``copy.deepcopy`` creates new hook objects. Hooks torch.ao adds for observers and fake-quants are left
out: they belong to quantization, not to the user.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import nn

from fnl.hooks.registry import HOOK_KINDS, HookKind, is_quantization_observer_hook, module_hooks

# Arguments of a functools.partial that are shown by value; anything else is shown by type, so that the text does
# not depend on object identity (timm's FeatureHooks binds the feature name, a str, which is what we want to see).
_PLAIN_VALUE_TYPES = (str, int, float, bool, type(None))


class HookPreservationError(AssertionError):
    """A transformation lost, added or reordered user hooks."""


@dataclass(frozen=True)
class HookRecord:
    """One user hook of one module.

    ``position`` is the index among the user hooks of this ``kind`` on this module (observer hooks not counted).
    """

    module: str
    module_type: str
    kind: HookKind
    position: int
    description: str
    with_kwargs: bool = False
    always_call: bool = False

    def identity(self) -> tuple[str, bool, bool]:
        """What must stay the same for the hook to count as kept: the callable and its calling convention."""
        return (self.description, self.with_kwargs, self.always_call)

    def flags(self) -> str:
        flags = (("with_kwargs", self.with_kwargs), ("always_call", self.always_call))
        return ",".join(name for name, on in flags if on)


def describe_callable(fn: Callable[..., Any]) -> str:
    """A stable text for a hook callable.

    ``functools.partial(FeatureHooks._collect_output_hook, "blocks.1.2.conv_pwl")`` (timm's feature hooks) reads
    ``FeatureHooks._collect_output_hook('blocks.1.2.conv_pwl')``; bound methods read ``Class.method``; functions
    their qualified name; other callables ``Class()``.
    """
    if isinstance(fn, partial):
        arguments = [_describe_argument(value) for value in fn.args]
        arguments += [f"{key}={_describe_argument(value)}" for key, value in sorted(fn.keywords.items())]
        return f"{describe_callable(fn.func)}({', '.join(arguments)})"
    owner = getattr(fn, "__self__", None)
    if owner is not None and hasattr(fn, "__func__"):
        owner_type = owner if isinstance(owner, type) else type(owner)
        return f"{owner_type.__qualname__}.{fn.__func__.__name__}"
    qualified_name = getattr(fn, "__qualname__", None)
    if qualified_name is not None:
        return qualified_name
    return f"{type(fn).__qualname__}()"


def _describe_argument(value: Any) -> str:
    if isinstance(value, _PLAIN_VALUE_TYPES):
        return repr(value)
    if isinstance(value, tuple) and all(isinstance(item, _PLAIN_VALUE_TYPES) for item in value):
        return repr(value)
    return f"<{type(value).__qualname__}>"


def audit_hooks(model: nn.Module, include_observers: bool = False) -> list[HookRecord]:
    """Every forward pre-hook and forward hook registered on ``model`` or its submodules, in ``named_modules`` order
    and, per module, in the order they fire. Global hooks (``register_module_forward_hook``) are not per module and
    not listed. ``include_observers`` keeps the hooks torch.ao adds for observers / fake-quants."""
    records = []
    for name, module in model.named_modules():
        for kind in HOOK_KINDS:
            hooks = [
                hook
                for hook in module_hooks(module, kind)
                if include_observers or not is_quantization_observer_hook(hook.fn)
            ]
            for position, hook in enumerate(hooks):
                records.append(
                    HookRecord(
                        module=name,
                        module_type=type(module).__name__,
                        kind=kind,
                        position=position,
                        description=describe_callable(hook.fn),
                        with_kwargs=hook.with_kwargs,
                        always_call=hook.always_call,
                    )
                )
    return records


@dataclass
class HookAuditDiff:
    """What differs between two audits, after the first audit's module names went through ``renamed``.

    ``reordered`` lists the (module, kind) slots that hold the same hooks in another order; the order is only
    checked where all hooks of a slot came from one module, since hooks merged from several modules (the pre-hooks
    of a fused group's first module and the forward hooks of its last) have no common order to keep.
    """

    missing: list[HookRecord] = field(default_factory=list)
    unexpected: list[HookRecord] = field(default_factory=list)
    reordered: list[tuple[str, HookKind]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.reordered)

    def __str__(self) -> str:
        if self.ok:
            return "hooks unchanged"
        parts = []
        if self.missing:
            parts.append("missing (in the first audit only):\n" + format_hook_table(self.missing))
        if self.unexpected:
            parts.append("unexpected (in the second audit only):\n" + format_hook_table(self.unexpected))
        if self.reordered:
            parts.append("reordered: " + ", ".join(f"{module or '<root>'} [{kind}]" for module, kind in self.reordered))
        return "\n".join(parts)


def compare_hook_audits(
    before: Sequence[HookRecord], after: Sequence[HookRecord], renamed: Mapping[str, str] | None = None
) -> HookAuditDiff:
    """Compares two audits. ``renamed`` maps a module name of ``before`` to the name its hooks live at in ``after``
    (fusion moves a group's hooks to the group's first module; see ``FusionGroup.renamed``)."""
    renamed = renamed or {}
    expected = _by_slot((renamed.get(record.module, record.module), record) for record in before)
    actual = _by_slot((record.module, record) for record in after)
    sources = _sources_by_slot((renamed.get(record.module, record.module), record) for record in before)
    diff = HookAuditDiff()
    for slot in sorted(expected.keys() | actual.keys()):
        expected_records = expected.get(slot, [])
        actual_records = actual.get(slot, [])
        expected_count = Counter(record.identity() for record in expected_records)
        actual_count = Counter(record.identity() for record in actual_records)
        diff.missing += _records_beyond(expected_records, expected_count - actual_count)
        diff.unexpected += _records_beyond(actual_records, actual_count - expected_count)
        same_hooks = expected_count == actual_count
        one_source = len(sources.get(slot, ())) <= 1
        if same_hooks and one_source and [r.identity() for r in expected_records] != [
            r.identity() for r in actual_records
        ]:
            diff.reordered.append(slot)
    return diff


def assert_same_hooks(
    before: Sequence[HookRecord], after: Sequence[HookRecord], renamed: Mapping[str, str] | None = None, what: str = ""
) -> None:
    """Raises ``HookPreservationError`` with both tables when ``compare_hook_audits`` finds a difference."""
    diff = compare_hook_audits(before, after, renamed)
    if not diff.ok:
        stage = f" by {what}" if what else ""
        raise HookPreservationError(
            f"user forward hooks changed{stage}:\n{diff}\n\nbefore:\n{format_hook_table(before)}"
            f"\n\nafter:\n{format_hook_table(after)}"
        )


def format_hook_table(records: Iterable[HookRecord]) -> str:
    """A fixed-width text table, one hook per row."""
    header = ("module", "type", "kind", "#", "hook", "flags")
    rows = [
        (r.module or "<root>", r.module_type, r.kind, str(r.position), r.description, r.flags()) for r in records
    ]
    if not rows:
        return "(no hooks)"
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _by_slot(named_records: Iterable[tuple[str, HookRecord]]) -> dict[tuple[str, HookKind], list[HookRecord]]:
    slots: dict[tuple[str, HookKind], list[HookRecord]] = {}
    for module, record in named_records:
        slots.setdefault((module, record.kind), []).append(record)
    return slots


def _sources_by_slot(named_records: Iterable[tuple[str, HookRecord]]) -> dict[tuple[str, HookKind], set[str]]:
    sources: dict[tuple[str, HookKind], set[str]] = {}
    for module, record in named_records:
        sources.setdefault((module, record.kind), set()).add(record.module)
    return sources


def _records_beyond(records: Sequence[HookRecord], surplus: Counter) -> list[HookRecord]:
    """The last ``surplus[identity]`` records of each identity: those without a counterpart in the other audit."""
    remaining = Counter(surplus)
    chosen = []
    for record in reversed(records):
        if remaining[record.identity()] > 0:
            remaining[record.identity()] -= 1
            chosen.append(record)
    return list(reversed(chosen))
