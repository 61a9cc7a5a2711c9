"""Fixtures: small LLM-like layers (see ``tests/layers.py``)."""

from __future__ import annotations

import pytest

from tests.layers import llm_like


@pytest.fixture(scope="session")
def layer() -> dict:
    return llm_like()


@pytest.fixture(scope="session")
def wide_layer() -> dict:
    return llm_like(m=64, n=256, seed=1)
