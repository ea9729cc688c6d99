"""The products over a support, for every registered sparse backend, through the pipeline's routing.

``pipeline.products_for`` gives each product as the backend's kernel, or the
``torch`` backend's op for a dtype the kernel does not take, and routes it to
a dense GEMM past the measured crossover; every route must give the
``torch`` backend's values.
"""

import pytest
import torch
from conftest import run_product

from spade_kernels import pipeline
from spade_kernels.backends import BACKENDS
from spade_kernels.backends import torch_ as T


def _support(B, C, K, device, pad=True):
    idx = torch.randint(0, K, (B, C)).to(device)
    w = torch.randn(B, C).to(device)
    if pad:  # padding convention: index 0, weight 0 after each row's support
        size = torch.randint(0, C + 1, (B,)).to(device)
        tail = torch.arange(C, device=device) >= size[:, None]
        idx, w = idx.masked_fill(tail, 0), w.masked_fill(tail, 0.0)
    return w, idx


@pytest.mark.parametrize("B,C,d,K", [(1, 1, 1, 1), (5, 7, 20, 30), (9, 33, 40, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_match_the_torch_backend(sparse_backend, device, product_route, B, C, d, K, dtype):
    prims = BACKENDS[sparse_backend].primitives()
    w, idx = _support(B, C, K, device)
    M = torch.randn(K, d).to(device, dtype)
    X = torch.randn(B, d).to(device, dtype)
    # bfloat16: a backend that accumulates in bfloat16 (the torch ops' index_add) is a few ulps off
    # on a 33-term sum (ulp 2⁻⁸ at 1–2); the Triton kernels accumulate in float32 (2e-2 there:
    # tests/test_backend_triton.py).
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 4e-2, "rtol": 2e-2}
    M32, X32 = M.float(), X.float()
    got = run_product(prims, "gather_matmul", w, idx, M)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), T.gather_matmul(w, idx, M32), **tol)
    got = run_product(prims, "gather_dot", X, idx, M)
    torch.testing.assert_close(got.float(), T.gather_dot(X32, idx, M32), **tol)
    got = run_product(prims, "scatter_matmul", w, idx, X, K)
    torch.testing.assert_close(got.float(), T.scatter_matmul(w, idx, X32, K), **tol)
    # The prototypes' form: Σ w·(X_b − M_k), the weight sums taken with the segments.
    row_w = torch.zeros(K, device=device).index_add_(0, idx.reshape(-1), w.reshape(-1))
    want = T.scatter_matmul(w, idx, X32, K) - row_w[:, None] * M32
    got = run_product(prims, "scatter_matmul", w, idx, X32, K, M32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got = run_product(prims, "gather_sq_dist", X32, idx, M32)
    torch.testing.assert_close(got, T.gather_sq_dist(X32, idx, M32), atol=1e-4, rtol=1e-5)


def test_products_of_non_contiguous_operands(sparse_backend, device, product_route):
    prims = BACKENDS[sparse_backend].primitives()
    _, idx = _support(6, 8, 25, device, pad=False)
    M = torch.randn(25, 40).to(device)[:, ::2]  # (25, 20) strided rows
    X = torch.randn(6, 40).to(device)[:, ::2]
    wt = torch.randn(8, 6).to(device).t()  # (6, 8) non-contiguous weights
    torch.testing.assert_close(run_product(prims, "gather_matmul", wt, idx, M), T.gather_matmul(wt, idx, M))
    torch.testing.assert_close(run_product(prims, "gather_dot", X, idx, M), T.gather_dot(X, idx, M))
    torch.testing.assert_close(
        run_product(prims, "scatter_matmul", wt, idx, X, 25), T.scatter_matmul(wt, idx, X, 25)
    )


def test_float64_matrices_keep_their_dtype(sparse_backend, device):
    # A backend without float64 kernels hands them to the torch backend's products.
    prims = BACKENDS[sparse_backend].primitives()
    w, idx = _support(6, 9, 20, device)
    M = torch.randn(20, 12, dtype=torch.float64).to(device)
    with pipeline.dense_products(False):
        got = run_product(prims, "gather_matmul", w.double(), idx, M)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, T.gather_matmul(w.double(), idx, M))


@pytest.mark.parametrize("with_grad_d", [False, True])
def test_support_jacobian_matches_the_torch_backend(sparse_backend, device, with_grad_d):
    prims = BACKENDS[sparse_backend].primitives()
    z = torch.rand(6, 9).to(device)
    z[z < 0.4] = 0.0  # off-support slots (and padding)
    z[3] = 0.0  # an empty row
    grad_z, D = torch.randn(6, 9).to(device), torch.rand(6, 9).to(device) * 5
    grad_D = torch.randn(6, 9).to(device) if with_grad_d else None
    lam = torch.tensor(0.7, device=device)
    G, lam_rows = prims.support_jacobian(z, grad_z, D, grad_D, lam)
    G_ref, lam_ref = T.support_jacobian(z, grad_z, D, grad_D, lam)
    torch.testing.assert_close(G, G_ref)
    torch.testing.assert_close(lam_rows, lam_ref)
    G, _ = prims.support_jacobian(z, None, D, grad_D, lam)  # only the regulariser's gradient
    torch.testing.assert_close(G, T.support_jacobian(z, None, D, grad_D, lam)[0])


def test_products_take_the_kernel_unless_the_dense_route_is_faster(sparse_backend, device):
    calls = []
    prims = BACKENDS[sparse_backend].primitives()
    spy = prims._replace(gather_matmul=lambda *a: calls.append(1) or T.gather_matmul(*a))
    w, idx, M = (
        torch.rand(4, 3).to(device),
        torch.randint(0, 9, (4, 3)).to(device),
        torch.randn(9, 5).to(device),
    )
    with pipeline.dense_products(True):
        got = run_product(spy, "gather_matmul", w, idx, M)
    torch.testing.assert_close(got, T.gather_matmul(w, idx, M))
    dense = pipeline.plan._dense_route(3, 9, torch.device(device))  # C/K = 1/3: past the CPU crossover
    assert calls == ([] if dense else [1])
    with pipeline.dense_products(False):
        run_product(spy, "gather_matmul", w, idx, M)
    assert calls[-1:] == [1]
