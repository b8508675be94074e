"""fnl.hooks.preserve: the paper's Figure 2 pipeline on spnasnet_100 (fuse -> prepare_qat -> QAT forward -> convert ->
quantized forward), and the cases where torch.ao itself drops or damages hooks.

What runs quantized: the converted backbone runs end to end on quint8 tensors only after its residual adds are
switched off on the test's copy (``has_skip = False``): timm's ``x + shortcut`` needs the FloatFunctional patch that
``fnl.qat`` owns. That changes the numbers, not where the hooks sit or whether they fire, which is what is tested.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.ao.quantization as ao
from hooks_testing import SPNASNET_FEATURE_TAPS, CallLog, example_images, timm_backbone
from torch import nn

from fnl.hooks import (
    HookPreservationError,
    apply_preserving_hooks,
    audit_hooks,
    compare_hook_audits,
    convert_preserving_hooks,
    fuse_model,
    prepare_preserving_hooks,
    prepare_qat_preserving_hooks,
    restore_hooks,
    snapshot_hooks,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
]

SPNASNET_EXPANSION_SHAPES = [(72, 16, 16), (120, 8, 8), (288, 4, 4), (1152, 2, 2)]


def qat_qconfig() -> ao.QConfig:
    return ao.get_default_qat_qconfig("x86")


def test_spnasnet_feature_hooks_survive_fuse_prepare_qat_and_convert() -> None:
    x = example_images()
    backbone = timm_backbone("spnasnet_100", "expansion").train()
    hooks_float = audit_hooks(backbone)
    assert [r.module for r in hooks_float] == SPNASNET_FEATURE_TAPS

    fused = fuse_model(backbone, is_qat=True)
    assert compare_hook_audits(hooks_float, audit_hooks(fused)).ok
    assert type(fused.blocks[1][2].conv_pwl).__name__ == "ConvBn2d"

    model = nn.Sequential(ao.QuantStub(), fused)
    model.qconfig = qat_qconfig()
    prepared = prepare_qat_preserving_hooks(model)
    tapped = {r.module.removeprefix("1."): r.module_type for r in audit_hooks(prepared)}
    assert tapped == dict.fromkeys(SPNASNET_FEATURE_TAPS, "ConvBn2d")  # torch.ao.nn.intrinsic.qat's ConvBn2d

    features = prepared(x)  # QAT forward: fake-quantized, residual adds in float
    assert [tuple(f.shape) for f in features] == [(2, *shape) for shape in SPNASNET_EXPANSION_SHAPES]
    features[-1].mean().backward()  # and it trains
    assert prepared[1].conv_stem.weight.grad is not None

    prepared.eval()
    gc.collect()  # the modules prepare_qat replaced are gone: their hooks' handles must not break the copy below
    converted = convert_preserving_hooks(prepared)
    hooks_converted = audit_hooks(converted)
    assert {r.module.removeprefix("1.") for r in hooks_converted} == set(SPNASNET_FEATURE_TAPS)
    assert {r.module_type for r in hooks_converted} == {"Conv2d"}  # torch.ao.nn.quantized's Conv2d
    assert type(converted[1].blocks[1][2].conv_pwl).__module__.startswith("torch.ao.nn.quantized")

    for module in converted.modules():
        if hasattr(module, "has_skip"):
            module.has_skip = False
    with torch.no_grad():
        quantized_features = converted(x)
    assert [tuple(f.shape) for f in quantized_features] == [(2, *shape) for shape in SPNASNET_EXPANSION_SHAPES]
    assert {f.dtype for f in quantized_features} == {torch.quint8}


def test_mobilenetv3_forward_hook_on_a_norm_with_kept_hardswish_survives_all_stages() -> None:
    """mobilenetv3's last expansion feature is a *forward* hook on ``blocks.6.0.bn1`` (BatchNormAct2d + Hardswish):
    the last module of a conv+bn+act pattern whose activation torch.ao cannot fuse."""
    x = example_images()
    backbone = timm_backbone("mobilenetv3_large_100", "expansion").train()
    with torch.no_grad():
        expected_last = backbone.eval()(x)[-1]
    fused = fuse_model(backbone.train(), is_qat=True)
    last_tap = [r for r in audit_hooks(fused) if r.kind == "forward"]
    assert [(r.module, r.module_type) for r in last_tap] == [("blocks.6.0.bn1", "Hardswish")]
    with torch.no_grad():
        assert torch.equal(fused.eval()(x)[-1], expected_last)

    model = nn.Sequential(ao.QuantStub(), fused)
    model.qconfig = qat_qconfig()
    prepared = prepare_qat_preserving_hooks(model.train())
    features = prepared(x)
    assert [f.shape[1] for f in features] == [72, 120, 672, 960]
    converted = convert_preserving_hooks(prepared.eval())
    after = [(r.module, r.kind, r.module_type) for r in audit_hooks(converted)]
    assert after[-1] == ("1.blocks.6.0.bn1", "forward", "Hardswish")  # torch.ao.nn.quantized's Hardswish
    assert type(converted[1].blocks[6][0].bn1).__module__.startswith("torch.ao.nn.quantized")
    assert len(after) == 4


def test_hooks_with_kwargs_and_always_call_survive_prepare_qat_and_convert() -> None:
    model = nn.Sequential(ao.QuantStub(), nn.Conv2d(3, 4, 3), nn.ReLU(), ao.DeQuantStub())
    log = CallLog()
    model[1].register_forward_pre_hook(log.kwargs_pre_hook("conv in"), with_kwargs=True)
    model[1].register_forward_hook(log.forward_hook("conv out"), always_call=True)
    model.qconfig = qat_qconfig()
    before = audit_hooks(model)

    prepared = prepare_qat_preserving_hooks(model.train())
    assert compare_hook_audits(before, audit_hooks(prepared)).ok
    prepared(example_images())
    assert log.tags() == ["conv in", "conv out"]

    log.entries.clear()
    converted = convert_preserving_hooks(prepared.eval())
    assert compare_hook_audits(before, audit_hooks(converted)).ok
    converted(example_images())
    assert log.tags() == ["conv in", "conv out"]
    assert log.tensor("conv out").dtype == torch.quint8


def test_restore_does_not_duplicate_hooks_torch_already_kept() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model[0].register_forward_pre_hook(CallLog().pre_hook("in"))
    model.qconfig = qat_qconfig()
    snapshot = snapshot_hooks(model)
    prepared = ao.prepare_qat(model.train(), inplace=True)  # torch's swap_module re-registers plain hooks
    assert restore_hooks(prepared, snapshot) == []
    assert len(audit_hooks(prepared)) == 1


class FloatBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ObservedBlock(FloatBlock):
    @classmethod
    def from_float(cls, float_block: FloatBlock) -> ObservedBlock:
        observed = cls()
        observed.conv = float_block.conv
        return observed


def test_prepare_custom_module_path_loses_hooks_and_the_wrapper_restores_them() -> None:
    custom = {"float_to_observed_custom_module_class": {FloatBlock: ObservedBlock}}
    model = nn.Sequential(ao.QuantStub(), FloatBlock(), ao.DeQuantStub()).eval()
    log = CallLog()
    model[1].register_forward_pre_hook(log.pre_hook("block in"))
    model.qconfig = ao.get_default_qconfig("x86")

    native = ao.prepare(copy.deepcopy(model), prepare_custom_config_dict=custom)
    assert type(native[1]) is ObservedBlock and audit_hooks(native) == []  # torch 2.14 drops the hook

    prepared = prepare_preserving_hooks(model, prepare_custom_config_dict=custom)
    assert type(prepared[1]) is ObservedBlock
    assert [(r.module, r.description) for r in audit_hooks(prepared)] == [("1", "CallLog._record_input('block in')")]
    prepared(example_images())
    assert log.tags() == ["block in"]


def test_apply_preserving_hooks_around_any_stage() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    log = CallLog()
    model[0].register_forward_pre_hook(log.pre_hook("in"))

    def replace_conv_without_hooks(m: nn.Module) -> None:
        m[0] = nn.Conv2d(3, 4, 1)

    result = apply_preserving_hooks(model, replace_conv_without_hooks, what="replace")
    assert [r.module for r in audit_hooks(result)] == ["0"]
    result(example_images())
    assert log.tags() == ["in"]

    def remove_conv(m: nn.Module) -> nn.Module:
        return nn.Identity()

    with pytest.raises(LookupError, match="no module '0'"):
        apply_preserving_hooks(model, remove_conv)


def test_a_stage_that_adds_hooks_is_reported() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1))

    def add_hook(m: nn.Module) -> None:
        m[0].register_forward_hook(CallLog().forward_hook("new"))

    with pytest.raises(HookPreservationError, match="unexpected"):
        apply_preserving_hooks(model, add_hook, what="add_hook")


def test_models_stay_deep_copyable_after_hooked_modules_were_replaced() -> None:
    """timm's FeatureHooks keeps RemovableHandles, which reference the hooked module's dictionaries weakly. After
    fusion / prepare_qat replaced that module and it was collected, torch 2.14 cannot deep-copy those handles
    (see test_torch_native_hooks.py); fnl.hooks keeps the old dictionaries referenced so copies keep working."""
    backbone = timm_backbone("spnasnet_100", "expansion")
    eval_fused = fuse_model(backbone, is_qat=False)
    gc.collect()
    copied = copy.deepcopy(eval_fused)
    assert len(copied(example_images())) == 4

    model = nn.Sequential(ao.QuantStub(), fuse_model(backbone.train(), is_qat=True))
    model.qconfig = qat_qconfig()
    prepared = prepare_qat_preserving_hooks(model, inplace=True)
    gc.collect()
    assert len(copy.deepcopy(prepared)(example_images())) == 4
