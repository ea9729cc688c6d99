"""pytest-benchmark: the products over a support (decoder, regulariser, backward), every sparse backend.

Each backend's own primitive (``torch``: PyTorch ops; ``native``: the
extension's C++ kernels on the CPU, CUDA kernels on a GPU, float32; ``triton``:
the Triton kernels, on a GPU only) at the support sizes SpaDE sees (C ≈ 80).
The sparse route is timed: the pipeline's dense GEMM route is a matmul.
"""

import pytest
import torch
from conftest import DEVICE, pedantic, skip_unless_timed

from spade_kernels.backends import BACKENDS

# (B, C, d, K): S1-like and S2-like on a GPU, small on CPU.
SHAPES = (
    [(4096, 80, 768, 24576), (4096, 80, 2304, 65536)] if DEVICE.type == "cuda" else [(512, 80, 256, 8192)]
)
SPARSE = [name for name, b in BACKENDS.items() if not b.dense]


def _data(B, C, d, K, dtype):
    idx = torch.randint(0, K, (B, C), device=DEVICE)
    w = torch.rand(B, C, device=DEVICE)
    return (
        w,
        idx,
        torch.randn(K, d, device=DEVICE, dtype=dtype),
        torch.randn(B, d, device=DEVICE, dtype=dtype),
    )


def _prims(name):
    skip_unless_timed(name)
    prims = BACKENDS[name].primitives()
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    return prims, dtype if dtype in prims.product_dtypes else torch.float32


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", SPARSE)
def test_gather_matmul(benchmark, name, shape):
    prims, dtype = _prims(name)
    w, idx, M, _ = _data(*shape, dtype)
    benchmark.group = f"gather_matmul {shape}"
    assert pedantic(benchmark, lambda: prims.gather_matmul(w, idx, M)).shape == (shape[0], shape[2])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", SPARSE)
def test_gather_dot(benchmark, name, shape):
    prims, dtype = _prims(name)
    _, idx, M, X = _data(*shape, dtype)
    benchmark.group = f"gather_dot {shape}"
    assert pedantic(benchmark, lambda: prims.gather_dot(X, idx, M)).shape == (shape[0], shape[1])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", SPARSE)
def test_scatter_matmul(benchmark, name, shape):
    prims, dtype = _prims(name)
    w, idx, _, X = _data(*shape, dtype)
    benchmark.group = f"scatter_matmul {shape}"
    assert pedantic(benchmark, lambda: prims.scatter_matmul(w, idx, X, shape[3])).shape == (
        shape[3],
        shape[2],
    )
