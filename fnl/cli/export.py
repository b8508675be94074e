"""fnl-export --ckpt model.pth [--config FILE] --format onnx --output DIR [--verify [--data DIR]] [KEY VALUE ...]

Writes DIR/model_fp32.onnx: the whole model as one ONNX graph (input: one RGB uint8 image, already resized so its
shortest side is the test size; outputs: boxes in that image, scores, classes, DensePose head outputs), checked with
onnx.checker. --verify then runs PyTorch and ONNX Runtime on the same images, prints the per-output differences and
exits with status 1 when they are beyond the float32 criteria (see fnl.export.verify).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from fnl.cli.common import add_config_arguments, config_from_args, ensure_dir, run_cli
from fnl.config import CfgNode

if TYPE_CHECKING:
    import torch

    from fnl.modeling import GeneralizedRCNN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnl-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="model checkpoint (.pth)")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default onnx)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--verify", action="store_true", help="compare the export with PyTorch; exit 1 on failure")
    parser.add_argument("--data", help="dataset root whose test split (DATASETS.TEST[0]) --verify runs on "
                                       "(default: synthetic images)")
    parser.add_argument("--verify-images", type=int, default=8, help="images --verify runs on (default 8)")
    parser.add_argument("--input-size", type=int, help="test size, the images' shortest side (INPUT.MIN_SIZE_TEST; "
                                                       "default: the config's)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for --verify (default 2)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="load a checkpoint holding arbitrary pickled objects (only from a trusted source)")
    add_config_arguments(parser, required=False)
    args = parser.parse_args(argv)
    return run_cli(lambda: _export(args), "fnl-export")


def _export(args: argparse.Namespace) -> int:
    import torch

    from fnl.export.onnx import default_onnx_name, model_precision, to_onnx
    from fnl.utils.io import refuse_overwrite

    if args.input_size is not None and args.input_size < 32:
        raise ValueError(f"--input-size must be at least 32, got {args.input_size}")
    if args.verify_images < 1:
        raise ValueError(f"--verify-images must be at least 1, got {args.verify_images}")
    cfg = _config(args)
    model = _load_model(cfg, args.ckpt, args.unsafe_load)
    path = ensure_dir(args.output) / default_onnx_name(model)
    refuse_overwrite(path, args.force)
    size = cfg.INPUT.MIN_SIZE_TEST
    sample = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    to_onnx(model, path, sample, opset=args.opset)
    print(f"wrote {path} ({model_precision(model)}, opset {args.opset}, {path.stat().st_size / 2**20:.1f} MB, "
          "onnx.checker passed)")
    if not args.verify:
        return 0

    from fnl.export.verify import FLOAT32, INT8, verify_onnx

    criteria = INT8 if model_precision(model) == "int8" else FLOAT32
    report = verify_onnx(model, path, _verification_images(cfg, args), criteria, threads=args.threads)
    print(report.table())
    latency = report.as_dict()["latency_ms_p50"]
    print(f"median time per image in these runs (first runs, not a benchmark): PyTorch {latency['pytorch']:.1f} ms, "
          f"ONNX Runtime ({args.threads} threads) {latency['onnx']:.1f} ms")
    if report.rows[0].compared == 0:
        print("note: no detections on the verification images, so only the counts were compared; "
              "verify on real images with --data")
    return 0 if report.passed else 1


def _config(args: argparse.Namespace) -> CfgNode:
    """--config with overrides, or the config stored in the checkpoint; on CPU, at --input-size."""
    extra = ["MODEL.DEVICE", "cpu"]
    if args.input_size is not None:
        extra += ["INPUT.MIN_SIZE_TEST", str(args.input_size)]
    if args.config:
        return config_from_args(args, extra)
    from fnl.engine.checkpoint import config_from_checkpoint

    cfg = config_from_checkpoint(args.ckpt, allow_unsafe=args.unsafe_load)
    cfg.merge_from_list([*extra, *args.opts])
    return cfg


def _load_model(cfg: CfgNode, ckpt: str, allow_unsafe: bool) -> GeneralizedRCNN:
    """The float model with every tensor from ``ckpt``: an export must not carry initialisation weights."""
    from fnl.engine.checkpoint import CheckpointError, load_state, read_checkpoint
    from fnl.modeling import build_model

    data = read_checkpoint(ckpt, allow_unsafe)
    if any(key.endswith(".zero_point") for key in data["model"]):
        raise CheckpointError(f"checkpoint {ckpt} holds a quantized (QAT or int8) model; this command builds float "
                              "models only for now: export the int8 model from Python with "
                              "fnl.export.to_onnx(model, path, sample_image)")
    model = build_model(cfg)
    report = load_state(model, ckpt, allow_unsafe, data=data)
    missing = [key for key in report.missing if not key.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} lacks {len(missing)} of the model's tensors (e.g. "
                              f"{', '.join(missing[:3])}): the export would carry random weights for them. "
                              "Is --config the one it was trained with?")
    return model.eval()


def _verification_images(cfg: CfgNode, args: argparse.Namespace) -> list[torch.Tensor]:
    """The first --verify-images test images of --data, resized as for evaluation; without --data, seeded random
    images whose sizes vary around the test size (not all multiples of the padding)."""
    import torch

    if args.data:
        from fnl.data import build_test_loader

        data_cfg = cfg.clone()
        data_cfg.merge_from_list(["DATASETS.ROOT", args.data, "TEST.MAX_IMAGES", str(args.verify_images)])
        return [item["image"] for batch in build_test_loader(data_cfg, data_cfg.DATASETS.TEST[0]) for item in batch]
    size = cfg.INPUT.MIN_SIZE_TEST
    shapes = [(size, size), (size, size * 4 // 3), (size, size * 3 // 2 + 5), (size * 4 // 3 + 7, size)]
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, *shapes[k % len(shapes)]), dtype=torch.uint8, generator=generator)
            for k in range(args.verify_images)]


if __name__ == "__main__":
    sys.exit(main())
