"""fnl.hooks.fuse on real backbones: timm's EfficientNet family, torchvision-style Sequentials, fnl's own layers.

For each, the groups found from registration order are checked against a traced forward (the order assumption),
fusion leaves no norm behind, outputs match and hooks are kept.

Tolerances of eval fusion (norms folded into the convs): in float64 the fused timm backbones match to about 1e-12,
so the folding is exact; in float32 the changed rounding grows through 60+ layers to about 2.5e-5 of the output's
scale on spnasnet_100's deepest feature (random weights, calibrated statistics), so float32 is held to 1e-4 of the
output scale and float64 to 1e-9. Shallow modules meet 1e-5 in float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from hooks_testing import (
    SPNASNET_FEATURE_TAPS,
    assert_outputs_close,
    count_types,
    example_images,
    randomize_norms,
    timm_backbone,
)
from torch import nn

from fnl.config import load_config
from fnl.hooks import audit_hooks, compare_hook_audits, find_fusion_groups, fuse_model
from fnl.modeling.layers import ConvNormAct, SeparableConvNormAct
from fnl.modeling.necks import build_backbone

FLOAT32_TOLERANCE = 1e-4
FLOAT64_TOLERANCE = 1e-9
NORM_TYPES = ("BatchNorm2d", "BatchNormAct2d", "SyncBatchNorm", "FrozenBatchNorm2d", "FrozenBatchNormAct2d")

# model, feature_location, groups: {pattern: count}, activations kept in a norm's slot, feature channels
TIMM_CASES = [
    ("spnasnet_100", "expansion",
     {"Conv2d + BatchNormAct2d[ReLU]": 42, "Conv2d + BatchNormAct2d[Identity]": 21}, {}, [72, 120, 288, 1152]),
    ("spnasnet_100", "bottleneck",
     {"Conv2d + BatchNormAct2d[ReLU]": 42, "Conv2d + BatchNormAct2d[Identity]": 21}, {}, [24, 40, 96, 320]),
    ("mobilenetv3_large_100", "expansion",
     {"Conv2d + BatchNormAct2d[ReLU]": 11, "Conv2d + BatchNormAct2d[Identity]": 15,
      "Conv2d + BatchNormAct2d[Hardswish kept]": 19, "Conv2d + BatchNorm2d": 1, "Conv2d + ReLU": 8},
     {"Hardswish": 19}, [72, 120, 672, 960]),
    ("efficientnet_b0", "bottleneck",
     {"Conv2d + BatchNormAct2d[SiLU kept]": 32, "Conv2d + BatchNormAct2d[Identity]": 16}, {"SiLU": 32},
     [24, 40, 112, 320]),
]


def pattern(group_text: str) -> str:
    return group_text.split(": ", 1)[1].rsplit(" (", 1)[0]


@pytest.mark.parametrize(("name", "location", "expected_groups", "kept", "channels"), TIMM_CASES,
                         ids=[f"{case[0]}-{case[1]}" for case in TIMM_CASES])
def test_timm_backbone_fusion(name: str, location: str, expected_groups: dict[str, int], kept: dict[str, int],
                              channels: list[int]) -> None:
    model = timm_backbone(name, location)
    x = example_images()

    groups = find_fusion_groups(model, is_qat=False)
    found: dict[str, int] = {}
    for group in groups:
        found[pattern(str(group))] = found.get(pattern(str(group)), 0) + 1
    assert found == expected_groups
    assert sum(g.keeps_norm_activation for g in groups) == sum(kept.values())
    # registration order is call order in timm's blocks: a traced forward confirms every group
    assert find_fusion_groups(model, is_qat=False, example_inputs=(x,)) == groups

    fused = fuse_model(model, is_qat=False, groups=groups)
    with torch.no_grad():
        expected = model(x)
        actual = fused(x)
        assert [f.shape[1] for f in actual] == channels
        assert_outputs_close(expected, actual, tolerance=FLOAT32_TOLERANCE)
        # float64 convolutions are slow on CPU: one small image is enough to show the folding is exact
        model64, x64 = copy.deepcopy(model).double(), x[:1, :, :32, :32].double()
        assert_outputs_close(model64(x64), fuse_model(model64, is_qat=False, groups=groups)(x64), FLOAT64_TOLERANCE)
    assert not set(count_types(fused)) & set(NORM_TYPES)
    renamed = {old: new for group in groups for old, new in group.renamed().items()}
    assert compare_hook_audits(audit_hooks(model), audit_hooks(fused), renamed).ok

    fused_qat = fuse_model(model.train(), is_qat=True, groups=find_fusion_groups(model, is_qat=True))
    types = count_types(fused_qat)
    assert types.get("ConvBnReLU2d", 0) == expected_groups.get("Conv2d + BatchNormAct2d[ReLU]", 0)
    assert types.get("ConvReLU2d", 0) == expected_groups.get("Conv2d + ReLU", 0)
    assert types.get("ConvBn2d", 0) == len(groups) - types.get("ConvBnReLU2d", 0) - types.get("ConvReLU2d", 0)
    with torch.no_grad():
        assert_outputs_close(expected, fused_qat.eval()(x))


def test_torchvision_sequential_blocks_match_the_trace() -> None:
    # torchvision's Conv2dNormActivation is Sequential(conv, BatchNorm2d, ReLU6): conv+bn fused, ReLU6 left alone
    model = randomize_norms(torchvision.models.mobilenet_v2(num_classes=10)).eval()
    x = example_images()
    groups = find_fusion_groups(model, is_qat=False)
    assert len(groups) == 52
    assert find_fusion_groups(model, is_qat=False, example_inputs=(x,)) == groups
    fused = fuse_model(model, is_qat=False, groups=groups)
    assert count_types(fused)["ReLU6"] == count_types(model)["ReLU6"]
    assert "BatchNorm2d" not in count_types(fused)
    with torch.no_grad():
        assert_outputs_close(model(x), fused(x))


def test_torchvision_resnet_needs_the_trace() -> None:
    """ResNet's BasicBlock registers conv1, bn1, relu but calls relu again after the residual add: registration
    order alone would fuse that relu away. The trace keeps it."""
    model = randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()
    x = example_images()
    static = find_fusion_groups(model, is_qat=False)
    traced = find_fusion_groups(model, is_qat=False, example_inputs=(x,))
    block_relu_groups = [g for g in static if g.parent.startswith("layer") and g.members[-1] == "relu"]
    assert len(block_relu_groups) == 8
    assert [g for g in traced if g.parent.startswith("layer") and g.members[-1] == "relu"] == []
    with torch.no_grad():
        expected = model(x)
        assert_outputs_close(expected, fuse_model(model, is_qat=False, groups=traced)(x), FLOAT32_TOLERANCE)
        wrong = fuse_model(model, is_qat=False, groups=static)(x)
    assert not torch.allclose(expected, wrong, atol=1e-3)


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "FrozenBN", ""])
def test_fnl_layers(norm: str) -> None:
    model = nn.Sequential(
        ConvNormAct(3, 8, norm=norm),
        SeparableConvNormAct(8, norm=norm or "BN"),
        ConvNormAct(8, 4, 1, norm=norm, activation=False),
    )
    model = randomize_norms(model).eval()
    x = example_images()
    groups = find_fusion_groups(model, is_qat=False)
    assert len(groups) == 2 + bool(norm)  # ConvNormAct(..., activation=False) without norm is a lone conv
    assert find_fusion_groups(model, is_qat=False, example_inputs=(x,)) == groups
    with torch.no_grad():
        assert_outputs_close(model(x), fuse_model(model, is_qat=False, groups=groups)(x))


def test_mobile_parsing_rcnn_b_backbone() -> None:
    """Model B's backbone (spnasnet_100 with expansion taps + BiFPN, fnl's own modules): registration order holds
    everywhere, fusion keeps the BiFPN taps and the P2..P6 features."""
    torch.manual_seed(0)
    model = randomize_norms(build_backbone(load_config("mobile_parsing_rcnn_b"))).eval()
    x = example_images(1)
    groups = find_fusion_groups(model, is_qat=False)
    assert find_fusion_groups(model, is_qat=False, example_inputs=(x,)) == groups
    fused = fuse_model(model, is_qat=False, groups=groups)
    assert not set(count_types(fused)) & set(NORM_TYPES)
    assert [r.module for r in audit_hooks(fused)] == [f"bottom_up.{name}" for name in SPNASNET_FEATURE_TAPS]
    with torch.no_grad():
        assert list(fused(x)) == ["p2", "p3", "p4", "p5", "p6"]
        # In float32 this deep random-weight stack amplifies rounding: a 1e-7 relative change of the input already
        # moves P2..P6 by ~1e-3, the size of the fusion's float32 difference. float64 shows the fusion is exact.
        model64, x64 = copy.deepcopy(model).double(), x[:, :, :32, :32].double()
        expected = model64(x64)
        actual = fuse_model(model64, is_qat=False, groups=groups)(x64)
    assert_outputs_close(list(expected.values()), list(actual.values()), FLOAT64_TOLERANCE)
