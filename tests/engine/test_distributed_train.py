"""fnl-train under torchrun: two CPU processes (gloo) train the tiny model B for a few iterations with
DistributedDataParallel; both must end with the same weights, and the checkpoint rank 0 saved must be those weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fnl.engine.checkpoint import config_from_checkpoint, load_state
from fnl.engine.train import RANK_WEIGHTS, parameter_digest
from fnl.modeling import build_model

pytestmark = pytest.mark.slow


def test_two_processes_end_with_the_same_weights_and_the_checkpoint_holds_them(tiny_dataset: Path,
                                                                               tmp_path: Path) -> None:
    output = tmp_path / "ddp"
    fnl_train = shutil.which("fnl-train", path=str(Path(sys.executable).parent))
    assert fnl_train is not None
    # One image per process and iteration (IMS_PER_BATCH 2 over 2 processes); one thread each on a 2-core machine.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
               fnl_train, "--config", "test_tiny", "--output", str(output), "--no-eval",
               "DATASETS.ROOT", str(tiny_dataset), "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    digests = json.loads((output / RANK_WEIGHTS).read_text())["parameters_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]

    checkpoint = output / "model_final.pth"
    model = build_model(config_from_checkpoint(checkpoint))
    untrained = parameter_digest(model)
    load_state(model, checkpoint, strict=True)
    assert parameter_digest(model) == digests[0]
    assert untrained != digests[0]  # the weights did train
    assert [record["iteration"] for record in json.loads((output / "train_history.json").read_text())] == [0, 1, 2]
    assert torch.isfinite(torch.tensor([r["total_loss"] for r in json.loads(
        (output / "train_history.json").read_text())])).all()
