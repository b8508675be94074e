"""Dataset dict (one image's annotations, see fnl.data.densepose_coco) -> model input dict."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fnl.config import CfgNode, ConfigError
from fnl.data.catalog import uv_symmetry_file
from fnl.data.densepose_coco import DatasetError, DatasetFileNotFoundError
from fnl.data.images import ImageReadError, load_image
from fnl.data.transforms import (
    DensePoseTransformData,
    hflip_boxes,
    hflip_densepose,
    resize_image,
    scale_boxes,
    shortest_edge_size,
    xywh_to_xyxy,
)

FLIP_MODES = ("horizontal", "none")


class DatasetMapper:
    """Reads the image, resizes it (shortest side drawn from INPUT.MIN_SIZE_TRAIN when training, INPUT.MIN_SIZE_TEST
    otherwise, long side capped at INPUT.MAX_SIZE_*), flips it horizontally half of the time when training with
    INPUT.RANDOM_FLIP "horizontal", and returns::

        {"image": uint8 (3, H, W) RGB, "height", "width": original size, "image_id", "file_name",
         "instances": {"boxes": float32 (N, 4) XYXY in the resized image, "classes": int64 (N,),
                       "densepose": N entries, None or {"x", "y", "u", "v": float32 (P,), "i": int64 (P,),
                                                        "segm": uint8 (256, 256)}}}   # training only

    Crowd annotations are dropped in training. Boxes are not clipped to the image, so that the box-relative
    DensePose points stay where they were annotated. The input dict is never modified.
    """

    def __init__(self, cfg: CfgNode, is_train: bool, transform_data: DensePoseTransformData | None = None) -> None:
        self.is_train = is_train
        if cfg.INPUT.FORMAT != "RGB":
            raise ConfigError(f"INPUT.FORMAT '{cfg.INPUT.FORMAT}' is not supported; the models take RGB images")
        if cfg.INPUT.RANDOM_FLIP not in FLIP_MODES:
            raise ConfigError(f"INPUT.RANDOM_FLIP must be one of {FLIP_MODES}, got '{cfg.INPUT.RANDOM_FLIP}'")
        if is_train:
            self.min_sizes = tuple(int(s) for s in cfg.INPUT.MIN_SIZE_TRAIN)
            self.max_size = int(cfg.INPUT.MAX_SIZE_TRAIN)
        else:
            self.min_sizes = (int(cfg.INPUT.MIN_SIZE_TEST),)
            self.max_size = int(cfg.INPUT.MAX_SIZE_TEST)
        if not self.min_sizes or min(self.min_sizes) <= 0 or self.max_size <= 0:
            raise ConfigError(f"input sizes must be positive, got min {self.min_sizes}, max {self.max_size}")
        self.flip = is_train and cfg.INPUT.RANDOM_FLIP == "horizontal"
        if self.flip and transform_data is None:
            transform_data = DensePoseTransformData.load(uv_symmetry_file(cfg.DATASETS.ROOT))
        self.transform_data = transform_data
        # Used only when the caller passes no generator; the loaders pass one per draw, so that augmentation does
        # not depend on the number of worker processes.
        self._default_rng = np.random.default_rng(cfg.SEED)

    def __call__(self, dataset_dict: dict, rng: np.random.Generator | None = None) -> dict:
        rng = rng if rng is not None else self._default_rng
        image = read_image(dataset_dict)
        height, width = dataset_dict["height"], dataset_dict["width"]
        short_edge = self.min_sizes[0]
        if len(self.min_sizes) > 1:
            short_edge = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        new_h, new_w = shortest_edge_size(height, width, short_edge, self.max_size)
        image = resize_image(image, new_h, new_w)
        do_flip = self.flip and bool(rng.random() < 0.5)
        if do_flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.uint8)
        result = {
            "image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
            "height": height,
            "width": width,
            "image_id": dataset_dict["image_id"],
            "file_name": dataset_dict["file_name"],
        }
        if self.is_train:
            result["instances"] = self._instances(dataset_dict["annotations"], new_w / width, new_h / height,
                                                  new_w, do_flip)
        return result

    def _instances(self, annotations: list[dict], scale_x: float, scale_y: float, new_width: int,
                   do_flip: bool) -> dict:
        kept = [a for a in annotations if not a.get("iscrowd", 0)]
        boxes = scale_boxes(xywh_to_xyxy([a["bbox"] for a in kept]), scale_x, scale_y)
        densepose = [a.get("densepose") for a in kept]
        if do_flip:
            boxes = hflip_boxes(boxes, new_width)
            densepose = [None if d is None else hflip_densepose(d, self.transform_data) for d in densepose]
        return {
            "boxes": torch.from_numpy(boxes.astype(np.float32)),
            "classes": torch.tensor([a["category_id"] for a in kept], dtype=torch.int64),
            "densepose": [None if d is None else _densepose_tensors(d) for d in densepose],
        }


def _densepose_tensors(densepose: dict) -> dict[str, torch.Tensor]:
    # Copies, so that a consumer writing into a tensor cannot change the dataset dict.
    return {
        "x": torch.tensor(densepose["x"], dtype=torch.float32),
        "y": torch.tensor(densepose["y"], dtype=torch.float32),
        "i": torch.tensor(densepose["i"], dtype=torch.int64),
        "u": torch.tensor(densepose["u"], dtype=torch.float32),
        "v": torch.tensor(densepose["v"], dtype=torch.float32),
        "segm": torch.tensor(np.ascontiguousarray(densepose["segm"]), dtype=torch.uint8),
    }


def read_image(dataset_dict: dict) -> Image.Image:
    """The RGB image of a dataset dict, EXIF orientation applied; its size must match the dict's height/width."""
    path = dataset_dict["file_name"]
    where = f"image {dataset_dict.get('image_id')} ({path})"
    try:
        image = load_image(path)
    except DatasetFileNotFoundError as exc:
        raise DatasetFileNotFoundError(f"{where}: image file not found") from exc
    except ImageReadError as exc:
        raise DatasetError(f"{where}: {exc.reason}") from exc
    expected = (dataset_dict["width"], dataset_dict["height"])
    if image.size != expected:
        raise DatasetError(f"{where}: image is {image.size[0]}x{image.size[1]} but the annotations say "
                           f"{expected[0]}x{expected[1]}")
    return image
