"""AnchorGenerator against anchors written out by hand (detectron2's DefaultAnchorGenerator convention: an aspect
ratio is height / width, a size is the side of the square of the same area, anchors ordered (y, x, anchor))."""

from __future__ import annotations

import pytest
import torch

from fnl.modeling.anchors import AnchorGenerator

# Level 0 (stride 8): size 16 at ratios 1/4 and 1 -> 32 x 8 and 16 x 16. Level 1 (stride 16): size 32 -> 64 x 16 and
# 32 x 32. The one ratio list is shared by both levels.
SIZES = [[16.0], [32.0]]
ASPECT_RATIOS = [[0.25, 1.0]]
STRIDES = [8, 16]

# Level 0 on a 2 x 2 feature map: cells at x, y in {0, 8}, x varying fastest, both anchors of a cell together.
LEVEL0_ANCHORS = torch.tensor([
    [-16.0, -4.0, 16.0, 4.0], [-8.0, -8.0, 8.0, 8.0],  # cell (y=0, x=0)
    [-8.0, -4.0, 24.0, 4.0], [0.0, -8.0, 16.0, 8.0],  # cell (y=0, x=8)
    [-16.0, 4.0, 16.0, 12.0], [-8.0, 0.0, 8.0, 16.0],  # cell (y=8, x=0)
    [-8.0, 4.0, 24.0, 12.0], [0.0, 0.0, 16.0, 16.0],  # cell (y=8, x=8)
])
# Level 1 on a 1 x 1 feature map: the cell at the origin.
LEVEL1_ANCHORS = torch.tensor([[-32.0, -8.0, 32.0, 8.0], [-16.0, -16.0, 16.0, 16.0]])


def _features() -> list[torch.Tensor]:
    # Only the spatial size of a feature map matters; batch and channels are arbitrary.
    return [torch.rand(2, 3, 2, 2), torch.rand(2, 3, 1, 1)]


def test_anchors_per_level_are_the_hand_computed_ones() -> None:
    generator = AnchorGenerator(SIZES, ASPECT_RATIOS, STRIDES)
    level0, level1 = generator(_features())
    assert generator.num_anchors == 2
    torch.testing.assert_close(level0, LEVEL0_ANCHORS, rtol=0, atol=1e-5)
    torch.testing.assert_close(level1, LEVEL1_ANCHORS, rtol=0, atol=1e-5)


def test_offset_moves_every_anchor_by_that_fraction_of_its_stride() -> None:
    generator = AnchorGenerator(SIZES, ASPECT_RATIOS, STRIDES, offset=0.5)
    level0, level1 = generator(_features())
    torch.testing.assert_close(level0, LEVEL0_ANCHORS + 4.0, rtol=0, atol=1e-5)  # 0.5 * stride 8
    torch.testing.assert_close(level1, LEVEL1_ANCHORS + 8.0, rtol=0, atol=1e-5)  # 0.5 * stride 16


def test_two_sizes_on_one_level_come_size_major() -> None:
    generator = AnchorGenerator([[8.0, 16.0]], [[1.0, 4.0]], [4])
    (anchors,) = generator([torch.zeros(1, 1, 1, 1)])
    # size 8: 8 x 8, 4 x 16; size 16: 16 x 16, 8 x 32.
    expected = torch.tensor([[-4.0, -4.0, 4.0, 4.0], [-2.0, -8.0, 2.0, 8.0],
                             [-8.0, -8.0, 8.0, 8.0], [-4.0, -16.0, 4.0, 16.0]])
    torch.testing.assert_close(anchors, expected, rtol=0, atol=1e-5)


def test_one_size_list_per_feature_level_is_required() -> None:
    with pytest.raises(ValueError, match=r"MODEL.ANCHOR_GENERATOR: 2 SIZES for 3 feature levels"):
        AnchorGenerator(SIZES, ASPECT_RATIOS, [8, 16, 32])
