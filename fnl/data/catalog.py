"""Where a dataset's files live. A dataset root directory (``DATASETS.ROOT``) is laid out as::

    ROOT/annotations/densepose_<split>.json   DensePose-COCO annotations of each split
    ROOT/images/<split>/                      the images the json's file_name entries name
    ROOT/surface/                             body-surface evaluation files (fnl.data.surface) and
    ROOT/surface/UV_symmetry_transforms.mat   DensePose's U/V mirror tables, used by horizontal flips

For DensePose-COCO, put (or link) the released ``densepose_<split>.json`` files and COCO's images there, and the
SMPL evaluation files and ``UV_symmetry_transforms.mat`` from DensePose's downloads in ``surface/``;
``fnl-data synth`` writes the same layout.
"""

from __future__ import annotations

from pathlib import Path

from fnl.data.densepose_coco import DatasetFileNotFoundError, load_densepose_coco

ANNOTATIONS_DIR = "annotations"
IMAGES_DIR = "images"
SURFACE_DIR = "surface"
UV_SYMMETRY_FILE = "UV_symmetry_transforms.mat"


def annotation_file(root: str | Path, split: str) -> Path:
    return Path(root) / ANNOTATIONS_DIR / f"densepose_{split}.json"


def image_dir(root: str | Path, split: str) -> Path:
    return Path(root) / IMAGES_DIR / split


def available_splits(root: str | Path) -> list[str]:
    """Splits that have an annotation file under ``root``."""
    directory = Path(root) / ANNOTATIONS_DIR
    prefix, suffix = "densepose_", ".json"
    return sorted(p.name[len(prefix):-len(suffix)] for p in directory.glob(f"{prefix}*{suffix}"))


def resolve_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(json_path, image_dir)`` of a split; raises :class:`DatasetFileNotFoundError` naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetFileNotFoundError(
            f"dataset root not found: {root} (generate one with `fnl-data synth --output {root}` "
            "or set DATASETS.ROOT)"
        )
    json_path = annotation_file(root, split)
    if not json_path.is_file():
        splits = available_splits(root)
        raise DatasetFileNotFoundError(
            f"annotations of split '{split}' not found: {json_path} "
            f"(splits under {root}: {', '.join(splits) if splits else 'none'})"
        )
    images = image_dir(root, split)
    if not images.is_dir():
        raise DatasetFileNotFoundError(f"image directory of split '{split}' not found: {images}")
    return json_path, images


def surface_dir(root: str | Path) -> Path:
    """The directory of body-surface files; raises :class:`DatasetFileNotFoundError` when it does not exist."""
    directory = Path(root) / SURFACE_DIR
    if not directory.is_dir():
        raise DatasetFileNotFoundError(f"body-surface directory not found: {directory}")
    return directory


def uv_symmetry_file(root: str | Path) -> Path:
    """``surface/UV_symmetry_transforms.mat``; raises :class:`DatasetFileNotFoundError` when it does not exist."""
    path = surface_dir(root) / UV_SYMMETRY_FILE
    if not path.is_file():
        raise DatasetFileNotFoundError(
            f"UV symmetry file not found: {path} (needed for horizontal flips; for DensePose-COCO it comes with "
            "DensePose's downloads, or set INPUT.RANDOM_FLIP none)"
        )
    return path


def load_split(root: str | Path, split: str, check_image_files: bool = True) -> list[dict]:
    """The dataset dicts of one split (see :func:`fnl.data.densepose_coco.load_densepose_coco`)."""
    json_path, images = resolve_split(root, split)
    return load_densepose_coco(json_path, images, check_image_files=check_image_files)
