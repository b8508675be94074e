"""The training loop: SGD with linear warm-up and multi-step decay (the paper's schedule), periodic checkpoints,
``--resume``, evaluation at the end, tqdm progress and a log file; DDP when started with torchrun."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fnl.config import CfgNode, ConfigError
from fnl.data import build_train_loader
from fnl.engine.checkpoint import checkpoints_kept, load_state, periodic_checkpoint_name
from fnl.engine.checkpointer import (
    CONFIG_FILE,
    FINAL_CHECKPOINT,
    LAST_CHECKPOINT,
    METRICS_FILE,
    TRAIN_HISTORY_FILE,
    Checkpointer,
)
from fnl.engine.inference import evaluate_model
from fnl.modeling import build_model
from fnl.utils.errors import UserError
from fnl.utils.io import remove_stale_temporaries, write_json_atomic, write_text_atomic
from fnl.utils.logging import setup_logger

logger = logging.getLogger("fnl")
RANK_WEIGHTS = "rank_weights.json"  # distributed runs: each process's parameter digest


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss (or the weights) became NaN or infinite; the message names the iteration and each loss term.

    ``last_good`` is the (file name, iteration) that ``run_iterations`` last passed to ``save`` whose weights then
    gave a finite loss: weights saved after a step are only known good once a forward pass on them is finite.
    ``bad`` is the file name of the checkpoint it saved whose weights gave the non-finite loss, if any."""

    def __init__(self, message: str, last_good: tuple[str, int] | None = None, bad: str | None = None) -> None:
        super().__init__(message)
        self.last_good = last_good
        self.bad = bad


def rewind_to_last_good(exc: NonFiniteLossError, output_dir: Path, marker_name: str,
                        file_prefix: str = "") -> NonFiniteLossError:
    """Point ``output_dir/marker_name`` (what --resume reads) at the last checkpoint whose weights gave a finite
    loss; without one, a marker naming the checkpoint that diverged is removed (any other is left as it was). Returns
    the error with that checkpoint named."""
    marker = output_dir / marker_name
    if exc.last_good is None:
        if exc.bad is not None and marker.is_file() and marker.read_text().strip() == file_prefix + exc.bad:
            marker.unlink()
        advice = "no checkpoint of this run had weights that gave a finite loss"
    else:
        name, iteration = exc.last_good
        write_text_atomic(marker, file_prefix + name)
        advice = (f"the last checkpoint whose weights gave a finite loss is {output_dir / (file_prefix + name)} "
                  f"(iteration {iteration}); --resume continues from it")
    return NonFiniteLossError(f"{exc}; {advice}", exc.last_good, exc.bad)


def weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


OPTIMIZERS = ("SGD", "AdamW")


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER (SGD with momentum, or AdamW); norm layers get WEIGHT_DECAY_NORM, as detectron2 does."""
    if cfg.SOLVER.OPTIMIZER not in OPTIMIZERS:
        raise ConfigError(f"SOLVER.OPTIMIZER '{cfg.SOLVER.OPTIMIZER}' is not one of {', '.join(OPTIMIZERS)}")
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if isinstance(module, norm_types) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.SOLVER.WEIGHT_DECAY},
              {"params": no_decay, "weight_decay": cfg.SOLVER.WEIGHT_DECAY_NORM}]
    if cfg.SOLVER.OPTIMIZER == "AdamW":
        return torch.optim.AdamW(groups, lr=cfg.SOLVER.BASE_LR)
    return torch.optim.SGD(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM)


def lr_factor(cfg: CfgNode, iteration: int) -> float:
    """Linear warm-up from WARMUP_FACTOR, then x GAMMA at each of STEPS."""
    solver = cfg.SOLVER
    decay = solver.GAMMA ** sum(iteration >= s for s in solver.STEPS)
    if iteration < solver.WARMUP_ITERS:
        alpha = iteration / solver.WARMUP_ITERS
        return decay * (solver.WARMUP_FACTOR * (1 - alpha) + alpha)
    return decay


def build_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer, start_iter: int = 0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """cfg.SOLVER's warm-up + multi-step schedule, positioned at ``start_iter`` when resuming."""
    # The schedule is a pure function of the iteration: start there directly (stepping the scheduler up to it before
    # any optimizer step made torch warn, on every --resume, that the schedule's first value would be skipped).
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # a resumed optimizer's state holds it already
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it), last_epoch=start_iter - 1)


