"""Helpers over ``torch.nn.Module`` instances that every layer may use (quantization, export, verification)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # fnl.utils imports no torch at run time: the ONNX and Caffe2 runtimes run without it
    from torch import nn


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
