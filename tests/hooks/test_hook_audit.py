"""fnl.hooks.audit: stable hook descriptions, observer hooks left out, comparison and table."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch.ao.quantization as ao
from hooks_testing import SPNASNET_FEATURE_TAPS, CallLog, timm_backbone
from torch import nn

from fnl.hooks import (
    HookPreservationError,
    HookRecord,
    assert_same_hooks,
    audit_hooks,
    compare_hook_audits,
    describe_callable,
    format_hook_table,
)


def module_level_hook(module: nn.Module, args: tuple) -> None:
    return None


class CallableHook:
    def __call__(self, module: nn.Module, args: tuple) -> None:
        return None


def test_describe_callable_is_stable_and_readable() -> None:
    log = CallLog()
    assert describe_callable(module_level_hook) == "module_level_hook"
    assert describe_callable(log.tensor) == "CallLog.tensor"
    assert describe_callable(log.pre_hook("p2")) == "CallLog._record_input('p2')"
    assert describe_callable(CallableHook()) == "CallableHook()"
    assert describe_callable(functools.partial(module_level_hook, nn.ReLU(), x=3)) == "module_level_hook(<ReLU>, x=3)"
    # no memory address, so two copies describe alike
    assert describe_callable(CallLog().pre_hook("p2")) == describe_callable(log.pre_hook("p2"))


def test_audit_lists_timm_feature_hooks() -> None:
    model = timm_backbone("spnasnet_100", "expansion")
    records = audit_hooks(model)
    assert [r.module for r in records] == SPNASNET_FEATURE_TAPS
    assert {r.kind for r in records} == {"forward_pre"}
    assert [r.description for r in records] == [
        f"FeatureHooks._collect_output_hook('{name}')" for name in SPNASNET_FEATURE_TAPS
    ]
    assert all(r.module_type == "Conv2d" and r.position == 0 and not r.with_kwargs for r in records)


@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning")
def test_audit_leaves_out_quantization_observer_hooks() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    log = CallLog()
    model[0].register_forward_hook(log.forward_hook("conv"))
    model.qconfig = ao.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prepared = ao.prepare_qat(model.train())
    user_records = audit_hooks(prepared)
    all_records = audit_hooks(prepared, include_observers=True)
    assert [r.description for r in user_records] == ["CallLog._record_output('conv')"]
    assert "_observer_forward_hook" in {r.description for r in all_records}
    assert len(all_records) > len(user_records)


def record(module: str, description: str, kind: str = "forward_pre", position: int = 0, **flags: bool) -> HookRecord:
    return HookRecord(module, "Conv2d", kind, position, description, **flags)


def test_compare_finds_missing_unexpected_and_reordered_hooks() -> None:
    before = [record("a", "h1"), record("a", "h2", position=1), record("b", "h3", "forward")]
    assert compare_hook_audits(before, before).ok

    lost = compare_hook_audits(before, before[:2])
    assert lost.missing == [before[2]] and not lost.unexpected

    added = compare_hook_audits(before[:2], before)
    assert added.unexpected == [before[2]] and not added.missing

    swapped = [record("a", "h2"), record("a", "h1", position=1), before[2]]
    assert compare_hook_audits(before, swapped).reordered == [("a", "forward_pre")]

    flags_lost = [record("a", "h1"), record("a", "h2", position=1), record("b", "h3", "forward", always_call=True)]
    diff = compare_hook_audits(before, flags_lost)
    assert diff.missing == [before[2]] and diff.unexpected == [flags_lost[2]]


def test_compare_follows_renamed_modules() -> None:
    # a fused conv+bn+relu group: the conv's pre-hook stays, the relu's forward hook moves to the conv's name
    before = [record("block.conv", "collect"), record("block.relu", "after", "forward")]
    after = [record("block.conv", "collect"), record("block.conv", "after", "forward")]
    assert not compare_hook_audits(before, after).ok
    assert compare_hook_audits(before, after, renamed={"block.relu": "block.conv"}).ok


def test_compare_does_not_order_hooks_merged_from_several_modules() -> None:
    before = [record("bn", "inner", "forward"), record("bn.act", "outer", "forward")]
    after = [record("bn", "outer", "forward"), record("bn", "inner", "forward", position=1)]
    assert compare_hook_audits(before, after, renamed={"bn.act": "bn"}).ok


def test_assert_same_hooks_raises_with_tables() -> None:
    before = [record("blocks.1.2.conv_pwl", "FeatureHooks._collect_output_hook('blocks.1.2.conv_pwl')")]
    with pytest.raises(HookPreservationError, match="missing") as raised:
        assert_same_hooks(before, [], what="a stage")
    assert "blocks.1.2.conv_pwl" in str(raised.value) and "a stage" in str(raised.value)


def test_format_hook_table() -> None:
    table = format_hook_table([record("", "h", "forward", always_call=True, with_kwargs=True)])
    header, rule, row = table.splitlines()
    assert header.split() == ["module", "type", "kind", "#", "hook", "flags"]
    assert set(rule) <= {"-", " "}
    assert row.split() == ["<root>", "Conv2d", "forward", "0", "h", "with_kwargs,always_call"]
    assert format_hook_table([]) == "(no hooks)"
