"""Fixtures of every test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_threads():
    """Training sets torch's thread count (train.threads): restore it after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
