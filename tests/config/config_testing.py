"""Shared by the upstream-config tests (detectron2, DensePoseFnL)."""

from __future__ import annotations

import shutil
from pathlib import Path


def write_user_config(tmp_path: Path, upstream: Path, chain: tuple[str, ...], body: str) -> Path:
    """A user's ``mine.yaml`` with ``body`` over the last of ``chain``, the upstream files it needs copied beside it
    (an upstream config reaches its ``_BASE_`` files by relative path)."""
    for name in chain:
        shutil.copy(upstream / name, tmp_path)
    path = tmp_path / "mine.yaml"
    path.write_text(f'_BASE_: "{chain[-1]}"\n' + body)
    return path
