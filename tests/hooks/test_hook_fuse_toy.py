"""fnl.hooks.fuse on small modules: every norm kind, activations fused or kept, and where hooks go."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
import torch.ao.nn.intrinsic as nni
from hooks_testing import CallLog, assert_outputs_close, randomize_norms
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fnl.hooks import audit_hooks, compare_hook_audits, find_fusion_groups, fuse_model

CHANNELS = 6


def image() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def conv() -> nn.Conv2d:
    return nn.Conv2d(3, CHANNELS, 3, padding=1, bias=False)


def sync_batch_norm_act(act_layer: type[nn.Module]) -> SyncBatchNormAct:
    # timm creates SyncBatchNormAct only by converting a BatchNormAct2d (convert_sync_batchnorm)
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(BatchNormAct2d(CHANNELS, act_layer=act_layer))


# (name, model factory, fused type in eval, fused type for QAT, module left in the norm's slot)
NORM_CASES: list[tuple[str, Callable[[], nn.Module], type, type, type]] = [
    ("bn_relu", lambda: nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS), nn.ReLU()),
     nni.ConvReLU2d, nni.ConvBnReLU2d, nn.Identity),
    ("bn", lambda: nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS)), nn.Conv2d, nni.ConvBn2d, nn.Identity),
    ("syncbn_relu", lambda: nn.Sequential(conv(), nn.SyncBatchNorm(CHANNELS), nn.ReLU()),
     nni.ConvReLU2d, nni.ConvBnReLU2d, nn.Identity),
    ("frozenbn_relu", lambda: nn.Sequential(conv(), FrozenBatchNorm2d(CHANNELS), nn.ReLU()),
     nni.ConvReLU2d, nni.ConvReLU2d, nn.Identity),
    ("frozenbn", lambda: nn.Sequential(conv(), FrozenBatchNorm2d(CHANNELS)), nn.Conv2d, nn.Conv2d, nn.Identity),
    ("bnact_relu", lambda: nn.Sequential(conv(), BatchNormAct2d(CHANNELS)),
     nni.ConvReLU2d, nni.ConvBnReLU2d, nn.Identity),
    ("bnact_identity_then_relu", lambda: nn.Sequential(conv(), BatchNormAct2d(CHANNELS, apply_act=False), nn.ReLU()),
     nni.ConvReLU2d, nni.ConvBnReLU2d, nn.Identity),
    ("bnact_hardswish", lambda: nn.Sequential(conv(), BatchNormAct2d(CHANNELS, act_layer=nn.Hardswish)),
     nn.Conv2d, nni.ConvBn2d, nn.Hardswish),
    ("bnact_relu6", lambda: nn.Sequential(conv(), BatchNormAct2d(CHANNELS, act_layer=nn.ReLU6)),
     nn.Conv2d, nni.ConvBn2d, nn.ReLU6),
    ("bnact_silu", lambda: nn.Sequential(conv(), BatchNormAct2d(CHANNELS, act_layer=nn.SiLU)),
     nn.Conv2d, nni.ConvBn2d, nn.SiLU),
    ("syncbnact_relu", lambda: nn.Sequential(conv(), sync_batch_norm_act(nn.ReLU)),
     nni.ConvReLU2d, nni.ConvBnReLU2d, nn.Identity),
    ("frozenbnact_relu", lambda: nn.Sequential(conv(), FrozenBatchNormAct2d(CHANNELS)),
     nni.ConvReLU2d, nni.ConvReLU2d, nn.Identity),
    ("frozenbnact_silu", lambda: nn.Sequential(conv(), FrozenBatchNormAct2d(CHANNELS, act_layer=nn.SiLU)),
     nn.Conv2d, nn.Conv2d, nn.SiLU),
    ("conv_relu", lambda: nn.Sequential(nn.Conv2d(3, CHANNELS, 1), nn.ReLU()),
     nni.ConvReLU2d, nni.ConvReLU2d, nn.Identity),
]


@pytest.mark.parametrize(("case", "make", "eval_type", "qat_type", "norm_slot_type"), NORM_CASES,
                         ids=[case[0] for case in NORM_CASES])
def test_fusion_by_norm_kind(case: str, make: Callable[[], nn.Module], eval_type: type, qat_type: type,
                             norm_slot_type: type) -> None:
    torch.manual_seed(0)
    model = randomize_norms(make()).eval()
    x = image()
    expected = model(x)

    (group,) = find_fusion_groups(model, is_qat=False)
    assert group.name == "0"
    fused = fuse_model(model, is_qat=False)
    assert type(fused[0]) is eval_type
    assert type(fused[1]) is norm_slot_type
    assert all(type(m) is nn.Identity for m in list(fused)[2:])
    assert_outputs_close(expected, fused(x))

    fused_qat = fuse_model(model.train(), is_qat=True)
    assert type(fused_qat[0]) is qat_type
    assert type(fused_qat[1]) is norm_slot_type
    assert_outputs_close(expected, fused_qat.eval()(x))
    assert type(model[0]) is nn.Conv2d  # inplace=False left the model as it was


def test_qat_fusion_shares_norm_parameters_and_converts_sync_and_timm_norms_to_batchnorm2d() -> None:
    model = nn.Sequential(conv(), sync_batch_norm_act(nn.ReLU)).train()
    norm = model[1]
    fused = fuse_model(model, is_qat=True, inplace=True)
    assert fused is model
    conv_bn_relu = fused[0]
    assert type(conv_bn_relu[1]) is nn.BatchNorm2d
    # the same tensors: an optimizer built before fusion still updates the fused module
    assert conv_bn_relu[1].weight is norm.weight and conv_bn_relu[1].running_var is norm.running_var
    assert conv_bn_relu[2] is norm.act


def test_frozen_norm_is_folded_for_qat_with_frozen_shift() -> None:
    model = randomize_norms(nn.Sequential(conv(), FrozenBatchNorm2d(CHANNELS), nn.ReLU())).train()
    fused = fuse_model(model, is_qat=True)
    folded_conv = fused[0][0]
    assert folded_conv.weight.requires_grad
    assert not folded_conv.bias.requires_grad  # the conv had no bias and the norm's shift was frozen
    # a frozen norm is the same affine map in training mode: outputs equal in train mode too
    x = image()
    assert_outputs_close(model(x), fused(x))


def test_linear_batchnorm1d_relu() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU())
    randomize_norms(model, example=torch.randn(16, 5))
    model.eval()
    expected = model(x)
    eval_fused = fuse_model(model, is_qat=False)
    assert [type(m) for m in eval_fused] == [nni.LinearReLU, nn.Identity, nn.Identity, nni.LinearReLU, nn.Identity]
    assert_outputs_close(expected, eval_fused(x))
    # torch.ao has no LinearBnReLU: for QAT the ReLU stays a module of its own
    qat_fused = fuse_model(model.train(), is_qat=True)
    assert [type(m) for m in qat_fused] == [nni.LinearBn1d, nn.Identity, nn.ReLU, nni.LinearReLU, nn.Identity]
    assert_outputs_close(expected, qat_fused.eval()(x))


def test_unfusable_activation_is_kept_after_the_fused_conv() -> None:
    model = randomize_norms(nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS), nn.Hardswish(), nn.SiLU())).eval()
    fused = fuse_model(model, is_qat=False)
    assert [type(m) for m in fused] == [nn.Conv2d, nn.Identity, nn.Hardswish, nn.SiLU]
    assert_outputs_close(model(image()), fused(image()))


def test_eval_fusion_refuses_a_training_model() -> None:
    model = nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS)).train()
    with pytest.raises(ValueError, match="model.eval"):
        fuse_model(model, is_qat=False)


def test_not_fused_when_drop_is_not_identity_or_module_is_shared(caplog: pytest.LogCaptureFixture) -> None:
    with_drop = nn.Sequential(conv(), BatchNormAct2d(CHANNELS, drop_layer=nn.Dropout))
    assert find_fusion_groups(with_drop, is_qat=True) == []
    assert "drop layer is Dropout" in caplog.text
    relu = nn.ReLU()
    shared = nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS), relu, nn.Conv2d(CHANNELS, 2, 1), relu)
    groups = find_fusion_groups(shared, is_qat=True)
    assert [g.members for g in groups] == [("0", "1")]


def test_fusing_twice_finds_nothing_new() -> None:
    model = nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS), nn.ReLU()).train()
    fused = fuse_model(model, is_qat=True)
    assert find_fusion_groups(fused, is_qat=True) == []


# ---- hooks -------------------------------------------------------------------------------------------------------


def test_pre_hook_of_first_and_forward_hook_of_last_move_and_fire_once() -> None:
    model = randomize_norms(nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS), nn.ReLU())).eval()
    log = CallLog()
    model[0].register_forward_pre_hook(log.pre_hook("input"))
    model[2].register_forward_hook(log.forward_hook("output"))
    x = image()
    expected = model(x)
    for is_qat in (False, True):
        log.entries.clear()
        fused = fuse_model(model.train(is_qat), is_qat=is_qat).eval()
        assert [r.module for r in audit_hooks(fused)] == ["0", "0"]
        output = fused(x)
        assert log.tags() == ["input", "output"]  # once each: torch's own eval fuser fires the pre-hook twice
        assert_outputs_close(x, log.tensor("input"))
        assert_outputs_close(expected, log.tensor("output"))
        assert_outputs_close(expected, output)


def test_a_handle_taken_before_fusion_no_longer_removes_the_moved_hook() -> None:
    model = nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS)).train()
    handle = model[0].register_forward_pre_hook(CallLog().pre_hook("input"))
    fused = fuse_model(model, is_qat=True, inplace=True)
    handle.remove()  # moving re-registers the hook: the old handle points at the conv's (now empty) dictionary
    assert len(audit_hooks(fused)) == 1


def test_hook_flags_and_order_are_kept() -> None:
    model = nn.Sequential(conv(), BatchNormAct2d(CHANNELS)).train()
    log = CallLog()
    model[0].register_forward_pre_hook(log.pre_hook("second"))
    model[0].register_forward_pre_hook(log.kwargs_pre_hook("first"), with_kwargs=True, prepend=True)
    model[1].register_forward_hook(log.forward_hook("always"), always_call=True)
    fused = fuse_model(model, is_qat=True)
    hooks = audit_hooks(fused)
    assert [(r.module, r.description, r.with_kwargs, r.always_call) for r in hooks] == [
        ("0", "CallLog._record_input_with_kwargs('first')", True, False),
        ("0", "CallLog._record_input('second')", False, False),
        ("0", "CallLog._record_output('always')", False, True),
    ]
    fused(image())
    assert log.tags() == ["first", "second", "always"]


def test_forward_hooks_of_norm_and_its_inner_activation_move_in_firing_order() -> None:
    model = nn.Sequential(conv(), BatchNormAct2d(CHANNELS)).eval()
    log = CallLog()
    model[1].register_forward_hook(log.forward_hook("norm"))
    model[1].act.register_forward_hook(log.forward_hook("inner act"))
    model(image())
    order_before = log.tags()
    log.entries.clear()
    fused = fuse_model(model, is_qat=False)
    fused(image())
    assert log.tags() == order_before == ["inner act", "norm"]


def test_forward_hook_of_norm_with_kept_activation_moves_to_the_activation() -> None:
    # mobilenetv3's last feature: a forward hook on a BatchNormAct2d whose Hardswish is not fusable
    model = randomize_norms(nn.Sequential(conv(), BatchNormAct2d(CHANNELS, act_layer=nn.Hardswish))).eval()
    log = CallLog()
    model[1].register_forward_hook(log.forward_hook("feature"))
    expected = model(image())
    (group,) = find_fusion_groups(model, is_qat=False)
    assert group.keeps_norm_activation and group.renamed() == {"1": "1", "1.act": "1"}
    log.entries.clear()
    fused = fuse_model(model, is_qat=False)
    assert [(r.module, r.module_type) for r in audit_hooks(fused)] == [("1", "Hardswish")]
    fused(image())
    assert_outputs_close(expected, log.tensor("feature"))


def test_hook_inside_a_group_stops_fusion_there(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    log = CallLog()
    # a forward hook on the conv reads a tensor fusion would remove: no fusion at all
    model = nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS), nn.ReLU()).eval()
    model[0].register_forward_hook(log.forward_hook("conv out"))
    assert find_fusion_groups(model, is_qat=False) == []
    assert "a hook observes the tensor between them" in caplog.text

    # a pre-hook on the ReLU reads the BN output: conv+bn fuse, the ReLU keeps its hook
    model = randomize_norms(nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS), nn.ReLU())).eval()
    model[2].register_forward_pre_hook(log.pre_hook("bn out"))
    before = audit_hooks(model)
    fused = fuse_model(model, is_qat=False)
    assert [type(m) for m in fused] == [nn.Conv2d, nn.Identity, nn.ReLU]
    assert compare_hook_audits(before, audit_hooks(fused)).ok

    # the same through a timm norm-act: its ReLU stays, in the norm's slot, with its pre-hook
    model = nn.Sequential(conv(), BatchNormAct2d(CHANNELS)).eval()
    model[1].act.register_forward_pre_hook(log.pre_hook("bn out"))
    fused = fuse_model(model, is_qat=False)
    assert [type(m) for m in fused] == [nn.Conv2d, nn.ReLU]
    assert [r.module for r in audit_hooks(fused)] == ["1"]


def test_tracing_keeps_groups_of_a_sequential_model() -> None:
    model = nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS), nn.ReLU(), nn.Conv2d(CHANNELS, 2, 1), nn.ReLU())
    static = find_fusion_groups(model, is_qat=True)
    assert [g.members for g in static] == [("0", "1", "2"), ("3", "4")]
    assert find_fusion_groups(model, is_qat=True, example_inputs=(image(),)) == static


class ReusedReLU(nn.Module):
    """Registers conv, bn, relu but calls relu twice, as torchvision's ResNet blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv()
        self.bn = nn.BatchNorm2d(CHANNELS)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        return self.relu(y - 1.0)


def test_tracing_cuts_a_group_where_registration_order_lies() -> None:
    model = randomize_norms(ReusedReLU()).eval()
    assert [g.members for g in find_fusion_groups(model, is_qat=False)] == [("conv", "bn", "relu")]
    traced = find_fusion_groups(model, is_qat=False, example_inputs=(image(),))
    assert [g.members for g in traced] == [("conv", "bn")]
    assert_outputs_close(model(image()), fuse_model(model, is_qat=False, groups=traced)(image()))
    # modes are restored after tracing
    assert not model.training and not model.bn.training


def test_fused_modules_take_the_mode_of_the_module_they_replace() -> None:
    eval_model = nn.Sequential(conv(), nn.BatchNorm2d(CHANNELS), nn.ReLU()).eval()
    assert not any(m.training for m in fuse_model(eval_model, is_qat=False).modules())
    assert not any(m.training for m in fuse_model(eval_model, is_qat=True).modules())
    train_model = eval_model.train()
    assert all(m.training for m in fuse_model(train_model, is_qat=True).modules())
