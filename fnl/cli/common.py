"""What every command line shares: config loading with KEY VALUE overrides, and turning our errors into one clear
line on stderr with exit status 2 instead of a traceback."""

from __future__ import annotations

import argparse
import logging
import os
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
    from fnl.utils.io import UnwritableOutputError

    errors: list[type[BaseException]] = [ConfigError, CheckpointError, NonFiniteLossError, ImageShapeError,
                                         FileNotFoundError, FileExistsError, UnwritableOutputError]
    try:
        from fnl.data import DatasetError

        errors.append(DatasetError)
    except ImportError:
        pass
    return tuple(errors)


def run_cli(main: Callable[[], int | None], prog: str) -> int:
    from fnl.utils.logging import close_log_files

    close_log_files()  # a command logs into its own output only (several may run in one process)

    def fail(message: str) -> int:
        """The error on stderr and, when the run has one, in its log.txt: a log must say why it ends."""
        line = f"{prog}: error: {message}"
        print(line, file=sys.stderr)
        for handler in logging.getLogger("fnl").handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(logging.makeLogRecord({"name": "fnl", "levelno": logging.ERROR,
                                                      "levelname": "ERROR", "msg": line}))
        return 2

    try:
        return int(main() or 0)
    except user_errors() as exc:
        return fail(str(exc))
    except ValueError as exc:
        # Config values that fail validation deep in model construction raise ValueError with the key named.
        return fail(str(exc))
    except OSError as exc:
        # A disk that fills up or turns read-only during the run: one line naming the file, not a traceback.
        from fnl.utils.io import describe_disk_error

        message = describe_disk_error(exc)
        if message is None:
            raise
        return fail(message)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


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


def load_model_for_inference(ckpt: str, config: str | None, overrides: list[str], allow_unsafe: bool = False):
    """A float or int8 PyTorch model from a checkpoint, with its config (the stored one unless ``config``)."""
    from fnl.engine.checkpoint import load_state, read_checkpoint
    from fnl.modeling import build_model
    from fnl.qat.report import resolve_config
    from fnl.qat.serialization import is_int8_checkpoint, load_int8_checkpoint

    data = read_checkpoint(ckpt, allow_unsafe)
    if is_int8_checkpoint(data):
        model, stored = load_int8_checkpoint(ckpt, allow_unsafe)
        cfg = stored.clone()
        if config:
            cfg.merge_from_file(config)
        cfg.merge_from_list(overrides)
        return model, cfg.freeze()
    cfg = resolve_config(ckpt, config, overrides, allow_unsafe)
    model = build_model(cfg)
    load_state(model, ckpt, allow_unsafe, data=data)
    return model.eval(), cfg
