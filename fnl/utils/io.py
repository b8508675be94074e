"""Atomic output: write to a temporary file beside the target, then rename, so an interrupted run never leaves
a half-written model, report or dataset file behind."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fnl.utils.errors import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the output the permissions a plain open() would (umask applied).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# The temporaries atomic_path creates: "." + target name + "." + mkstemp's 8 random characters + ".tmp".
_TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete what interrupted atomic writes (``kill -9``, power loss) left in ``directory``; call it when a run
    starts or resumes there, before it writes anything. Returns the files removed."""
    directory = Path(directory)
    stale = sorted(p for p in directory.iterdir() if p.is_file() and _TEMPORARY_NAME.fullmatch(p.name))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def refuse_overwrite(path: str | Path, force: bool) -> None:
    """Outputs never replace a user's file silently: an existing target needs ``force``."""
    if Path(path).exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")


class UnwritableOutputError(UserError, ValueError):
    """An output directory cannot be created or written; the message names it and says why."""


def check_output_dir(path: str | Path) -> Path:
    """Fail now, with one line naming ``path``, if it cannot become a writable directory: before any long work
    starts, and without creating anything (so that a run refused for another reason leaves no empty directory)."""
    path = Path(path)
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UnwritableOutputError(f"output directory {path}: {existing} is a file, not a directory")
    stats = os.statvfs(existing)
    if stats.f_flag & os.ST_RDONLY:
        raise UnwritableOutputError(f"output directory {path}: {existing} is on a read-only file system")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UnwritableOutputError(f"output directory {path}: no permission to write in {existing}")
    if stats.f_bavail == 0:
        raise UnwritableOutputError(f"output directory {path}: no space left on the device holding {existing}")
    return path


# Failures that say something about the disk or its permissions, not about the program: the first only happen
# when writing, the second when reading or writing.
WRITE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
ACCESS_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR})


def describe_disk_error(exc: OSError) -> str | None:
    """One line for an I/O call that failed because of the disk (full, read-only, no permission), else None."""
    if exc.errno in WRITE_ERRNOS:
        where = exc.filename if exc.filename is not None else "an output file"
        return f"cannot write {where}: {exc.strerror or exc}"
    if exc.errno in ACCESS_ERRNOS:
        where = exc.filename if exc.filename is not None else "a file"
        return f"cannot access {where}: {exc.strerror or exc}"
    return None
