"""MODEL.RPN.POST_NMS_TOPK_PER: fnl's per-level count, or detectron2's count over all levels of an image."""

from __future__ import annotations

import pytest
import torch

from fnl.config import load_config
from fnl.modeling.rpn import RPN

STRIDES = {"p2": 4, "p3": 8}


def proposals_per_level(per: str) -> tuple[torch.Tensor, list[int]]:
    cfg = load_config("densepose_rcnn_R_50_FPN", ["MODEL.RPN.IN_FEATURES", "['p2', 'p3']",
                                                  "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16]]",
                                                  "MODEL.RPN.POST_NMS_TOPK_TEST", "5", "MODEL.RPN.NMS_THRESH_TEST",
                                                  "1.0", "MODEL.RPN.POST_NMS_TOPK_PER", per])
    rpn = RPN(cfg, 8, STRIDES).eval()
    features = [torch.zeros(1, 8, 16, 16), torch.zeros(1, 8, 8, 8)]
    anchors = rpn.anchor_generator(features)
    g = torch.Generator().manual_seed(0)
    # Level p3's objectness all above p2's: the image's top 5 all come from p3.
    logits = [torch.rand(1, len(anchors[0]), generator=g), torch.rand(1, len(anchors[1]), generator=g) + 1.0]
    deltas = [torch.zeros(1, len(a), 4) for a in anchors]
    (proposals,) = rpn.decode_proposals(anchors, logits, deltas, [(64, 64)])
    from_p3 = proposals[:, 4] > 1.0
    return proposals, [int((~from_p3).sum()), int(from_p3.sum())]


@pytest.mark.parametrize(("per", "counts"), [("level", [5, 5]), ("image", [0, 5])])
def test_post_nms_topk_counts_per_level_or_per_image(per, counts):
    proposals, per_level = proposals_per_level(per)
    assert per_level == counts
    if per == "image":  # best first, as detectron2 returns them
        assert torch.equal(proposals[:, 4], proposals[:, 4].sort(descending=True).values)


def test_an_unknown_post_nms_topk_per_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="MODEL.RPN.POST_NMS_TOPK_PER must be 'level' or 'image', got 'batch'"):
        proposals_per_level("batch")
