import json

import numpy as np
import pytest
from PIL import Image

from fnl.cli.data import main
from fnl.data.catalog import load_split
from fnl.data.surface import load_body_surface
from fnl.data.synthetic import generate_synthetic_dataset, split_sizes
from fnl.data.synthetic.generate import INFO_FILE


def _files(root):
    """Bytes of every file; MATLAB files without their 128-byte header, which holds the time they were written."""
    return {p.relative_to(root).as_posix(): p.read_bytes()[128 if p.suffix == ".mat" else 0:]
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    one = generate_synthetic_dataset(tmp_path / "one", num_images=3, seed=11, image_size=64, val_fraction=0.34,
                                     progress=False)
    two = generate_synthetic_dataset(tmp_path / "two", num_images=3, seed=11, image_size=64, val_fraction=0.34,
                                     workers=2, progress=False)
    first, second = _files(one), _files(two)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    other = generate_synthetic_dataset(tmp_path / "other", num_images=3, seed=12, image_size=64, val_fraction=0.34,
                                       progress=False)
    assert (other / "annotations/densepose_train.json").read_bytes() != first["annotations/densepose_train.json"]
    uv_file = "surface/UV_symmetry_transforms.mat"
    assert (one / uv_file).read_bytes() == (two / uv_file).read_bytes()  # our own .mat is reproducible in full


def test_generated_dataset_layout_and_content(synthetic_root):
    info = json.loads((synthetic_root / INFO_FILE).read_text())
    assert info["images"] == {"train": 4, "val": 2} and info["seed"] == 3
    train, val = load_split(synthetic_root, "train"), load_split(synthetic_root, "val")
    assert [d["image_id"] for d in train + val] == list(range(1, 7))
    for d in train + val:
        with Image.open(d["file_name"]) as image:
            assert image.size == (128, 128) and image.mode == "RGB"
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and 0 < a["area"] <= w * h
    annotations = [a for d in train + val for a in d["annotations"]]
    assert len({a["id"] for a in annotations}) == len(annotations)
    assert 1 <= max(len(d["annotations"]) for d in train + val) <= 5
    surface = load_body_surface(synthetic_root / "surface")
    assert surface.num_mesh_vertices <= 3000 and set(np.unique(surface.vertex_part)) == set(range(1, 25))


def test_points_carry_the_rendered_labels(synthetic_root):
    """Regenerating one image's render gives back its annotated I, U, V at the annotated points."""
    from fnl.data.synthetic.body import build_template
    from fnl.data.synthetic.scene import sample_scene

    dataset_dict = load_split(synthetic_root, "train")[0]
    image, render, _ = sample_scene(np.random.default_rng([3, 0]), build_template(), 128)
    with Image.open(dataset_dict["file_name"]) as stored:
        assert np.abs(np.asarray(stored, dtype=np.int16) - image).mean() < 4  # JPEG of the same picture
    for annotation in dataset_dict["annotations"]:
        dp = annotation["densepose"]
        if dp is None:
            continue
        x, y, w, h = annotation["bbox"]
        cols = np.floor(x + dp["x"] / 256 * w).astype(int)
        rows = np.floor(y + dp["y"] / 256 * h).astype(int)
        np.testing.assert_array_equal(render.part[rows, cols], dp["i"])
        np.testing.assert_allclose(render.u[rows, cols], dp["u"], atol=1e-5)


def test_split_sizes():
    assert split_sizes(1000, 0.1) == (900, 100)
    assert split_sizes(6, 0.34) == (4, 2)
    assert split_sizes(2, 0.01) == (1, 1)  # both splits non-empty when asked for a val split
    assert split_sizes(1, 0.5) == (1, 0)
    assert split_sizes(5, 0.0) == (5, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        split_sizes(5, 1.0)


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "cli"
    arguments = ["synth", "--output", str(out), "--num-images", "2", "--image-size", "48", "--seed", "1",
                 "--val-fraction", "0", "--workers", "1"]
    assert main(arguments) == 0
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == ["000001.jpg", "000002.jpg"]
    assert not (out / "annotations" / "densepose_val.json").exists()
    assert main(arguments) == 2
    assert "is not empty; pass --force" in capsys.readouterr().err
    keep = out / "notes.txt"
    keep.write_text("mine")
    assert main([*arguments[:4], "1", *arguments[5:], "--force"]) == 0
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == ["000001.jpg"]  # no stale image
    assert keep.read_text() == "mine"  # only the dataset's own files are replaced
    assert main(["synth", "--out", str(tmp_path / "x"), "--num-images", "0"]) == 2
    # --force into a directory the generator did not write deletes nothing of the owner's.
    foreign = tmp_path / "foreign"
    (foreign / "images" / "train").mkdir(parents=True)
    (foreign / "images" / "train" / "holiday.jpg").write_bytes(b"not ours")
    assert main(["synth", "--out", str(foreign), "--num-images", "1", "--image-size", "48", "--workers", "1",
                 "--force"]) == 0
    assert (foreign / "images" / "train" / "holiday.jpg").read_bytes() == b"not ours"
    assert "--out is deprecated, use --output" in capsys.readouterr().err  # the old spelling still works


def test_written_surface_scores_rendered_truth_100_and_left_right_confusion_low(synthetic_root):
    """End to end through the GPS evaluator: I/U/V maps cut from the renders score AP 100 against the json with
    the generator's surface files, and the same maps with left and right swapped (part and U mirrored) score low,
    so the geodesic distances separate the two sides of the body."""
    from fnl.data.parts import POINT_LABEL_SYMMETRIES
    from fnl.data.synthetic.body import build_template
    from fnl.data.synthetic.scene import sample_scene
    from fnl.evaluation import DensePoseCOCOEvaluator, densepose_map_region

    json_path = synthetic_root / "annotations" / "densepose_train.json"
    coco = json.loads(json_path.read_text())

    def predictions(swap_sides: bool) -> list[dict]:
        result = []
        for image in coco["images"]:
            _, render, _ = sample_scene(np.random.default_rng([3, image["id"] - 1]), build_template(), 128)
            boxes, maps = [], []
            for annotation in (a for a in coco["annotations"] if a["image_id"] == image["id"] and "dp_x" in a):
                x, y, w, h = annotation["bbox"]
                boxes.append([x, y, x + w, y + h])
                x0, y0, map_w, map_h = densepose_map_region(boxes[-1])
                region = (slice(y0, y0 + map_h), slice(x0, x0 + map_w))
                # The rendered person under the first annotated point (another may cover most of the box).
                first_point = (int(y + annotation["dp_y"][0] / 256 * h), int(x + annotation["dp_x"][0] / 256 * w))
                person = render.person[first_point]
                part = np.where(render.person[region] == person, render.part[region], 0)
                u, v = render.u[region], render.v[region]
                if swap_sides:
                    part, u = np.asarray(POINT_LABEL_SYMMETRIES)[part], 1 - u
                maps.append(np.stack([part, u, v]).astype(np.float32))
            result.append({"image_id": image["id"], "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                           "scores": np.ones(len(boxes)), "classes": np.zeros(len(boxes), dtype=np.int64),
                           "densepose": maps})
        return result

    evaluator = DensePoseCOCOEvaluator(json_path, synthetic_root / "surface")
    assert evaluator.evaluate(predictions(swap_sides=False))["densepose"]["AP"] == pytest.approx(100.0)
    assert evaluator.evaluate(predictions(swap_sides=True))["densepose"]["AP"] < 20.0
