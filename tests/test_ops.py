"""The native ops (spade_kernels/ops.py; csrc/ops.h), when the extension is built.

On CPU tensors these are the C++/OpenMP implementations; with
SPADE_TEST_GPU=1 the op tests also run the CUDA implementations (on an
extension built with CUDA) against the same float64 references.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import spade_kernels.encode  # noqa: F401  (with spade_kernels.ops: registers torch.ops.spade_kernels.*)
from spade_kernels import _ext
from spade_kernels.backends import BACKENDS
from spade_kernels.backends import torch_ as T
from spade_kernels.numerics import sanitize, score_margin
from spade_kernels.reference import spade_encode_reference, sparsemax_reference

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension unavailable: {_ext.reason}")

OPCHECKS = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _support(B, C, K, device, dtype=torch.float64):
    """Random supports in the package's layout: index 0 / weight 0 padding after each row's size."""
    idx = torch.randint(0, K, (B, C), device=device)
    w = torch.randn(B, C, device=device, dtype=dtype)
    size = torch.randint(0, C + 1, (B,), device=device)
    tail = torch.arange(C, device=device) >= size[:, None]
    return w.masked_fill(tail, 0.0), idx.masked_fill(tail, 0)


@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (3, 70000), (5, 131072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.01, 1.0, 40.0])
def test_sparsemax_rows_matches_reference(device, shape, dtype, scale):
    # CPU: float32/float64; CUDA: float32/bfloat16/float16 scores, float32 math.
    if (device == "cpu") != (dtype != torch.bfloat16):
        pytest.skip(f"{dtype} scores are not an input of the {device} op")
    s = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)
    out, tau = torch.ops.spade_kernels.sparsemax_rows(s)
    ref = sparsemax_reference(s.double())
    if dtype == torch.float64:
        tol = 1e-12
    elif dtype == torch.float32:
        tol = 1e-5 + 4e-7 * float(s.abs().max())
    else:  # the projection is rounded to the scores' 8-bit mantissa
        tol = 2.0**-8 * (1 + float(ref.max()))
    assert (out.double() - ref).abs().max() <= tol
    # bf16: each support entry rounds on its own
    n = max(int((out > 0).sum(-1).max()), 1) if dtype == torch.bfloat16 else 1
    torch.testing.assert_close(
        out.double().sum(-1), torch.ones(shape[0], dtype=torch.float64, device=device), atol=tol * n, rtol=0
    )
    torch.testing.assert_close(
        torch.clamp(s.double() - tau.double()[:, None], min=0), out.double(), atol=tol, rtol=0
    )


def test_sparsemax_rows_special_values():
    inf, nan = math.inf, math.nan
    s = torch.tensor(
        [[1.0, -inf, 0.5], [nan, 1.0, 2.0], [-inf, -inf, -inf], [inf, 0.0, 0.0], [-3e7, -3.1e7, -3e7]]
    )
    out, tau = torch.ops.spade_kernels.sparsemax_rows(s)
    torch.testing.assert_close(out[0], torch.tensor([0.75, 0.0, 0.25]))
    assert torch.isnan(out[1:4]).all() and torch.isnan(tau[1:4]).all()
    torch.testing.assert_close(out[4], torch.tensor([0.5, 0.0, 0.5]))


def test_sparsemax_rows_errors_and_registration():
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.spade_kernels.sparsemax_rows(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.spade_kernels.sparsemax_rows(torch.randn(2, 3).half())
    torch.library.opcheck(torch.ops.spade_kernels.sparsemax_rows.default, (torch.randn(4, 9),))
    noncontig = torch.randn(9, 4).t()
    torch.testing.assert_close(
        torch.ops.spade_kernels.sparsemax_rows(noncontig)[0], sparsemax_reference(noncontig)
    )


def test_cuda_tensors_need_the_cuda_kernels(monkeypatch):
    monkeypatch.setattr(_ext, "cuda_kernels", lambda: False)
    monkeypatch.setattr(_ext, "cuda_reason", "spade_kernels._C_cuda was not built (test)")
    reason = BACKENDS["native"].device_reason(torch.device("cuda"))
    assert reason is not None and "CUDA kernels are not available" in reason and "(test)" in reason
    with pytest.raises(
        RuntimeError, match=r"CUDA kernels are not available: spade_kernels._C_cuda was not built \(test\)"
    ):
        _ext.require(torch.device("cuda"))
    assert BACKENDS["native"].device_reason(torch.device("cpu")) is None


# ---------------------------------------------------------------------------
# Products over a support, against the torch primitives in float64
# ---------------------------------------------------------------------------


def _check_products(w, idx, M, X, dtype, tol):
    """The four products of the ops in ``dtype`` against the torch primitives on the float64 inputs."""
    ops, K = torch.ops.spade_kernels, M.shape[0]
    cases = [
        (ops.gather_matmul(w.to(dtype), idx, M.to(dtype)), T.gather_matmul(w, idx, M)),
        (ops.gather_dot(X.to(dtype), idx, M.to(dtype)), T.gather_dot(X, idx, M)),
        (ops.gather_sq_dist(X.to(dtype), idx, M.to(dtype)), T.gather_sq_dist(X, idx, M)),
        (ops.scatter_matmul(w.to(dtype), idx, X.to(dtype), K), T.scatter_matmul(w, idx, X, K)),
    ]
    row_w = torch.zeros(K, dtype=w.dtype, device=w.device).index_add_(0, idx.reshape(-1), w.reshape(-1))
    cases.append(  # the prototypes' form: Σ w·(X_b − M_k)
        (
            ops.scatter_matmul(w.to(dtype), idx, X.to(dtype), K, M.to(dtype)),
            T.scatter_matmul(w, idx, X, K) - row_w[:, None] * M,
        )
    )
    for got, want in cases:
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("B,C,d,K", [(1, 1, 1, 1), (5, 7, 20, 30), (9, 33, 40, 17), (300, 3, 5, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_match_torch(device, B, C, d, K, dtype):
    w, idx = _support(B, C, K, device)
    M = torch.randn(K, d, device=device, dtype=torch.float64)
    X = torch.randn(B, d, device=device, dtype=torch.float64)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    _check_products(w, idx, M, X, dtype, tol)


def test_products_take_strided_inputs_and_cast_weights(device):
    w, idx = _support(6, 5, 12, device, torch.float32)
    M = torch.randn(8, 12, device=device, dtype=torch.float64).t()  # non-contiguous (12, 8)
    X = torch.randn(8, 6, device=device, dtype=torch.float64).t()
    torch.testing.assert_close(
        torch.ops.spade_kernels.gather_matmul(w, idx, M), T.gather_matmul(w.double(), idx, M)
    )
    torch.testing.assert_close(
        torch.ops.spade_kernels.scatter_matmul(w, idx, X, 12), T.scatter_matmul(w.double(), idx, X, 12)
    )


def test_scatter_matmul_subtracts_M_on_every_latent_like_the_torch_op(device):
    # Latent 3 has no slot: 0 − 0·M[3] is 0, or NaN where M[3] is infinite (as 0·inf in the dense
    # gradient); a slot outside [0, K) adds to no latent's sum.
    idx = torch.tensor([[0, 1], [1, 5], [2, 0]], device=device)
    w = torch.tensor([[0.5, -1.0], [2.0, 3.0], [0.25, 0.0]], device=device, dtype=torch.float64)
    X = torch.randn(3, 4, device=device, dtype=torch.float64)
    M = torch.randn(4, 4, device=device, dtype=torch.float64)
    M[3, 1] = math.inf
    ok = idx < 4
    got = torch.ops.spade_kernels.scatter_matmul(w, idx, X, 4, M)
    want = T.scatter_matmul(w * ok, idx * ok, X, 4, M)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(got[3, 1]) and (got[3, [0, 2, 3]] == 0).all()
    # An infinite M entry of a latent with slots: −(Σw)·inf, a signed infinity.
    M[1, 0] = math.inf
    assert torch.ops.spade_kernels.scatter_matmul(w, idx, X, 4, M)[1, 0] == -math.inf  # Σw = 1 on latent 1
    assert torch.equal(torch.ops.spade_kernels.scatter_matmul(w, idx, X, 4, None),
                       T.scatter_matmul(w * ok, idx * ok, X, 4))  # fmt: skip


def test_scatter_matmul_is_deterministic(device):
    w, idx = _support(500, 40, 7, device, torch.float32)  # many duplicates per latent
    X = torch.randn(500, 33, device=device)
    first = torch.ops.spade_kernels.scatter_matmul(w, idx, X, 9)
    assert torch.equal(first, torch.ops.spade_kernels.scatter_matmul(w, idx, X, 9))
    assert (first[7:] == 0).all()  # latents nobody points at


def test_zero_weights_against_non_finite_rows_stay_nan(device):
    # The CPU products leave out slots of weight exactly 0 against finite rows (the codes' padding,
    # csrc/include/spade/sparse.h), never against a non-finite row: 0·inf is NaN, as in torch.
    inf, nan = float("inf"), float("nan")
    w = torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 2.0], [0.0, 3.0, 0.0]], device=device)
    idx = torch.tensor([[0, 1, 2], [2, 0, 1], [3, 1, 0]], device=device)
    X = torch.tensor([[1.0, 2.0], [inf, 1.0], [3.0, nan]], device=device)
    ops = torch.ops.spade_kernels
    want = T.scatter_matmul(w.double(), idx, X.double(), 4)
    torch.testing.assert_close(ops.scatter_matmul(w, idx, X, 4).double(), want, equal_nan=True)
    # A decoder matrix past 2 MiB, so the CPU takes its latent-major loop (sparse.h, latent_major).
    M = torch.randn(1100, 512, device=device)
    M[2, 0], M[3, 0] = nan, inf
    want = T.gather_matmul(w.double(), idx, M.double())
    torch.testing.assert_close(ops.gather_matmul(w, idx, M).double(), want, equal_nan=True)
    assert torch.isnan(want).any(1).all()  # every row has a zero weight on the NaN or inf row


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_past_the_cache_match_torch(device, dtype):
    # K·d past 2 MiB: the CPU's gathers run latent by latent (each row of M read once), the
    # exact stage's distances too; padding slots (index 0, weight 0) and an empty slot (−1) included.
    B, C, K, d = 70, 40, 1100, 512
    w, idx = _support(B, C, K, device)
    w[:, 30:], idx[:, 30:] = 0, 0
    M = torch.randn(K, d, device=device, dtype=torch.float64)
    X = torch.randn(B, d, device=device, dtype=torch.float64)
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-4, "rtol": 1e-5}
    _check_products(w, idx, M, X, dtype, tol)
    ops = torch.ops.spade_kernels
    cand = idx.clone()
    cand[:, 30:] = -1  # empty slots
    cand[:, :30] = torch.stack([torch.randperm(K, device=device)[:30] for _ in range(B)])
    values, indices, size, dist = ops.exact_codes(X.to(dtype), M.to(dtype), 0.01, cand)
    want = T.gather_sq_dist(X, cand.clamp(min=0), M)
    rows = torch.arange(B, device=device).unsqueeze(1).expand(-1, values.shape[1])
    slot = (
        (cand.unsqueeze(2) == indices.unsqueeze(1)).float().argmax(1)
    )  # each support entry's candidate slot
    on = torch.arange(values.shape[1], device=device).unsqueeze(0) < size.unsqueeze(1)
    torch.testing.assert_close(dist.double()[on], want[rows, slot][on], **tol)


def test_products_over_several_row_chunks_match_torch(device):
    # Past 2^20 slots the CPU's latent-major loops take the rows in chunks (sparse.h, chunk_rows:
    # their slot arrays stay small whatever B is); the sparse transpose adds the chunks in order.
    B, C, K, d = 20000, 60, 70000, 8  # 1.2M slots; K·d·4 past 2 MiB (the latent-major loops)
    w, idx = _support(B, C, K, device)
    M = torch.randn(K, d, device=device, dtype=torch.float64)
    X = torch.randn(B, d, device=device, dtype=torch.float64)
    _check_products(w, idx, M, X, torch.float64, {"atol": 1e-10, "rtol": 1e-10})
    # The M form's weight sums span the chunks: a latent whose slots are all in the second chunk
    # and whose M row is infinite gets ±inf there (not the NaN of a chunk that saw none of them).
    idx[idx == 5] = 6
    idx[-1, 0], w[-1, 0], M[5, 2] = 5, 0.5, math.inf
    got = torch.ops.spade_kernels.scatter_matmul(w, idx, X, K, M)
    want = T.scatter_matmul(w, idx, X, K, M)
    assert got[5, 2] == -math.inf and want[5, 2] == -math.inf
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_scatter_matmul_large_output_is_an_ordinary_tensor(device):
    # 2 MiB and up, the CPU op writes its K×d output on huge pages (csrc/ops.h, large_empty):
    # the same values, and a tensor that autograd and optimizers can use like any other.
    K, d = 1100, 512  # 2.15 MiB of float32
    w, idx = _support(300, 9, K, device, torch.float64)
    X = torch.randn(300, d, device=device, dtype=torch.float64)
    want = T.scatter_matmul(w, idx, X, K)
    got = torch.ops.spade_kernels.scatter_matmul(w.float(), idx, X.float(), K)
    assert got.shape == (K, d) and got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    got.add_(1.0).mul_(2.0)  # written in place
    torch.testing.assert_close(got.double(), 2 * (want + 1), atol=1e-4, rtol=1e-5)
    p = torch.nn.Parameter(torch.zeros(K, d, device=device))
    p.grad = got
    torch.optim.SGD([p], lr=1.0).step()
    torch.testing.assert_close(p.detach(), -got)
    del got, p  # freed by its own deleter


def test_scatter_matmul_reuses_a_freed_output_and_stays_exact():
    # A freed large CPU output is kept (csrc/ops.h, OutputCache) and handed out again for the
    # same size: the next call writes every element of it (no stale values), the kept bytes are
    # reported and released on request.
    from spade_kernels import ops as sk_ops

    sk_ops.release_cached_outputs()
    K, d = 1100, 512  # 2.15 MiB of float32: a 4 MiB block
    w, idx = _support(300, 9, K, "cpu", torch.float64)
    X = torch.randn(300, d, dtype=torch.float64)
    first = sk_ops.scatter_matmul(w.float(), idx, X.float(), K)
    first.fill_(7.0)  # values the next call must overwrite
    ptr = first.data_ptr()
    del first
    assert sk_ops.cached_output_bytes() == 4 << 20
    w2, idx2 = _support(300, 9, K, "cpu", torch.float64)
    got = sk_ops.scatter_matmul(w2.float(), idx2, X.float(), K)
    assert got.data_ptr() == ptr and sk_ops.cached_output_bytes() == 0
    torch.testing.assert_close(got.double(), T.scatter_matmul(w2, idx2, X, K), atol=1e-5, rtol=1e-5)
    other = sk_ops.scatter_matmul(w2.float(), idx2, X.float(), 2300)  # 4.5 MiB: a fresh 6 MiB block
    assert other.data_ptr() != ptr
    del got, other
    assert sk_ops.cached_output_bytes() == (4 << 20) + (6 << 20)
    assert sk_ops.release_cached_outputs() == (4 << 20) + (6 << 20)
    assert sk_ops.cached_output_bytes() == 0


_CACHE_LIMIT = """
import torch
from spade_kernels import ops
outs = [ops.scatter_matmul(torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 600), n)
        for n in (1000, 1100, 1200)]  # 2.3, 2.5, 2.7 MiB: blocks of 4 MiB each
