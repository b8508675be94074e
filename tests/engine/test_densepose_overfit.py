"""The DensePose overfit check: configs/overfit_tiny.yaml trained on two synthetic images must fit them, boxes and
DensePose alike. Before the head had a norm and the recipe AdamW, a model fitting boxes at AP 59 reached
DensePose AP 7 on the images it trained on; this test fails if the DensePose path (targets, losses, head,
evaluation) stops learning again."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_tiny_model_fits_densepose_of_the_images_it_trains_on(tmp_path):
    from fnl.config import load_config
    from fnl.data.synthetic import generate_synthetic_dataset
    from fnl.engine.inference import evaluate_model
    from fnl.engine.train import train

    root = tmp_path / "synth"
    # 3 images, one of them in val: the two train images hold 10 persons, each with DensePose points.
    generate_synthetic_dataset(root, num_images=3, seed=3, image_size=256, val_fraction=0.34, progress=False)
    cfg = load_config("overfit_tiny", ["DATASETS.ROOT", str(root), "OUTPUT_DIR", str(tmp_path / "out")])
    torch.manual_seed(0)
    result = train(cfg, evaluate=False)
    with torch.no_grad():
        metrics = evaluate_model(result["model"], cfg, split="train")
    assert metrics["bbox"]["AP"] >= 50, metrics
    assert metrics["densepose"]["AP"] >= 50, metrics
