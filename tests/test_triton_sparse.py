"""Triton products over a support (decoder, regulariser, backward) and the Triton training step."""

import os

import pytest
import torch

pytest.importorskip("triton")

import spade_kernels as sk
from spade_kernels import pipeline
from spade_kernels.backends import torch_ as T
from spade_kernels.backends import triton_ as TR
from spade_kernels.reference import spade_forward_reference
from spade_kernels.triton_ import sparse as S

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("SPADE_TEST_GPU=1 but no CUDA device", allow_module_level=True)
KERNEL_CHECKS = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _support(B, C, K, pad=True):
    idx = torch.randint(0, K, (B, C), device=DEVICE)
    w = torch.randn(B, C, device=DEVICE)
    if pad:  # padding convention: index 0, weight 0 after each row's support
        size = torch.randint(0, C + 1, (B,), device=DEVICE)
        tail = torch.arange(C, device=DEVICE) >= size[:, None]
        idx, w = idx.masked_fill(tail, 0), w.masked_fill(tail, 0.0)
    return w, idx


@pytest.mark.parametrize("B,C,d,K", [(1, 1, 1, 1), (5, 7, 20, 30), (9, 33, 40, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_primitives_match_torch(B, C, d, K, dtype):
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


def test_primitives_non_contiguous():
    _, idx = _support(6, 8, 25, pad=False)
    M = torch.randn(25, 40, device=DEVICE)[:, ::2]  # (25, 20) strided rows
    X = torch.randn(6, 40, device=DEVICE)[:, ::2]
    wt = torch.randn(8, 6, device=DEVICE).t()  # (6, 8) non-contiguous weights
    torch.testing.assert_close(S.gather_matmul(wt, idx, M), T.gather_matmul(wt, idx, M))
    torch.testing.assert_close(S.gather_dot(X, idx, M), T.gather_dot(X, idx, M))
    torch.testing.assert_close(S.scatter_matmul(wt, idx, X, 25), T.scatter_matmul(wt, idx, X, 25))


def test_opcheck_primitives():
    w, idx = _support(4, 6, 10)
    M, X = torch.randn(10, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.spade_triton.gather_matmul.default, (w, idx, M), test_utils=KERNEL_CHECKS)
    torch.library.opcheck(torch.ops.spade_triton.gather_dot.default, (X, idx, M), test_utils=KERNEL_CHECKS)
    torch.library.opcheck(
        torch.ops.spade_triton.scatter_matmul.default, (w, idx, X, 10), test_utils=KERNEL_CHECKS
    )


@pytest.mark.parametrize("reg_on", ["encoder", "decoder"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_triton_training_step_matches_float64_reference(reg_on, use_bias):
    torch.manual_seed(5)
    m = sk.SpaDE(12, 60, backend="triton", reg_on=reg_on, use_bias=use_bias, gamma_reg=0.3, device=DEVICE)
    with torch.no_grad():
        m.W_dec.add_(0.1 * torch.randn_like(m.W_dec))
        if use_bias:
            m.b_dec.normal_()
    x = torch.randn(3, 7, 12, device=DEVICE)
    out = m(x)
    out.loss.backward()
    names = ["prototypes", "W_dec", "lambda_raw"] + (["b_dec"] if use_bias else [])
    ref = {n: getattr(m, n).detach().double().requires_grad_() for n in names}
    _, z, loss, _, _ = spade_forward_reference(
        x.reshape(-1, 12).double(), ref["prototypes"], ref["W_dec"],
        torch.nn.functional.softplus(ref["lambda_raw"]), b_dec=ref.get("b_dec"), gamma_reg=0.3, reg_on=reg_on,
    )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(out.loss.double(), loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.codes.to_dense().reshape(-1, 60).double(), z, atol=1e-5, rtol=0)
    for n in names:
        torch.testing.assert_close(getattr(m, n).grad.double(), ref[n].grad, atol=1e-4, rtol=1e-4, msg=n)


def test_triton_and_torch_train_step_for_step():
    torch.manual_seed(7)
    data = torch.randn(5, 24, 10, device=DEVICE)
    layers = [sk.SpaDE(10, 40, backend=b, device=DEVICE, use_bias=True) for b in ("torch", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in layers]
    for batch in data:
        for m, opt in zip(layers, opts):
            opt.zero_grad()
            m(batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
    for p, q in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


def test_triton_training_step_with_overflow_rows():
    # λ tiny: every row is dense and overflows the Triton slots; still exact, still differentiable.
    m = sk.SpaDE(6, 50, backend="triton", lambda_init=1e-4, device=DEVICE)
    ref = sk.SpaDE(6, 50, backend="torch", lambda_init=1e-4, device=DEVICE)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(9, 6, device=DEVICE)
    a, b = m(x), ref(x)
    assert int(a.codes.support_size.min()) == 50
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_bfloat16_training_step():
    m = sk.SpaDE(16, 64, backend="triton", dtype=torch.bfloat16, device=DEVICE)
    out = m(torch.randn(10, 16, device=DEVICE, dtype=torch.bfloat16))
    out.loss.backward()
    assert out.x_hat.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert m.prototypes.grad.dtype == m.W_dec.grad.dtype == torch.bfloat16
    assert m.lambda_raw.grad.dtype == torch.float32  # λ's raw parameter is kept in float32
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("with_grad_d", [False, True])
def test_support_jacobian_matches_torch(with_grad_d):
    z = torch.rand(6, 9, device=DEVICE)
    z[z < 0.4] = 0.0  # off-support slots (and padding)
    z[3] = 0.0  # an empty row
    grad_z, D = torch.randn(6, 9, device=DEVICE), torch.rand(6, 9, device=DEVICE) * 5
    grad_D = torch.randn(6, 9, device=DEVICE) if with_grad_d else None
    lam = torch.tensor(0.7, device=DEVICE)
    G, lam_rows = S.support_jacobian(z, grad_z, D, grad_D, lam)
    G_ref, lam_ref = T.support_jacobian(z, grad_z, D, grad_D, lam)
    torch.testing.assert_close(G, G_ref)
    torch.testing.assert_close(lam_rows, lam_ref)
    G, lam_rows = S.support_jacobian(z, None, D, grad_D, lam)  # only the regulariser's gradient
    torch.testing.assert_close(G, T.support_jacobian(z, None, D, grad_D, lam)[0])
    args = (z, grad_z, D, grad_D, lam)
    torch.library.opcheck(torch.ops.spade_triton.support_jacobian.default, args, test_utils=KERNEL_CHECKS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_atomic_scatter_with_a_popular_latent(dtype):
    w, idx = _support(11, 9, 13)
    idx[:, 0] = 4  # a popular latent: many atomics to one row
    X = torch.randn(11, 24, device=DEVICE).to(dtype)
    ref = T.scatter_matmul(w, idx, X.float(), 13)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(S.scatter_matmul(w, idx, X, 13).float(), ref, **tol)
    assert (S.scatter_matmul(torch.zeros_like(w), idx, X, 13) == 0).all()  # no live entry at all


def test_bfloat16_gradients_against_float64_reference():
    # bf16 parameters and inputs; the reference runs in float64 on the same
    # (bf16-rounded) values.  Gradients come back in bf16: ~3 significant digits.
    torch.manual_seed(11)
    m = sk.SpaDE(16, 48, backend="triton", dtype=torch.bfloat16, device=DEVICE, gamma_reg=0.2)
    x = torch.randn(12, 16, device=DEVICE, dtype=torch.bfloat16)
    m(x).loss.backward()
    names = ["prototypes", "W_dec", "lambda_raw"]
    ref = {n: getattr(m, n).detach().double().requires_grad_() for n in names}
    loss = spade_forward_reference(
        x.double(),
        ref["prototypes"],
        ref["W_dec"],
        torch.nn.functional.softplus(ref["lambda_raw"]),
        gamma_reg=0.2,
    )[2]
    loss.backward()
    for n in names:
        ours, theirs = getattr(m, n).grad.double(), ref[n].grad
        scale = theirs.abs().max().clamp_min(1e-6)
        assert ((ours - theirs).abs().max() / scale) < 3e-2, n


def test_pipeline_routes_triton_products():
    # Sparse route: the kernels; float64 matrices: the torch backend's products.
    w, idx = _support(6, 9, 20)
    M = torch.randn(20, 12, device=DEVICE)
    with pipeline.dense_products(False):
        torch.testing.assert_close(
            pipeline.product(TR.PRIMITIVES, "gather_matmul", w, idx, M), S.gather_matmul(w, idx, M)
        )
        got = pipeline.product(TR.PRIMITIVES, "gather_matmul", w.double(), idx, M.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, T.gather_matmul(w.double(), idx, M.double()))