for o in outs:
    del o
outs.clear()
print(ops.cached_output_bytes())
"""


@pytest.mark.parametrize("limit,kept", [("0", 0), ("9", 8 << 20), ("", 12 << 20)])
def test_output_cache_keeps_at_most_its_limit(limit, kept):
    # SPADE_KERNELS_OUTPUT_CACHE_MB caps the kept bytes (the oldest block dropped for a newer
    # one); 0 keeps nothing; unset, 256 MiB.
    env = {**os.environ, "SPADE_KERNELS_OUTPUT_CACHE_MB": limit}
    proc = subprocess.run(
        [sys.executable, "-c", _CACHE_LIMIT], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) == kept


def test_output_cache_limit_must_be_a_whole_number():
    env = {**os.environ, "SPADE_KERNELS_OUTPUT_CACHE_MB": "lots"}
    proc = subprocess.run(
        [sys.executable, "-c", _CACHE_LIMIT], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode != 0
    assert "SPADE_KERNELS_OUTPUT_CACHE_MB must be a whole number of MiB >= 0, got 'lots'" in proc.stderr


@pytest.mark.parametrize("with_grads", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_support_jacobian_matches_torch(device, with_grads, dtype):
    z = torch.rand(7, 9, device=device, dtype=dtype).masked_fill(torch.rand(7, 9, device=device) < 0.4, 0.0)
    z[3] = math.nan  # a NaN row: no support, G = 0, no ∂λ share
    D = torch.rand(7, 9, device=device, dtype=dtype)
    D[3] = math.nan
    gz = torch.randn(7, 9, device=device, dtype=dtype) if with_grads else None
    gD = torch.randn(7, 9, device=device, dtype=dtype) if with_grads else None
    lam = torch.tensor(0.3, device=device, dtype=dtype)
    G, lam_rows = torch.ops.spade_kernels.support_jacobian(z, gz, D, gD, lam)
    G_ref, lam_ref = T.support_jacobian(z, gz, D, gD, lam)
    torch.testing.assert_close(G, G_ref)
    torch.testing.assert_close(lam_rows, lam_ref)


# ---------------------------------------------------------------------------
# Candidate selection and exact codes
# ---------------------------------------------------------------------------


def _select(x, A, lam, chunk, max_candidates):
    x, A, aa, xx, _ = sanitize(x, A)
    margin = score_margin(xx, aa, lam, x.shape[1], torch.finfo(x.dtype).eps)
    return torch.ops.spade_kernels.select_candidates(x, A, aa, lam, margin, chunk, max_candidates)


@pytest.mark.parametrize(
    "B,d,K,chunk", [(1, 1, 1, 1), (7, 16, 129, 50), (40, 8, 1000, 1000), (33, 24, 777, 64)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_candidates_contain_the_support(device, B, d, K, chunk, dtype):
    x = torch.randn(B, d, device=device, dtype=dtype)
    A = torch.randn(K, d, device=device, dtype=dtype)
    lam = 1.0 / (2 * d)
    cand, overflow = _select(x, A, lam, chunk, 256)
    # Trimmed to the widest row's candidate count (≤ the 256 slots).
    assert cand.shape[0] == B and 1 <= cand.shape[1] <= 256 and not overflow.any()
    assert int((cand >= 0).sum(1).max()) == max(cand.shape[1], 1) or cand.shape[1] == 1
    ref = spade_encode_reference(x.double(), A.double(), lam) > 0
    for b in range(B):
        kept = cand[b][cand[b] >= 0]
        assert len(set(kept.tolist())) == kept.numel()  # no duplicates
        assert set(ref[b].nonzero().squeeze(1).tolist()) <= set(kept.tolist())


def test_select_candidates_flags_overflow(device):
    x = torch.randn(6, 4, device=device)
    A = torch.randn(5000, 4, device=device)
    cand, overflow = _select(x, A, 1e-5, 700, 256)  # nearly uniform rows: thousands in the support
    assert overflow.all() and (cand == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_codes_match_reference(device, dtype):
    B, d, K = 9, 10, 60
    x = torch.randn(B, d, device=device, dtype=dtype)
    A = torch.randn(K, d, device=device, dtype=dtype)
    cand = torch.arange(K, device=device).repeat(B, 1)
    cand[:, ::7] = -1  # empty slots are ignored ...
    keep = cand[0] >= 0
    z, idx, size, D = torch.ops.spade_kernels.exact_codes(x, A, 0.05, cand)
    ref = spade_encode_reference(x.double(), A.double()[keep.cpu()], 0.05)  # ... as if absent
    dense = torch.zeros(B, K, dtype=torch.float64, device=device).scatter_add_(1, idx, z.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(dense[:, keep], ref.to(device), atol=tol, rtol=0)
    assert (size == (ref > 0).sum(1).to(device)).all()
    for b in range(B):  # sorted descending, zero padded, D recomputed directly
        n = int(size[b])
        assert (z[b, :n].diff() <= 0).all() and (z[b, n:] == 0).all() and (idx[b, n:] == 0).all()
        want = ((x[b] - A[idx[b, :n]]).double() ** 2).sum(1)
        torch.testing.assert_close(D[b, :n].double(), want, atol=tol * 100, rtol=tol)


# ---------------------------------------------------------------------------
# Registration and argument checks
# ---------------------------------------------------------------------------


def test_opcheck_every_op(device):
    w, idx = _support(5, 4, 11, device, torch.float32)
    M = torch.randn(11, 6, device=device)
    X = torch.randn(5, 6, device=device)
    z = torch.rand(5, 4, device=device).masked_fill(idx == 0, 0.0)
    x, A, aa, xx, _ = sanitize(X, M)
    margin = score_margin(xx, aa, 0.1, 6, 2.0**-23)
    cases = [
        (torch.ops.spade_kernels.gather_matmul, (w, idx, M)),
        (torch.ops.spade_kernels.gather_dot, (X, idx, M)),
        (torch.ops.spade_kernels.gather_sq_dist, (X, idx, M)),
        (torch.ops.spade_kernels.scatter_matmul, (w, idx, X, 11)),
        (torch.ops.spade_kernels.scatter_matmul, (w, idx, X, 11, M)),
        (
            torch.ops.spade_kernels.support_jacobian,
            (z, w, torch.rand_like(z), None, torch.tensor(0.5, device=device)),
        ),
        (torch.ops.spade_kernels.select_candidates, (x, A, aa, 0.1, margin, 4, 256)),
        (torch.ops.spade_kernels.exact_codes, (x, A, 0.1, torch.arange(11, device=device).repeat(5, 1))),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=OPCHECKS)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: torch.ops.spade_kernels.gather_matmul(
                torch.ones(2, 3), torch.zeros(2, 3).long(), torch.ones(4)
            ),
            "M must be 2-D",
        ),
        (
            lambda: torch.ops.spade_kernels.gather_matmul(
                torch.ones(2, 3), torch.zeros(2, 3), torch.ones(4, 5)
            ),
            "int64",
        ),
        (
            lambda: torch.ops.spade_kernels.gather_dot(
                torch.ones(2, 3), torch.zeros(2, 1).long(), torch.ones(4, 5)
            ),
            "3 columns",
        ),
        (
            lambda: torch.ops.spade_kernels.gather_dot(
                torch.ones(2, 5), torch.zeros(2, 1).long(), torch.ones(4, 5).half()
            ),
            "float32 or float64",
        ),
        (
            lambda: torch.ops.spade_kernels.scatter_matmul(
                torch.ones(2, 3), torch.zeros(2, 2).long(), torch.ones(2, 5), 4
            ),
            "shape",
        ),
        (
            lambda: torch.ops.spade_kernels.scatter_matmul(
                torch.ones(2, 1), torch.zeros(2, 1).long(), torch.ones(3, 5), 4
            ),
            "rows",
        ),
        (
            lambda: torch.ops.spade_kernels.scatter_matmul(
                torch.ones(2, 1), torch.zeros(2, 1).long(), torch.ones(2, 5), 4, torch.ones(4, 6)
            ),
            r"M has shape \[4, 6\], expected \(n_rows, d\) = \(4, 5\)",
        ),
        (
            lambda: torch.ops.spade_kernels.scatter_matmul(
                torch.ones(2, 1), torch.zeros(2, 1).long(), torch.ones(2, 5), 4, torch.ones(4, 5).double()
            ),
            "M has dtype",
        ),
        (
            lambda: torch.ops.spade_kernels.exact_codes(
                torch.ones(2, 3), torch.ones(4, 3), 0.0, torch.zeros(2, 1).long()
            ),
            "lam",
        ),
        (
            lambda: torch.ops.spade_kernels.exact_codes(
                torch.ones(2, 3), torch.ones(4, 3).double(), 1.0, torch.zeros(2, 1).long()
            ),
            "dtype",
        ),
        (lambda: _select(torch.ones(2, 3), torch.ones(4, 3), 1.0, 2, 0), "max_candidates must be >= 1"),
        (lambda: _select(torch.ones(2, 3), torch.ones(4, 3), 1.0, 0, 256), "chunk must be >= 1"),
        (
            lambda: torch.ops.spade_kernels.support_jacobian(
                torch.ones(2, 3), None, torch.ones(2, 4), None, torch.ones(())
            ),
            "shape",
        ),
    ],
)
def test_op_argument_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_fakes_match_the_real_layout_for_strided_inputs():
    # The ops return contiguous outputs for any input strides; so must the fakes.
    torch.library.opcheck(
        torch.ops.spade_kernels.sparsemax_rows.default, (torch.randn(9, 4).t(),), test_utils=OPCHECKS
    )
    z = torch.rand(6, 5).t()
    args = (z, None, torch.rand(5, 6), None, torch.tensor(0.5))
    torch.library.opcheck(torch.ops.spade_kernels.support_jacobian.default, args, test_utils=OPCHECKS)


@pytest.mark.slow  # 16 s, inductor's first compile: in the slow set (CI runs it)
def test_inductor_compiles_sparsemax_over_a_strided_dim():
    import spade_kernels as sk

    x = torch.randn(6, 9)
    compiled = torch.compile(lambda t: sk.sparsemax(t, dim=0), backend="inductor")
    torch.testing.assert_close(compiled(x), sparsemax_reference(x, dim=0))


# ---------------------------------------------------------------------------
# The candidate-buffer policy, and indices out of range: the same on both devices
# ---------------------------------------------------------------------------

TILE = 256  # kThreads of csrc/include/spade/common.h: the selection's tile


def _policy_model(S_chunks, margin, max_candidates):
    """The selection policy of csrc/include/spade/select.h, in Python (float64 math on the op's own scores)."""
    from spade_kernels.numerics import sorted_threshold

    def tau(v):
        return float(
            sorted_threshold(torch.sort(torch.tensor(v, dtype=torch.float64), descending=True).values)
        )

    rows = S_chunks[0][1].shape[0]
    result, overflow = [], []
    for r in range(rows):
        buf, bound, over = [], -math.inf, False
        for c0, S in S_chunks:
            s = S[r].tolist()
            b = max(bound, max(s) - 1)
            slack = float(margin[r])
            for base in range(0, len(s), TILE):
                buf += [(v, c0 + k) for k, v in enumerate(s[base : base + TILE], base) if v > b - slack]
                if len(buf) > max_candidates:
                    b = max(b, tau([v for v, _ in buf]))
                    buf = [(v, k) for v, k in buf if v > b - slack]
                    if len(buf) > max_candidates:
                        over = True
                        break
            if over:
                break
            if buf:
                b = max(b, tau([v for v, _ in buf]))
                buf = [(v, k) for v, k in buf if v > b - slack]
            bound = b
        overflow.append(over)
        result.append(set() if over else {k for _, k in buf})
    return result, overflow


@pytest.mark.parametrize(
    "max_candidates,lam,K", [(6, 0.5, 600), (30, 0.05, 600), (300, 0.05, 600), (2, 2.0, 1100)]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_select_candidates_follows_the_buffer_policy(device, max_candidates, lam, K, dtype):
    # Small caps put rows on both sides of the overflow boundary; prototypes in chunks of 512
    # give a partial last chunk and tiles that end mid-chunk.  K = 1100: each row also has a
    # prototype on it in the second tile of the second chunk, so that chunk's max − 1 is above
    # the bound the first chunk left and the first tile is pruned from it (the CPU, which scans
    # a chunk from the bound while it takes the max, scans that chunk again).
    torch.manual_seed(max_candidates)
    x = torch.randn(24, 6, device=device, dtype=dtype)
    A = torch.randn(K, 6, device=device, dtype=dtype)
    if K > 1024:
        A[1000:1024] = x + 1e-3 * torch.randn(24, 6, device=device, dtype=dtype)
    else:
        x[:8] *= 0.05  # near the centre: wide supports (support sizes 2–44 here)
    xs, As, aa, xx, _ = sanitize(x, A)
    margin = score_margin(xx, aa, lam, 6, torch.finfo(dtype).eps)
    cand, overflow = torch.ops.spade_kernels.select_candidates(xs, As, aa, lam, margin, 512, max_candidates)
    # The op's scores: its GEMM's dot products, then λ(2·dot − ‖a‖²) in the dtype.
    chunks = [(c0, (lam * (2 * torch.mm(xs, As[c0 : c0 + 512].t()) - aa[c0 : c0 + 512])).cpu())
              for c0 in range(0, K, 512)]  # fmt: skip
    want, want_overflow = _policy_model(chunks, margin.cpu(), max_candidates)
    assert overflow.cpu().tolist() == want_overflow
    assert 0 < sum(want_overflow) < 24 or max_candidates == 300
    for r in range(24):
        got = cand[r].cpu()
        assert set(got[got >= 0].tolist()) == want[r], r


def test_indices_out_of_range_are_nan_empty_or_dropped(device):
    w = torch.ones(2, 3, device=device, dtype=torch.float64)
    idx = torch.tensor([[0, 1, 2], [0, 7, -1]], device=device)  # row 1 points outside [0, 4)
    M = torch.randn(4, 5, device=device, dtype=torch.float64)
    X = torch.randn(2, 5, device=device, dtype=torch.float64)
    out = torch.ops.spade_kernels.gather_matmul(w, idx, M)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    for op in (torch.ops.spade_kernels.gather_dot, torch.ops.spade_kernels.gather_sq_dist):
        got = op(X, idx, M)
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1, 0]) and torch.isnan(got[1, 1:]).all()
    scattered = torch.ops.spade_kernels.scatter_matmul(w, idx, X, 4)
    torch.testing.assert_close(scattered[0], X[0] + X[1])  # entries 7 and −1 of row 1 are dropped
    z, ind, size, _ = torch.ops.spade_kernels.exact_codes(X, M, 0.1, idx)
    assert int(size[1]) == 1 and int(ind[1, 0]) == 0 and float(z[1, 0]) == pytest.approx(1.0)
