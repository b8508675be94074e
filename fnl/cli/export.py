"""fnl-export: a float32 or int8 checkpoint as one ONNX graph, Caffe2 NetDefs or ExecuTorch programs, checked and
compared with PyTorch.

  fnl-export onnx --ckpt model.pth|model_int8.pth --output DIR [--verify [--data DIR]] [--config FILE] [KEY VALUE ...]
  fnl-export onnx --from-quantize QDIR --output DIR [--data DIR] [--threads N] [--input-size S]
  fnl-export caffe2 --ckpt model.pth|model_int8.pth --output DIR [--verify [--data DIR]]
  fnl-export executorch --ckpt QDIR/model_pt2e.pth | --from-quantize QDIR --output DIR [--verify [--data DIR]]

The format is the subcommand, so that only its own options can be typed; `fnl-export --format FORMAT ...` (without a
subcommand: onnx) is the same command spelled as before.

caffe2 writes DIR/model.pb, model_init.pb and model.pbtxt (fnl.export.caffe2: Caffe2 NetDefs, QNNPACK int8
ops for an int8 checkpoint); --verify executes them with the reference executor against ONNX Runtime (float32) or
PyTorch int8 (fnl.export.caffe2.verify) and exits with status 1 on failure.

onnx --ckpt writes DIR/model_fp32.onnx (float checkpoint) or DIR/model_int8.onnx (int8 checkpoint written by
fnl-quantize: QuantizeLinear/DequantizeLinear around the int8 convs): the whole model as one ONNX graph (input: one
RGB uint8 image, already resized so its shortest side is the test size, which the file's metadata records for
fnl.export.runtime.OnnxPredictor to resize by; outputs: boxes in that image, scores, classes, DensePose head
outputs), checked with onnx.checker. --verify then runs PyTorch and ONNX Runtime on the same
images and prints the per-output differences; it exits with status 1 when they are beyond the criteria
(fnl.export.verify): float32 -- every detection within 1e-3; int8 -- at least 95% of the detections paired at
IoU >= 0.9 and, with --data, box and DensePose AP on the test split within 0.5 of the PyTorch int8 model's.

onnx --from-quantize takes a fnl-quantize output directory (model_fp32.pth, model_int8.pth) and writes into DIR
model_fp32.onnx, model_int8.onnx, model_ort_ptq.onnx (ONNX Runtime's own static PTQ of the float graph, calibrated on
training images), caffe2_int8/ (the int8 model as Caffe2 NetDefs) and the size / AP / FPS report report.json,
report.md, report.png with six rows: PyTorch float32, PyTorch int8, ONNX float32, ONNX int8, ONNX int8 (ORT static
PTQ), Caffe2 int8 (size and AP: its reference executor is a checker). Both ONNX exports are always verified; the command
exits with status 1 if either verification fails (the report is written either way).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from fnl.cli.common import STORED_CONFIG_HELP, add_config_arguments, config_from_args, ensure_dir, run_cli
from fnl.config import CfgNode
from fnl.export.onnx import DEFAULT_OPSET
from fnl.utils.errors import InvalidArgumentError

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from fnl.export.verify import Criteria
    from fnl.modeling import GeneralizedRCNN


FORMATS = ("onnx", "caffe2", "executorch")


class OtherFormatsOption(argparse.Action):
    """An option of other formats only, refused while parsing with the formats that take it named (without it, the
    trailing KEY VALUE overrides would swallow it and the error would be about something else)."""

    def __init__(self, option_strings: list[str], dest: str, formats: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.formats = formats

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is an option of fnl-export {self.formats} only")


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per format, each with only the options that format takes."""
    parser = argparse.ArgumentParser(prog="fnl-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = parser.add_subparsers(dest="format", required=True, metavar="{" + ",".join(FORMATS) + "}")
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--output", required=True, help="output directory")
    shared.add_argument("--verify", action="store_true", help="compare the export with PyTorch; exit 1 on failure "
                                                              "(always done with --from-quantize)")
    shared.add_argument("--data", help="dataset root whose test split (DATASETS.TEST[0]) --verify runs on (default: "
                                       "synthetic images); with --from-quantize, the dataset the report is measured "
                                       "on (default: the embedded synthetic set)")
    shared.add_argument("--verify-images", type=int, default=8, help="images --verify runs on (default 8)")
    shared.add_argument("--input-size", type=int, help="test size, the images' shortest side (INPUT.MIN_SIZE_TEST; "
                                                       "default: the config's)")
    shared.add_argument("--threads", type=int, default=2,
                        help="ONNX Runtime (and, for the report, PyTorch) threads (default 2)")
    shared.add_argument("--force", action="store_true", help="overwrite existing output files")
    shared.add_argument("--unsafe-load", action="store_true",
                        help="load a checkpoint holding arbitrary pickled objects (only from a trusted source)")

    def add_format(name: str, help_text: str, from_quantize: str | None) -> argparse.ArgumentParser:
        command = formats.add_parser(name, parents=[shared], help=help_text, description=help_text)
        source = command.add_mutually_exclusive_group(required=True)
        source.add_argument("--ckpt", help="model checkpoint (.pth): float, or int8 from fnl-quantize")
        if from_quantize:
            source.add_argument("--from-quantize", metavar="QDIR", help=from_quantize)
        else:
            command.add_argument("--from-quantize", action=OtherFormatsOption, formats="onnx|executorch")
        return command

    onnx = add_format("onnx", "one ONNX graph of a float32 or int8 checkpoint, run by ONNX Runtime",
                      "fnl-quantize output directory: export its float32 and int8 models and write the report")
    onnx.add_argument("--calibration-images", type=int, default=16,
                      help="training images calibrating ONNX Runtime's static PTQ (--from-quantize; default 16)")
    onnx.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    onnx.add_argument("--profile", action="store_true",
                      help="where the time goes: ONNX Runtime's profiler on the --verify-images images, time by "
                           "operator and by model part (with --from-quantize float32 beside int8), printed and "
                           "written to OUTPUT/profile.md")
    add_config_arguments(onnx, required=False, config_help=STORED_CONFIG_HELP)
    caffe2 = add_format("caffe2", "Caffe2 NetDefs (QNNPACK int8 operators for an int8 checkpoint)", None)
    add_config_arguments(caffe2, required=False, config_help=STORED_CONFIG_HELP)
    executorch = add_format("executorch", "XNNPACK .pte programs of a PT2E int8 model (fnl-quantize --engine pt2e), "
                                          "or float32 ones of a float checkpoint, with the config stored in it",
                            "fnl-quantize --engine pt2e output directory: export it and write the report")
    executorch.set_defaults(config=None, opts=[])
    return parser


def with_format_subcommand(argv: list[str]) -> list[str]:
    """``argv`` of the former spelling, ``--format FORMAT`` (default onnx) among the options, as the subcommand
    ``FORMAT`` followed by the other arguments; any other ``argv`` as it is."""
    if argv and (not argv[0].startswith("-") or argv[0] in ("-h", "--help")):
        return argv  # a subcommand (or a misspelt one, which the parser names), or the help
    rest, chosen = list(argv), "onnx"
    for k, token in enumerate(rest):
        if token == "--format" and k + 1 < len(rest):
            chosen = rest[k + 1]
            del rest[k:k + 2]
            break
        if token.startswith("--format="):
            chosen = token.partition("=")[2]
            del rest[k]
            break
    return [chosen, *rest]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(with_format_subcommand(sys.argv[1:] if argv is None else argv))
    return run_cli(lambda: _export(args), "fnl-export")


def _export(args: argparse.Namespace) -> int:
    import torch

    from fnl.export.onnx import default_onnx_name, model_precision, to_onnx
    from fnl.export.runtime import Preprocessing
    from fnl.utils.io import check_output_dir, refuse_overwrite

    check_output_dir(args.output)
    if args.input_size is not None and args.input_size < 32:
        raise InvalidArgumentError(f"--input-size must be at least 32, got {args.input_size}")
    if args.verify_images < 1:
        raise InvalidArgumentError(f"--verify-images must be at least 1, got {args.verify_images}")
    if args.format == "executorch":
        return _export_executorch(args)
    if args.from_quantize:
        return _export_and_report(args)
    cfg = _config(args)
    model = _load_model(cfg, args.ckpt, args.unsafe_load)
    if args.format == "caffe2":
        return _export_caffe2(model, cfg, args)
    path = ensure_dir(args.output) / default_onnx_name(model)
    refuse_overwrite(path, args.force)
    size = cfg.INPUT.MIN_SIZE_TEST
    sample = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    to_onnx(model, path, sample, opset=args.opset, preprocessing=Preprocessing.from_config(cfg))
    print(f"wrote {path} ({model_precision(model)}, opset {args.opset}, {path.stat().st_size / 2**20:.1f} MB, "
          "onnx.checker passed)")
    if args.profile:
        _profile({model_precision(model): path}, _verification_images(cfg, args), args)
    if not args.verify:
        return 0

    from fnl.export.verify import ap_rows, criteria_for, verify_onnx

    criteria = criteria_for(model)
    report = verify_onnx(model, path, _verification_images(cfg, args, criteria), criteria, threads=args.threads)
    if args.data and criteria.ap_tolerance is not None:
        report.rows.extend(ap_rows(*_test_split_results(model, path, _data_config(cfg, args.data), args), criteria))
    print(report.table())
    latency = report.as_dict()["latency_ms_p50"]
    print(f"median time per image in these runs (first runs, not a benchmark): PyTorch {latency['pytorch']:.1f} ms, "
          f"ONNX Runtime ({args.threads} threads) {latency['onnx']:.1f} ms")
    if report.rows[0].compared == 0:
        print("note: no detections on the verification images, so only the counts were compared; "
              "verify on real images with --data")
    return 0 if report.passed else 1


def _export_caffe2(model: GeneralizedRCNN, cfg: CfgNode, args: argparse.Namespace) -> int:
    from fnl.export.caffe2 import to_caffe2, verify_caffe2
    from fnl.export.caffe2.writer import INIT_NET_FILE, PREDICT_NET_FILE, PREDICT_NET_TEXT_FILE
    from fnl.utils.io import refuse_overwrite

    output = ensure_dir(args.output)
    for name in (PREDICT_NET_FILE, INIT_NET_FILE, PREDICT_NET_TEXT_FILE):
        refuse_overwrite(output / name, args.force)
    written = to_caffe2(model, output)
    print(f"wrote {written.predict_net}, {written.init_net}, {written.predict_net_text} ({written.precision}, "
          f"{written.size_mb:.1f} MB, {sum(written.operators.values())} operators)")
    if not args.verify:
        return 0
    from fnl.export.verify import criteria_for

    result = verify_caffe2(model, output, _verification_images(cfg, args, criteria_for(model)))
    print(result.table())
    return 0 if result.passed else 1


def _export_executorch(args: argparse.Namespace) -> int:
    """fnl-export executorch: XNNPACK .pte programs of a PT2E int8 model (fnl-quantize --engine pt2e), or float32
    programs of a float checkpoint, run by fnl.export.executorch.ExecuTorchPredictor. --from-quantize QDIR also
    measures and writes the report (PyTorch float32, ExecuTorch float32, PyTorch PT2E int8, ExecuTorch int8); --ckpt
    QDIR/model_pt2e.pth or a float checkpoint writes the programs (--verify: compare with the PyTorch model)."""
    from pathlib import Path

    from fnl.qat.pt2e import require_pt2e

    require_pt2e()
    from fnl.cli.common import ensure_dataset
    from fnl.export.executorch import (
        EXECUTORCH_DIR,
        EXECUTORCH_FLOAT_DIR,
        ExecuTorchPredictor,
        export_executorch_and_report,
        program_image_size,
        to_executorch,
        verify_executorch,
    )
    from fnl.qat.pt2e import load_pt2e_checkpoint

    output = Path(args.output)
    if args.from_quantize:
        document = export_executorch_and_report(args.from_quantize, output, ensure_dataset(args.data), args.threads,
                                                args.verify_images, args.force, args.input_size)
        print((output / "report.md").read_text())
        print(f"report: {output / 'report.json'}")
        return 0 if all(v["passed"] for v in document["verification"].values()) else 1
    from fnl.engine.checkpoint import CheckpointError, read_checkpoint
    from fnl.export.verify import FLOAT32, INT8
    from fnl.qat.pt2e import is_pt2e_checkpoint
    from fnl.qat.serialization import is_int8_checkpoint

    data = read_checkpoint(args.ckpt, args.unsafe_load)
    if is_pt2e_checkpoint(data):
        model, cfg, _ = load_pt2e_checkpoint(args.ckpt, args.unsafe_load)
        criteria = INT8
    elif is_int8_checkpoint(data):
        raise CheckpointError(f"{args.ckpt} is an eager-mode int8 checkpoint: fnl-export executorch exports the "
                              "model_pt2e.pth that fnl-quantize --engine pt2e writes, or a float checkpoint")
    else:
        cfg = _config(args)
        model, criteria = _load_model(cfg, args.ckpt, args.unsafe_load).eval(), FLOAT32
    if args.input_size is not None:
        cfg = cfg.clone()
        cfg.INPUT.MIN_SIZE_TEST = args.input_size
    images = _verification_images(cfg, args, criteria) if args.verify else []
    # The backbone program has a fixed size: the largest verification image, else the square test size.
    image_size = program_image_size(cfg)
    if images:
        image_size = tuple(max(size, *(program_image_size(cfg, image.shape[k])[0] for image in images))
                           for k, size in ((-2, image_size[0]), (-1, image_size[1])))
    directory = output / (EXECUTORCH_DIR if criteria is INT8 else EXECUTORCH_FLOAT_DIR)
    written = to_executorch(model, cfg, directory, args.force, image_size)
    print(f"wrote {', '.join(str(p) for p in written.files)} ({written.precision}, XNNPACK, {written.size_mb:.2f} MB)")
    if not args.verify:
        return 0
    report = verify_executorch(model, ExecuTorchPredictor(written.directory, args.threads), images, criteria)
    print(report.table())
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


def _export_and_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fnl.cli.common import ensure_dataset
    from fnl.export.pipeline import OUTPUTS, export_and_report, verification_passed
    from fnl.utils.io import refuse_overwrite

    if args.config or args.opts:
        raise InvalidArgumentError("--from-quantize uses the configs stored in its checkpoints: drop --config and KEY "
                                   "VALUE overrides (use --input-size and --data)")
    output = Path(args.output)
    for name in OUTPUTS:
        refuse_overwrite(output / name, args.force)
    document = export_and_report(args.from_quantize, output, ensure_dataset(args.data), threads=args.threads,
                                 input_size=args.input_size, verify_images=args.verify_images,
                                 calibration_images=args.calibration_images, opset=args.opset)
    print((output / "report.md").read_text())
    print(f"report: {output / 'report.json'}")
    if args.profile:
        from fnl.engine.checkpoint import config_from_checkpoint
        from fnl.export.pipeline import FLOAT_ONNX, INT8_ONNX, split_images

        # The test images the report measured on, at its test size.
        cfg = config_from_checkpoint(str(Path(args.from_quantize) / "model_fp32.pth"), allow_unsafe=args.unsafe_load)
        cfg.merge_from_list(["DATASETS.ROOT", ensure_dataset(args.data)]
                            + (["INPUT.MIN_SIZE_TEST", str(args.input_size)] if args.input_size else []))
        images = split_images(cfg, cfg.DATASETS.TEST[0], args.verify_images)
        _profile({"float32": output / FLOAT_ONNX, "int8": output / INT8_ONNX}, images, args)
    return 0 if verification_passed(document) else 1


def _profile(paths: dict[str, Path], images: list[torch.Tensor], args: argparse.Namespace) -> None:
    """Profile each graph of ``paths`` (name -> file) on ``images``; print the tables, write OUTPUT/profile.md."""
    from pathlib import Path

    from fnl.export.profile import format_profiles_markdown, profile_onnx
    from fnl.utils.io import write_text_atomic

    profiles = [profile_onnx(path, [image.numpy() for image in images], args.threads, f"ONNX {name}")
                for name, path in paths.items()]
    text = format_profiles_markdown(profiles)
    write_text_atomic(Path(args.output) / "profile.md", text)
    print(text)


def _load_model(cfg: CfgNode, ckpt: str, allow_unsafe: bool) -> GeneralizedRCNN:
    """The float model with every tensor from ``ckpt`` (an export must not carry initialisation weights), or the
    int8 model of an int8 checkpoint (rebuilt from the config stored in it)."""
    from fnl.engine.checkpoint import CheckpointError, load_state, read_checkpoint
    from fnl.modeling import build_model
    from fnl.qat.serialization import is_int8_checkpoint, load_int8_checkpoint

    data = read_checkpoint(ckpt, allow_unsafe)
    if is_int8_checkpoint(data):
        int8_model, _ = load_int8_checkpoint(ckpt, allow_unsafe)
        return int8_model
    if any(key.endswith(".zero_point") for key in data["model"]):
        raise CheckpointError(f"checkpoint {ckpt} holds a QAT (fake-quantized) training state, not an int8 model: "
                              "export the model_int8.pth that fnl-quantize writes")
    model = build_model(cfg)
    report = load_state(model, ckpt, allow_unsafe, data=data)
    missing = [key for key in report.missing if not key.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} lacks {len(missing)} of the model's tensors (e.g. "
                              f"{', '.join(missing[:3])}): the export would carry random weights for them. "
                              "Is --config the one it was trained with?")
    return model.eval()


