"""Reader (and mask writer) for DensePose-COCO annotation files.

A DensePose-COCO file is a COCO instances file whose person annotations may carry, besides ``bbox``, ``area``,
``iscrowd`` and ``category_id``, the DensePose fields:

- ``dp_x``, ``dp_y``: point coordinates relative to the box, on a 0..256 grid spanning it;
- ``dp_I``: the chart 1..24 of each point (stored as floats in the released files);
- ``dp_U``, ``dp_V``: chart coordinates in [0, 1];
- ``dp_masks``: 14 entries, one per coarse part; each is a COCO RLE (compressed ``counts`` string) of a 256x256 mask
  over the box, or a falsy value (``[]``, ``0``) when the part is not visible.

:func:`load_densepose_coco` turns such a file into detectron2-style "dataset dicts" (see its docstring), checking
every field so that a broken file fails here, with the file, image id and annotation id named, and not deep inside
training.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from fnl.data.parts import MASK_SIZE, NUM_COARSE_PARTS, NUM_FINE_PARTS
from fnl.utils.errors import UserError

DP_POINT_KEYS = ("dp_x", "dp_y", "dp_I", "dp_U", "dp_V")
DP_MASKS_KEY = "dp_masks"


class DatasetError(UserError, ValueError):
    """A dataset file is missing or malformed; the message names the file, image id and annotation id at fault."""


class DatasetFileNotFoundError(DatasetError, FileNotFoundError):
    """A file the dataset layout requires (annotation json, image, surface file) does not exist."""


def load_densepose_coco(json_path: str | Path, image_root: str | Path, check_image_files: bool = True) -> list[dict]:
    """Read a DensePose-COCO json into one dict per image, in the file's image order::

        {"file_name": absolute path, "image_id": int, "height": int, "width": int,
         "annotations": [{"id": int, "bbox": [x, y, w, h] (absolute, floats), "category_id": contiguous id (0 = person),
                          "iscrowd": int, "area": float,
                          "densepose": None | {"x", "y": float32 (P,) box-relative 0..256, "i": int64 (P,) 1..24,
                                               "u", "v": float32 (P,), "segm": uint8 (256, 256) coarse labels 0..14}}]}

    ``densepose`` is None for persons without DensePose points (they still train the box branch). Category ids are
    made contiguous in the order of their json ids (DensePose-COCO's only category, person = 1, becomes 0).
    Raises :class:`DatasetError` on any malformed entry or, with ``check_image_files``, a missing image file.
    """
    json_path = Path(json_path)
    image_root = Path(image_root)
    coco = read_coco_json(json_path)
    category_map = _contiguous_category_ids(coco, json_path)

    dataset_dicts: list[dict] = []
    by_image_id: dict[int, dict] = {}
    for image in coco["images"]:
        record = _parse_image(image, json_path, image_root, check_image_files)
        if record["image_id"] in by_image_id:
            raise DatasetError(f"{json_path}: image id {record['image_id']} appears more than once in 'images'")
        by_image_id[record["image_id"]] = record
        dataset_dicts.append(record)

    seen_annotation_ids: set[int] = set()
    for annotation in coco["annotations"]:
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        annotation_id = annotation.get("id") if isinstance(annotation, dict) else None
        where = f"{json_path}: image {image_id}, annotation {annotation_id}"
        if not isinstance(annotation, dict) or not isinstance(annotation_id, int):
            raise DatasetError(f"{where}: an annotation must be a mapping with an integer 'id'")
        if annotation_id in seen_annotation_ids:
            raise DatasetError(f"{where}: annotation id {annotation_id} appears more than once")
        seen_annotation_ids.add(annotation_id)
        if image_id not in by_image_id:
            raise DatasetError(f"{where}: image_id {image_id!r} is not in the file's 'images'")
        image = by_image_id[image_id]
        image["annotations"].append(
            _parse_annotation(annotation, category_map, image["height"], image["width"], where)
        )
    return dataset_dicts


def read_coco_json(json_path: str | Path) -> dict:
    """A COCO json's top level, checked: a mapping with ``images``, ``annotations`` and ``categories`` lists. Used by
    the loader and by the evaluator; errors name the file."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DatasetFileNotFoundError(f"annotation file not found: {json_path}")
    try:
        with open(json_path, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{json_path} is not valid JSON: {exc}") from exc
    if not isinstance(coco, dict):
        raise DatasetError(f"{json_path}: expected a COCO mapping at the top level, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DatasetError(f"{json_path}: missing or non-list '{key}' (a COCO file has images, "
                               "annotations and categories)")
    return coco


def _contiguous_category_ids(coco: dict, json_path: Path) -> dict[int, int]:
    ids = []
    for category in coco["categories"]:
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            raise DatasetError(f"{json_path}: category {category!r} has no integer 'id'")
        ids.append(category["id"])
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{json_path}: category ids {ids} are not unique")
    return {json_id: contiguous for contiguous, json_id in enumerate(sorted(ids))}


def _parse_image(image: Any, json_path: Path, image_root: Path, check_image_files: bool) -> dict:
    image_id = image.get("id") if isinstance(image, dict) else None
    where = f"{json_path}: image {image_id}"
    if not isinstance(image_id, int):
        raise DatasetError(f"{where}: an image entry must be a mapping with an integer 'id'")
    file_name = image.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise DatasetError(f"{where}: missing 'file_name'")
    height, width = image.get("height"), image.get("width")
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise DatasetError(f"{where}: height and width must be positive integers, got {height!r} x {width!r}")
    path = os.path.abspath(image_root / file_name)
    if check_image_files and not os.path.isfile(path):
        raise DatasetFileNotFoundError(f"{where}: image file not found: {path}")
    return {"file_name": path, "image_id": image_id, "height": height, "width": width, "annotations": []}


def _parse_annotation(annotation: dict, category_map: dict[int, int], image_height: int, image_width: int,
                      where: str) -> dict:
    category_id = annotation.get("category_id")
    if category_id not in category_map:
        raise DatasetError(f"{where}: category_id {category_id!r} is not in the file's 'categories'")
    bbox = _parse_bbox(annotation.get("bbox"), image_height, image_width, where)
    iscrowd = annotation.get("iscrowd", 0)
    if iscrowd not in (0, 1):
        raise DatasetError(f"{where}: iscrowd must be 0 or 1, got {iscrowd!r}")
    area = annotation.get("area", bbox[2] * bbox[3])
    if not _is_finite_number(area) or area < 0:
        raise DatasetError(f"{where}: area must be a non-negative number, got {area!r}")
    return {
        "id": annotation["id"],
        "bbox": bbox,
        "category_id": category_map[category_id],
        "iscrowd": int(iscrowd),
        "area": float(area),
        "densepose": _parse_densepose(annotation, where),
    }


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_bbox(bbox: Any, image_height: int, image_width: int, where: str) -> list[float]:
    if not (isinstance(bbox, list | tuple) and len(bbox) == 4 and all(_is_finite_number(c) for c in bbox)):
        raise DatasetError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(c) for c in bbox)
    if w <= 0 or h <= 0:
        raise DatasetError(f"{where}: bbox {bbox!r} has a non-positive width or height")
    if x >= image_width or y >= image_height or x + w <= 0 or y + h <= 0:
        raise DatasetError(f"{where}: bbox {bbox!r} lies outside the {image_width}x{image_height} image")
    return [x, y, w, h]


def _parse_densepose(annotation: dict, where: str) -> dict | None:
    present = [key for key in DP_POINT_KEYS if key in annotation]
    if not present:
        return None
    if len(present) != len(DP_POINT_KEYS):
        missing = sorted(set(DP_POINT_KEYS) - set(present))
        raise DatasetError(f"{where}: has {', '.join(present)} but not {', '.join(missing)}")
    values = {}
    for key in DP_POINT_KEYS:
        try:
            array = np.asarray(annotation[key], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: {key} must be a list of numbers ({exc})") from exc
        if array.ndim != 1:
            raise DatasetError(f"{where}: {key} must be a flat list of numbers, got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise DatasetError(f"{where}: {key} holds a non-finite value")
        values[key] = array
    lengths = {key: len(array) for key, array in values.items()}
    if len(set(lengths.values())) != 1:
        raise DatasetError(f"{where}: the DensePose point lists differ in length: {lengths}")
    if lengths["dp_x"] == 0:
        return None  # no points: the person only trains the box branch, as one without dp fields
    _check_range(values["dp_x"], 0.0, MASK_SIZE, "dp_x", where)
    _check_range(values["dp_y"], 0.0, MASK_SIZE, "dp_y", where)
    _check_range(values["dp_U"], 0.0, 1.0, "dp_U", where)
    _check_range(values["dp_V"], 0.0, 1.0, "dp_V", where)
    part = values["dp_I"]
    bad = np.flatnonzero((part != np.round(part)) | (part < 1) | (part > NUM_FINE_PARTS))
    if len(bad):
        raise DatasetError(f"{where}: dp_I[{bad[0]}] = {part[bad[0]]} is not a part index 1..{NUM_FINE_PARTS}")
    if DP_MASKS_KEY not in annotation:
        raise DatasetError(f"{where}: has DensePose points but no {DP_MASKS_KEY}")
    return {
        "x": values["dp_x"].astype(np.float32),
        "y": values["dp_y"].astype(np.float32),
        "i": part.astype(np.int64),
        "u": values["dp_U"].astype(np.float32),
        "v": values["dp_V"].astype(np.float32),
        "segm": decode_dp_masks(annotation[DP_MASKS_KEY], where),
    }


def _check_range(values: np.ndarray, low: float, high: float, key: str, where: str) -> None:
    bad = np.flatnonzero((values < low) | (values > high))
    if len(bad):
        raise DatasetError(f"{where}: {key}[{bad[0]}] = {values[bad[0]]} is outside [{low:g}, {high:g}]")


def decode_dp_masks(dp_masks: Any, where: str = "dp_masks") -> np.ndarray:
    """The 14 coarse part masks -> one (256, 256) uint8 map of coarse labels 0..14 (later parts win overlaps,
    as DensePose's own decoder does)."""
    if not isinstance(dp_masks, list | tuple) or len(dp_masks) != NUM_COARSE_PARTS:
        length = len(dp_masks) if isinstance(dp_masks, list | tuple) else type(dp_masks).__name__
        raise DatasetError(f"{where}: {DP_MASKS_KEY} must be a list of {NUM_COARSE_PARTS} entries, got {length}")
    present = [index for index, rle in enumerate(dp_masks) if rle]  # falsy entries: the part is not visible
    rles = [_checked_rle(dp_masks[index], f"{where}: {DP_MASKS_KEY}[{index}]") for index in present]
    if not rles:
        return np.zeros((MASK_SIZE, MASK_SIZE), dtype=np.uint8)
    try:
        with warnings.catch_warnings():
            # pycocotools' decoder trips numpy 2's __array__(copy=...) deprecation; nothing we can act on.
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            masks = mask_utils.decode(rles)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: cannot decode {DP_MASKS_KEY} ({exc})") from exc
    if masks.max() > 1:  # pycocotools leaves memory unset when a compressed string ends early
        raise DatasetError(f"{where}: cannot decode {DP_MASKS_KEY} (a truncated or corrupt RLE string)")
    # Labels grow with the entry index, so "the later part wins an overlap" is a maximum over the masks.
    labels = np.asarray(present, dtype=np.uint8) + 1
    return np.ascontiguousarray((masks * labels).max(axis=2))


def _checked_rle(rle: Any, where: str) -> dict:
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise DatasetError(f"{where}: expected a COCO RLE mapping with 'size' and 'counts', got {type(rle).__name__}")
    if list(rle["size"]) != [MASK_SIZE, MASK_SIZE]:
        raise DatasetError(f"{where}: RLE size {rle['size']!r} is not [{MASK_SIZE}, {MASK_SIZE}]")
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        if sum(counts) != MASK_SIZE * MASK_SIZE or min(counts, default=0) < 0:
            raise DatasetError(f"{where}: uncompressed RLE counts must be non-negative and sum to "
                               f"{MASK_SIZE * MASK_SIZE}, got sum {sum(counts)}")
        return mask_utils.frPyObjects(rle, MASK_SIZE, MASK_SIZE)
    if not isinstance(counts, str | bytes):
        raise DatasetError(f"{where}: RLE counts must be a string or a list, got {type(counts).__name__}")
    return {"size": [MASK_SIZE, MASK_SIZE], "counts": counts}


def encode_dp_masks(segm: np.ndarray) -> list:
    """Inverse of :func:`decode_dp_masks`: a (256, 256) coarse label map -> 14 entries, each a COCO RLE with the
    compressed ``counts`` as a string (as the released files store it) or ``[]`` for a part that is absent."""
    segm = np.asarray(segm)
    if segm.shape != (MASK_SIZE, MASK_SIZE):
        raise ValueError(f"coarse part map must be {MASK_SIZE}x{MASK_SIZE}, got shape {segm.shape}")
    entries: list = []
    for label in range(1, NUM_COARSE_PARTS + 1):
        mask = segm == label
        if not mask.any():
            entries.append([])
            continue
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        entries.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return entries
