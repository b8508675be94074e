"""The one checkpointer of float training and QAT: file names, marker, pruning, and resuming model and optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fnl.config import get_cfg
from fnl.engine.checkpoint import CheckpointError, read_checkpoint
from fnl.engine.checkpointer import FINAL_CHECKPOINT, QAT_LAST_CHECKPOINT, QAT_PREFIX, Checkpointer
from fnl.engine.train import load_float_state
from fnl.qat.train import load_prepared_state


def checkpointer(tmp_path, seed: int, **options) -> Checkpointer:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # momentum buffers: optimizer state worth restoring
    return Checkpointer(tmp_path, model, get_cfg(), optimizer, **options)


def test_qat_saves_under_its_prefix_names_the_last_in_its_marker_and_prunes(tmp_path):
    saving = checkpointer(tmp_path, 0, keep=2, marker=QAT_LAST_CHECKPOINT, prefix=QAT_PREFIX,
                          extra={"quantization": {"stage": "qat"}})
    for iteration in (9, 19, 29):
        saving.save(f"model_{iteration:07d}.pth", iteration)
    saving.save(FINAL_CHECKPOINT, 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        QAT_LAST_CHECKPOINT, "qat_model_0000019.pth", "qat_model_0000029.pth", "qat_model_final.pth"]
    assert (tmp_path / QAT_LAST_CHECKPOINT).read_text() == "qat_model_final.pth"
    assert saving.last_checkpoint() == tmp_path / "qat_model_final.pth"
    assert read_checkpoint(tmp_path / "qat_model_final.pth")["quantization"] == {"stage": "qat"}


@pytest.mark.parametrize("load_model", [load_float_state, load_prepared_state])
def test_resume_restores_model_and_optimizer_and_continues_after_the_saved_iteration(tmp_path, load_model):
    saved = checkpointer(tmp_path, 0, keep=0)
    saved.save("model_0000004.pth", 4)
    fresh = checkpointer(tmp_path, 1, keep=0)
    assert not torch.equal(fresh.model.weight, saved.model.weight)
    path, start_iter = fresh.resume(load_model)
    assert (path, start_iter) == (tmp_path / "model_0000004.pth", 5)
    assert torch.equal(fresh.model.weight, saved.model.weight)
    momentum = [fresh.optimizer.state[p]["momentum_buffer"] for p in fresh.model.parameters()]
    assert all(torch.equal(a, saved.optimizer.state[p]["momentum_buffer"])
               for a, p in zip(momentum, saved.model.parameters(), strict=True))


def test_without_a_marker_there_is_nothing_to_resume(tmp_path):
    assert checkpointer(tmp_path, 0, keep=0).resume(load_float_state) == (None, 0)


def test_a_checkpoint_of_another_model_is_refused_naming_it(tmp_path):
    checkpointer(tmp_path, 0, keep=0).save("model_0000000.pth", 0)
    other_model = nn.Sequential(nn.Linear(3, 2))  # other keys: "0.weight", "0.bias"
    other = Checkpointer(tmp_path, other_model, get_cfg(), torch.optim.SGD(other_model.parameters(), lr=1), keep=0)
    with pytest.raises(CheckpointError, match="model_0000000.pth"):
        other.resume(load_prepared_state)
