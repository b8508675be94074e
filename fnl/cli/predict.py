"""fnl-predict --ckpt model.pth --input IMG_OR_DIR --output DIR [--score-thresh 0.5]: PNG overlays (boxes, part
colours, U/V contours), the I/U/V maps per image (.npz) and one results.json per run.

A directory is searched recursively; outputs keep each image's relative path and extension (x/a.jpg ->
DIR/x/a_jpg_densepose.png, DIR/x/a_jpg_iuv.npz). results.json holds {"images": [...], "failed": [{"file_name",
"error"}], "not_images": [...]}: an unreadable image is reported on one line and skipped, and the command then exits
with status 1 after processing every other image."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from fnl.cli.common import STORED_CONFIG_HELP, add_config_arguments, run_cli
from fnl.data.images import IMAGE_SUFFIXES
from fnl.qat.serialization import load_model_for_inference


@dataclass
class PredictInputs:
    """What --input holds: the images to predict on, the other files (reported, not read), and the folder that
    output names are relative to."""

    images: list[Path]
    not_images: list[Path]
    root: Path


def collect_inputs(path: Path, output: Path) -> PredictInputs:
    """One image, or every image below a directory (recursively; hidden entries and ``output`` left out)."""
    if path.is_file():
        return PredictInputs([path], [], path.parent)
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    output = output.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts)
                   and not p.resolve().is_relative_to(output))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return PredictInputs(images, [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES], path)


def output_stem(image: Path, root: Path, output: Path) -> Path:
    """Where an image's outputs go, without their ending: its path below ``root`` under ``output``, extension kept
    (``a.jpg`` -> ``a_jpg``), so that ``a.jpg`` and ``a.png``, or ``x/a.jpg`` and ``y/a.jpg``, never share a file."""
    relative = image.relative_to(root)
    return output / relative.parent / f"{relative.stem}_{relative.suffix.removeprefix('.')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnl-predict", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="float or int8 checkpoint")
    parser.add_argument("--input", required=True, help="an image, or a directory searched recursively for images")
    parser.add_argument("--output", required=True, help="directory for overlays and results.json")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="minimum detection score to keep")
    parser.add_argument("--unsafe-load", action="store_true", help="allow pickled objects (trusted files only)")
    add_config_arguments(parser, required=False, config_help=STORED_CONFIG_HELP)
    args = parser.parse_args(argv)

    def run() -> int:
        import numpy as np
        import torch
        from tqdm import tqdm

        from fnl.data.images import ImageReadError, load_image
        from fnl.data.mapper import DatasetMapper
        from fnl.engine.inference import to_evaluator_format
        from fnl.engine.visualize import draw_densepose, save_png
        from fnl.utils.io import atomic_path, check_output_dir, write_json_atomic

        output = check_output_dir(args.output)
        inputs = collect_inputs(Path(args.input), output)
        if inputs.not_images:
            names = ", ".join(str(p.relative_to(inputs.root)) for p in inputs.not_images[:5])
            more = f", ... ({len(inputs.not_images) - 5} more)" if len(inputs.not_images) > 5 else ""
            print(f"fnl-predict: skipping {len(inputs.not_images)} file(s) that are not images "
                  f"({', '.join(IMAGE_SUFFIXES)}): {names}{more}", file=sys.stderr)
        model, cfg = load_model_for_inference(args.ckpt, args.config, args.opts, args.unsafe_load)
        mapper = DatasetMapper(cfg, is_train=False)
        results, failures = [], []
        for index, path in enumerate(tqdm(inputs.images, desc="predict", unit="img")):
            try:
                image = load_image(path)
            except ImageReadError as exc:
                # One bad file must not cost the rest of the directory: report it, go on, list it at the end.
                tqdm.write(f"fnl-predict: skipped {exc}", file=sys.stderr)
                failures.append({"file_name": str(path), "error": exc.reason})
                continue
            width, height = image.size
            mapped = mapper({"file_name": str(path), "image_id": index, "height": height, "width": width})
            with torch.no_grad():
                prediction = to_evaluator_format(index, model([mapped])[0])
            keep = prediction["scores"] >= args.score_thresh
            boxes, scores = prediction["boxes"][keep], prediction["scores"][keep]
            maps = [m for m, k in zip(prediction["densepose"], keep, strict=True) if k]
            stem = output_stem(path, inputs.root, output)
            overlay, iuv = stem.with_name(f"{stem.name}_densepose.png"), stem.with_name(f"{stem.name}_iuv.npz")
            save_png(draw_densepose(np.asarray(image), boxes, scores, maps), overlay)
            # The full I/U/V maps (3, h, w) per box, at box resolution, beside the JSON summary.
            with atomic_path(iuv) as tmp, open(tmp, "wb") as handle:
                np.savez_compressed(handle, boxes=boxes, scores=scores, **{f"iuv_{k}": m for k, m in enumerate(maps)})
            results.append({"file_name": str(path), "height": height, "width": width,
                            "overlay": str(overlay.relative_to(output)), "iuv": str(iuv.relative_to(output)),
                            "instances": [
                {"box_xyxy": [round(float(c), 2) for c in box], "score": round(float(score), 4),
                 "parts_present": sorted(int(p) for p in np.unique(m[0]) if p > 0)}
                for box, score, m in zip(boxes, scores, maps, strict=True)
            ]})
        write_json_atomic(output / "results.json", {"images": results, "failed": failures,
                                                    "not_images": [str(p) for p in inputs.not_images]})
        print(f"wrote {len(results)} overlay(s) and {output / 'results.json'}")
        if failures:
            print(f"fnl-predict: {len(failures)} of {len(inputs.images)} image(s) could not be read (listed under "
                  f"'failed' in {output / 'results.json'})", file=sys.stderr)
            return 1
        return 0

    return run_cli(run, "fnl-predict")


if __name__ == "__main__":
    sys.exit(main())
