"""ROIPooler: detectron2's level assignment (a box of side 224 on level 4, one level per factor of two, the side being
sqrt(area)), clamping to the levels there are, and RoIAlign values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from fnl.modeling.poolers import ROIPooler, boxes_to_rois

FPN_STRIDES = [4, 8, 16, 32]  # levels 2..5, as the RoI heads pool P2..P5


def _square(side: float) -> list[float]:
    return [0.0, 0.0, side, side]


@pytest.mark.parametrize(("box", "level"), [
    (_square(224.0), 4),  # the canonical box
    (_square(112.0), 3),  # exactly half: the boundary belongs to the upper level
    (_square(111.9), 2),  # just below half
    (_square(448.0), 5),
    (_square(447.9), 4),
    (_square(56.0), 2),
    (_square(10.0), 2),  # below the finest level: clamped
    (_square(2000.0), 5),  # above the coarsest level: clamped
    ([0.0, 0.0, 56.0, 224.0], 3),  # sqrt(56 * 224) = 112: area decides, not width or height
    ([30.0, 40.0, 254.0, 264.0], 4),  # position does not matter
    ([5.0, 5.0, 5.0, 5.0], 2),  # empty box
])
def test_level_of_a_box_follows_the_canonical_mapping(box: list[float], level: int) -> None:
    pooler = ROIPooler(7, FPN_STRIDES, sampling_ratio=0, pooler_type="ROIAlignV2")
    assigned = pooler.assign_levels(boxes_to_rois([torch.tensor([box])]))
    assert assigned.tolist() == [level - 2]  # indices into the pooled levels, the finest first


def test_canonical_size_and_level_are_the_pooler_arguments() -> None:
    pooler = ROIPooler(7, FPN_STRIDES, sampling_ratio=0, pooler_type="ROIAlignV2", canonical_box_size=100,
                       canonical_level=3)
    rois = boxes_to_rois([torch.tensor([_square(100.0), _square(200.0), _square(49.0)])])
    assert pooler.assign_levels(rois).tolist() == [1, 2, 0]  # levels 3, 4, 2


def test_each_box_is_pooled_from_its_own_level_and_keeps_its_place() -> None:
    # Level k holds the constant k + 1, so each pooled box says which level it came from.
    sizes = [(128, 128), (64, 64), (32, 32), (16, 16)]  # a 512 x 512 image
    features = [torch.full((2, 3, h, w), float(k + 1)) for k, (h, w) in enumerate(sizes)]
    pooler = ROIPooler(2, FPN_STRIDES, sampling_ratio=2, pooler_type="ROIAlignV2")
    image0 = torch.tensor([[0.0, 0.0, 224.0, 224.0], [10.0, 10.0, 50.0, 50.0]])  # levels 4, 2
    image1 = torch.tensor([[0.0, 0.0, 460.0, 460.0], [0.0, 0.0, 120.0, 120.0], [0.0, 0.0, 60.0, 60.0]])  # 5, 3, 2
    pooled = pooler(features, [image0, image1])
    assert pooled.shape == (5, 3, 2, 2)
    per_box = pooled.flatten(1)
    expected_level = torch.tensor([3.0, 1.0, 4.0, 2.0, 1.0])
    torch.testing.assert_close(per_box, expected_level[:, None].expand_as(per_box))


def test_image_index_of_a_box_chooses_its_feature_map() -> None:
    features = [torch.stack([torch.full((1, 4, 4), 5.0), torch.full((1, 4, 4), 7.0)])]  # image 0: 5, image 1: 7
    pooler = ROIPooler(1, [1], sampling_ratio=1, pooler_type="ROIAlignV2")
    pooled = pooler(features, [torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]] * 2)])
    assert pooled.flatten().tolist() == [5.0, 7.0, 7.0]


@pytest.mark.parametrize(("pooler_type", "expected_columns"), [
    # Box [0, 4] on a stride-1 map, 2 bins of width 2, one sample each at x = 1 and x = 3. ROIAlignV2 ("aligned")
    # reads pixel centres at integer + 0.5, so the samples fall between pixels: 0.5 and 2.5 on a map whose value is
    # its column index; ROIAlign reads pixel centres at integers: 1 and 3.
    ("ROIAlignV2", [0.5, 2.5]),
    ("ROIAlign", [1.0, 3.0]),
])
def test_roialign_samples_where_its_pooler_type_says(pooler_type: str, expected_columns: list[float]) -> None:
    columns = torch.arange(6.0).expand(1, 1, 6, 6).contiguous()
    pooler = ROIPooler(2, [1], sampling_ratio=1, pooler_type=pooler_type)
    pooled = pooler([columns], [torch.tensor([[0.0, 0.0, 4.0, 4.0]])])
    torch.testing.assert_close(pooled[0, 0], torch.tensor([expected_columns, expected_columns]))


def test_unknown_pooler_type_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="POOLER_TYPE must be 'ROIAlignV2' or 'ROIAlign', got 'ROIPool'"):
        ROIPooler(7, FPN_STRIDES, sampling_ratio=0, pooler_type="ROIPool")
