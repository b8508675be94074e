"""What torch.ao's eager quantization does with forward hooks by itself, without fnl.hooks (facts for docs/DESIGN.md).

torch 2.14:
- ``fuse_modules`` / ``fuse_modules_qat`` (``fuse_known_modules``) move the first module's pre-hooks and the last
  module's forward hooks to the fused module, but lose their ``with_kwargs`` / ``always_call`` flags, silently drop
  hooks on the modules in between, and (eval) duplicate the conv's pre-hooks: ``fuse_conv_bn_eval`` deep-copies the
  conv with its hooks, so the copy inside the fused module fires them again (into copies of their owners).
  They cannot fuse timm's ``BatchNormAct2d`` or torchvision's ``FrozenBatchNorm2d`` at all.
- ``prepare_qat`` and ``convert`` keep plain hooks (``swap_module`` re-registers them on the new module; observer
  hooks come first during QAT) but lose the ``with_kwargs`` / ``always_call`` flags.
- ``prepare``'s custom-module path drops hooks (see ``test_hook_preserve.py``).
- Once a hooked module was replaced and collected, a model whose hook owner keeps the ``RemovableHandle``s
  (timm's FeatureHooks does) can no longer be deep-copied: ``RemovableHandle.__setstate__`` fails on the dead
  weak references, so ``prepare`` / ``convert`` with ``inplace=False`` crash depending on when the GC ran.
So the paper's Figure 2 problem (hooks lost by prepare / convert) is fixed upstream for plain hooks such as timm's
FeatureHooks; what still needs fnl.hooks is fusion of timm / frozen norms, the flags, the custom-module path and
a check that nothing was lost.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.ao.quantization as ao
from hooks_testing import SPNASNET_FEATURE_TAPS, CallLog, example_images, timm_backbone
from timm.layers import BatchNormAct2d
from timm.models._features import FeatureHooks
from torch import nn

from fnl.hooks import audit_hooks, fuse_model

pytestmark = [
    pytest.mark.skipif(not torch.__version__.startswith("2.14."), reason="documents torch 2.14's behaviour"),
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
    pytest.mark.filterwarnings("ignore:must run observer before calling calculate_qparams:UserWarning"),
]


def conv_bn_relu() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_fuse_modules_eval_fires_the_conv_pre_hook_twice() -> None:
    model = conv_bn_relu().eval()
    log = CallLog()
    model[0].register_forward_pre_hook(log.pre_hook("conv in"))
    fused = ao.fuse_modules(model, [["0", "1", "2"]])
    fused(example_images())
    assert log.tags() == ["conv in", "conv in"]  # once on ConvReLU2d, once on the deep-copied conv inside it
    log.entries.clear()
    fuse_model(model, is_qat=False)(example_images())
    assert log.tags() == ["conv in"]


def test_fuse_modules_qat_moves_plain_hooks_but_loses_their_flags() -> None:
    model = conv_bn_relu().train()
    log = CallLog()
    model[0].register_forward_pre_hook(log.pre_hook("conv in"))
    model[2].register_forward_hook(log.forward_hook("relu out"), always_call=True)
    fused = ao.fuse_modules_qat(model, [["0", "1", "2"]])
    assert [(r.module, r.always_call) for r in audit_hooks(fused)] == [("0", False), ("0", False)]

    model = conv_bn_relu().train()
    model[0].register_forward_pre_hook(log.kwargs_pre_hook("conv in"), with_kwargs=True)
    fused = ao.fuse_modules_qat(model, [["0", "1", "2"]])
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        fused(example_images())  # the hook is now called without kwargs


def test_hooks_of_inner_modules_are_lost_by_fuse_modules_or_by_prepare_qat() -> None:
    model = conv_bn_relu()
    model[1].register_forward_hook(CallLog().forward_hook("bn out"))
    assert audit_hooks(ao.fuse_modules(model.eval(), [["0", "1", "2"]])) == []  # the bn is folded away
    # fuse_modules_qat keeps the bn as child "0.1" of ConvBnReLU2d, with its hook; prepare_qat then rebuilds it
    fused = ao.fuse_modules_qat(model.train(), [["0", "1", "2"]])
    assert [r.module for r in audit_hooks(fused)] == ["0.1"]
    fused.qconfig = ao.get_default_qat_qconfig("x86")
    assert audit_hooks(ao.prepare_qat(fused)) == []
    # fnl.hooks.fuse_model fuses conv+bn only here, so the hook keeps observing the bn output
    assert [r.module for r in audit_hooks(fuse_model(model, is_qat=True))] == ["0"]


def test_fuse_modules_cannot_fuse_timm_norm_act() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)).eval()
    with pytest.raises(AssertionError, match="did not find fuser method"):
        ao.fuse_modules(model, [["0", "1"]])


def test_prepare_qat_and_convert_keep_plain_hooks_but_lose_flags() -> None:
    model = nn.Sequential(ao.QuantStub(), nn.Conv2d(3, 4, 3), ao.DeQuantStub())
    log = CallLog()
    model[1].register_forward_pre_hook(log.pre_hook("conv in"))
    model[1].register_forward_hook(log.forward_hook("conv out"), always_call=True)
    model.qconfig = ao.get_default_qat_qconfig("x86")
    prepared = ao.prepare_qat(model.train())
    assert [(r.description, r.always_call) for r in audit_hooks(prepared)] == [
        ("CallLog._record_input('conv in')", False), ("CallLog._record_output('conv out')", False)
    ]
    observer_first = audit_hooks(prepared, include_observers=True)
    assert [r.description for r in observer_first if r.kind == "forward"][0] == "_observer_forward_hook"
    converted = ao.convert(prepared.eval())
    assert [r.description for r in audit_hooks(converted)] == [
        "CallLog._record_input('conv in')", "CallLog._record_output('conv out')"
    ]
    converted(example_images())
    assert log.tags() == ["conv in", "conv out"]


def test_timm_feature_hooks_survive_plain_prepare_qat_and_convert() -> None:
    """With fnl's fusion first (torch's cannot fuse BatchNormAct2d), torch.ao alone keeps timm's FeatureHooks."""
    fused = fuse_model(timm_backbone("spnasnet_100", "expansion").train(), is_qat=True)
    model = nn.Sequential(ao.QuantStub(), fused)
    model.qconfig = ao.get_default_qat_qconfig("x86")
    prepared = ao.prepare_qat(model)
    assert [r.module for r in audit_hooks(prepared)] == [f"1.{name}" for name in SPNASNET_FEATURE_TAPS]
    assert len(prepared(example_images())) == 4
    # inplace: a copy could fail, see test_deep_copy_fails_once_a_hooked_module_was_replaced_and_collected
    converted = ao.convert(prepared.eval(), inplace=True)
    assert [r.module for r in audit_hooks(converted)] == [f"1.{name}" for name in SPNASNET_FEATURE_TAPS]


def test_deep_copy_fails_once_a_hooked_module_was_replaced_and_collected() -> None:
    """``RemovableHandle`` keeps weak references to its module's hook dictionaries; ``__setstate__`` survives a dead
    main dictionary but not dead flag dictionaries (``weakref.ref(None)``). timm's FeatureHooks keeps its handles,
    so once torch.ao replaced a hooked module and the garbage collector ran, ``copy.deepcopy`` of the model, and
    with it ``prepare(..., inplace=False)`` / ``convert(..., inplace=False)``, raises."""
    model = nn.Sequential(ao.QuantStub(), nn.Conv2d(3, 4, 1), nn.ReLU())
    model.feature_hooks = FeatureHooks([{"module": "1", "hook_type": "forward_pre"}], model.named_modules())
    model.qconfig = ao.get_default_qat_qconfig("x86")
    ao.prepare_qat(model.train(), inplace=True)  # swaps the hooked conv for its QAT version
    gc.collect()
    with pytest.raises(TypeError, match="cannot create weak reference to 'NoneType' object"):
        copy.deepcopy(model)
