import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pedantic(benchmark, fn, rounds=5):
    """Short, fixed measurement so the suite fits CI's budget."""
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
