"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small batches gain nothing from a second intra-op thread, and on a busy 2-core machine
    OpenMP spin-waiting can make a 2-thread run many times slower. Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
