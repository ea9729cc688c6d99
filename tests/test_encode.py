import math

import pytest
import torch

import spade_kernels as sk
from spade_kernels import _ext
from spade_kernels.backends import BACKENDS, backend_status, resolve_backend
from spade_kernels.backends import torch_ as T
from spade_kernels.reference import spade_encode_reference, squared_distances
from spade_kernels.testing import assert_codes_match_reference

# "cuda" runs its C++/OpenMP twins on CPU tensors when the extension is built.
CPU_BACKENDS = ["reference", "torch"] + (["cuda"] if _ext.available() else [])
# Small chunk / top-k / buffer settings make every code path of the torch
# backend (k-doubling, buffer merges, overflow rows) run at test sizes.
SMALL = {"chunk": 16, "topk": 2, "max_candidates": 8}


def _inputs(B, d, K, dtype=torch.float32, lam=None):
    x = torch.randn(B, d, dtype=dtype)
    A = torch.randn(K, d, dtype=dtype)
    return x, A, (1.0 / (2 * d) if lam is None else lam)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B,d,K", [(1, 1, 1), (7, 3, 5), (129, 16, 129), (33, 24, 1000), (5, 2, 128)])
def test_matches_reference_fp32(backend, B, d, K):
    x, A, lam = _inputs(B, d, K)
    assert_codes_match_reference(sk.spade_encode(x, A, lam, backend=backend), x, A, lam)


@pytest.mark.parametrize("B,d,K", [(7, 3, 5), (50, 8, 300), (20, 16, 1000)])
def test_torch_backend_every_path_float64_exact(B, d, K):
    x, A, lam = _inputs(B, d, K, torch.float64)
    codes = T.encode(x, A, lam, **SMALL)
    torch.testing.assert_close(codes.to_dense(), spade_encode_reference(x, A, lam), atol=1e-12, rtol=0)


