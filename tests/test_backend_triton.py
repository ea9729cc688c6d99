"""The ``triton`` backend's own knobs and kernels (the contracts run it too: tests/test_contract_*.py).

Tiles, slots, the candidate max_candidates and the prepass; the tf32 option; the select
kernel's slots; the atomic scatter; ``opcheck`` of every Triton op.  On the
interpreter (CPU) or a GPU (SPADE_TEST_GPU=1).
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from conftest import SMALL_OPTIONS, plan_of

import spade_kernels as sk
from spade_kernels import encode, ops, pipeline  # noqa: F401  (encode, ops: register torch.ops.spade_kernels.*)
from spade_kernels.backends import torch_ as T
from spade_kernels.backends import triton_ as TR
from spade_kernels.numerics import sanitize, score_margin, sorted_threshold
from spade_kernels.reference import spade_encode_reference
from spade_kernels.testing import assert_codes_match_reference
from spade_kernels.triton_ import encode as E
from spade_kernels.triton_ import sparse as S

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("SPADE_TEST_GPU=1 but no CUDA device", allow_module_level=True)
SMALL = SMALL_OPTIONS["triton"]
# On a GPU the kernels are triton_ops (traced by torch.compile); under the interpreter they are
# opaque custom_ops.  Both must pass every check.
KERNEL_CHECKS = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _inputs(B, d, K, dtype=torch.float32, lam=None):
    x = torch.randn(B, d).to(DEVICE, dtype)
    A = torch.randn(K, d).to(DEVICE, dtype)
    return x, A, (1.0 / (2 * d) if lam is None else lam)


def _codes(x, A, lam, **opts):
    z, idx, size, _ = pipeline.encode_forward(plan_of(TR.PRIMITIVES, x, A, opts), x, A, lam)
    return sk.SparseCodes(idx, z, size, A.shape[0])


def _support(B, C, K, pad=True):
    idx = torch.randint(0, K, (B, C), device=DEVICE)
    w = torch.randn(B, C, device=DEVICE)
    if pad:  # padding convention: index 0, weight 0 after each row's support
        size = torch.randint(0, C + 1, (B,), device=DEVICE)
        tail = torch.arange(C, device=DEVICE) >= size[:, None]
        idx, w = idx.masked_fill(tail, 0), w.masked_fill(tail, 0.0)
    return w, idx


def test_tf32_option_keeps_exact_codes():
    # tf32 only selects candidates (with a wider margin); τ and the codes come from directly
    # recomputed distances, so the contract still holds.
    x, A, lam = _inputs(21, 48, 160)
    assert_codes_match_reference(_codes(x, A, lam, precision="tf32", **SMALL), x, A, lam)
    with pytest.raises(ValueError, match="precision"):
        _codes(x, A, lam, precision="bf16x9")


def test_slot_and_cap_overflow_rows_are_exact():
    # Small λ: dense supports overflow every slot and the max_candidates; large λ: one-hot.
    for lam in (1e-4, 5.0):
        x, A, _ = _inputs(12, 6, 90)
        aa = (A * A).sum(1)
        no_margin = torch.zeros(12, device=DEVICE)
        start = torch.full((12,), -math.inf, device=DEVICE)
        counts = E.select_tiles(x, A, aa, no_margin, start, lam, 16, 2, "ieee")[2]
        if lam < 1:
            assert (counts > 2).any(), "the test must overflow slots"
        codes = _codes(x, A, lam, block_n=16, slots=2, max_candidates=8, prepass=8)
        ref = spade_encode_reference(x.double(), A.double(), lam)
        torch.testing.assert_close(codes.to_dense().double(), ref, atol=1e-5, rtol=0)


def test_select_kernel_slots_hold_every_survivor():
    x, A, lam = _inputs(9, 12, 64)
    _, _, aa, xx, _ = sanitize(x, A)
    margin = score_margin(xx, aa, lam, 12, 2.0**-24).float()
    start = torch.full((9,), -math.inf, device=DEVICE)
    _, slot_idx, counts, bound = E.select_tiles(x, A, aa.float(), margin, start, lam, 16, 16, "ieee")
    s = lam * (2 * x @ A.t() - aa)  # GEMM-form scores, for checking only
    tau = sorted_threshold(torch.sort(s, dim=1, descending=True).values)
    assert (bound <= tau + 1e-5).all(), "the published bound must stay below τ"
    for b in range(9):
        stored = set()
        for t in range(counts.shape[1]):
            stored |= set(slot_idx[b, t, : min(int(counts[b, t]), 16)].tolist())
        support = set((s[b] > tau[b]).nonzero().flatten().tolist())
        assert support <= stored


@pytest.mark.parametrize("B,C,d,K", [(1, 1, 1, 1), (5, 7, 20, 30), (9, 33, 40, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_accumulate_in_float32(B, C, d, K, dtype):
    # Tighter than the contract's bfloat16 tolerance: the kernels round only their outputs.
    w, idx = _support(B, C, K)
    M = torch.randn(K, d, device=DEVICE).to(dtype)
    X = torch.randn(B, d, device=DEVICE).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    f32 = (M.float(), X.float())
    torch.testing.assert_close(S.gather_matmul(w, idx, M).float(), T.gather_matmul(w, idx, f32[0]), **tol)
    torch.testing.assert_close(S.gather_dot(X, idx, M).float(), T.gather_dot(X.float(), idx, f32[0]), **tol)
    out = S.scatter_matmul(w, idx, X, K).float()
    torch.testing.assert_close(out, T.scatter_matmul(w, idx, f32[1], K), **tol)
    assert S.gather_matmul(w, idx, M).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_atomic_scatter_with_a_popular_latent(dtype):
    w, idx = _support(11, 9, 13)
    idx[:, 0] = 4  # a popular latent: many atomics to one row
    X = torch.randn(11, 24, device=DEVICE).to(dtype)
    ref = T.scatter_matmul(w, idx, X.float(), 13)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(S.scatter_matmul(w, idx, X, 13).float(), ref, **tol)
    assert (S.scatter_matmul(torch.zeros_like(w), idx, X, 13) == 0).all()  # no live entry at all


def test_opcheck_every_triton_op():
    x, A, lam = _inputs(5, 16, 40)
    _, _, aa, xx, _ = sanitize(x, A)
    margin = score_margin(xx, aa, lam, 16, 2.0**-24).float()
    start = torch.full((5,), -math.inf, device=DEVICE)
    sel_args = (x, A, aa.float(), margin, start, lam, 16, 4, "ieee")
    torch.library.opcheck(
        torch.ops.spade_kernels.triton_select_tiles.default, sel_args, test_utils=KERNEL_CHECKS
    )
    slot_val, slot_idx, counts, bound = E.select_tiles(*sel_args)
    merge_args = (slot_val, slot_idx, counts, bound, margin, 16)
    torch.library.opcheck(
        torch.ops.spade_kernels.triton_select_merge.default, merge_args, test_utils=KERNEL_CHECKS
    )
    idx = torch.randint(0, 40, (5, 7), device=DEVICE)
    torch.library.opcheck(
        torch.ops.spade_kernels.triton_gather_sq_dist.default, (x, idx, A), test_utils=KERNEL_CHECKS
    )
    w, sidx = _support(4, 6, 10)
    M, X = torch.randn(10, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE)
    torch.library.opcheck(
        torch.ops.spade_kernels.triton_gather_matmul.default, (w, sidx, M), test_utils=KERNEL_CHECKS
    )
    torch.library.opcheck(
        torch.ops.spade_kernels.triton_gather_dot.default, (X, sidx, M), test_utils=KERNEL_CHECKS
    )
    torch.library.opcheck(
        torch.ops.spade_kernels.triton_scatter_matmul.default, (w, sidx, X, 10), test_utils=KERNEL_CHECKS
    )
    z = torch.rand(6, 9, device=DEVICE)
    z[z < 0.4] = 0.0
    args = (
        z,
        torch.randn(6, 9, device=DEVICE),
        torch.rand(6, 9, device=DEVICE),
        None,
        torch.tensor(0.7, device=DEVICE),
    )
    torch.library.opcheck(
        torch.ops.spade_kernels.triton_support_jacobian.default, args, test_utils=KERNEL_CHECKS
    )
    lam_t = torch.tensor(lam, device=DEVICE, requires_grad=True)
    # The pipeline's op: schema, fake (data-dependent width) and autograd registration.
    torch.library.opcheck(
        torch.ops.spade_kernels.encode.default,
        (
            x.requires_grad_(),
            A,
            lam_t,
            "triton",
            *pipeline.resolve_options(TR.PRIMITIVES, {"precision": "ieee"}),
        ),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
