"""The functional encoder's API: argument errors, the backend registry, dtype promotion, product routes.

What every backend must compute is in tests/test_contract_*.py.
"""

import math

import pytest
import torch
from conftest import run_product

import spade_kernels as sk
from spade_kernels import _ext, pipeline
from spade_kernels.backends import BACKENDS, auto_backend, backend_status, resolve_backend
from spade_kernels.backends import torch_ as T
from spade_kernels.reference import squared_distances
from spade_kernels.testing import assert_codes_match_reference


def test_gather_sq_dist_and_sparse_decode_gradcheck(product_route):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    M = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    v = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 9, (4, 5))
    P = pipeline.products_for(T.PRIMITIVES, torch.float64)
    assert torch.autograd.gradcheck(lambda x, M: pipeline.gather_sq_dist(P, x, M, idx), (x, M))
    codes = lambda v: sk.SparseCodes(idx, v, torch.full((4,), 5), 9)  # noqa: E731
    assert torch.autograd.gradcheck(lambda v, M, b: pipeline.sparse_decode(P, codes(v), M, b), (v, M, b))
    D = squared_distances(x.detach(), M.detach())
    torch.testing.assert_close(pipeline.gather_sq_dist(P, x, M, idx), D.gather(1, idx))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.randn(3, 4), torch.randn(5, 6), 0.1), ValueError, "d=4"),
        ((torch.randn(3, 4).long(), torch.randn(5, 4), 0.1), TypeError, "x must have a floating dtype"),
        ((torch.randn(3, 4), torch.randn(5, 4).int(), 0.1), TypeError, "prototypes must have a floating"),
        (([1.0], torch.randn(5, 4), 0.1), TypeError, "x must be a torch.Tensor"),
        ((torch.randn(3, 4), torch.randn(5, 4, 1), 0.1), ValueError, "prototypes must be 2-d"),
        ((torch.randn(3, 4), torch.randn(0, 4), 0.1), ValueError, "K >= 1"),
        ((torch.randn(3, 4), torch.randn(5, 4), 0.0), ValueError, "lam must be a finite number > 0"),
        ((torch.randn(3, 4), torch.randn(5, 4), -1.0), ValueError, "lam must be"),
        ((torch.randn(3, 4), torch.randn(5, 4), math.nan), ValueError, "lam must be"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0.1, 0.2])), ValueError, "scalar"),
        ((torch.randn(3, 4), torch.randn(5, 4), "0.1"), TypeError, "lam must be"),
        ((torch.randn(3, 4), torch.randn(5, 4, device="meta"), 0.1), ValueError, "meta"),
    ],
)
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        sk.spade_encode(*args, backend="torch")


def test_backend_errors_and_registry():
    x, A = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        sk.spade_encode(x, A, 0.1, backend="nope")
    status = backend_status()
    assert set(status) == set(BACKENDS) == {"reference", "torch", "native", "triton"}
    assert sk.available_backends() == [n for n, r in status.items() if r is None]
    assert {"reference", "torch"} <= set(sk.available_backends())
    for name, reason in status.items():
        if reason is not None:
            assert isinstance(reason, str) and reason
            with pytest.raises(ValueError, match=f"backend '{name}' is not available"):
                sk.spade_encode(x, A, 0.1, backend=name)
    want = "native" if _ext.available() else "torch"
    assert resolve_backend("auto", torch.device("cpu")).name == auto_backend(torch.device("cpu"))[0] == want
    with pytest.raises(
        TypeError, match=r"backend 'torch' takes the options \['chunk', 'max_candidates', 'search', 'topk'\]"
    ):
        sk.spade_encode(x, A, 0.1, backend="torch", cap=4)
    with pytest.raises(TypeError, match="takes no options"):
        sk.spade_encode(x, A, 0.1, backend="reference", chunk=4)


def test_the_former_name_cuda_is_an_unknown_backend():
    x, A = torch.randn(5, 3), torch.randn(9, 3)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; expected one of \['auto', 'reference'"):
        sk.spade_encode(x, A, 0.1, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        sk.SpaDE(3, 9, backend="cuda")


def test_mixed_dtypes_promote():
    x, A = torch.randn(4, 5, dtype=torch.bfloat16), torch.randn(9, 5)
    codes = sk.spade_encode(x, A, 0.1, backend="torch")
    assert codes.dtype == torch.float32
    assert_codes_match_reference(codes, x.float(), A, 0.1)


def test_dense_route_matches_sparse_route():
    B, C, d, K = 9, 12, 10, 40
    idx = torch.randint(0, K, (B, C))
    w, G, M, X = torch.randn(B, C), torch.randn(B, d), torch.randn(K, d), torch.randn(B, d)
    P = T.PRIMITIVES
    results = []
    for dense in (False, True):
        with pipeline.dense_products(dense):
            results.append(
                (
                    run_product(P, "gather_matmul", w, idx, M),
                    run_product(P, "gather_dot", G, idx, M),
                    run_product(P, "scatter_matmul", w, idx, X, K),
                )
            )
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # C/K = 0.3 takes the dense route on the CPU by default, none below the measured crossover.
    assert pipeline.plan._dense_route(C, K, torch.device("cpu"))
    assert not pipeline.plan._dense_route(1, K, torch.device("cpu"))
