import pytest
import torch

from spade_kernels.backends import BACKENDS as _ALL

#: Every backend, on a GPU when there is one (bfloat16 there, float32 on the CPU).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BACKENDS = list(_ALL)


def skip_unless_timed(name: str) -> None:
    """Skip a backend that cannot run here, or whose only way here is the Triton interpreter (never timed)."""
    if name not in _ALL:
        return
    backend = _ALL[name]
    reason = backend.unavailable_reason() or backend.device_reason(DEVICE)
    if reason is None and name == "triton" and DEVICE.type != "cuda":
        reason = "the Triton interpreter is not timed"
    if reason is not None:
        pytest.skip(f"{name}: {reason}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pedantic(benchmark, fn, rounds=5):
    """Short, fixed measurement so the suite fits CI's budget; synchronises on a GPU."""

    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    return benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
