"""fnl-convert --from detectron2|densepose-fnl --ckpt FILE --output model.pth [--config FILE] [KEY VALUE ...]: a
checkpoint trained with detectron2's DensePose (its model zoo's model_final_*.pkl) or with DensePoseFnL (its
Mobile-Parsing-RCNN-B .pth) as an fnl checkpoint for fnl-quantize, fnl-export and fnl-eval. --config takes an fnl
config or the detectron2 / DensePoseFnL YAML the model was trained with (default: configs/
densepose_rcnn_R_50_FPN_s1x.yaml, configs/densepose_fnl_b_s3x.yaml). Checkpoint keys the model does not use are
listed by name, each with the reason."""

from __future__ import annotations

import argparse
import sys

from fnl.cli.common import add_config_arguments, config_from_args, run_cli

DEFAULT_CONFIG = {"detectron2": "densepose_rcnn_R_50_FPN_s1x", "densepose-fnl": "densepose_fnl_b_s3x"}
# The channel order each source's models take unless its config says (detectron2's INPUT.FORMAT default; all of
# DensePoseFnL's released configs set RGB).
DEFAULT_INPUT_FORMAT = {"detectron2": "BGR", "densepose-fnl": "RGB"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnl-convert", description=__doc__)
    parser.add_argument("--from", dest="source", choices=sorted(DEFAULT_CONFIG), required=True,
                        help="the framework that wrote --ckpt")
    parser.add_argument("--ckpt", required=True, help="the checkpoint to convert (.pkl or .pth)")
    parser.add_argument("--output", required=True, help="the fnl checkpoint to write (.pth), with its config")
    parser.add_argument("--input-format", choices=["BGR", "RGB"],
                        help="channel order the model was trained on (detectron2's INPUT.FORMAT; default: the "
                             "upstream config's, else BGR for detectron2 and RGB for densepose-fnl); fnl takes RGB, "
                             "so a BGR model's first conv gets its input channels reversed")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="load a checkpoint that holds arbitrary pickled objects (only for trusted files)")
    add_config_arguments(parser, required=False)
    args = parser.parse_args(argv)

    def run() -> int:
        from fnl.config.densepose_fnl import is_densepose_fnl_config, load_densepose_fnl_config
        from fnl.config.detectron2 import is_detectron2_config, load_detectron2_config
        from fnl.engine.convert import convert_checkpoint

        args.config = args.config or DEFAULT_CONFIG[args.source]
        input_format = args.input_format or DEFAULT_INPUT_FORMAT[args.source]
        # the user's upstream YAML, as written (DensePoseFnL's are detectron2 configs with more keys: checked first)
        dialect = next(((name, load) for name, is_dialect, load in (
            ("DensePoseFnL", is_densepose_fnl_config, load_densepose_fnl_config),
            ("detectron2", is_detectron2_config, load_detectron2_config)) if is_dialect(args.config)), None)
        if dialect:
            name, load = dialect
            upstream = load(args.config, ["MODEL.DEVICE", "cpu", *args.opts])
            cfg, input_format = upstream.cfg, args.input_format or upstream.input_format
            print(f"{args.config}: {name} config; {len(upstream.ignored)} keys ignored:")
            print("\n".join(f"  {key}: {reason}" for key, reason in upstream.ignored.items()))
        else:
            cfg = config_from_args(args, ["MODEL.DEVICE", "cpu"])
        report = convert_checkpoint(args.ckpt, cfg, args.output, args.source, input_format, args.unsafe_load)
        print(report.summary())
        return 0

    return run_cli(run, "fnl-convert")


if __name__ == "__main__":
    sys.exit(main())
