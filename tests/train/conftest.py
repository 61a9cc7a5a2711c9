"""The QPEFT tests' shared fixture: a small ODLRI-compressed tiny Llama with its teacher."""

from __future__ import annotations

import copy

import pytest
import torch

import qlr
from qlr.models.tiny import tiny_llama


@pytest.fixture(scope="module")
def compressed() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(FP teacher, ODLRI-compressed student with E8P Q, E8P-4 L/R and a Hadamard rotation, training ids)."""
    fp = tiny_llama(seed=0)
    text = (b"the quick brown fox jumps over the lazy dog. " * 40)[:1024]
    ids = torch.tensor(list(text)).reshape(16, 64)
    student = copy.deepcopy(fp)
    qlr.compress(student, "odlri", 2, rank=8, calibration=ids, progress=False, group_size=32, outer_iters=1,
                 inner_iters=1)
    return fp, student, ids
