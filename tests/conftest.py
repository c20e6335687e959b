"""Shared test setup: one intra-op thread and a fixed seed per test.

Tests run on a two-core machine, often beside other test processes: with two OpenMP threads a tiny
convolution then spins for milliseconds (50x its single-thread time), so one thread is the fast choice.
"""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
