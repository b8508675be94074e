"""Data: the DensePose-COCO loader, the dataset layout, transforms, the model-input mapper, data loaders and the
synthetic dataset generator (``fnl.data.synthetic``).

Names that need torch (mapper, loaders) are imported on first use, so that the generator's worker processes, which
import this package, do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from fnl.data.catalog import load_split, resolve_split, surface_dir, uv_symmetry_file
from fnl.data.densepose_coco import DatasetError, DatasetFileNotFoundError, load_densepose_coco
from fnl.data.transforms import DensePoseTransformData

_LAZY = {
    "DatasetMapper": "fnl.data.mapper",
    "build_train_loader": "fnl.data.build",
    "build_test_loader": "fnl.data.build",
    "get_dataset_dicts": "fnl.data.build",
    "generate_synthetic_dataset": "fnl.data.synthetic",
}

__all__ = [
    "DatasetError",
    "DatasetFileNotFoundError",
    "DensePoseTransformData",
    "load_densepose_coco",
    "load_split",
    "resolve_split",
    "surface_dir",
    "uv_symmetry_file",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fnl.data' has no attribute '{name}'")