def _verification_images(cfg: CfgNode, args: argparse.Namespace, criteria: Criteria | None = None
                         ) -> list[torch.Tensor]:
    """The first --verify-images test images of --data, resized as for evaluation; without --data, seeded random
    images whose sizes vary around the test size (not all multiples of the padding). With ``criteria``, refuses
    fewer images than those criteria judge on (``fnl.export.verify.require_images``)."""
    import torch

    from fnl.export.verify import require_images

    if criteria is not None:
        require_images(criteria, args.verify_images)
    if args.data:
        from fnl.data import build_test_loader

        data_cfg = _data_config(cfg, args.data)
        data_cfg.TEST.MAX_IMAGES = args.verify_images
        images = [item["image"] for batch in build_test_loader(data_cfg, data_cfg.DATASETS.TEST[0]) for item in batch]
        if criteria is not None:
            require_images(criteria, len(images))  # a test split smaller than --verify-images
        return images
    size = cfg.INPUT.MIN_SIZE_TEST
    shapes = [(size, size), (size, size * 4 // 3), (size, size * 3 // 2 + 5), (size * 4 // 3 + 7, size)]
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, *shapes[k % len(shapes)]), dtype=torch.uint8, generator=generator)
            for k in range(args.verify_images)]


def _data_config(cfg: CfgNode, data: str) -> CfgNode:
    """``cfg`` (unfrozen copy) reading the dataset under ``data``."""
    data_cfg = cfg.clone()
    data_cfg.DATASETS.ROOT = data
    return data_cfg


def _test_split_results(model: GeneralizedRCNN, onnx_path: Path, cfg: CfgNode, args: argparse.Namespace
                        ) -> tuple[dict, dict]:
    """Evaluator results of the PyTorch model and of its export on the test split (the same evaluator for both)."""
    from fnl.engine.benchmark import measure
    from fnl.export.onnx import model_precision
    from fnl.export.runtime import OnnxPredictor

    precision = model_precision(model)
    _, reference = measure(f"PyTorch {precision}", "pytorch", precision, "export", model, cfg, None)
    _, exported = measure(f"ONNX {precision}", "onnx", precision, "export",
                          OnnxPredictor(onnx_path, threads=args.threads), cfg, None)
    return reference, exported


if __name__ == "__main__":
    sys.exit(main())