def check_losses_finite(losses: dict[str, torch.Tensor], iteration: int) -> torch.Tensor:
    total = sum(losses.values())
    if not torch.isfinite(total):
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"loss is not finite at iteration {iteration}: {terms}. Lower SOLVER.BASE_LR, raise SOLVER.WARMUP_ITERS "
            "or set SOLVER.CLIP_GRADIENTS"
        )
    return total


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(cfg: CfgNode) -> tuple[int, int]:
    """Initialise torch.distributed when started by torchrun (one process per device)."""
    if not is_distributed():
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if cfg.MODEL.DEVICE.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    if cfg.MODEL.DEVICE.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def parameter_digest(model: nn.Module) -> str:
    """sha256 over every parameter's name and bytes: two processes hold the same weights iff their digests match.
    Buffers are left out: under DistributedDataParallel each process's last forward updates its own BatchNorm
    running statistics after rank 0's were broadcast, so they differ by design."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_ranks_agree(model: nn.Module, output_dir: Path, rank: int, world_size: int) -> list[str]:
    """Gathers every process's ``parameter_digest``; rank 0 writes them to ``output_dir/RANK_WEIGHTS``. Raises if
    they differ: the saved checkpoint (rank 0's) would then not be the model the other processes trained."""
    digests: list[str] = [""] * world_size
    torch.distributed.all_gather_object(digests, parameter_digest(model))
    if rank == 0:
        write_json_atomic(output_dir / RANK_WEIGHTS, {"parameters_sha256": digests})
    if len(set(digests)) > 1:
        raise RuntimeError(f"the {world_size} training processes ended with different weights: {digests}")
    return digests


def train(cfg: CfgNode, resume: bool = False, evaluate: bool = True) -> dict[str, Any]:
    """Train ``build_model(cfg)`` on cfg.DATASETS.TRAIN; returns {"model", "final_checkpoint", "metrics"}."""
    rank, world_size = setup_distributed(cfg)
    output_dir = Path(cfg.OUTPUT_DIR)
    keep = checkpoints_kept(cfg, "SOLVER.CHECKPOINTS_KEPT")
    seed_everything(cfg.SEED + rank)

    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    checkpointer = Checkpointer(output_dir, model, cfg, optimizer, keep)
    checkpoint, start_iter = checkpointer.resume(load_float_state) if resume else (None, 0)
    if checkpoint is None and cfg.MODEL.WEIGHTS:
        load_state(model, cfg.MODEL.WEIGHTS)
    scheduler = build_scheduler(cfg, optimizer, start_iter)
    batches = iter(build_train_loader(cfg, start_iter=start_iter))

    # Only now that config, weights and dataset are known good: a refused run leaves no output directory behind.
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logger(output_dir if rank == 0 else None)
    if rank == 0:
        for stale in remove_stale_temporaries(output_dir):
            logger.info("removed %s, left by an interrupted write", stale)
        write_text_atomic(output_dir / CONFIG_FILE, cfg.dump())
    if checkpoint is not None:
        logger.info("resuming from %s at iteration %d", checkpoint, start_iter)

    train_model: nn.Module = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    try:
        history = run_iterations(
            train_model, batches, optimizer, scheduler,
            range(start_iter, cfg.SOLVER.MAX_ITER), clip_gradients=cfg.SOLVER.CLIP_GRADIENTS,
            checkpoint_period=cfg.SOLVER.CHECKPOINT_PERIOD, save=checkpointer.save if rank == 0 else None,
            description="train",
            log=rank == 0, resumed_from=(checkpoint.name, start_iter - 1) if checkpoint is not None else None,
        )
    except NonFiniteLossError as exc:
        if rank != 0:
            raise
        raise rewind_to_last_good(exc, output_dir, LAST_CHECKPOINT) from None
    if world_size > 1:
        check_ranks_agree(model, output_dir, rank, world_size)
    final = output_dir / FINAL_CHECKPOINT
    if rank == 0:
        checkpointer.save(FINAL_CHECKPOINT, cfg.SOLVER.MAX_ITER - 1)
        write_json_atomic(output_dir / TRAIN_HISTORY_FILE, history)
    metrics: dict[str, Any] = {}
    if evaluate and rank == 0:
        metrics = evaluate_model(model, cfg)
        write_json_atomic(output_dir / METRICS_FILE, metrics)
    return {"model": model, "final_checkpoint": final, "metrics": metrics, "history": history}


def run_iterations(model: nn.Module, batches: Iterator[list[dict]], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, iterations: range, clip_gradients: float = 0.0,
                   checkpoint_period: int = 0, save: Callable[[str, int], None] | None = None,
                   on_iteration: Callable[[int], None] | None = None, description: str = "train",
                   log: bool = True, resumed_from: tuple[str, int] | None = None) -> list[dict[str, float]]:
    """The loop both float training and QAT run: forward, finite-loss check, backward, clip, step, log, and a
    checkpoint every ``checkpoint_period`` iterations through ``save(file_name, iteration)``. ``resumed_from``: the
    (file name, iteration) of the checkpoint the weights came from, a candidate for the last good one."""
    model.train()
    history: list[dict[str, float]] = []
    # A checkpoint holds the weights after a step; only a finite loss computed with them makes it known good.
    last_good: tuple[str, int] | None = None
    unconfirmed = resumed_from
    progress = tqdm(iterations, desc=description, initial=iterations.start, total=iterations.stop, disable=not log)
    for iteration in progress:
        if on_iteration is not None:
            on_iteration(iteration)
        losses = model(next(batches))
        try:
            total = check_losses_finite(losses, iteration)
        except NonFiniteLossError as exc:
            # Only a checkpoint of this run counts as bad: the one resumed from stays for the user to decide.
            bad = unconfirmed[0] if unconfirmed is not None and unconfirmed != resumed_from else None
            raise NonFiniteLossError(str(exc), last_good, bad) from None
        if unconfirmed is not None:
            last_good, unconfirmed = unconfirmed, None
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if clip_gradients > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_gradients)
        optimizer.step()
        # The rate this step applied, read before the scheduler moves on to the next iteration's.
        record = {"iteration": iteration, "total_loss": total.item(), "lr": optimizer.param_groups[0]["lr"],
                  **{k: v.item() for k, v in losses.items()}}
        scheduler.step()
        history.append(record)
        progress.set_postfix(loss=f"{record['total_loss']:.3f}", lr=f"{record['lr']:.4g}")
        if log and (iteration % 20 == 0 or iteration == iterations.stop - 1):
            logger.info("%s iter %d: %s", description, iteration,
                        ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "iteration"))
        is_last = iteration == iterations.stop - 1
        if save is not None and checkpoint_period and not is_last and (iteration + 1) % checkpoint_period == 0:
            if not weights_finite(model):
                raise NonFiniteLossError(f"weights are not finite after iteration {iteration}. Lower "
                                         "SOLVER.BASE_LR, raise SOLVER.WARMUP_ITERS or set SOLVER.CLIP_GRADIENTS",
                                         last_good)
            unconfirmed = (periodic_checkpoint_name(iteration), iteration)
            save(*unconfirmed)
    return history


def load_float_state(model: nn.Module, path: Path, data: dict[str, Any]) -> None:
    """A float training checkpoint into ``model``: every tensor, of the right shape (CheckpointError otherwise)."""
    load_state(model, path, strict=True, data=data)
