"""Shared fixtures: every test starts from the same global seed, on one torch thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    """Same seed for every test; one intra-op thread, because the test problems are tiny and
    thread wake-ups would dominate each oracle call (and make a busy machine much slower)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
