import shutil

import pytest

from fnl.data.catalog import available_splits, resolve_split, surface_dir, uv_symmetry_file
from fnl.data.densepose_coco import DatasetFileNotFoundError


def test_resolve_split_of_the_synthetic_layout(synthetic_root):
    json_path, images = resolve_split(synthetic_root, "val")
    assert json_path == synthetic_root / "annotations" / "densepose_val.json" and json_path.is_file()
    assert images == synthetic_root / "images" / "val" and images.is_dir()
    assert available_splits(synthetic_root) == ["train", "val"]
    assert surface_dir(synthetic_root) == synthetic_root / "surface"
    assert uv_symmetry_file(synthetic_root).name == "UV_symmetry_transforms.mat"


def test_missing_pieces_are_named(tmp_path, synthetic_root):
    with pytest.raises(DatasetFileNotFoundError, match="dataset root not found: .*nowhere"):
        resolve_split(tmp_path / "nowhere", "train")
    with pytest.raises(DatasetFileNotFoundError, match=r"densepose_minival\.json .*splits under .*: train, val"):
        resolve_split(synthetic_root, "minival")
    root = tmp_path / "partial"
    (root / "annotations").mkdir(parents=True)
    shutil.copy(synthetic_root / "annotations" / "densepose_val.json", root / "annotations")
    with pytest.raises(DatasetFileNotFoundError, match=r"image directory of split 'val' not found: .*images/val"):
        resolve_split(root, "val")
    with pytest.raises(DatasetFileNotFoundError, match="body-surface directory not found: .*surface"):
        surface_dir(root)
    (root / "surface").mkdir()
    with pytest.raises(DatasetFileNotFoundError, match=r"UV symmetry file not found: .*UV_symmetry_transforms\.mat"):
        uv_symmetry_file(root)