@pytest.mark.parametrize("lam", [1e-4, 1e-2, 3.0])
def test_overflow_and_dense_rows_exact(lam):
    # Tiny λ makes supports dense (K-wide): far past max_candidates, so these
    # rows take the exact dense path.  Large λ makes them one-hot.
    x, A, _ = _inputs(40, 6, 200, torch.float64)
    codes = T.encode(x, A, lam, **SMALL)
    ref = spade_encode_reference(x, A, lam)
    torch.testing.assert_close(codes.to_dense(), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(codes.support_size, (ref > 0).sum(-1))


def test_mixed_overflow_rows():
    # Half the rows far from every prototype (dense support), half on top of one.
    x, A, lam = _inputs(30, 4, 150, torch.float64, lam=0.05)
    x[::2] = A[torch.arange(15)] + 1e-3 * torch.randn(15, 4, dtype=torch.float64)
    x[1::2] *= 0.01
    codes = T.encode(x, A, lam, chunk=32, topk=2, max_candidates=4)
    torch.testing.assert_close(codes.to_dense(), spade_encode_reference(x, A, lam), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    x, A, lam = _inputs(37, 16, 300, dtype)
    codes = sk.spade_encode(x, A, lam, backend="torch")
    assert codes.dtype == torch.float32  # documented: half inputs give float32 codes
    baseline = sk.spade_encode(x, A, lam, backend="reference").to_dense()
    assert_codes_match_reference(codes, x, A, lam, low_precision_baseline=baseline)
    # Stronger than the contract: distances are recomputed in float32 from the
    # half-precision values, so the codes meet the float32 tolerance as well.
    assert_codes_match_reference(codes, x.float(), A.float(), lam)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_backend_low_precision_is_a_projection(dtype):
    # The reference backend defines the low-precision baseline itself; what it
    # must still satisfy is being a point of the simplex, close to exact.
    x, A, lam = _inputs(20, 16, 100, dtype)
    z = sk.spade_encode(x, A, lam, backend="reference").to_dense()
    assert (z >= 0).all() and ((z.sum(-1) - 1).abs() <= 1e-3).all()
    exact = spade_encode_reference(x.double(), A.double(), lam)
    assert (z.double() - exact).abs().max() < 0.05


def test_float64_close_to_exact():
    x, A, lam = _inputs(17, 9, 77, torch.float64)
    codes = sk.spade_encode(x, A, lam, backend="torch")
    assert codes.dtype == torch.float64
    torch.testing.assert_close(codes.to_dense(), spade_encode_reference(x, A, lam), atol=1e-12, rtol=0)


def test_x_on_top_of_prototypes_large_lambda():
    # GEMM-form distances cancel catastrophically here; the exact stage
    # recomputes D directly (DESIGN §4).
    A = torch.randn(64, 32) * 10
    x = A[:8] + 1e-3 * torch.randn(8, 32)
    lam = 50.0
    assert_codes_match_reference(sk.spade_encode(x, A, lam, backend="torch"), x, A, lam)


def test_non_contiguous_and_leading_dims():
    x = torch.randn(3, 5, 20)[:, :, ::2]  # (3, 5, 10), strided
    A = torch.randn(10, 40).t()  # (40, 10), transposed
    assert not x.is_contiguous() and not A.is_contiguous()
    codes = sk.spade_encode(x, A, 0.05, backend="torch")
    assert codes.indices.shape[:2] == (3, 5) and codes.support_size.shape == (3, 5)
    assert codes.to_dense().shape == (3, 5, 40)
    assert_codes_match_reference(codes, x, A, 0.05)


def test_codes_layout():
    x, A, lam = _inputs(25, 8, 90)
    codes = sk.spade_encode(x, A, lam, backend="torch")
    assert codes.n_latents == 90 and codes.indices.dtype == torch.int64
    assert codes.width == int(codes.support_size.max())
    pad = torch.arange(codes.width) >= codes.support_size[:, None]
    assert (codes.values[pad] == 0).all() and (codes.indices[pad] == 0).all()
    assert (codes.values[~pad] > 0).all()


def test_nan_rows_are_isolated():
    x, A, lam = _inputs(6, 5, 40)
    x[2, 1] = math.nan
    x[4, 0] = math.inf
    for backend in CPU_BACKENDS:
        dense = sk.spade_encode(x, A, lam, backend=backend).to_dense()
        assert torch.isnan(dense[[2, 4]]).all(), backend
        assert torch.isfinite(dense[[0, 1, 3, 5]]).all(), backend
    assert_codes_match_reference(sk.spade_encode(x, A, lam, backend="torch"), x, A, lam)


def test_nan_prototype_poisons_every_row():
    x, A, lam = _inputs(4, 3, 10)
    A[7, 1] = math.nan
    assert torch.isnan(sk.spade_encode(x, A, lam, backend="torch").to_dense()).all()


# ---------------------------------------------------------------- gradients


def test_gradcheck_torch_backend():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 30, dtype=torch.float64)

    def f(x, A, lam):
        return (T.encode(x, A, lam, **SMALL).to_dense() * w).sum()

    assert torch.autograd.gradcheck(f, (x, A, lam))


def test_torch_backend_gradients_match_reference_autograd():
    x0, A0 = torch.randn(12, 6, dtype=torch.float64), torch.randn(70, 6, dtype=torch.float64)
    w = torch.randn(12, 70, dtype=torch.float64)
    grads = []
    for backend in CPU_BACKENDS:
        x, A = x0.clone().requires_grad_(), A0.clone().requires_grad_()
        lam = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        (sk.spade_encode(x, A, lam, backend=backend).to_dense() * w).sum().backward()
        grads.append((x.grad, A.grad, lam.grad))
    # And plain autograd through the naive formula, no custom backward at all.
    x, A = x0.clone().requires_grad_(), A0.clone().requires_grad_()
    lam = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    (spade_encode_reference(x, A, lam) * w).sum().backward()
    grads.append((x.grad, A.grad, lam.grad))
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            torch.testing.assert_close(a, b)


def test_support_sq_dists_and_sparse_decode_gradcheck():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    M = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    v = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 9, (4, 5))
    assert torch.autograd.gradcheck(lambda x, M: T.support_sq_dists(x, M, idx), (x, M))
    codes = lambda v: sk.SparseCodes(idx, v, torch.full((4,), 5), 9)  # noqa: E731
    assert torch.autograd.gradcheck(lambda v, M, b: T.sparse_decode(codes(v), M, b), (v, M, b))
    D = squared_distances(x.detach(), M.detach())
    torch.testing.assert_close(T.support_sq_dists(x, M, idx), D.gather(1, idx))


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
    assert set(status) == set(BACKENDS) == {"reference", "torch", "triton", "cuda"}
    assert sk.available_backends() == [n for n, r in status.items() if r is None]
    assert {"reference", "torch"} <= set(sk.available_backends())
    for name, reason in status.items():
        if reason is not None:
            assert isinstance(reason, str) and reason
            with pytest.raises(ValueError, match=f"backend '{name}' is not available"):
                sk.spade_encode(x, A, 0.1, backend=name)
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"


