"""The learning-rate schedule (linear warm-up, then x GAMMA at each of STEPS) at every iteration, written out by hand,
as the optimizer actually applies it, and the same after --resume from a middle iteration.

The model is one scalar weight whose loss is the weight itself: its gradient is 1, so plain SGD (no momentum, no
weight decay) lowers it by exactly the learning rate of the step, which makes the applied rate observable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fnl.config import CfgNode, load_config
from fnl.engine.train import build_optimizer, build_scheduler, lr_factor, run_iterations

MAX_ITER = 10
SCHEDULE = ["SOLVER.BASE_LR", "0.1", "SOLVER.WARMUP_ITERS", "4", "SOLVER.WARMUP_FACTOR", "0.2",
            "SOLVER.STEPS", "[6, 8]", "SOLVER.GAMMA", "0.5", "SOLVER.MOMENTUM", "0.0", "SOLVER.WEIGHT_DECAY", "0.0",
            "SOLVER.MAX_ITER", str(MAX_ITER)]
# Warm-up from 0.2 * 0.1 in 4 equal steps, then the base rate, halved at 6 and again at 8.
EXPECTED_LR = [0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025]


class ScalarLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, batch: object) -> dict[str, torch.Tensor]:
        return {"loss": self.weight * 1.0}


def _train(cfg: CfgNode, model: ScalarLoss, start_iter: int) -> tuple[list[float], list[float]]:
    """Runs iterations start_iter..MAX_ITER; returns the rate each step applied (the weight's fall) and the rate
    the history recorded for it."""
    optimizer = build_optimizer(cfg, model)
    weights: list[float] = []
    history = run_iterations(model, iter(lambda: [], None), optimizer, build_scheduler(cfg, optimizer, start_iter),
                             range(start_iter, MAX_ITER), on_iteration=lambda _: weights.append(model.weight.item()),
                             log=False)
    weights.append(model.weight.item())
    applied = [before - after for before, after in zip(weights, weights[1:], strict=False)]
    return applied, [record["lr"] for record in history]


@pytest.mark.parametrize(("steps", "iteration", "factor"), [
    ([6, 8], 0, 0.2), ([6, 8], 2, 0.6), ([6, 8], 4, 1.0), ([6, 8], 5, 1.0), ([6, 8], 6, 0.5), ([6, 8], 8, 0.25),
    ([2], 3, 0.4),  # a step inside the warm-up multiplies the warm-up factor (0.8 * 0.5), as detectron2's does
    ([6, 8], 1000, 0.25),
])
def test_lr_factor_at_an_iteration(steps: list[int], iteration: int, factor: float) -> None:
    cfg = load_config(None, [*SCHEDULE, "SOLVER.STEPS", str(steps)])
    assert lr_factor(cfg, iteration) == pytest.approx(factor)


def test_every_step_applies_the_scheduled_rate_and_the_history_records_it() -> None:
    applied, recorded = _train(load_config(None, SCHEDULE), ScalarLoss(), start_iter=0)
    assert applied == pytest.approx(EXPECTED_LR)
    assert recorded == pytest.approx(EXPECTED_LR)


@pytest.mark.filterwarnings("error::UserWarning")  # torch's "scheduler stepped before the optimizer" among them
@pytest.mark.parametrize("start_iter", [3, 6, 7])
def test_resuming_at_an_iteration_continues_the_schedule_where_it_was(start_iter: int) -> None:
    cfg = load_config(None, SCHEDULE)
    model = ScalarLoss()
    optimizer = build_optimizer(cfg, model)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # before the scheduler positions it
    assert build_scheduler(cfg, optimizer, start_iter).get_last_lr() == pytest.approx([EXPECTED_LR[start_iter]] * 2)
    applied, recorded = _train(cfg, ScalarLoss(), start_iter)
    assert applied == pytest.approx(EXPECTED_LR[start_iter:])
    assert recorded == pytest.approx(EXPECTED_LR[start_iter:])
