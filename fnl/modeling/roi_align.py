"""RoIAlign on channels-last features as one weighted gather (``embedding_bag``): what torchvision's ``roi_align``
computes, about three times as fast on a CPU at inference.

torchvision's CPU kernel reads the four neighbours of every sample one channel at a time, from NCHW planes. Here each
output bin is a bag of (pixel, weight) pairs — every sample's four neighbours, weighted by their bilinear weight over
the sample count — and ``embedding_bag`` sums the bags' pixel rows of C channels, vectorized over the channels, from
an (N*H*W, C) table: the feature map laid out channels-last. Model B at 512 px, 1 thread: the box pooler (P2-P5,
~380 RoIs, 7 x 7) and the DensePose pooler (P2, 10 RoIs, 32 x 32) take ~6 ms per image, against ~17 ms in
torchvision's op (docs/PROFILE.md). The sums run in another order than torchvision's, so results agree to float
rounding (~1e-6).

It runs only where no gradient is needed (training keeps torchvision's op and its backward), and not while
exporting: exporters (ONNX's RoiAlign, Caffe2's RoIAlign, ``torch.export``) need torchvision's op in the graph;
``fast_roi_align_applies`` says when."""

from __future__ import annotations

import torch
from torch.nn import functional as F

MAX_BAG_ENTRIES = 1 << 24  # (index, weight) pairs gathered at once: ~130 MB of them


def fast_roi_align_applies(feature: torch.Tensor) -> bool:
    """Whether ``roi_align_channels_last`` may stand in for torchvision's op: a float32 CPU tensor that needs no
    gradient, in eager mode (no tracing, scripting, compiling or export)."""
    capturing = (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
                 or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())
    needs_gradient = torch.is_grad_enabled() and feature.requires_grad
    return (not capturing and not needs_gradient and feature.device.type == "cpu"
            and feature.dtype == torch.float32 and not feature.is_quantized)


def _shared_rows(features: list[torch.Tensor]) -> torch.Tensor | None:
    """The levels' pixel rows as one (sum N*H*W, C) view when they are channels-last and lie one after another in
    one buffer (as ``channels_last_levels`` lays them out), else None."""
    channels = features[0].shape[1]
    if not all(f.is_contiguous(memory_format=torch.channels_last) for f in features):
        return None
    start, storage = features[0].data_ptr(), features[0].untyped_storage().data_ptr()
    end = start
    for feature in features:
        if feature.data_ptr() != end or feature.untyped_storage().data_ptr() != storage:
            return None
        end += feature.numel() * feature.element_size()
    rows = (end - start) // (channels * features[0].element_size())
    return features[0].as_strided((rows, channels), (channels, 1))


