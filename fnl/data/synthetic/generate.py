"""Writing a synthetic DensePose-COCO dataset to disk (the layout of fnl.data.catalog)."""

from __future__ import annotations

import io
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fnl.data.catalog import (
    ANNOTATIONS_DIR,
    IMAGES_DIR,
    SURFACE_DIR,
    UV_SYMMETRY_FILE,
    annotation_file,
    image_dir,
)
from fnl.data.surface import save_body_surface
from fnl.data.synthetic.annotate import annotate_person
from fnl.data.synthetic.body import build_body_surface, build_template, uv_symmetry_tables
from fnl.data.synthetic.scene import sample_scene
from fnl.data.transforms import save_uv_symmetry
from fnl.utils.errors import InvalidArgumentError
from fnl.utils.io import write_bytes_atomic, write_json_atomic

GENERATOR_VERSION = 1  # bump when the same seed stops giving the same data
INFO_FILE = "synth_info.json"
JPEG_QUALITY = 92
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"}]


def split_sizes(num_images: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) image counts; the last ``val`` images form the val split."""
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidArgumentError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = int(round(num_images * val_fraction))
    if val_fraction > 0 and num_images >= 2:
        num_val = min(max(num_val, 1), num_images - 1)  # both splits non-empty
    return num_images - num_val, num_val


def _render_image(index: int, seed: int, image_size: int, split: str, out_dir: str) -> tuple[int, list[dict]]:
    """Render image ``index`` (its own random stream, so results do not depend on the worker that draws it), write
    it, and return its annotations (without ids)."""
    rng = np.random.default_rng([seed, index])
    image, render, persons = sample_scene(rng, build_template(), image_size)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: keep thin limbs
    write_bytes_atomic(image_dir(out_dir, split) / image_file_name(index), buffer.getvalue())
    annotations = [annotate_person(render, k, rng) for k in range(len(persons))]
    return index, [a for a in annotations if a is not None]


def image_file_name(index: int) -> str:
    return f"{index + 1:06d}.jpg"


def _prepare_output(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"{out_dir} is not empty; pass --force (force=True) to replace the dataset there")
        # Clear a previous synthetic dataset, so that stale images of a larger run cannot linger. A directory that
        # this generator did not write (no info file) keeps its files: ours are only written over them.
        if (out_dir / INFO_FILE).is_file():
            for name in (ANNOTATIONS_DIR, IMAGES_DIR, SURFACE_DIR):
                if (out_dir / name).is_dir():
                    shutil.rmtree(out_dir / name)
            (out_dir / INFO_FILE).unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def generate_synthetic_dataset(out_dir: str | Path, num_images: int, seed: int = 0, image_size: int = 256,
                               val_fraction: float = 0.1, workers: int = 1, force: bool = False,
                               progress: bool = True) -> Path:
    """Render ``num_images`` square images of ``image_size`` pixels into ``out_dir`` (see the package docstring)
    and return ``out_dir``. The same arguments give the same files, whatever ``workers`` is. Annotation files are
    written last, so an interrupted run leaves no json pointing at missing images."""
    if num_images < 1:
        raise InvalidArgumentError(f"num_images must be >= 1, got {num_images}")
    if image_size < 32:
        raise InvalidArgumentError(f"image_size must be >= 32 pixels, got {image_size}")
    if workers < 1:
        raise InvalidArgumentError(f"workers must be >= 1, got {workers}")
    num_train, num_val = split_sizes(num_images, val_fraction)
    out_dir = Path(out_dir)
    _prepare_output(out_dir, force)
    splits = ["train"] * num_train + ["val"] * num_val

    surface_dir = out_dir / SURFACE_DIR
    save_body_surface(build_body_surface(), surface_dir)
    save_uv_symmetry(surface_dir / UV_SYMMETRY_FILE, *uv_symmetry_tables())

    tasks = [(index, seed, image_size, splits[index], str(out_dir)) for index in range(num_images)]
    annotations_of: dict[int, list[dict]] = {}
    bar = tqdm(total=num_images, desc="rendering", unit="img", disable=not progress)
    if workers == 1:
        results = (_render_image(*task) for task in tasks)
        for index, annotations in results:
            annotations_of[index] = annotations
            bar.update()
    else:
        # spawn: workers start clean instead of inheriting the parent's threads (torch's, a test runner's).
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for index, annotations in pool.imap_unordered(_star_render_image, tasks, chunksize=4):
                annotations_of[index] = annotations
                bar.update()
    bar.close()

    next_annotation_id = 1
    for split in ("train", "val"):
        indices = [k for k in range(num_images) if splits[k] == split]
        if not indices:
            continue  # no val split when val_fraction is 0
        images, annotations = [], []
        for index in indices:
            image_id = index + 1
            images.append({"id": image_id, "file_name": image_file_name(index), "height": image_size,
                           "width": image_size})
            for annotation in annotations_of[index]:
                annotations.append({"id": next_annotation_id, "image_id": image_id, **annotation})
                next_annotation_id += 1
        coco = {
            "info": {"description": "fnl synthetic DensePose-COCO", "version": str(GENERATOR_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": CATEGORIES,
        }
        image_dir(out_dir, split).mkdir(parents=True, exist_ok=True)
        write_json_atomic(annotation_file(out_dir, split), coco, indent=None)
    write_json_atomic(out_dir / INFO_FILE, {
        "generator": "fnl.data.synthetic", "version": GENERATOR_VERSION, "seed": seed, "num_images": num_images,
        "image_size": image_size, "val_fraction": val_fraction, "images": {"train": num_train, "val": num_val},
    })
    return out_dir


def _star_render_image(task: tuple) -> tuple[int, list[dict]]:
    return _render_image(*task)

