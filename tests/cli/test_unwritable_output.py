"""An --output that cannot be written is one line naming it, exit status 2, before any checkpoint, dataset or model
is touched. Root ignores chmod, so the unwritable places here are below a regular file and a full device."""

from pathlib import Path

import pytest

import fnl.cli.export
import fnl.cli.predict
import fnl.cli.quantize
import fnl.cli.train
from fnl.cli.common import BUG_REPORT, run_cli
from fnl.utils.errors import InvalidArgumentError

# Nonexistent checkpoints and dataset: had the commands touched them first, the error would name them instead.
COMMANDS = {
    "fnl-quantize": (fnl.cli.quantize.main, ["--ckpt", "missing.pth", "--data", "no_dataset_here"]),
    "fnl-train": (fnl.cli.train.main, ["--config", "test_tiny"]),
    "fnl-export": (fnl.cli.export.main, ["--ckpt", "missing.pth"]),
    "fnl-predict": (fnl.cli.predict.main, ["--ckpt", "missing.pth", "--input", "no_images_here"]),
}


def output_argv(prog: str, output: Path) -> list[str]:
    main, argv = COMMANDS[prog]
    return ["--output", str(output), *argv]


@pytest.mark.parametrize("prog", COMMANDS)
def test_an_output_below_a_regular_file_is_one_line_naming_it(prog, tmp_path, capsys):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file where a directory was expected")
    output = blocker / "out"
    main, _ = COMMANDS[prog]
    assert main(output_argv(prog, output)) == 2
    err = capsys.readouterr().err
    assert err == f"{prog}: error: output directory {output}: {blocker} is a file, not a directory\n"


@pytest.mark.parametrize("prog", COMMANDS)
def test_an_output_that_is_a_regular_file_is_refused_and_left_alone(prog, tmp_path, capsys):
    output = tmp_path / "out"
    output.write_text("keep me")
    main, _ = COMMANDS[prog]
    assert main(output_argv(prog, output)) == 2
    assert capsys.readouterr().err == f"{prog}: error: output directory {output}: {output} is a file, not a directory\n"
    assert output.read_text() == "keep me"


def test_a_disk_that_fills_during_the_run_is_one_line(capsys):
    def write_to_a_full_device() -> int:
        with open("/dev/full", "wb") as handle:
            handle.write(b"model bytes")
        return 0

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    assert run_cli(write_to_a_full_device, "fnl-x") == 2
    assert capsys.readouterr().err == "fnl-x: error: cannot write an output file: No space left on device\n"


def test_a_path_through_a_regular_file_is_one_line_naming_it(tmp_path, capsys):
    blocker = tmp_path / "weights.pth"
    blocker.write_bytes(b"")
    assert run_cli(lambda: (blocker / "config.yaml").read_bytes(), "fnl-x") == 2
    assert capsys.readouterr().err == f"fnl-x: error: cannot access {blocker / 'config.yaml'}: Not a directory\n"


def test_an_error_not_about_the_disk_keeps_its_traceback(capsys):
    def broken() -> int:
        raise OSError(5, "Input/output error")

    assert run_cli(broken, "fnl-x") == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "OSError: [Errno 5] Input/output error" in err
    assert err.endswith(f"fnl-x: {BUG_REPORT}\n")


def test_a_value_error_inside_fnl_is_a_bug_not_a_user_mistake(capsys):
    def broken() -> int:
        raise ValueError("shapes do not match")  # what a bug deep in the model raises

    assert run_cli(broken, "fnl-x") == 1
    err = capsys.readouterr().err
    assert "ValueError: shapes do not match" in err and "error:" not in err and BUG_REPORT in err


def test_a_user_error_is_one_line_without_traceback(capsys):
    def wrong_flag() -> int:
        raise InvalidArgumentError("--input-size must be at least 32, got 8")

    assert run_cli(wrong_flag, "fnl-x") == 2
    assert capsys.readouterr().err == "fnl-x: error: --input-size must be at least 32, got 8\n"
