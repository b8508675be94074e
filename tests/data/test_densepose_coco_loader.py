import json
import os

import numpy as np
import pytest

from fnl.data.catalog import load_split, resolve_split
from fnl.data.densepose_coco import (
    DatasetError,
    DatasetFileNotFoundError,
    decode_dp_masks,
    encode_dp_masks,
    load_densepose_coco,
)
from fnl.data.parts import FINE_TO_COARSE


def test_real_format_file_loads_into_dataset_dicts(real_format):
    dicts = load_densepose_coco(real_format.write(), real_format.image_root)

    assert [d["image_id"] for d in dicts] == [1, 7]
    first, second = dicts
    assert first["file_name"] == os.path.abspath(real_format.image_root / "a.jpg")
    assert (first["height"], first["width"]) == (30, 40)
    assert second["annotations"] == []
    person, box_only, crowd = first["annotations"]
    assert person["id"] == 11 and person["category_id"] == 0 and person["iscrowd"] == 0
    assert person["bbox"] == [4.5, 2.25, 20.0, 25.0] and person["area"] == 210.5
    dp = person["densepose"]
    assert {k: v.dtype for k, v in dp.items()} == {"x": np.float32, "y": np.float32, "i": np.int64,
                                                    "u": np.float32, "v": np.float32, "segm": np.uint8}
    np.testing.assert_array_equal(dp["i"], [2, 3, 24])
    np.testing.assert_allclose(dp["x"], [10.0, 128.5, 250.25])
    np.testing.assert_allclose(dp["v"], [0.25, 0.75, 0.125])
    segm = dp["segm"]
    assert segm.shape == (256, 256)
    expected = np.zeros((256, 256), dtype=np.uint8)
    expected[real_format.rectangle_mask(real_format.rectangles["A"])] = 1
    expected[real_format.rectangle_mask(real_format.rectangles["B"])] = 5
    expected[real_format.rectangle_mask(real_format.rectangles["C"])] = 14
    np.testing.assert_array_equal(segm, expected)
    assert box_only["densepose"] is None and box_only["bbox"] == [30.0, 10.0, 6.0, 12.0]
    assert crowd["iscrowd"] == 1 and crowd["densepose"] is None


def test_mask_codec_round_trip_and_uncompressed_rle():
    rng = np.random.default_rng(0)
    segm = rng.integers(0, 15, size=(256, 256)).astype(np.uint8)
    segm[:, :100] = 0
    segm[segm == 7] = 0  # an absent part
    entries = encode_dp_masks(segm)
    assert entries[6] == [] and isinstance(entries[0]["counts"], str)
    np.testing.assert_array_equal(decode_dp_masks(json.loads(json.dumps(entries))), segm)
    uncompressed = [[] for _ in range(14)]
    uncompressed[2] = {"size": [256, 256], "counts": [256 * 3, 256 * 2, 256 * 251]}  # columns 3-4 (column-major)
    decoded = decode_dp_masks(uncompressed)
    assert set(np.unique(decoded[:, 3:5])) == {3} and decoded[:, :3].max() == 0 and decoded[:, 5:].max() == 0


def test_synthetic_json_loads_through_the_same_loader(synthetic_root):
    json_path, images = resolve_split(synthetic_root, "train")
    raw = json.loads(json_path.read_text())
    assert raw["categories"][0]["id"] == 1
    with_points = [a for a in raw["annotations"] if "dp_x" in a]
    assert with_points, "the synthetic set must have DensePose annotations"
    assert all(isinstance(i, float) for a in with_points for i in a["dp_I"])  # floats, as the released files
    assert all(len(a["dp_masks"]) == 14 for a in with_points)

    dicts = load_densepose_coco(json_path, images)
    assert len(dicts) == len(raw["images"])
    annotations = [a for d in dicts for a in d["annotations"]]
    assert len(annotations) == len(raw["annotations"])
    densepose = [a["densepose"] for a in annotations if a["densepose"] is not None]
    assert len(densepose) == len(with_points)
    agree = total = 0
    for dp in densepose:
        assert dp["i"].min() >= 1 and dp["i"].max() <= 24 and 0 < len(dp["x"]) <= 100
        assert dp["u"].min() >= 0 and dp["u"].max() <= 1
        # A point's part agrees with the coarse part mask under it (up to the grid's sub-pixel offsets).
        cells = dp["segm"][dp["y"].astype(int), dp["x"].astype(int)]
        agree += int(np.sum(cells == np.asarray(FINE_TO_COARSE)[dp["i"]]))
        total += len(cells)
    assert agree / total > 0.9
    assert all(d["height"] == d["width"] == 128 for d in dicts)
    assert load_split(synthetic_root, "val")[0]["image_id"] > dicts[-1]["image_id"]  # ids unique across splits


