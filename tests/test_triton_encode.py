"""The Triton encoder forward, on the interpreter (CPU) or a GPU (SPADE_TEST_GPU=1)."""

import math
import os

import pytest
import torch

pytest.importorskip("triton")

import spade_kernels as sk
from spade_kernels import pipeline
from spade_kernels.backends import triton_ as TR
from spade_kernels.numerics import sanitize, score_margin, sorted_threshold
from spade_kernels.reference import spade_encode_reference
from spade_kernels.testing import assert_codes_match_reference
from spade_kernels.triton_ import encode as E

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("SPADE_TEST_GPU=1 but no CUDA device", allow_module_level=True)

# Tiny tiles, slots and caps so every path (many tiles, slot overflow, cap
# overflow, the prepass bound) runs at interpreter-friendly sizes.  On a GPU
# the defaults run too.
SMALL = {"block_n": 16, "slots": 4, "cap": 32, "prepass": 16}
OPTIONS = [SMALL] + ([{}] if DEVICE == "cuda" else [])


def _inputs(B, d, K, dtype=torch.float32, lam=None):
    x = torch.randn(B, d).to(DEVICE, dtype)
    A = torch.randn(K, d).to(DEVICE, dtype)
    return x, A, (1.0 / (2 * d) if lam is None else lam)


def _codes(x, A, lam, **opts):
    z, idx, size, _ = pipeline.encode_forward(TR.PRIMITIVES, x, A, lam, opts)
    return sk.SparseCodes(idx, z, size, A.shape[0])


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("B,d,K", [(1, 1, 1), (7, 3, 5), (33, 24, 129), (17, 40, 300)])
def test_matches_reference_fp32(B, d, K, opts):
    x, A, lam = _inputs(B, d, K)
    assert_codes_match_reference(_codes(x, A, lam, **opts), x, A, lam)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    x, A, lam = _inputs(19, 32, 200, dtype)
    codes = _codes(x, A, lam, **SMALL)
    assert codes.dtype == torch.float32
    baseline = sk.spade_encode(x, A, lam, backend="reference").to_dense()
    assert_codes_match_reference(codes, x, A, lam, low_precision_baseline=baseline)


def test_tf32_option_keeps_exact_codes():
    # tf32 only selects candidates (with a wider margin); τ and the codes come
    # from directly recomputed distances, so the contract still holds.
    x, A, lam = _inputs(21, 48, 160)
    assert_codes_match_reference(_codes(x, A, lam, precision="tf32", **SMALL), x, A, lam)
    with pytest.raises(ValueError, match="precision"):
        _codes(x, A, lam, precision="bf16x9")


def test_slot_and_cap_overflow_rows_are_exact():
    # Small λ: dense supports overflow every slot and the cap; large λ: one-hot.
    for lam in (1e-4, 5.0):
        x, A, _ = _inputs(12, 6, 90)
        aa = (A * A).sum(1)
        no_margin = torch.zeros(12, device=DEVICE)
        start = torch.full((12,), -math.inf, device=DEVICE)
        counts = E.encode_fwd_select(x, A, aa, no_margin, start, lam, 16, 2, "ieee")[2]
        if lam < 1:
            assert (counts > 2).any(), "the test must overflow slots"
        codes = _codes(x, A, lam, block_n=16, slots=2, cap=8, prepass=8)
        ref = spade_encode_reference(x.double(), A.double(), lam)
        torch.testing.assert_close(codes.to_dense().double(), ref, atol=1e-5, rtol=0)


def test_mixed_overflow_and_clean_rows():
    x, A, lam = _inputs(24, 8, 120, lam=0.05)
    x[::2] = A[:12] + 1e-3 * torch.randn(12, 8, device=DEVICE)  # near one prototype: tiny support
    x[1::2] *= 0.01  # far from all: dense support, overflows
    assert_codes_match_reference(_codes(x, A, lam, block_n=16, slots=3, cap=10, prepass=8), x, A, lam)


def test_select_kernel_slots_hold_every_survivor():
    x, A, lam = _inputs(9, 12, 64)
    _, _, aa, xx, _ = sanitize(x, A)
    margin = score_margin(xx, aa, lam, 12, 2.0**-24).float()
    start = torch.full((9,), -math.inf, device=DEVICE)
    _, slot_idx, counts, bound = E.encode_fwd_select(x, A, aa.float(), margin, start, lam, 16, 16, "ieee")
    s = lam * (2 * x @ A.t() - aa)  # GEMM-form scores, for checking only
    tau = sorted_threshold(torch.sort(s, dim=1, descending=True).values)
    assert (bound <= tau + 1e-5).all(), "the published bound must stay below τ"
    for b in range(9):
        stored = set()
        for t in range(counts.shape[1]):
            stored |= set(slot_idx[b, t, : min(int(counts[b, t]), 16)].tolist())
        support = set((s[b] > tau[b]).nonzero().flatten().tolist())
        assert support <= stored


