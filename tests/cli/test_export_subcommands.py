"""fnl-export's formats are subcommands with only their own options; the former --format spelling still parses to
the same command."""

from __future__ import annotations

import pytest

from fnl.cli.export import FORMATS, build_parser, with_format_subcommand


def parsed(argv: list[str]) -> dict:
    return vars(build_parser().parse_args(with_format_subcommand(argv)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_format_flag_is_the_same_command_as_the_subcommand(fmt):
    options = ["--ckpt", "m.pth", "--output", "out", "--verify", "--threads", "1"]
    assert parsed([*options[:2], "--format", fmt, *options[2:]]) == parsed([fmt, *options])
    assert parsed([f"--format={fmt}", *options]) == parsed([fmt, *options])
    assert parsed([fmt, *options])["format"] == fmt


def test_without_format_or_subcommand_it_is_onnx_as_before():
    assert parsed(["--ckpt", "m.pth", "--output", "out"]) == parsed(["onnx", "--ckpt", "m.pth", "--output", "out"])


@pytest.mark.parametrize("argv, refused", [
    (["caffe2", "--from-quantize", "q", "--output", "o"], "--from-quantize is an option of fnl-export onnx|executorch"),
    (["executorch", "--ckpt", "m.pth", "--output", "o", "--config", "c.yaml"], "unrecognized arguments: --config"),
    (["executorch", "--ckpt", "m.pth", "--output", "o", "--calibration-images", "4"], "unrecognized arguments"),
    (["onnx", "--ckpt", "m.pth", "--from-quantize", "q", "--output", "o"], "not allowed with argument"),
    (["tflite", "--ckpt", "m.pth", "--output", "o"], "invalid choice: 'tflite'"),
])
def test_a_combination_a_format_does_not_take_cannot_be_typed(argv, refused, capsys):
    with pytest.raises(SystemExit) as exit_status:
        build_parser().parse_args(with_format_subcommand(argv))
    assert exit_status.value.code == 2
    assert refused in capsys.readouterr().err
