"""QAT from a float checkpoint: the float training loop (``fnl.engine.train.run_iterations``) on the fake-quant
model, with a small learning rate, BN statistics frozen after FREEZE_BN_ITER and observers after
FREEZE_OBSERVER_ITER, periodic checkpoints and ``--resume``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from fnl.config import CfgNode
from fnl.data import build_train_loader
from fnl.engine.checkpoint import CheckpointError, checkpoints_kept
from fnl.engine.checkpointer import FINAL_CHECKPOINT, QAT_LAST_CHECKPOINT, QAT_PREFIX, Checkpointer
from fnl.engine.train import build_optimizer, build_scheduler, run_iterations
from fnl.qat.quantize import apply_frozen_state, freeze_schedule

logger = logging.getLogger("fnl")


def qat_solver_config(cfg: CfgNode) -> CfgNode:
    """The SOLVER section QAT runs with: QUANTIZATION's schedule, one LR drop at 80%, the float run's momentum."""
    q = cfg.QUANTIZATION
    qat_cfg = cfg.clone()
    # QAT fine-tunes trained weights at a small LR with SGD whatever optimizer trained them: AdamW's per-weight
    # step sizes would move every weight by about BASE_LR at once, far more than the quantization needs.
    qat_cfg.SOLVER.OPTIMIZER = "SGD"
    qat_cfg.SOLVER.BASE_LR = q.BASE_LR
    qat_cfg.SOLVER.MAX_ITER = q.MAX_ITER
    qat_cfg.SOLVER.STEPS = [int(0.8 * q.MAX_ITER)]
    qat_cfg.SOLVER.WARMUP_ITERS = q.WARMUP_ITERS
    qat_cfg.SOLVER.CHECKPOINT_PERIOD = q.CHECKPOINT_PERIOD
    return qat_cfg.freeze()


def quantization_aware_training(prepared: nn.Module, cfg: CfgNode, output_dir: str | Path, resume: bool = False
                                ) -> list[dict[str, float]]:
    """Train ``prepared`` (the output of ``fnl.qat.prepare(..., mode="qat")``) in place; returns the loss history."""
    output_dir = Path(output_dir)
    qat_cfg = qat_solver_config(cfg)
    optimizer = build_optimizer(qat_cfg, prepared)
    keep = checkpoints_kept(cfg, "QUANTIZATION.CHECKPOINTS_KEPT")
    stage = {"stage": "qat", "backend": cfg.QUANTIZATION.BACKEND}
    checkpointer = Checkpointer(output_dir, prepared, cfg, optimizer, keep, marker=QAT_LAST_CHECKPOINT,
                                prefix=QAT_PREFIX, extra={"quantization": stage})
    checkpoint, start_iter = checkpointer.resume(load_prepared_state) if resume else (None, 0)
    if checkpoint is not None:
        apply_frozen_state(prepared, cfg, start_iter)
        logger.info("resuming QAT from %s at iteration %d", checkpoint, start_iter)
    scheduler = build_scheduler(qat_cfg, optimizer, start_iter)

    batches = iter(build_train_loader(cfg, start_iter=start_iter))
    history = run_iterations(
        prepared, batches, optimizer, scheduler, range(start_iter, qat_cfg.SOLVER.MAX_ITER),
        clip_gradients=cfg.SOLVER.CLIP_GRADIENTS, checkpoint_period=qat_cfg.SOLVER.CHECKPOINT_PERIOD,
        save=checkpointer.save,
        on_iteration=freeze_schedule(prepared, cfg), description="qat",
        resumed_from=(checkpoint.name, start_iter - 1) if checkpoint is not None else None,
    )
    checkpointer.save(FINAL_CHECKPOINT, qat_cfg.SOLVER.MAX_ITER - 1)
    return history


def load_prepared_state(prepared: nn.Module, path: Path, data: dict[str, Any]) -> None:
    """A QAT checkpoint into the prepared (fake-quant) model: every key must fit, or a CheckpointError names them."""
    missing, unexpected = prepared.load_state_dict(data["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"QAT checkpoint {path} does not fit this model: {len(missing)} missing, "
                              f"{len(unexpected)} unexpected keys (e.g. {(missing or unexpected)[:3]})")
