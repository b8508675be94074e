"""Model summary: parameters by part, fp32 size and FLOPs at an input size (docs/DESIGN.md's fixed JSON keys)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fnl.modeling import GeneralizedRCNN


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def state_dict_megabytes(module: nn.Module) -> float:
    """Bytes of every tensor a checkpoint of the module stores, in MB (10^6), as a model file's size."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 1e6


def _gflops(fn, *args) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def summarize(model: GeneralizedRCNN, input_size: int = 512) -> dict[str, Any]:
    """``gflops`` covers what every image pays: backbone, neck and RPN head on an input_size x input_size image.
    The heads run once per RoI; their cost is in ``gflops_per_roi``. FLOPs count 2 per multiply-add."""
    model = model.eval()
    roi_heads = model.roi_heads
    params = {
        "backbone": count_parameters(model.backbone.bottom_up),
        "neck": count_parameters(model.backbone) - count_parameters(model.backbone.bottom_up),
        "rpn": count_parameters(model.proposal_generator),
        "roi_heads": count_parameters(roi_heads),
    }
    image = torch.zeros(1, 3, input_size, input_size, device=model.device)

    def image_level() -> None:
        features = model.backbone(image)
        model.proposal_generator.rpn_head([features[f] for f in model.proposal_generator.in_features])

    box_input = torch.zeros(1, model.backbone.out_channels, roi_heads.box_pooler.output_size,
                            roi_heads.box_pooler.output_size, device=model.device)
    per_roi = {"box_head": _gflops(lambda x: roi_heads.box_predictor(roi_heads.box_head(x)), box_input)}
    if roi_heads.densepose_on:
        size = roi_heads.densepose_pooler.output_size
        dp_input = torch.zeros(1, model.backbone.out_channels, size, size, device=model.device)
        per_roi["densepose_head"] = _gflops(
            lambda x: roi_heads.densepose_predictor(roi_heads.densepose_head(x)), dp_input)
    return {
        "params_total": count_parameters(model),
        "params": params,
        "size_mb_fp32": round(state_dict_megabytes(model), 3),
        "gflops": round(_gflops(image_level), 3),
        "gflops_per_roi": {k: round(v, 4) for k, v in per_roi.items()},
        "input_size": input_size,
    }


def format_summary(name: str, summary: dict[str, Any]) -> str:
    p = summary["params"]
    rows = [
        "| part | parameters |", "|---|---:|",
        *(f"| {k} | {v:,} |" for k, v in p.items()),
        f"| **total** | **{summary['params_total']:,}** |",
    ]
    per_roi = ", ".join(f"{k} {v} GFLOPs" for k, v in summary["gflops_per_roi"].items())
    return (f"{name}: {summary['params_total'] / 1e6:.2f}M parameters, {summary['size_mb_fp32']:.1f} MB fp32, "
            f"{summary['gflops']} GFLOPs at {summary['input_size']}x{summary['input_size']} (+ per RoI: {per_roi})\n"
            + "\n".join(rows))