def test_mixed_dtypes_promote():
    x, A = torch.randn(4, 5, dtype=torch.bfloat16), torch.randn(9, 5)
    codes = sk.spade_encode(x, A, 0.1, backend="torch")
    assert codes.dtype == torch.float32
    assert_codes_match_reference(codes, x.float(), A, 0.1)


def test_dense_path_matches_sparse_path(monkeypatch):
    B, C, d, K = 9, 12, 10, 40
    idx = torch.randint(0, K, (B, C))
    w, G, M, X = torch.randn(B, C), torch.randn(B, d), torch.randn(K, d), torch.randn(B, d)
    sparse = (T.gather_matmul(w, idx, M), T.gather_dot(G, idx, M), T.scatter_matmul(w, idx, X, K))
    monkeypatch.setattr(T, "DENSE_FRACTION", {"cpu": 0.0})
    dense = (T.gather_matmul(w, idx, M), T.gather_dot(G, idx, M), T.scatter_matmul(w, idx, X, K))
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # And a whole training step through the dense path against the float64 reference.
    m = sk.SpaDE(6, 30, backend="torch", dtype=torch.float64, lambda_init=0.02)
    x = torch.randn(8, 6, dtype=torch.float64)
    out = m(x)
    out.loss.backward()
    from spade_kernels.reference import spade_forward_reference

    A, W, raw = (p.detach().clone().requires_grad_() for p in (m.prototypes, m.W_dec, m.lambda_raw))
    loss = spade_forward_reference(x, A, W, torch.nn.functional.softplus(raw))[2]
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    for p, q in zip((m.prototypes, m.W_dec, m.lambda_raw), (A, W, raw)):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.skipif(not _ext.available(), reason="C++ extension unavailable")
def test_torch_backend_uses_the_extension_on_cpu(monkeypatch):
    from spade_kernels.backends import cuda as Cu

    monkeypatch.setattr(T, "NATIVE_CPU", True)
    calls = []
    native_forward = Cu.encode_forward
    monkeypatch.setattr(Cu, "encode_forward", lambda *a, **k: calls.append(1) or native_forward(*a, **k))
    x, A, lam = _inputs(33, 24, 1000)
    assert_codes_match_reference(T.encode(x, A, lam), x, A, lam)
    assert calls  # the forward went through the extension ...
    T.encode(x, A, lam, **SMALL)  # ... except with a buffer smaller than its 256-slot minimum
    assert len(calls) == 1
    idx = torch.randint(0, 1000, (33, 7))
    w = torch.rand(33, 7)
    assert torch.equal(T.gather_matmul(w, idx, A), torch.ops.spade.gather_matmul(w, idx, A))
    assert torch.equal(T.scatter_matmul(w, idx, x, 1000), torch.ops.spade.scatter_matmul(w, idx, x, 1000))
    half = A.bfloat16()  # other dtypes keep the PyTorch-op path
    torch.testing.assert_close(
        T.gather_matmul(w, idx, half).float(), T.gather_matmul(w, idx, A), atol=0.1, rtol=0.05
    )
