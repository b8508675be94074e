"""Shared fixtures: small synthetic model inputs that need no dataset on disk."""

from __future__ import annotations

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
