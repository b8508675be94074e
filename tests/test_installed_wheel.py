"""fnl installed from its wheel into a fresh venv, run away from the checkout: the shipped configs and the model zoo
are package data, found without the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from: the package (with its links to configs/ and model_zoo/) and the build metadata.
WHEEL_SOURCES = ("fnl", "configs", "model_zoo", "setup.cfg", "pyproject.toml", "README.md")


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(c) for c in command], cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with only the fnl wheel installed in it; fnl's dependencies come from this test's environment."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so that the build leaves no build/ or egg-info in the checkout
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    # --no-build-isolation: the build uses this environment's setuptools instead of downloading one.
    built = _run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-q",
                 "-w", root / "dist", cwd=root)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("fnl-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = _run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                   cwd=root).stdout.strip()
    # This environment's site-packages after the venv's own: the dependencies (and pip) without a download. A
    # directory named in a .pth file is not scanned for .pth files, so the checkout's editable install of fnl in it
    # stays off the venv's path.
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel,
                     cwd=root)
    assert installed.returncode == 0, installed.stderr
    return venv


def test_installed_package_is_the_wheel_and_zoo_resolves_inside_it(venv: Path, tmp_path: Path) -> None:
    found = _run(venv / "bin" / "python", "-c",
                 "import fnl; from fnl.engine.checkpoint import resolve_checkpoint; "
                 "print(fnl.__file__); print(resolve_checkpoint('zoo:synth_b_512'))", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    package, model = (Path(line) for line in found.stdout.split())
    assert package.is_relative_to(venv) and not package.is_relative_to(REPO)
    assert model.is_relative_to(package.parent) and model.is_file() and not model.is_symlink()


def test_summary_reads_a_shipped_config(venv: Path, tmp_path: Path) -> None:
    summary = _run(venv / "bin" / "fnl-summary", "--config", "mobile_parsing_rcnn_b", "--json", cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr
    figures = json.loads(summary.stdout)
    assert set(figures["params"]) == {"backbone", "neck", "rpn", "roi_heads"}
    assert 3.3e6 < figures["params_total"] < 3.6e6


def test_demo_first_stage_finds_data_and_shipped_model(venv: Path, tmp_path: Path) -> None:
    demo = _run(venv / "bin" / "fnl-demo", "--output", tmp_path / "demo", "--stop-after", "data", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "float model " + str(venv) in demo.stdout
