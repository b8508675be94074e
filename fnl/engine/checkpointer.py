"""The training checkpoints of a run directory, one implementation for float training (``fnl.engine.train``) and
QAT (``fnl.qat.train``): save a checkpoint and point the run's marker file at it, prune old periodic ones, find the
one ``--resume`` continues from and load model and optimizer state from it. The run directory's file names are the
constants below, used wherever those files are written or read."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fnl.config import CfgNode
from fnl.engine.checkpoint import prune_periodic_checkpoints, read_checkpoint, save_checkpoint
from fnl.utils.io import write_text_atomic

logger = logging.getLogger("fnl")

# The files of a run directory (fnl-train's OUTPUT_DIR, fnl-quantize's --output).
LAST_CHECKPOINT = "last_checkpoint"  # the name of the float checkpoint --resume continues from
QAT_LAST_CHECKPOINT = "last_qat_checkpoint"  # the same for QAT
QAT_PREFIX = "qat_"  # QAT checkpoints: this prefix + the float training's file names
FINAL_CHECKPOINT = "model_final.pth"
CONFIG_FILE = "config.yaml"
TRAIN_HISTORY_FILE = "train_history.json"
METRICS_FILE = "metrics.json"
FLOAT32_MODEL = "model_fp32.pth"  # fnl-quantize: the float model it quantized, as evaluated
INT8_MODEL = "model_int8.pth"  # fnl-quantize: the int8 model (eager engine)
INT8_PTQ_MODEL = "model_int8_ptq.pth"  # fnl-quantize: its PTQ baseline

LoadModel = Callable[[nn.Module, Path, dict[str, Any]], None]


@dataclass
class Checkpointer:
    """The checkpoints one training run writes into ``output_dir``: ``prefix`` + the loop's file names, the last one
    named in ``marker``, at most ``keep`` periodic ones (0: all), each with ``extra`` entries beside the model, its
    config, iteration and optimizer state."""

    output_dir: Path
    model: nn.Module
    cfg: CfgNode
    optimizer: torch.optim.Optimizer
    keep: int
    marker: str = LAST_CHECKPOINT
    prefix: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, name: str, iteration: int) -> Path:
        """``model`` as ``prefix + name`` after ``iteration``, named in the marker; old periodic ones pruned."""
        path = self.output_dir / f"{self.prefix}{name}"
        save_checkpoint(path, self.model, self.cfg, iteration, optimizer=self.optimizer.state_dict(), **self.extra)
        write_text_atomic(self.output_dir / self.marker, path.name)
        logger.info("saved %s (iteration %d)", path, iteration)
        prune_periodic_checkpoints(self.output_dir, self.keep, prefix=self.prefix)
        return path

    def last_checkpoint(self) -> Path | None:
        """The checkpoint the marker names, if both exist: what --resume continues from."""
        marker = self.output_dir / self.marker
        if not marker.is_file():
            return None
        path = self.output_dir / marker.read_text().strip()
        return path if path.is_file() else None

    def resume(self, load_model: LoadModel) -> tuple[Path | None, int]:
        """Load ``last_checkpoint()`` into the model (through ``load_model(model, path, data)``, which refuses a
        checkpoint that does not fit) and the optimizer; (that checkpoint, the iteration to continue at), or
        (None, 0) when there is none."""
        path = self.last_checkpoint()
        if path is None:
            return None, 0
        data = read_checkpoint(path)
        load_model(self.model, path, data)
        if "optimizer" in data:
            self.optimizer.load_state_dict(data["optimizer"])
        return path, int(data.get("iteration", -1)) + 1
