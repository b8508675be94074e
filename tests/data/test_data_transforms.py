from dataclasses import replace

import numpy as np
import pytest
import scipy.io

from fnl.data.catalog import load_split, uv_symmetry_file
from fnl.data.densepose_coco import DatasetError, decode_dp_masks
from fnl.data.parts import MASK_LABEL_SYMMETRIES, POINT_LABEL_SYMMETRIES
from fnl.data.synthetic.annotate import annotate_person
from fnl.data.synthetic.body import build_template, uv_symmetry_tables
from fnl.data.synthetic.scene import mirror_person, render_people, sample_person
from fnl.data.transforms import (
    DensePoseTransformData,
    hflip_boxes,
    hflip_densepose,
    save_uv_symmetry,
    shortest_edge_size,
)


@pytest.fixture(scope="module")
def synthetic_transform_data() -> DensePoseTransformData:
    return DensePoseTransformData(*uv_symmetry_tables())


@pytest.mark.parametrize(("size", "short", "max_size", "expected"), [
    ((480, 640), 800, 1333, (800, 1067)),
    ((640, 480), 800, 1333, (1067, 800)),
    ((100, 1000), 800, 1333, (133, 1333)),
    ((128, 128), 96, 200, (96, 96)),
])
def test_shortest_edge_size(size, short, max_size, expected):
    assert shortest_edge_size(*size, short, max_size) == expected


def test_uv_symmetry_file_has_the_real_layout(tmp_path, synthetic_root):
    u, v = uv_symmetry_tables()
    path = tmp_path / "UV_symmetry_transforms.mat"
    save_uv_symmetry(path, u, v)
    raw = scipy.io.loadmat(str(path))
    for key in ("U_transforms", "V_transforms"):
        assert raw[key].shape == (1, 24) and raw[key].dtype == object  # a 1x24 MATLAB cell
        assert raw[key][0, 3].shape == (256, 256)
    loaded = DensePoseTransformData.load(path)
    np.testing.assert_allclose(loaded.u_transforms, u, atol=1e-7)
    np.testing.assert_allclose(DensePoseTransformData.load(uv_symmetry_file(synthetic_root)).v_transforms, v,
                               atol=1e-7)
    scipy.io.savemat(str(tmp_path / "bad.mat"), {"U_transforms": np.zeros((3, 3))})
    with pytest.raises(DatasetError, match=r"bad\.mat: 'U_transforms' must be a 1x24 cell"):
        DensePoseTransformData.load(tmp_path / "bad.mat")


def test_flip_uses_the_tables_and_symmetries():
    u_table = np.zeros((24, 256, 256), dtype=np.float32)
    v_table = np.zeros((24, 256, 256), dtype=np.float32)
    u_table[2, 64, 51] = 0.9  # chart 3 at U = 51 / 255 = 0.2, V = 64 / 255
    v_table[2, 64, 51] = 0.4
    data = DensePoseTransformData(u_table, v_table)
    segm = np.zeros((256, 256), dtype=np.uint8)
    segm[:, :10] = 2  # right hand, on the left of the box
    segm[:, 200:] = 14
    annotation = {"x": np.array([10.0], np.float32), "y": np.array([7.0], np.float32), "i": np.array([3]),
                  "u": np.array([0.2], np.float32), "v": np.array([64 / 255], np.float32), "segm": segm}
    flipped = hflip_densepose(annotation, data)
    assert flipped["i"].tolist() == [4] and flipped["x"].tolist() == [246.0] and flipped["y"].tolist() == [7.0]
    assert flipped["u"].tolist() == pytest.approx([0.9]) and flipped["v"].tolist() == pytest.approx([0.4])
    assert np.all(flipped["segm"][:, -10:] == 3) and np.all(flipped["segm"][:, :56] == 14)
    assert annotation["segm"][0, 0] == 2 and annotation["i"][0] == 3  # the input is not modified
    np.testing.assert_allclose(hflip_boxes(np.array([[1.0, 2.0, 5.0, 9.0]]), 20), [[15.0, 2.0, 19.0, 9.0]])