def test_nan_rows_isolated_and_non_contiguous():
    x = torch.randn(6, 20, device=DEVICE)[:, ::2]  # (6, 10) strided
    A = torch.randn(10, 50, device=DEVICE).t()  # (50, 10) transposed
    x[2, 3] = math.nan
    codes = _codes(x, A, 0.05, **SMALL)
    dense = codes.to_dense()
    assert torch.isnan(dense[2]).all() and torch.isfinite(dense[[0, 1, 3, 4, 5]]).all()
    assert_codes_match_reference(codes, x, A, 0.05)


def test_float64_is_exact():
    # The kernels have no float64 instantiation: the pipeline takes the torch backend's search.
    x, A, lam = _inputs(5, 7, 40, torch.float64)
    codes = _codes(x, A, lam)
    torch.testing.assert_close(codes.to_dense(), spade_encode_reference(x, A, lam), atol=1e-12, rtol=0)


def test_backend_and_gradients_match_torch_backend():
    x0, A0 = _inputs(11, 16, 70)[:2]
    w = torch.randn(11, 70, device=DEVICE)
    grads = []
    for backend in ("torch", "triton"):
        x, A = x0.clone().requires_grad_(), A0.clone().requires_grad_()
        lam = torch.tensor(0.04, device=DEVICE, requires_grad=True)
        codes = sk.spade_encode(x, A, lam, backend=backend)
        (codes.to_dense() * w).sum().backward()
        grads.append((codes.to_dense(), x.grad, A.grad, lam.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_layer_with_triton_backend():
    torch.manual_seed(3)
    layers = [sk.SpaDE(16, 48, backend=b, device=DEVICE) for b in ("torch", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 5, 16, device=DEVICE)
    outs = [m(x) for m in layers]
    for out in outs:
        out.loss.backward()
    torch.testing.assert_close(outs[0].loss, outs[1].loss, atol=1e-5, rtol=1e-5)
    for p, q in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


# On a GPU the kernels are triton_ops (traced by torch.compile); under the
# interpreter they are opaque custom_ops.  Both must pass every check.
KERNEL_CHECKS = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_opcheck_registered_ops():
    x, A, lam = _inputs(5, 16, 40)
    _, _, aa, xx, _ = sanitize(x, A)
    margin = score_margin(xx, aa, lam, 16, 2.0**-24).float()
    start = torch.full((5,), -math.inf, device=DEVICE)
    sel_args = (x, A, aa.float(), margin, start, lam, 16, 4, "ieee")
    torch.library.opcheck(
        torch.ops.spade_triton.encode_fwd_select.default, sel_args, test_utils=KERNEL_CHECKS
    )
    slot_val, slot_idx, counts, bound = E.encode_fwd_select(*sel_args)
    merge_args = (slot_val, slot_idx, counts, bound, margin, 16)
    torch.library.opcheck(
        torch.ops.spade_triton.encode_fwd_merge.default, merge_args, test_utils=KERNEL_CHECKS
    )
    idx = torch.randint(0, 40, (5, 7), device=DEVICE)
    torch.library.opcheck(
        torch.ops.spade_triton.gather_sq_dist.default, (x, idx, A), test_utils=KERNEL_CHECKS
    )
    lam_t = torch.tensor(lam, device=DEVICE, requires_grad=True)
    # The pipeline's op: schema, fake (data-dependent width) and autograd registration.
    torch.library.opcheck(
        torch.ops.spade_kernels.encode.default,
        (x.requires_grad_(), A, lam_t, "triton", "precision=ieee"),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_torch_compile_traces_without_graph_breaks():
    x, A, lam = _inputs(6, 16, 40)
    lam_t = torch.tensor(lam, device=DEVICE)

    def f(x, A, lam):
        codes = sk.spade_encode(x, A, lam, backend="triton")
        return codes.values.sum(-1), codes.support_size

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=False)
    sums, sizes = compiled(x, A, lam_t)
    torch.testing.assert_close(sums, torch.ones(6, device=DEVICE), atol=1e-5, rtol=0)
    torch.testing.assert_close(sizes, sk.spade_encode(x, A, lam_t, backend="torch").support_size)


def test_torch_compile_of_a_training_step_matches_eager():
    torch.manual_seed(2)
    m = sk.SpaDE(16, 48, backend="triton", device=DEVICE, use_bias=True)
    x = torch.randn(10, 16, device=DEVICE)

    def step(x):
        return m(x).loss

    eager = step(x)
    eager.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)
    loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    for p, g in zip(m.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
    with torch.no_grad():  # the inference path through compiled kernels, too
        torch.testing.assert_close(compiled(x), eager)
