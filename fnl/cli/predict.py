"""fnl-predict --ckpt model.pth --input IMG_OR_DIR --output DIR [--score-thresh 0.5]: PNG overlays (boxes, part
colours, U/V contours), the I/U/V maps per image (.npz) and one results.json per run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fnl.cli.common import load_model_for_inference, run_cli

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            return images
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
    raise FileNotFoundError(f"input not found: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnl-predict", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="float or int8 checkpoint")
    parser.add_argument("--config", help="config (default: the one stored in the checkpoint)")
    parser.add_argument("--input", required=True, help="an image or a directory of images")
    parser.add_argument("--output", required=True, help="directory for overlays and results.json")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="minimum detection score to keep")
    parser.add_argument("--unsafe-load", action="store_true", help="allow pickled objects (trusted files only)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    def run() -> int:
        import numpy as np
        import torch
        from PIL import Image
        from tqdm import tqdm

        from fnl.data.mapper import DatasetMapper
        from fnl.engine.inference import to_evaluator_format
        from fnl.engine.visualize import draw_densepose, save_png
        from fnl.utils.io import atomic_path, check_output_dir, write_json_atomic

        check_output_dir(args.output)
        images = list_images(Path(args.input))
        model, cfg = load_model_for_inference(args.ckpt, args.config, args.opts, args.unsafe_load)
        mapper = DatasetMapper(cfg, is_train=False)
        output = Path(args.output)
        results = []
        for index, path in enumerate(tqdm(images, desc="predict", unit="img")):
            with Image.open(path) as opened:
                width, height = opened.size
            inputs = mapper({"file_name": str(path), "image_id": index, "height": height, "width": width})
            with torch.no_grad():
                prediction = to_evaluator_format(index, model([inputs])[0])
            keep = prediction["scores"] >= args.score_thresh
            boxes, scores = prediction["boxes"][keep], prediction["scores"][keep]
            maps = [m for m, k in zip(prediction["densepose"], keep, strict=True) if k]
            pixels = np.asarray(Image.open(path).convert("RGB"))
            save_png(draw_densepose(pixels, boxes, scores, maps), output / f"{path.stem}_densepose.png")
            # The full I/U/V maps (3, h, w) per box, at box resolution, beside the JSON summary.
            with atomic_path(output / f"{path.stem}_iuv.npz") as tmp, open(tmp, "wb") as handle:
                np.savez_compressed(handle, boxes=boxes, scores=scores, **{f"iuv_{k}": m for k, m in enumerate(maps)})
            results.append({"file_name": str(path), "height": height, "width": width, "instances": [
                {"box_xyxy": [round(float(c), 2) for c in box], "score": round(float(score), 4),
                 "parts_present": sorted(int(p) for p in np.unique(m[0]) if p > 0)}
                for box, score, m in zip(boxes, scores, maps, strict=True)
            ]})
        write_json_atomic(output / "results.json", results)
        print(f"wrote {len(images)} overlay(s) and {output / 'results.json'}")
        return 0

    return run_cli(run, "fnl-predict")


if __name__ == "__main__":
    sys.exit(main())
