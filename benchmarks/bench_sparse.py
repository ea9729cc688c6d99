"""pytest-benchmark: products over a support (decoder, regulariser, backward).

Compares the ``torch`` primitives with the Triton kernels and the C++/CUDA
extension's ops (``cuda``: its CUDA kernels on a GPU, its C++/OpenMP twins on
the CPU, always in float32), and the two Triton sparse-transpose products
(fp32 atomics vs latent-sorted segments), at the support sizes SpaDE sees
(C ≈ 80 of K). Triton variants need a GPU and skip on CPU; on a GPU every
timed call ends with a synchronize.
"""

import pytest
import torch
from conftest import pedantic

from spade_kernels.backends import torch_ as T

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (B, C, d, K): S1-like and S2-like on a GPU, small on CPU.
SHAPES = [(4096, 80, 768, 24576), (4096, 80, 2304, 65536)] if CUDA else [(512, 80, 256, 8192)]


def _impl(name):
    if name == "torch":
        return T
    if name == "cuda":
        from spade_kernels import _ext

        if not _ext.available() or (CUDA and not _ext.cuda_kernels()):
            pytest.skip("spade_kernels._C (with CUDA kernels on a GPU) is not built")
        return torch.ops.spade
    if not CUDA:
        pytest.skip("Triton kernels are timed on a GPU only")
    from spade_kernels.triton_ import sparse

    return sparse


def _timed(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return run


def _data(B, C, d, K):
    idx = torch.randint(0, K, (B, C), device=DEVICE)
    w = torch.rand(B, C, device=DEVICE)
    dtype = torch.bfloat16 if CUDA else torch.float32
    return (
        w,
        idx,
        torch.randn(K, d, device=DEVICE, dtype=dtype),
        torch.randn(B, d, device=DEVICE, dtype=dtype),
    )


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", ["torch", "triton", "cuda"])
def test_gather_matmul(benchmark, impl, shape):
    ops = _impl(impl)
    w, idx, M, _ = _data(*shape)
    M = M.float() if impl == "cuda" else M  # the extension computes in float32
    benchmark.group = f"gather_matmul {shape}"
    assert pedantic(benchmark, _timed(lambda: ops.gather_matmul(w, idx, M))).shape == (shape[0], shape[2])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", ["torch", "triton-atomic", "triton-sorted", "cuda"])
def test_scatter_matmul(benchmark, impl, shape):
    ops = _impl(impl.split("-")[0])
    fn = ops.scatter_matmul_sorted if impl == "triton-sorted" else ops.scatter_matmul
    w, idx, _, X = _data(*shape)
    X = X.float() if impl == "cuda" else X
    benchmark.group = f"scatter_matmul {shape}"
    assert pedantic(benchmark, _timed(lambda: fn(w, idx, X, shape[3]))).shape == (shape[3], shape[2])
