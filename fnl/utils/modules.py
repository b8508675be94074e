"""Helpers over ``torch.nn.Module`` instances that every layer may use (quantization, export, verification)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fnl.utils.errors import InvalidArgumentError

if TYPE_CHECKING:  # fnl.utils imports no torch at run time: the ONNX and Caffe2 runtimes run without it
    from torch import nn


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside, the previous count restored after: only what is timed
    runs with the threads a report states, while the rest of a run keeps the process's (``OMP_NUM_THREADS``), so a job
    pinned to one thread on a busy machine is not made to spin-wait on two."""
    import torch  # here, not at module level: fnl.utils imports no torch at run time

    if threads < 1:
        raise InvalidArgumentError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside, every submodule's own train/eval flag restored after (a fresh wrapper module is in train
    mode, so restoring only the top-level flag would switch the wrapped model to training)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
