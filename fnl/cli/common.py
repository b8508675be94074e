"""What every command line shares: config loading with KEY VALUE overrides, and how a command ends on an error: a
user's mistake (``fnl.utils.errors.UserError``) as one line on stderr with exit status 2, a bug in fnl with its
traceback and a request to report it, exit status 1."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fnl.config import CfgNode, load_config
from fnl.utils.errors import UserError
from fnl.utils.io import describe_disk_error
from fnl.utils.logging import close_log_files

STORED_CONFIG_HELP = "config (path, or a name in configs/); default: the one stored in the checkpoint"


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True,
                         config_help: str = "YAML config (path, or a name in configs/)") -> None:
    """--config and the trailing KEY VALUE overrides (``args.opts``), the same in every command that takes them."""
    parser.add_argument("--config", required=required, help=config_help)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs, e.g. SOLVER.MAX_ITER 100")


class DeprecatedAlias(argparse.Action):
    """Stores an option's value like ``store``; used under one of ``deprecated`` (old spellings kept working), it
    names the current spelling on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, deprecated: Sequence[str] = (), **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.deprecated = tuple(deprecated)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string in self.deprecated:
            print(f"{parser.prog}: warning: {option_string} is deprecated, use {self.option_strings[0]}",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> CfgNode:
    return load_config(args.config, [*extra, *args.opts])


# The user's to fix: fnl's own UserError, an input file that is not there, an output that already is.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError)
BUG_REPORT = ("this is a bug in fnl, not a mistake in the command: please report it with the traceback above and "
              "the command line")


def _log_line(line: str) -> None:
    """``line`` into the run's log.txt too, when it has one: a log must say why the run ended."""
    for handler in logging.getLogger("fnl").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logging.makeLogRecord({"name": "fnl", "levelno": logging.ERROR, "levelname": "ERROR",
                                                  "msg": line}))


def run_cli(main: Callable[[], int | None], prog: str) -> int:
    """``main``'s exit status; a ``USER_ERRORS`` error (or a full / read-only disk) as one line ``PROG: error: ...``,
    status 2; any other exception, a bug, with its traceback and ``BUG_REPORT``, status 1."""
    close_log_files()  # a command logs into its own output only (several may run in one process)

    def fail(message: str) -> int:
        line = f"{prog}: error: {message}"
        print(line, file=sys.stderr)
        _log_line(line)
        return 2

    try:
        return int(main() or 0)
    except USER_ERRORS as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A disk that fills up or turns read-only during the run: one line naming the file, not a traceback.
        message = describe_disk_error(exc) if isinstance(exc, OSError) else None
        if message is not None:
            return fail(message)
        traceback.print_exc()
        line = f"{prog}: {BUG_REPORT}"
        print(line, file=sys.stderr)
        _log_line(f"{line}\n{traceback.format_exc()}")
        return 1


def ensure_dir(path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


# The embedded default dataset: what --data falls back to.
DEFAULT_SYNTHETIC = {"num_images": 600, "seed": 0, "image_size": 256, "val_fraction": 0.1}


def default_dataset_root() -> Path:
    base = Path(os.environ.get("FNL_CACHE", Path.home() / ".cache" / "fnl"))
    d = DEFAULT_SYNTHETIC
    return base / f"synth-v1-n{d['num_images']}-s{d['seed']}-px{d['image_size']}"


def ensure_dataset(data: str | None) -> str:
    """The dataset root to use: the user's (checked), or the embedded synthetic set, generated on first use."""
    import json

    from fnl.data.catalog import resolve_split

    if data:
        resolve_split(data, "val")  # fails with the missing path named
        return data
    from fnl.data.synthetic import generate_synthetic_dataset
    from fnl.data.synthetic.generate import GENERATOR_VERSION

    root = default_dataset_root()
    info = root / "synth_info.json"
    if info.is_file():
        recorded = json.loads(info.read_text())
        expected = {**DEFAULT_SYNTHETIC, "version": GENERATOR_VERSION}
        if all(recorded.get(k) == v for k, v in expected.items()):
            return str(root)

    generate_synthetic_dataset(root, workers=min(2, os.cpu_count() or 1), force=True, **DEFAULT_SYNTHETIC)
    return str(root)
