"""Run a predictor over a test split and score it with the DensePose-COCO evaluator.

The evaluator takes predictions, not a model: anything that maps a mapped input dict to the model's output dict
(the float model, an int8 model, an ONNX Runtime session wrapper) goes through ``predict_dataset``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fnl.data import build_test_loader
from fnl.data.catalog import resolve_split, surface_dir
from fnl.evaluation import DensePoseCOCOEvaluator
from fnl.modeling.densepose import densepose_to_iuv

logger = logging.getLogger("fnl")

Predictor = Callable[[list[dict]], list[dict]]


def to_evaluator_format(image_id: int, output: dict[str, Any]) -> dict[str, Any]:
    """Model output (tensors) -> the evaluator's per-image prediction (numpy, I/U/V maps at box resolution)."""
    boxes = torch.as_tensor(output["boxes"]).float().cpu()
    densepose = output.get("densepose")
    maps = densepose_to_iuv(boxes, {k: torch.as_tensor(v) for k, v in densepose.items()}) if densepose else []
    return {
        "image_id": int(image_id),
        "boxes": boxes.numpy(),
        "scores": torch.as_tensor(output["scores"]).float().cpu().numpy(),
        "classes": torch.as_tensor(output["classes"]).long().cpu().numpy(),
        "densepose": [m.numpy().astype(np.float32) for m in maps],
    }


def predict_dataset(predictor: Predictor, loader: Iterable[list[dict]], description: str = "inference",
                    max_images: int = 0) -> tuple[list[dict], list[float]]:
    """Predictions in the evaluator's format and the per-image latency in seconds (model call only)."""
    predictions: list[dict] = []
    latencies: list[float] = []
    total = None
    if hasattr(loader, "__len__"):
        total = len(loader) if not max_images else min(len(loader), max_images)
    with torch.no_grad(), tqdm(total=total, desc=description, unit="img", leave=False) as progress:
        for batch in loader:
            start = time.perf_counter()
            outputs = predictor(batch)
            latencies.append((time.perf_counter() - start) / max(len(batch), 1))
            predictions.extend(to_evaluator_format(x["image_id"], out) for x, out in zip(batch, outputs, strict=True))
            progress.update(len(batch))
            if max_images and len(predictions) >= max_images:
                break
    return predictions, latencies


def evaluate_predictor(predictor: Predictor, cfg, split: str | None = None, dataset_dicts: list[dict] | None = None,
                       description: str | None = None, warmup: bool = False) -> tuple[dict[str, Any], list[float]]:
    """Box AP and DensePose GPS AP of any predictor (float / int8 model, ONNX Runtime or Caffe2 wrapper) on a test
    split of ``cfg.DATASETS`` (or on ``dataset_dicts``, a subset of it), and its per-image latencies in seconds.

    ``warmup`` makes one untimed call first: lazy initialisation (allocator, kernel selection, ORT arena) is not
    per-image cost.
    """
    split = split or cfg.DATASETS.TEST[0]
    if isinstance(predictor, torch.nn.Module):
        predictor.eval()
    loader = build_test_loader(cfg, split, dataset_dicts)
    if warmup:
        with torch.no_grad():
            predictor(next(iter(loader)))
    predictions, latencies = predict_dataset(predictor, loader, description or f"evaluate {split}",
                                             cfg.TEST.MAX_IMAGES)
    json_path, _ = resolve_split(cfg.DATASETS.ROOT, split)
    image_ids = [d["image_id"] for d in dataset_dicts] if dataset_dicts is not None else None
    results = DensePoseCOCOEvaluator(json_path, surface_dir(cfg.DATASETS.ROOT)).evaluate(predictions,
                                                                                        image_ids=image_ids)
    return results, latencies


def evaluate_model(model: Predictor, cfg, split: str | None = None) -> dict[str, Any]:
    """Box AP and DensePose GPS AP of ``model`` on a test split of ``cfg.DATASETS``, logged."""
    results, latencies = evaluate_predictor(model, cfg, split)
    logger.info("evaluation on %s (%d images, median %.1f ms/image): %s", split or cfg.DATASETS.TEST[0],
                len(latencies), 1000 * float(np.median(latencies)) if latencies else float("nan"), results)
    return results
