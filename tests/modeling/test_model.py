import pytest
import torch

from fnl.config import ConfigError, load_config
from fnl.modeling import ImageShapeError, build_model, densepose_to_iuv

SMALL = ["INPUT.MIN_SIZE_TEST", "128", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]


@pytest.fixture(scope="module", params=["mobile_parsing_rcnn_a", "mobile_parsing_rcnn_b"])
def model(request):
    torch.manual_seed(0)
    return build_model(load_config(request.param, SMALL))


def test_train_forward_gives_every_loss_and_gradients(model, training_batch):
    model.train()
    losses = model(training_batch)
    expected = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_densepose_I",
                "loss_densepose_U", "loss_densepose_V", "loss_densepose_S"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    head = model.roi_heads.densepose_predictor.index_uv_lowres.weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    model.zero_grad()


def test_eval_forward_maps_boxes_to_the_original_size(model, training_batch):
    model.eval()
    inputs = [{"image": training_batch[0]["image"], "height": 256, "width": 320}]
    with torch.no_grad():
        (out,) = model(inputs)
    n = len(out["boxes"])
    assert out["scores"].shape == (n,) and out["classes"].shape == (n,)
    assert out["densepose"]["fine_segm"].shape == (n, 25, 64, 64)
    assert out["densepose"]["coarse_segm"].shape == (n, 2, 64, 64)
    if n:
        assert out["boxes"][:, 2].max() <= 320 and out["boxes"][:, 3].max() <= 256
        maps = densepose_to_iuv(out["boxes"][:3], out["densepose"])
        for box, m in zip(out["boxes"][:3], maps, strict=True):
            assert m.shape == (3, max(int(box[3] - box[1]), 1), max(int(box[2] - box[0]), 1))
            assert m[0].min() >= 0 and m[0].max() <= 24 and m[1:].min() >= 0 and m[1:].max() <= 1


def test_model_b_taps_expansion_features_through_conv_pwl_pre_hooks():
    model = build_model(load_config("mobile_parsing_rcnn_b", SMALL)).eval()
    bottom_up = model.backbone.bottom_up
    hooked = sorted(n for n, m in bottom_up.named_modules() if m._forward_pre_hooks)
    assert hooked == ["blocks.1.2.conv_pwl", "blocks.2.3.conv_pwl", "blocks.4.3.conv_pwl", "blocks.6.0.conv_pwl"]
    fired = []
    for name in hooked:
        bottom_up.get_submodule(name).register_forward_pre_hook(lambda m, inp, name=name: fired.append(name))
    with torch.no_grad():
        features = bottom_up(torch.zeros(1, 3, 128, 128))
    assert fired == hooked
    assert [f.shape[1] for f in features] == [72, 120, 288, 1152]


def test_model_b_parameter_count_is_the_papers_within_ten_percent():
    params = sum(p.numel() for p in build_model(load_config("mobile_parsing_rcnn_b")).parameters())
    assert abs(params - 3.35e6) / 3.35e6 < 0.10


def test_test_tuned_rpn_keeps_at_most_100_proposals_per_level():
    cfg = load_config("mobile_parsing_rcnn_b_s3x", ["INPUT.MIN_SIZE_TEST", "128"])
    assert cfg.MODEL.RPN.POST_NMS_TOPK_TEST == 100 and cfg.MODEL.RPN.NMS_THRESH_TEST == 0.3
    model = build_model(cfg).eval()
    images = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        features = model.backbone(images)
        (proposals,), _ = model.proposal_generator(features, [(256, 256)])
    assert len(proposals) <= 100 * len(cfg.MODEL.RPN.IN_FEATURES)


@pytest.mark.parametrize("shape", [(1, 128, 128), (4, 128, 128), (128, 128, 3), (128, 128)])
def test_wrong_image_shape_is_a_clear_error(shape):
    model = build_model(load_config("mobile_parsing_rcnn_b", SMALL)).eval()
    with pytest.raises(ImageShapeError, match=r"expected an RGB image of shape \(3, H, W\)"):
        model([{"image": torch.zeros(shape, dtype=torch.uint8)}])


def test_unknown_backbone_or_neck_names_the_config_key():
    with pytest.raises(ValueError, match="MODEL.BACKBONE.NAME 'no_such_net'"):
        build_model(load_config(None, ["MODEL.BACKBONE.NAME", "no_such_net"]))
    with pytest.raises(ValueError, match="MODEL.NECK.NAME"):
        build_model(load_config(None, ["MODEL.NECK.NAME", "PAN"]))
    with pytest.raises(ConfigError, match="unknown config key 'MODEL.RPN.TOPK'"):
        load_config(None, ["MODEL.RPN.TOPK", "3"])


def test_frozen_stages_do_not_train():
    model = build_model(load_config("mobile_parsing_rcnn_b", ["MODEL.BACKBONE.FREEZE_AT", "2"]))
    bottom_up = model.backbone.bottom_up
    assert not any(p.requires_grad for p in bottom_up.conv_stem.parameters())
    assert not any(p.requires_grad for p in bottom_up.blocks[0].parameters())
    assert all(p.requires_grad for p in bottom_up.blocks[1].parameters())


def test_densepose_head_norm_puts_batch_norm_after_each_conv_but_image_pooling():
    from torch import nn

    cfg = load_config("mobile_parsing_rcnn_b", ["MODEL.ROI_DENSEPOSE_HEAD.NORM", "BN"])
    head = build_model(cfg).roi_heads.densepose_head
    convs = [*head.ASPP.convs, head.ASPP.project, *head.body]
    assert all(isinstance(block[1], nn.BatchNorm2d) and not block[0].bias for block in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in head.ASPP.pooling.modules())
    plain = build_model(load_config("mobile_parsing_rcnn_b")).roi_heads.densepose_head
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
