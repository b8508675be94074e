"""QAT from a float checkpoint: the float training loop (``fnl.engine.train.run_iterations``) on the fake-quant
model, with a small learning rate, BN statistics frozen after FREEZE_BN_ITER and observers after
FREEZE_OBSERVER_ITER, periodic checkpoints and ``--resume``."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from fnl.config import CfgNode
from fnl.data import build_train_loader
from fnl.engine.checkpoint import (
    CheckpointError,
    checkpoints_kept,
    prune_periodic_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from fnl.engine.train import build_optimizer, build_scheduler, resume_path, run_iterations
from fnl.qat.quantize import apply_frozen_state, freeze_schedule
from fnl.utils.io import write_text_atomic

logger = logging.getLogger("fnl")
QAT_LAST_CHECKPOINT = "last_qat_checkpoint"
QAT_PREFIX = "qat_"  # QAT checkpoints: this prefix + the training loop's file name


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
    start_iter = 0
    checkpoint = resume_path(output_dir, QAT_LAST_CHECKPOINT) if resume else None
    if checkpoint is not None:
        data = read_checkpoint(checkpoint)
        missing, unexpected = prepared.load_state_dict(data["model"], strict=False)
        if missing or unexpected:
            raise CheckpointError(f"QAT checkpoint {checkpoint} does not fit this model: {len(missing)} missing, "
                                  f"{len(unexpected)} unexpected keys (e.g. {(missing or unexpected)[:3]})")
        optimizer.load_state_dict(data["optimizer"])
        start_iter = int(data["iteration"]) + 1
        apply_frozen_state(prepared, cfg, start_iter)
        logger.info("resuming QAT from %s at iteration %d", checkpoint, start_iter)
    scheduler = build_scheduler(qat_cfg, optimizer, start_iter)

    keep = checkpoints_kept(cfg, "QUANTIZATION.CHECKPOINTS_KEPT")

    def save(name: str, iteration: int) -> None:
        save_checkpoint(output_dir / f"{QAT_PREFIX}{name}", prepared, cfg, iteration,
                        optimizer=optimizer.state_dict(),
                        quantization={"stage": "qat", "backend": cfg.QUANTIZATION.BACKEND})
        write_text_atomic(output_dir / QAT_LAST_CHECKPOINT, f"{QAT_PREFIX}{name}")
        prune_periodic_checkpoints(output_dir, keep, prefix=QAT_PREFIX)

    batches = iter(build_train_loader(cfg, start_iter=start_iter))
    history = run_iterations(
        prepared, batches, optimizer, scheduler, range(start_iter, qat_cfg.SOLVER.MAX_ITER),
        clip_gradients=cfg.SOLVER.CLIP_GRADIENTS, checkpoint_period=qat_cfg.SOLVER.CHECKPOINT_PERIOD, save=save,
        on_iteration=freeze_schedule(prepared, cfg), description="qat",
        resumed_from=(checkpoint.name, start_iter - 1) if checkpoint is not None else None,
    )
    save("model_final.pth", qat_cfg.SOLVER.MAX_ITER - 1)
    return history
