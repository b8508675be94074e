"""README's commands table says what every command's --help says: no option the command lacks, none it has left out
(the options the note under the table names as shared count as listed)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
OPTION = re.compile(r"--[a-z][a-z0-9-]*")
ENTRY_POINTS = {"fnl-data": "data", "fnl-train": "train", "fnl-eval": "evaluate", "fnl-predict": "predict",
                "fnl-summary": "summary", "fnl-quantize": "quantize", "fnl-export": "export", "fnl-gate": "gate",
                "fnl-convert": "convert", "fnl-demo": "demo"}


def table_rows() -> tuple[list[tuple[str, str]], set[str]]:
    """(command cell, description cell) of each row of the table under '## Commands', and the options that the
    paragraph after it names as shared by the commands that list them."""
    section = README.read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    lines = section.strip().splitlines()
    rows = [re.split(r"(?<!\\)\|", line)[1:3] for line in lines if line.startswith("| `")]
    after_table = "\n".join(line for line in lines if not line.startswith("|"))
    return [(command.strip(), description.strip()) for command, description in rows], set(OPTION.findall(after_table))


def commands_of(cell: str) -> list[tuple[str, str | None]]:
    """(program, subcommand) pairs a command cell stands for: `fnl-export onnx\\|caffe2 ...` is two."""
    words = cell.strip("`").split()
    if len(words) > 1 and not words[1].startswith("-"):
        return [(words[0], sub) for sub in words[1].split("\\|")]
    return [(words[0], None)]


def help_options(program: str, subcommand: str | None, capsys) -> set[str]:
    """The options ``--help`` lists (the names at the start of its option lines, not options its texts mention)."""
    main = importlib.import_module(f"fnl.cli.{ENTRY_POINTS[program]}").main
    with pytest.raises(SystemExit):
        main([subcommand, "--help"] if subcommand else ["--help"])
    names = [re.split(r"\s{2,}", line.strip())[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("  -")]
    return {option for name in names for option in OPTION.findall(name)} - {"--help"}


def test_every_command_is_in_the_table():
    rows, _ = table_rows()
    assert {commands_of(cell)[0][0] for cell, _ in rows} == set(ENTRY_POINTS)


def test_the_table_lists_exactly_the_options_of_each_commands_help(capsys):
    rows, shared = table_rows()
    listed: dict[tuple[str, str | None], set[str]] = {}
    for cell, description in rows:
        for command in commands_of(cell):
            in_help = help_options(*command, capsys)
            stale = set(OPTION.findall(cell)) - in_help
            assert not stale, f"README lists {sorted(stale)} for {command}, which its --help does not have"
            listed.setdefault(command, set()).update(OPTION.findall(cell + description))
    for command, options in listed.items():
        missing = help_options(*command, capsys) - options - shared
        assert not missing, f"{command} has {sorted(missing)}, which README's table does not list"
