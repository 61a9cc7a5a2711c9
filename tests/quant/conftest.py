"""Quantizer tests run with one intra-op thread (many small ops; robust timing on a loaded machine)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """These tests run many small tensor ops; with one intra-op thread they take the same ~1 s on an idle or a
    busy machine (two OpenMP threads sharing loaded cores stall on every op). Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
