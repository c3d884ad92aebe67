"""Fixtures for the model tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the machine is shared, and OpenMP threads spinning against other
    processes make these tiny convolutions tens of times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
