"""Shared test setup: two CPU threads (the test machine has two cores) and a fixed seed per test."""
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
