"""Fixtures for the fnl.hooks tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """Run these tests on one intra-op thread. The machine has two cores shared with other jobs; with two threads,
    OpenMP's spin-waiting made tests/hooks take 95 s instead of 10 s whenever the cores were busy (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
