"""The encoder's contract, for every registered backend (tests/conftest.py): codes against the float64 oracle.

Exactness at every shape and search, float64 exactness on every path (small
buffers force chunk merges, slot and candidate-limit overflow, the exact resolution of
overflow rows), low precision, the NaN policy, layouts, and the gradients of
the functional encoder.  The precision contract is docs/design.md's.
"""

import math

import pytest
import torch
from conftest import SMALL_OPTIONS

import spade_kernels as sk
from spade_kernels.reference import spade_encode_reference
from spade_kernels.testing import assert_codes_match_reference


def _inputs(B, d, K, device, dtype=torch.float32, lam=None):
    x = torch.randn(B, d, dtype=dtype).to(device)
    A = torch.randn(K, d, dtype=dtype).to(device)
    return x, A, (1.0 / (2 * d) if lam is None else lam)


def _encode(backend, x, A, lam, **options):
    return sk.spade_encode(x, A, lam, backend=backend, **({} if backend == "reference" else options))


@pytest.mark.parametrize("search", ["pruned", "dense"])
@pytest.mark.parametrize("B,d,K", [(1, 1, 1), (7, 3, 5), (129, 16, 129), (33, 24, 1000), (5, 2, 128)])
def test_codes_match_the_float64_reference(backend, device, search, B, d, K):
    x, A, lam = _inputs(B, d, K, device)
    codes = _encode(backend, x, A, lam, search=search)
    assert_codes_match_reference(codes.to("cpu"), x.cpu(), A.cpu(), lam)


@pytest.mark.parametrize("B,d,K", [(1, 1, 1), (7, 3, 5), (33, 24, 129), (17, 40, 300)])
def test_codes_match_with_small_buffers(sparse_backend, device, B, d, K):
    x, A, lam = _inputs(B, d, K, device)
    codes = sk.spade_encode(x, A, lam, backend=sparse_backend, **SMALL_OPTIONS[sparse_backend])
    assert_codes_match_reference(codes.to("cpu"), x.cpu(), A.cpu(), lam)


@pytest.mark.parametrize("B,d,K", [(7, 3, 5), (50, 8, 300), (20, 16, 1000)])
def test_every_path_is_exact_in_float64(sparse_backend, device, B, d, K):
    x, A, lam = _inputs(B, d, K, device, torch.float64)
    codes = sk.spade_encode(x, A, lam, backend=sparse_backend, **SMALL_OPTIONS[sparse_backend])
    assert codes.dtype == torch.float64
    torch.testing.assert_close(codes.to_dense(), spade_encode_reference(x, A, lam), atol=1e-12, rtol=0)


