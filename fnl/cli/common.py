"""What every command line shares: config loading with KEY VALUE overrides, and turning our errors into one clear
line on stderr with exit status 2 instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fnl.config import CfgNode, ConfigError, load_config


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config (path, or a name in configs/)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs, e.g. SOLVER.MAX_ITER 100")


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> CfgNode:
    return load_config(args.config, [*extra, *args.opts])


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: shown as one line, never as a traceback."""
    from fnl.engine.checkpoint import CheckpointError
    from fnl.engine.train import NonFiniteLossError
    from fnl.modeling import ImageShapeError

    errors: list[type[BaseException]] = [ConfigError, CheckpointError, NonFiniteLossError, ImageShapeError,
                                         FileNotFoundError, FileExistsError]
    try:
        from fnl.data import DatasetError

        errors.append(DatasetError)
    except ImportError:
        pass
    return tuple(errors)


def run_cli(main: Callable[[], int | None], prog: str) -> int:
    try:
        return int(main() or 0)
    except user_errors() as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # Config values that fail validation deep in model construction raise ValueError with the key named.
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def ensure_dir(path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
