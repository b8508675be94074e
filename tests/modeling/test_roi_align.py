"""The channels-last RoIAlign (fnl.modeling.roi_align) against torchvision's op, which it stands in for at inference:
every sampling rule (fixed and adaptive grids, aligned and legacy, boxes outside the map, empty and inverted boxes,
1-pixel maps), several levels in one gather, the shared buffer read without a copy, and when it runs at all."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import roi_align

from fnl.modeling import roi_align as roi_align_module
from fnl.modeling.poolers import ROIPooler, boxes_to_rois
from fnl.modeling.roi_align import channels_last_levels, fast_roi_align_applies, roi_align_channels_last


def _rois(count: int, images: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Boxes anywhere from well outside the map to inside it, of every size; the first four empty, two inverted."""
    index = torch.randint(0, images, (count, 1), generator=generator).float()
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * 5 - 10
    size = torch.rand(count, 2, generator=generator) * 60 * torch.rand(count, 1, generator=generator)
    size[:4], size[4:6] = 0.0, -3.0
    return torch.cat([index, corner, corner + size], dim=1)


@pytest.mark.parametrize(("shape", "output_size", "sampling_ratio", "aligned", "scale"), [
    (shape, *rest) for shape, rest in itertools.product(
        [(2, 3, 17, 23), (1, 5, 1, 9), (3, 4, 8, 1)],
        itertools.product([1, 3, 7], [0, 1, 2, 3], [True, False], [1.0, 0.25]))
])
def test_matches_torchvision_roi_align(shape: tuple[int, int, int, int], output_size: int, sampling_ratio: int,
                                       aligned: bool, scale: float) -> None:
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(shape, generator=generator)
    rois = _rois(40, shape[0], shape[2], shape[3], generator)
    expected = roi_align(feature, rois, output_size, scale, sampling_ratio, aligned)
    for laid_out in (feature, channels_last_levels([feature])[0]):
        pooled = roi_align_channels_last([laid_out], rois, None, output_size, [scale], sampling_ratio, aligned)
        assert pooled.is_contiguous()
        torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_each_roi_is_pooled_from_its_level_in_one_gather(sampling_ratio: int) -> None:
    generator = torch.Generator().manual_seed(1)
    levels = [torch.randn(2, 4, 32 // 2**k, 24 // 2**k, generator=generator) for k in range(3)]
    rois = _rois(30, 2, 32, 24, generator)
    assigned = torch.randint(0, 3, (30,), generator=generator)
    pooled = roi_align_channels_last(levels, rois, assigned, 5, [1.0, 0.5, 0.25], sampling_ratio, True)
    for k, level in enumerate(levels):
        chosen = assigned == k
        expected = roi_align(level, rois[chosen], 5, 0.5**k, sampling_ratio, True)
        torch.testing.assert_close(pooled[chosen], expected, rtol=0, atol=1e-5)


def test_many_rois_are_gathered_in_chunks_of_bounded_size(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(3)
    feature = torch.randn(2, 3, 20, 30, generator=generator)
    rois = _rois(50, 2, 20, 30, generator)
    monkeypatch.setattr(roi_align_module, "MAX_BAG_ENTRIES", 7 * 7 * 16 * 6)  # ~6 RoIs of 2 x 2 samples at once
    for sampling_ratio in (0, 2):
        pooled = roi_align_channels_last([feature], rois, None, 7, [0.5], sampling_ratio, True)
        torch.testing.assert_close(pooled, roi_align(feature, rois, 7, 0.5, sampling_ratio, True), rtol=0, atol=1e-5)


def test_levels_laid_out_together_are_read_in_place() -> None:
    levels = [torch.randn(1, 8, 16, 16), torch.randn(1, 8, 8, 8)]
    laid_out = channels_last_levels(levels)
    assert all(torch.equal(a, b) for a, b in zip(laid_out, levels, strict=True))
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in laid_out)
    # One buffer, the second level right after the first: laying them out again copies nothing.
    assert laid_out[1].data_ptr() == laid_out[0].data_ptr() + laid_out[0].numel() * 4
    assert [f.data_ptr() for f in channels_last_levels(laid_out)] == [f.data_ptr() for f in laid_out]


def test_no_rois_pool_to_an_empty_batch() -> None:
    pooled = roi_align_channels_last([torch.randn(1, 3, 8, 8)], torch.zeros(0, 5), None, 7, [1.0], 2, True)
    assert pooled.shape == (0, 3, 7, 7)


class _SingleLevelPooler(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pooler = ROIPooler(4, [4], sampling_ratio=2, pooler_type="ROIAlignV2")

    def forward(self, feature: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.pooler([feature], [boxes])


def test_exporters_record_torchvision_op() -> None:
    module, args = _SingleLevelPooler(), (torch.randn(1, 2, 16, 16), torch.tensor([[0.0, 0.0, 30.0, 40.0]]))
    with torch.no_grad():
        traced = str(torch.jit.trace(module, args, check_trace=False).graph)
        exported = str(torch.export.export(module, args, strict=False).graph)
    for graph in (traced, exported):
        assert "roi_align" in graph and "embedding_bag" not in graph


def test_runs_only_in_eager_float_without_gradient() -> None:
    feature = torch.randn(1, 2, 4, 4)
    assert fast_roi_align_applies(feature)  # needs no gradient (an int8 model's dequantized features)
    # training keeps torchvision's op and its gradient
    assert not fast_roi_align_applies(feature.requires_grad_())
    with torch.no_grad():
        assert fast_roi_align_applies(feature)
        assert not fast_roi_align_applies(feature.double())
        assert not fast_roi_align_applies(torch.quantize_per_tensor(feature, 0.1, 0, torch.quint8))


def test_pooler_gives_the_same_at_inference_as_in_training_mode() -> None:
    generator = torch.Generator().manual_seed(2)
    features = [torch.randn(1, 4, 64 // 2**k, 64 // 2**k, generator=generator) for k in range(4)]
    boxes = [torch.tensor([[0.0, 0.0, 224.0, 224.0], [10.0, 10.0, 50.0, 90.0], [5.0, 0.0, 250.0, 120.0],
                           [0.0, 0.0, 460.0, 460.0]])]
    pooler = ROIPooler(7, [4, 8, 16, 32], sampling_ratio=2, pooler_type="ROIAlignV2")
    with torch.no_grad():
        fast = pooler(features, boxes)
        rois = boxes_to_rois(boxes)
    reference = pooler([f.requires_grad_() for f in features], boxes)  # a gradient wanted: torchvision's op
    assert pooler.assign_levels(rois).unique().numel() == 4
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