def _break(coco: dict, key: str, value) -> None:
    annotation = coco["annotations"][0]
    if value is _DELETE:
        del annotation[key]
    else:
        annotation[key] = value


_DELETE = object()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("dp_U", [0.0, 0.5], "differ in length"),
    ("dp_I", [2.0, 25.0, 3.0], r"dp_I\[1\] = 25.0 is not a part index"),
    ("dp_I", [2.0, 2.5, 3.0], r"dp_I\[1\] = 2.5 is not a part index"),
    ("dp_I", [0, 2, 3], r"dp_I\[0\] = 0.0 is not a part index"),
    ("dp_U", [0.0, 1.5, 1.0], r"dp_U\[1\] = 1.5 is outside \[0, 1\]"),
    ("dp_V", [-0.1, 0.5, 1.0], r"dp_V\[0\] = -0.1 is outside \[0, 1\]"),
    ("dp_x", [10.0, 300.0, 2.0], r"dp_x\[1\] = 300.0 is outside \[0, 256\]"),
    ("dp_V", _DELETE, "but not dp_V"),
    ("dp_masks", _DELETE, "no dp_masks"),
    ("dp_masks", [[]] * 13, "list of 14 entries, got 13"),
    ("dp_masks", [{"size": [128, 128], "counts": "abc"}] + [[]] * 13, "RLE size"),
    ("dp_masks", [{"size": [256, 256], "counts": "xyz!!"}] + [[]] * 13, "cannot decode dp_masks"),
    ("dp_masks", [{"size": [256, 256], "counts": "ZP5j2V5"}] + [[]] * 13, "truncated or corrupt"),
    ("dp_masks", [{"size": [256, 256], "counts": [5, 6]}] + [[]] * 13, "sum to 65536"),
    ("bbox", [1, 2, -3, 4], "non-positive width or height"),
    ("bbox", [1, 2, 3], "bbox must be 4 finite numbers"),
    ("bbox", [1, 2, "3", 4], "bbox must be 4 finite numbers"),
    ("bbox", [100, 2, 3, 4], "lies outside the 40x30 image"),
    ("category_id", 2, "category_id 2 is not in the file's 'categories'"),
    ("image_id", 99, "image_id 99 is not in the file's 'images'"),
    ("iscrowd", 2, "iscrowd must be 0 or 1"),
])
def test_malformed_annotation_names_file_image_and_annotation(real_format, key, value, message):
    _break(real_format.coco, key, value)
    json_path = real_format.write()
    with pytest.raises(DatasetError, match=message) as raised:
        load_densepose_coco(json_path, real_format.image_root)
    text = str(raised.value)
    image_id = value if key == "image_id" else 1
    assert str(json_path) in text and f"image {image_id}" in text and "annotation 11" in text


def test_missing_image_file_is_reported_with_its_path(real_format):
    (real_format.image_root / "b.jpg").unlink()
    with pytest.raises(DatasetFileNotFoundError, match=r"image 7: image file not found: .*b\.jpg"):
        load_densepose_coco(real_format.write(), real_format.image_root)
    # Checking files can be switched off (e.g. to read annotations without the images).
    assert len(load_densepose_coco(real_format.json_path, real_format.image_root, check_image_files=False)) == 2


@pytest.mark.parametrize(("change", "message"), [
    (lambda coco: coco.pop("categories"), "missing or non-list 'categories'"),
    (lambda coco: coco["images"].append(dict(coco["images"][0])), "image id 1 appears more than once"),
    (lambda coco: coco["annotations"].append(dict(coco["annotations"][1])), "annotation id 12 appears more"),
    (lambda coco: coco["images"][0].pop("height"), "height and width must be positive integers"),
])
def test_malformed_file_structure(real_format, change, message):
    change(real_format.coco)
    with pytest.raises(DatasetError, match=message):
        load_densepose_coco(real_format.write(), real_format.image_root)


def test_unreadable_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json is not valid JSON"):
        load_densepose_coco(path, tmp_path)
    with pytest.raises(DatasetFileNotFoundError, match="annotation file not found"):
        load_densepose_coco(tmp_path / "absent.json", tmp_path)


def test_empty_point_lists_mean_no_densepose(real_format):
    for key in ("dp_x", "dp_y", "dp_I", "dp_U", "dp_V"):
        real_format.coco["annotations"][0][key] = []
    dicts = load_densepose_coco(real_format.write(), real_format.image_root)
    assert dicts[0]["annotations"][0]["densepose"] is None
