"""``fnl-data``: dataset tools. ``fnl-data synth`` renders the embedded synthetic DensePose-COCO dataset."""

from __future__ import annotations

import argparse
import os
import sys
import time

from fnl.cli.common import DeprecatedAlias, run_cli
from fnl.data.synthetic import generate_synthetic_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fnl-data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser(
        "synth", help="render a synthetic dataset in DensePose-COCO format",
        description="Render persons made of a template body surface with 24 charts into images with "
                    "DensePose-COCO annotations, plus the template's GPS evaluation files.")
    synth.add_argument("--output", "--out", dest="output", required=True, action=DeprecatedAlias,
                       deprecated=["--out"], help="output directory (dataset root; --out: its deprecated old name)")
    synth.add_argument("--num-images", type=int, default=1000, help="number of images (default 1000)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--image-size", type=int, default=256, help="square image side in pixels (default 256)")
    synth.add_argument("--val-fraction", type=float, default=0.1,
                       help="fraction of images in the val split (default 0.1)")
    synth.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                       help="rendering processes (default: 2, or 1 on a single core); does not change the output")
    synth.add_argument("--force", action="store_true", help="replace the dataset in a non-empty --output")
    return parser


def synth(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = generate_synthetic_dataset(args.output, args.num_images, seed=args.seed, image_size=args.image_size,
                                     val_fraction=args.val_fraction, workers=args.workers, force=args.force)
    print(f"wrote {args.num_images} images to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: synth(args), f"fnl-data {args.command}")


if __name__ == "__main__":
    sys.exit(main())