def test_symmetry_tables_are_involutions():
    point, mask = np.asarray(POINT_LABEL_SYMMETRIES), np.asarray(MASK_LABEL_SYMMETRIES)
    np.testing.assert_array_equal(point[point], np.arange(25))
    np.testing.assert_array_equal(mask[mask], np.arange(15))


def test_flipping_twice_is_identity(synthetic_root, synthetic_transform_data):
    annotations = [a["densepose"] for d in load_split(synthetic_root, "train") for a in d["annotations"]
                   if a["densepose"] is not None]
    assert annotations
    for dp in annotations:
        twice = hflip_densepose(hflip_densepose(dp, synthetic_transform_data), synthetic_transform_data)
        np.testing.assert_array_equal(twice["i"], dp["i"])
        np.testing.assert_array_equal(twice["segm"], dp["segm"])
        np.testing.assert_allclose(twice["x"], dp["x"], atol=1e-4)
        np.testing.assert_array_equal(twice["y"], dp["y"])
        # The tables sample U and V every 1/255: a point off the grid comes back to its nearest grid value.
        np.testing.assert_allclose(twice["u"], dp["u"], atol=0.5 / 255 + 1e-6)
        np.testing.assert_allclose(twice["v"], dp["v"], atol=0.5 / 255 + 1e-6)
        on_grid = {k: (np.rint(dp[k] * 255) / 255).astype(np.float32) for k in ("u", "v")}
        grid_twice = hflip_densepose(hflip_densepose({**dp, **on_grid}, synthetic_transform_data),
                                     synthetic_transform_data)
        np.testing.assert_allclose(grid_twice["u"], on_grid["u"], atol=1e-6)


def test_flipped_annotation_matches_the_rendering_of_the_mirrored_scene(synthetic_transform_data):
    """Annotate a rendered person, flip the annotation, and compare with the annotation-free rendering of the
    mirrored person at the flipped points: parts, U and V must agree (up to table quantization)."""
    template = build_template()
    size = 128
    checked_points = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        person = sample_person(rng, template, size, size, height_fraction=0.8, depth_rank=0)
        person = replace(person, origin=(size / 2 + rng.uniform(-10, 10), person.origin[1]))
        render = render_people(template, [person], size, size)
        annotation = annotate_person(render, 0, rng)
        if annotation is None or "dp_x" not in annotation:
            continue
        dp = {"x": np.asarray(annotation["dp_x"], np.float32), "y": np.asarray(annotation["dp_y"], np.float32),
              "i": np.asarray(annotation["dp_I"]).astype(np.int64), "u": np.asarray(annotation["dp_U"], np.float32),
              "v": np.asarray(annotation["dp_V"], np.float32), "segm": decode_dp_masks(annotation["dp_masks"])}
        flipped = hflip_densepose(dp, synthetic_transform_data)
        x0, y0, w, h = annotation["bbox"]
        flipped_x0 = size - (x0 + w)

        mirrored = render_people(template, [mirror_person(person, size)], size, size)
        cols = np.floor(flipped_x0 + flipped["x"] / 256 * w).astype(int)
        rows = np.floor(y0 + flipped["y"] / 256 * h).astype(int)
        same_part = mirrored.part[rows, cols] == flipped["i"]
        assert same_part.mean() >= 0.99
        # The UV tables hold U and V every 1/255: a flipped point is exact up to half a step.
        quantization = 0.5 / 255 + 1e-5
        np.testing.assert_allclose(mirrored.u[rows, cols][same_part], flipped["u"][same_part], atol=quantization)
        np.testing.assert_allclose(mirrored.v[rows, cols][same_part], flipped["v"][same_part], atol=quantization)
        # The mirrored person's own part masks are the flipped ones.
        mirrored_annotation = annotate_person(mirrored, 0, rng)
        assert mirrored_annotation["bbox"] == [flipped_x0, y0, w, h]
        agree = decode_dp_masks(mirrored_annotation["dp_masks"]) == flipped["segm"]
        assert agree.mean() > 0.995
        checked_points += len(rows)
    assert checked_points >= 200