@pytest.mark.parametrize("lam", [1e-5, 1e-2, 3.0])
def test_overflow_and_dense_rows_are_exact_in_float64(sparse_backend, device, lam):
    # Tiny λ: supports thousands wide, past every candidate buffer, so rows take the exact dense
    # path; large λ: one-hot rows.  D is the exact distance on the support.
    x, A, _ = _inputs(30, 6, 2000, device, torch.float64)
    codes = sk.spade_encode(x, A, lam, backend=sparse_backend, **SMALL_OPTIONS[sparse_backend])
    ref = spade_encode_reference(x, A, lam)
    torch.testing.assert_close(codes.to_dense(), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(codes.support_size, (ref > 0).sum(-1))
    z, idx = codes.values, codes.indices
    torch.testing.assert_close(codes.distances, torch.where(z > 0, ((x[:, None] - A[idx]) ** 2).sum(-1), 0.0))


@pytest.mark.parametrize("lam", [1e-4, 5.0])
def test_overflow_rows_are_exact_in_float32(sparse_backend, device, lam):
    # The same in the kernels' own float32 path (float64 may take another search).
    x, A, _ = _inputs(12, 6, 90, device)
    codes = sk.spade_encode(
        x, A, lam, backend=sparse_backend, **{**SMALL_OPTIONS[sparse_backend], **_tiny(sparse_backend)}
    )
    ref = spade_encode_reference(x.double(), A.double(), lam)
    torch.testing.assert_close(codes.to_dense().double(), ref, atol=1e-5, rtol=0)


def _tiny(backend):
    """Even smaller buffers where a backend has them (two slots, at most eight candidates)."""
    return {"slots": 2, "max_candidates": 8, "prepass": 8} if backend == "triton" else {}


def test_mixed_overflow_rows_are_exact(sparse_backend, device):
    # A tight cluster of 1000 prototypes and 500 spread far away.  Rows inside the cluster have
    # ~1000-wide supports (past every buffer: the exact dense path); rows on top of a far
    # prototype have a few neighbours.
    x, A, _ = _inputs(30, 4, 1500, device, torch.float64)
    A[:1000] *= 0.01
    A[1000:] = 10 + 3 * A[1000:]
    x[::2] = A[1000:1015] + 1e-3 * torch.randn(15, 4, dtype=torch.float64).to(device)
    x[1::2] *= 0.01
    codes = sk.spade_encode(x, A, 0.05, backend=sparse_backend, **SMALL_OPTIONS[sparse_backend])
    ref = spade_encode_reference(x, A, 0.05)
    torch.testing.assert_close(codes.to_dense(), ref, atol=1e-12, rtol=0)
    size = codes.support_size
    assert (size[::2] < 64).all() and (size[1::2] > 256).all()
    # And in float32, half the rows near one prototype, half far from all.
    x, A, lam = _inputs(24, 8, 120, device, lam=0.05)
    x[::2] = A[:12] + 1e-3 * torch.randn(12, 8).to(device)
    x[1::2] *= 0.01
    codes = sk.spade_encode(x, A, lam, backend=sparse_backend, **SMALL_OPTIONS[sparse_backend])
    assert_codes_match_reference(codes.to("cpu"), x.cpu(), A.cpu(), lam)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(sparse_backend, device, dtype):
    x, A, lam = _inputs(37, 16, 300, device, dtype)
    codes = sk.spade_encode(x, A, lam, backend=sparse_backend)
    assert codes.dtype == torch.float32  # documented: half inputs give float32 codes
    baseline = sk.spade_encode(x.cpu(), A.cpu(), lam, backend="reference").to_dense()
    assert_codes_match_reference(codes.to("cpu"), x.cpu(), A.cpu(), lam, low_precision_baseline=baseline)
    # Stronger than the contract: distances are recomputed in float32 from the half-precision
    # values, so the codes meet the float32 tolerance as well.
    assert_codes_match_reference(codes.to("cpu"), x.cpu().float(), A.cpu().float(), lam)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_backend_low_precision_is_a_projection(dtype):
    # The reference backend defines the low-precision baseline itself; what it must still
    # satisfy is being a point of the simplex, close to exact.
    x, A, lam = _inputs(20, 16, 100, "cpu", dtype)
    z = sk.spade_encode(x, A, lam, backend="reference").to_dense()
    assert (z >= 0).all() and ((z.sum(-1) - 1).abs() <= 1e-3).all()
    exact = spade_encode_reference(x.double(), A.double(), lam)
    assert (z.double() - exact).abs().max() < 0.05


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_tf32_and_reduced_matmul_precision_settings_are_ignored(backend, device, precision):
    x, A, lam = _inputs(50, 64, 700, device, lam=1 / 128)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision(precision)
        codes = _encode(backend, x, A, lam)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision("highest")
    assert_codes_match_reference(codes.to("cpu"), x.cpu(), A.cpu(), lam)


def test_x_on_top_of_prototypes_with_a_large_lambda(backend, device):
    # GEMM-form distances cancel catastrophically here; the exact stage recomputes D directly
    # (docs/design.md, fact 4).
    A = torch.randn(64, 32).to(device) * 10
    x = A[:8] + 1e-3 * torch.randn(8, 32).to(device)
    assert_codes_match_reference(_encode(backend, x, A, 50.0).to("cpu"), x.cpu(), A.cpu(), 50.0)


def test_non_contiguous_inputs_and_leading_dims(backend, device):
    x = torch.randn(3, 5, 20).to(device)[:, :, ::2]  # (3, 5, 10), strided
    A = torch.randn(10, 40).to(device).t()  # (40, 10), transposed
    assert not x.is_contiguous() and not A.is_contiguous()
    codes = _encode(backend, x, A, 0.05)
    assert codes.indices.shape[:2] == (3, 5) and codes.support_size.shape == (3, 5)
    assert codes.to_dense().shape == (3, 5, 40)
    assert_codes_match_reference(codes.to("cpu"), x.cpu(), A.cpu(), 0.05)


def test_codes_layout(backend, device):
    x, A, lam = _inputs(25, 8, 90, device)
    codes = _encode(backend, x, A, lam)
    assert codes.n_latents == 90 and codes.indices.dtype == torch.int64
    assert codes.width == int(codes.support_size.max())
    pad = torch.arange(codes.width, device=device) >= codes.support_size[:, None]
    assert (codes.values[pad] == 0).all() and (codes.indices[pad] == 0).all()
    assert (codes.values[~pad] > 0).all()


def test_nan_rows_are_isolated(backend, device):
    x, A, lam = _inputs(6, 5, 40, device)
    x[2, 1] = math.nan
    x[4, 0] = math.inf
    codes = _encode(backend, x, A, lam)
    dense = codes.to_dense()
    assert torch.isnan(dense[[2, 4]]).all() and torch.isfinite(dense[[0, 1, 3, 5]]).all()
    assert_codes_match_reference(codes.to("cpu"), x.cpu(), A.cpu(), lam)


def test_a_nan_prototype_poisons_every_row(backend, device):
    x, A, lam = _inputs(4, 3, 10, device)
    A[7, 1] = math.nan
    assert torch.isnan(_encode(backend, x, A, lam).to_dense()).all()


def test_gradients_match_plain_autograd_through_the_reference(backend, device):
    x0, A0 = torch.randn(12, 6, dtype=torch.float64), torch.randn(70, 6, dtype=torch.float64)
    w = torch.randn(12, 70, dtype=torch.float64)
    grads = []
    for which in (backend, None):  # None: plain autograd through the naive formula, no custom backward
        x, A = x0.clone().to(device).requires_grad_(), A0.clone().to(device).requires_grad_()
        lam = torch.tensor(0.2, dtype=torch.float64, device=device, requires_grad=True)
        z = spade_encode_reference(x, A, lam) if which is None else _encode(which, x, A, lam).to_dense()
        (z * w.to(device)).sum().backward()
        grads.append((x.grad, A.grad, lam.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_float32_gradients_match_the_torch_backend(sparse_backend, device):
    x0, A0 = torch.randn(11, 16).to(device), torch.randn(70, 16).to(device)
    w = torch.randn(11, 70).to(device)
    grads = []
    for backend in ("torch", sparse_backend):
        x, A = x0.clone().requires_grad_(), A0.clone().requires_grad_()
        lam = torch.tensor(0.04, device=device, requires_grad=True)
        codes = sk.spade_encode(x, A, lam, backend=backend)
        (codes.to_dense() * w).sum().backward()
        grads.append((codes.to_dense(), x.grad, A.grad, lam.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gradcheck_with_small_buffers(sparse_backend, device):
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    A = torch.randn(30, 4, dtype=torch.float64, device=device, requires_grad=True)
    lam = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(5, 30, dtype=torch.float64, device=device)

    def f(x, A, lam):
        return (
            sk.spade_encode(x, A, lam, backend=sparse_backend, **SMALL_OPTIONS[sparse_backend]).to_dense() * w
        ).sum()

    assert torch.autograd.gradcheck(f, (x, A, lam))
