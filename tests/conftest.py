"""Shared fixtures: small synthetic model inputs that need no dataset on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Two cores: keep intra-op threads at what the machine has, and make runs repeatable.
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_training_input(height: int = 128, width: int = 160, seed: int = 0) -> dict:
    """One image with two persons, the first carrying DensePose points and a coarse segmentation."""
    g = torch.Generator().manual_seed(seed)
    points = 30
    densepose = {
        "x": torch.rand(points, generator=g) * 256, "y": torch.rand(points, generator=g) * 256,
        "i": torch.randint(1, 25, (points,), generator=g), "u": torch.rand(points, generator=g),
        "v": torch.rand(points, generator=g), "segm": torch.randint(0, 15, (256, 256), generator=g).to(torch.uint8),
    }
    return {
        "image": torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8),
        "image_id": seed, "height": height, "width": width,
        "instances": {"boxes": torch.tensor([[8.0, 10.0, 70.0, 120.0], [80.0, 20.0, 150.0, 110.0]]),
                      "classes": torch.tensor([0, 0]), "densepose": [densepose, None]},
    }


@pytest.fixture
def training_batch() -> list[dict]:
    return [make_training_input(seed=0), make_training_input(seed=1)]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """12 synthetic images at 128 px (10 train / 2 val), generated once per session."""
    from fnl.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny") / "synth"
    generate_synthetic_dataset(root, num_images=12, seed=5, image_size=128, val_fraction=0.17, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_cfg(tiny_dataset):
    """configs/test_tiny.yaml on the tiny dataset: model B at 128 px, a few iterations."""
    from fnl.config import load_config

    return load_config("test_tiny", ["DATASETS.ROOT", str(tiny_dataset), "QUANTIZATION.MAX_ITER", "3",
                                     "QUANTIZATION.FREEZE_BN_ITER", "1", "QUANTIZATION.FREEZE_OBSERVER_ITER", "2",
                                     "QUANTIZATION.CALIBRATION_IMAGES", "4", "QUANTIZATION.CHECKPOINT_PERIOD", "2"])


GATE_MODEL = Path(__file__).parent / "assets" / "gate_float.pth"


@pytest.fixture(scope="session")
def gate_model(tmp_path_factory):
    """The AP gate's float model (tests/assets/gate_float.pth) with its config reading the 10-image synthetic set it
    was fitted to (configs/gate_mobile_parsing_rcnn_b_tiny.yaml; generation is deterministic): its 8 train images
    are where its outputs are worth keeping (box AP ~80, DensePose AP ~30)."""
    from fnl.data.synthetic import generate_synthetic_dataset
    from fnl.engine.checkpoint import config_from_checkpoint, load_state
    from fnl.modeling import build_model

    root = tmp_path_factory.mktemp("gate") / "synth"
    generate_synthetic_dataset(root, num_images=10, seed=3, image_size=256, val_fraction=0.2, progress=False)
    cfg = config_from_checkpoint(GATE_MODEL)
    cfg.merge_from_list(["DATASETS.ROOT", str(root), "TEST.MAX_IMAGES", "0"])
    cfg.freeze()
    model = build_model(cfg)
    load_state(model, GATE_MODEL, strict=True)
    return cfg, model.eval()
