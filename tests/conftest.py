"""Shared fixtures: seeded RNG and quiet exports."""

from __future__ import annotations

import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def quiet():
    """Silence lowbit's float-layer warnings where a test does not look at them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
