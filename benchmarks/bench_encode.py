"""pytest-benchmark: ``spade_encode`` per backend at CPU sizes, with the floor."""

import pytest
import torch
from conftest import pedantic

import spade_kernels as sk
from spade_kernels import _ext

SHAPES = [(256, 128, 4096), (512, 256, 8192)]


@pytest.mark.parametrize("B,d,K", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", ["reference", "torch"] + (["cuda"] if _ext.available() else []))
def test_encode(benchmark, backend, B, d, K):
    x, A = torch.randn(B, d), torch.randn(K, d)
    benchmark.group = f"encode B={B} d={d} K={K}"
    with torch.no_grad():
        codes = pedantic(benchmark, lambda: sk.spade_encode(x, A, 1 / (2 * d), backend=backend))
    assert codes.n_latents == K


@pytest.mark.parametrize("B,d,K", SHAPES, ids=lambda v: str(v))
def test_floor_mm(benchmark, B, d, K):
    x, A = torch.randn(B, d), torch.randn(K, d)
    benchmark.group = f"encode B={B} d={d} K={K}"
    out = pedantic(benchmark, lambda: torch.mm(x, A.t()))
    assert out.shape == (B, K)
