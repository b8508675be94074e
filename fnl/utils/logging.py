"""One logger for the package, writing to the console and to ``log.txt`` in the output directory."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes, not as it was when the handler was made: notebooks
    and test runners replace it, and a handler holding the old, closed stream prints "Logging error" tracebacks."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def close_log_files(name: str = "fnl", keep: Path | None = None) -> None:
    """Stop logger ``name`` writing to its log files (all but ``keep``)."""
    logger = logging.getLogger(name)
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        if keep is None or Path(handler.baseFilename) != keep:
            logger.removeHandler(handler)
            handler.close()


def setup_logger(output_dir: str | Path | None = None, name: str = "fnl", filename: str = "log.txt") -> logging.Logger:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in logger.handlers):
        console = _CurrentStderrHandler()
        console.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        logger.addHandler(console)
    if output_dir is not None:
        log_path = (Path(output_dir) / filename).resolve()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # One log file at a time: a process running several stages (fnl-demo, tests) logs each into its own only.
        close_log_files(name, keep=log_path)
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == log_path for h in logger.handlers):
            file_handler = logging.FileHandler(log_path)
            file_handler.setFormatter(logging.Formatter(_FORMAT))
            logger.addHandler(file_handler)
    return logger
