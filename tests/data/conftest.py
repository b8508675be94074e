"""Shared fixtures: a small synthetic dataset generated once per session, and a tiny hand-written DensePose-COCO
file in the format of the released annotation files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fnl.config import get_cfg
from fnl.data.synthetic import generate_synthetic_dataset

SYNTH_IMAGES = 6
SYNTH_SIZE = 128

# Compressed RLE strings as pycocotools writes them (and as the released files hold them) of three 256x256 masks:
# rows 10..99 x cols 20..119, rows 150..249 x cols 130..199, rows 0..39 x cols 100..159.
RLE_RECT_A = ("ZP5j2V5" + "0" * 197 + "foQ1", (slice(10, 100), slice(20, 120)))
RLE_RECT_B = ("fdP1T3l4" + "0" * 137 + "Zk=", (slice(150, 250), slice(130, 200)))
RLE_RECT_C = ("PPi0X1h6" + "0" * 117 + "PPh0", (slice(0, 40), slice(100, 160)))


def _real_format_coco() -> dict:
    """Two images; image 1 has a person with DensePose (float dp_I, RLE dp_masks with absent parts as [] and 0),
    a person with a box only, and a crowd; image 2 has no annotations."""
    dp_masks: list = [[] for _ in range(14)]
    dp_masks[0] = {"size": [256, 256], "counts": RLE_RECT_A[0]}  # coarse 1: torso
    dp_masks[1] = 0  # coarse 2 absent, written as 0
    dp_masks[13] = {"size": [256, 256], "counts": RLE_RECT_C[0]}  # coarse 14: head
    dp_masks[4] = {"size": [256, 256], "counts": RLE_RECT_B[0]}  # coarse 5: right foot
    return {
        "info": {"description": "hand-written DensePose-COCO sample"},
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": 30, "width": 40, "license": 1},
            {"id": 7, "file_name": "b.jpg", "height": 20, "width": 24},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 210.5,
             "bbox": [4.5, 2.25, 20.0, 25.0], "num_keypoints": 0, "keypoints": [0] * 51,
             "dp_x": [10.0, 128.5, 250.25], "dp_y": [5.0, 60.0, 255.5], "dp_I": [2.0, 3.0, 24.0],
             "dp_U": [0.0, 0.5, 1.0], "dp_V": [0.25, 0.75, 0.125], "dp_masks": dp_masks},
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 30.0, "bbox": [30, 10, 6, 12]},
            {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 80.0, "bbox": [0, 0, 10, 10],
             "segmentation": {"size": [30, 40], "counts": [0, 10, 20]}},
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }


class RealFormatSample:
    """The hand-written file's content (``coco``, free to modify) and a directory holding its images."""

    rectangles = {"A": RLE_RECT_A[1], "B": RLE_RECT_B[1], "C": RLE_RECT_C[1]}

    def __init__(self, directory: Path) -> None:
        self.coco = copy.deepcopy(_real_format_coco())
        self.image_root = directory / "images"
        self.image_root.mkdir()
        Image.new("RGB", (40, 30), (90, 120, 150)).save(self.image_root / "a.jpg")
        Image.new("RGB", (24, 20), (10, 20, 30)).save(self.image_root / "b.jpg")
        self.json_path = directory / "densepose_sample.json"

    def write(self) -> Path:
        self.json_path.write_text(json.dumps(self.coco))
        return self.json_path

    @staticmethod
    def rectangle_mask(rectangle: tuple[slice, slice]) -> np.ndarray:
        mask = np.zeros((256, 256), dtype=bool)
        mask[rectangle] = True
        return mask


@pytest.fixture
def real_format(tmp_path: Path) -> RealFormatSample:
    return RealFormatSample(tmp_path)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "synth"
    generate_synthetic_dataset(root, num_images=SYNTH_IMAGES, seed=3, image_size=SYNTH_SIZE, val_fraction=0.34,
                               progress=False)
    return root


@pytest.fixture
def synthetic_cfg(synthetic_root: Path):
    cfg = get_cfg()
    cfg.DATASETS.ROOT = str(synthetic_root)
    cfg.INPUT.MIN_SIZE_TRAIN = [96, 160]
    cfg.INPUT.MAX_SIZE_TRAIN = 200
    cfg.INPUT.MIN_SIZE_TEST = 160
    cfg.INPUT.MAX_SIZE_TEST = 200
    cfg.SOLVER.IMS_PER_BATCH = 2
    return cfg