def channels_last_levels(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The (N, C, H, W) levels laid out channels-last, one after another in one buffer: what
    ``roi_align_channels_last`` reads as its pixel table without a copy, whichever of the levels it pools (the box
    and DensePose poolers share P2). Each image's (C, H*W) plane is transposed as one 2-D matrix, ATen's blocked
    transpose: ~4x faster than ``contiguous(memory_format=torch.channels_last)`` (P2 of model B at 512 px: 0.5
    against 2 ms)."""
    if _shared_rows(features) is not None:
        return features
    channels = features[0].shape[1]
    pixels = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    buffer = features[0].new_empty((sum(pixels), channels))
    laid_out, start = [], 0
    for feature, count in zip(features, pixels, strict=True):
        batch, _, height, width = feature.shape
        rows = buffer[start:start + count]
        planes = feature.reshape(batch, channels, height * width)
        for image in range(batch):
            rows[image * height * width:(image + 1) * height * width].copy_(planes[image].t())
        laid_out.append(rows.view(batch, height, width, channels).permute(0, 3, 1, 2))
        start += count
    return laid_out


def _axis_samples(start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, size: torch.Tensor, bins: int,
                  max_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis, for each RoI (R,) of a map ``size`` (R,) pixels long, each output bin and sample: the two
    neighbouring pixel indices and their bilinear weights, (R, bins, max_grid, 2) each. Samples past a RoI's own
    ``grid``, or outside [-1, size], weigh 0; torchvision's rule: a sample at <= 0 reads pixel 0, one at or past the
    last pixel reads that pixel alone."""
    steps = torch.arange(bins, dtype=start.dtype).view(1, bins, 1)
    slots = torch.arange(max_grid, dtype=start.dtype).view(1, 1, max_grid)
    start, bin_size, size = start.view(-1, 1, 1), bin_size.view(-1, 1, 1), size.view(-1, 1, 1)
    coord = start + steps * bin_size + (slots + 0.5) * bin_size / grid.clamp(min=1).view(-1, 1, 1)
    inside = (coord >= -1.0) & (coord <= size) & (slots < grid.view(-1, 1, 1))
    last = size - 1
    coord = coord.clamp(min=0)
    low = torch.minimum(coord.floor(), last)
    coord = torch.where(low >= last, low, coord)
    high = torch.minimum(low + 1, last)
    frac = coord - low
    weights = torch.stack([1 - frac, frac], dim=-1) * inside.unsqueeze(-1)
    return torch.stack([low, high], dim=-1).to(torch.int32), weights


def _pixel_table(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The levels' pixels as rows of one (sum N*H*W, C) table, channels-last, with each level's first row, height
    and width."""
    table = _shared_rows(channels_last_levels(features))  # levels already laid out come back as they are
    sizes = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    first = torch.tensor([sum(sizes[:k]) for k in range(len(sizes))], dtype=torch.int32)
    heights = torch.tensor([f.shape[2] for f in features], dtype=torch.int32)
    widths = torch.tensor([f.shape[3] for f in features], dtype=torch.int32)
    return table, first, heights, widths


def roi_align_channels_last(features: list[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor | None,
                            output_size: int, spatial_scales: list[float], sampling_ratio: int,
                            aligned: bool) -> torch.Tensor:
    """torchvision's ``roi_align(features[level], rois, output_size, spatial_scales[level], sampling_ratio,
    aligned)`` of each of the (K, 5) ``rois`` (batch index, x1, y1, x2, y2) at its ``levels`` entry (K,) (level 0
    for all when None), in one gather; returns (K, C, output_size, output_size) in RoI order, contiguous.
    ``features`` laid out by ``channels_last_levels`` are read without a copy."""
    channels = features[0].shape[1]
    count = rois.shape[0]
    if count == 0:
        return features[0].new_zeros((0, channels, output_size, output_size))
    table, first, heights, widths = _pixel_table(features)
    levels = torch.zeros(count, dtype=torch.int64) if levels is None else levels
    scale = torch.tensor(spatial_scales, dtype=rois.dtype)[levels]
    height, width = heights[levels], widths[levels]
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    roi_width, roi_height = rois[:, 3] * scale - offset - x1, rois[:, 4] * scale - offset - y1
    if not aligned:  # the legacy op never pools a RoI under 1 x 1 pixel
        roi_width, roi_height = roi_width.clamp(min=1), roi_height.clamp(min=1)
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((count,), sampling_ratio, dtype=torch.int64)
    else:  # adaptive: ceil(RoI size / bins) samples per bin, per RoI
        grid_h = torch.ceil(roi_height / output_size).clamp(min=0).to(torch.int64)
        grid_w = torch.ceil(roi_width / output_size).clamp(min=0).to(torch.int64)
    max_h, max_w = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
    rows, row_weights = _axis_samples(y1, roi_height / output_size, grid_h, height.to(rois.dtype), output_size,
                                      max_h)
    cols, col_weights = _axis_samples(x1, roi_width / output_size, grid_w, width.to(rois.dtype), output_size,
                                      max_w)
    # The average over a bin's samples folds into the row weights (torchvision divides by max(samples, 1)).
    row_weights = row_weights / (grid_h * grid_w).clamp(min=1).to(row_weights.dtype).view(-1, 1, 1, 1)
    image_start = first[levels] + rois[:, 0].to(torch.int32) * height * width
    row_starts = image_start.view(-1, 1, 1, 1) + rows * width.view(-1, 1, 1, 1)
    # RoIs in chunks of at most MAX_BAG_ENTRIES (index, weight) pairs: one chunk for model B's poolers, a bounded
    # memory for many RoIs of large adaptive grids.
    step = max(1, MAX_BAG_ENTRIES // (output_size * output_size * max_h * 2 * max_w * 2))
    parts = []
    for chunk in (slice(start, start + step) for start in range(0, count, step)):
        index, offsets, weight = _bags(row_starts[chunk], row_weights[chunk], cols[chunk], col_weights[chunk])
        parts.append(F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight))
    pooled = parts[0] if len(parts) == 1 else torch.cat(parts)
    return pooled.view(count, output_size, output_size, channels).permute(0, 3, 1, 2).contiguous()


def _bags(row_starts: torch.Tensor, row_weights: torch.Tensor, cols: torch.Tensor, col_weights: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``embedding_bag``'s flat indices, bag offsets and per-entry weights: one bag per (RoI, bin y, bin x) in output
    order, entries (sample y, neighbour y, sample x, neighbour x), from the per-axis row starts / columns and weights
    (R, bins, samples, 2). Each axis's term is repeated over the bag's entries before the outer sum and product, so
    both run over whole bags: 4-10x faster than broadcasting over 2-wide inner dimensions."""
    count, bins, max_h, _ = row_starts.shape
    max_w = cols.shape[2]
    pairs, bag = (count, bins, max_h, 2, max_w, 2), max_h * 2 * max_w * 2

    def by_row(t: torch.Tensor) -> torch.Tensor:
        return t.view(count, bins, max_h, 2, 1, 1).expand(pairs).reshape(count, bins, 1, bag)

    def by_col(t: torch.Tensor) -> torch.Tensor:
        return t.view(count, bins, 1, 1, max_w, 2).expand(pairs).reshape(count, 1, bins, bag)

    index = by_row(row_starts) + by_col(cols)
    weight = by_row(row_weights) * by_col(col_weights)
    offsets = torch.arange(0, index.numel(), bag, dtype=torch.int32)
    return index.reshape(-1), offsets, weight.reshape(-1)
