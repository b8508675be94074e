"""detectron2's ResNet as fnl's bottom-up (MODEL.BACKBONE.NAME "build_resnet_fpn_backbone", MODEL.RESNETS)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from fnl.config import ConfigError, load_config
from fnl.modeling.backbone import build_bottom_up
from fnl.modeling.necks import build_backbone

D2_RESNET = ["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"]


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial norm statistics, so that a norm applied in the wrong place changes the output."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d | torch.nn.BatchNorm2d):
            n = module.running_mean.numel()
            module.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def torchvision_to_detectron2_name(name: str) -> str:
    """torchvision's resnet50 names -> detectron2's (conv1/bn1 stem, layerN.K.convJ/bnJ, downsample.0/1)."""
    if name.startswith(("conv1.", "bn1.")):
        return "stem.conv1." + ("norm." if name.startswith("bn1.") else "") + name.split(".", 1)[1]
    stage, rest = name.split(".", 1)
    stage = f"res{int(stage.removeprefix('layer')) + 1}"
    for j in (1, 2, 3):
        rest = rest.replace(f".bn{j}.", f".conv{j}.norm.")
    rest = rest.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
    return f"{stage}.{rest}"


def test_resnet50_keys_are_detectron2s_and_stage_outputs_have_its_strides_and_widths():
    bottom_up = build_bottom_up(load_config("densepose_rcnn_R_50_FPN", D2_RESNET))
    keys = bottom_up.state_dict()
    assert tuple(keys["stem.conv1.weight"].shape) == (64, 3, 7, 7)
    assert {"stem.conv1.norm.weight", "stem.conv1.norm.bias", "stem.conv1.norm.running_mean",
            "stem.conv1.norm.running_var"} <= set(keys)
    assert tuple(keys["res2.0.shortcut.weight"].shape) == (256, 64, 1, 1)
    assert tuple(keys["res5.2.conv3.norm.running_var"].shape) == (2048,)
    assert "res2.1.shortcut.weight" not in keys  # same width: identity shortcut
    assert not any(k.endswith("num_batches_tracked") for k in keys)  # FrozenBN, as detectron2's
    assert bottom_up.feature_info.channels() == [256, 512, 1024, 2048]
    assert bottom_up.feature_info.reduction() == [4, 8, 16, 32]
    outputs = bottom_up(torch.zeros(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in outputs] == [(256, 16, 24), (512, 8, 12), (1024, 4, 6), (2048, 2, 3)]


@pytest.mark.parametrize(("stride_in_1x1", "conv1_stride", "conv2_stride"), [(True, 2, 1), (False, 1, 2)])
def test_stride_in_1x1_places_each_stages_stride(stride_in_1x1, conv1_stride, conv2_stride):
    cfg = load_config("densepose_rcnn_R_50_FPN", [*D2_RESNET, "MODEL.RESNETS.STRIDE_IN_1X1", str(stride_in_1x1)])
    bottom_up = build_bottom_up(cfg)
    for stage in ("res3", "res4", "res5"):
        block = getattr(bottom_up, stage)[0]
        assert block.conv1.stride == (conv1_stride,) * 2 and block.conv2.stride == (conv2_stride,) * 2
        assert block.shortcut.stride == (2, 2)
    assert bottom_up.res2[0].conv1.stride == bottom_up.res2[0].conv2.stride == (1, 1)


def test_stride_in_3x3_resnet50_computes_torchvisions_resnet50():
    """With the stride in the 3x3 conv, detectron2's R-50 is torchvision's: same weights, same features."""
    cfg = load_config("densepose_rcnn_R_50_FPN", [*D2_RESNET, "MODEL.RESNETS.STRIDE_IN_1X1", "False",
                                                  "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.NORM", "BN"])
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    randomize_norms(reference)
    bottom_up = build_bottom_up(cfg).eval()
    state = {torchvision_to_detectron2_name(k): v for k, v in reference.state_dict().items()
             if not k.startswith("fc.")}
    result = bottom_up.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = bottom_up(x)
        h = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = []
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            h = layer(h)
            expected.append(h)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_freeze_at_freezes_the_stem_and_first_stages_and_freezes_their_batch_norms():
    cfg = load_config("densepose_rcnn_R_50_FPN", [*D2_RESNET, "MODEL.RESNETS.NORM", "BN",
                                                  "MODEL.BACKBONE.FREEZE_AT", "2"])
    bottom_up = build_bottom_up(cfg)
    assert not any(p.requires_grad for p in bottom_up.stem.parameters())
    assert not any(p.requires_grad for p in bottom_up.res2.parameters())
    assert all(p.requires_grad for p in bottom_up.res3.parameters())
    assert isinstance(bottom_up.res2[0].conv1.norm, FrozenBatchNorm2d)
    assert type(bottom_up.res3[0].conv1.norm) is torch.nn.BatchNorm2d


def test_fpn_on_detectron2_resnet_has_detectron2s_fpn_names():
    backbone = build_backbone(load_config("densepose_rcnn_R_50_FPN", D2_RESNET))
    keys = backbone.state_dict()
    assert tuple(keys["fpn_lateral2.weight"].shape) == (256, 256, 1, 1)
    assert tuple(keys["fpn_lateral5.weight"].shape) == (256, 2048, 1, 1)
    assert tuple(keys["fpn_output3.bias"].shape) == (256,)
    features = backbone(torch.zeros(1, 3, 64, 64))
    assert list(features) == ["p2", "p3", "p4", "p5", "p6"] and features["p6"].shape[-1] == 1


@pytest.mark.parametrize(("key", "value", "named"), [
    ("MODEL.RESNETS.DEPTH", "34", "MODEL.RESNETS.DEPTH"),
    ("MODEL.RESNETS.NORM", "GN", "MODEL.RESNETS.NORM"),
    ("MODEL.RESNETS.OUT_FEATURES", "['res6']", "MODEL.RESNETS.OUT_FEATURES"),
])
def test_unsupported_resnet_settings_are_one_line_errors_naming_the_key(key, value, named):
    with pytest.raises(ConfigError, match=named):
        build_bottom_up(load_config("densepose_rcnn_R_50_FPN", [*D2_RESNET, key, value]))


def test_timm_configs_still_build_timms_resnet50():
    bottom_up = build_bottom_up(load_config("densepose_rcnn_R_50_FPN"))
    assert "conv1.weight" in bottom_up.state_dict() and "layer1.0.conv1.weight" in bottom_up.state_dict()
