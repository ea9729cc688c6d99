"""The ``native`` backend (backends/native.py) end to end.

Runs its C++/OpenMP kernels on CPU tensors; with SPADE_TEST_GPU=1 (and an
extension built with CUDA) the same tests also run the CUDA kernels.  The
generic parity tests of test_encode.py / test_layer.py / test_robustness.py
include this backend too; these cover its own paths: chunking, the candidate
buffer's overflow rows, precision, the training step.
"""

import pytest
import torch

import spade_kernels as sk
from spade_kernels import _ext, pipeline
from spade_kernels.backends import native as N
from spade_kernels.backends import torch_ as T
from spade_kernels.reference import spade_encode_reference, spade_forward_reference
from spade_kernels.testing import assert_codes_match_reference

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension unavailable: {_ext.reason}")


def _inputs(B, d, K, device, dtype=torch.float32):
    return torch.randn(B, d, device=device, dtype=dtype), torch.randn(K, d, device=device, dtype=dtype)


@pytest.mark.parametrize(
    "B,d,K,chunk", [(1, 1, 1, 4096), (7, 3, 5, 2), (129, 16, 1000, 64), (65, 40, 3000, 1000)]
)
def test_matches_reference_fp32_every_chunking(device, B, d, K, chunk):
    x, A = _inputs(B, d, K, device)
    lam = 1.0 / (2 * d)
    z, idx, size, _ = pipeline.encode_forward(N.PRIMITIVES, x, A, lam, {"chunk": chunk})
    codes = sk.SparseCodes(idx, z, size, K)
    assert_codes_match_reference(codes, x.cpu(), A.cpu(), lam)


@pytest.mark.parametrize("lam", [1e-5, 1e-2, 3.0])
def test_overflow_and_dense_rows_exact_float64(device, lam):
    # Tiny λ: supports thousands wide, past the 256-slot buffer, so rows take the
    # exact dense path; large λ: one-hot rows.
    x, A = _inputs(30, 6, 2000, device, torch.float64)
    z, idx, size, D = pipeline.encode_forward(N.PRIMITIVES, x, A, lam, {"chunk": 300, "max_candidates": 256})
    ref = spade_encode_reference(x, A, lam)
    torch.testing.assert_close(sk.SparseCodes(idx, z, size, 2000).to_dense(), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(size, (ref > 0).sum(-1))
    torch.testing.assert_close(D, torch.where(z > 0, ((x[:, None] - A[idx]) ** 2).sum(-1), 0.0))


def test_mixed_overflow_rows(device):
    # A tight cluster of 1000 prototypes and 500 spread far away.  Rows inside
    # the cluster have ~1000-wide supports (past the 256-slot buffer: exact
    # dense path); rows on top of a far prototype have a few neighbours.
    x, A = _inputs(30, 4, 1500, device, torch.float64)
    A[:1000] *= 0.01
    A[1000:] = 10 + 3 * A[1000:]
    x[::2] = A[1000:1015] + 1e-3 * torch.randn(15, 4, device=device, dtype=torch.float64)
    x[1::2] *= 0.01
    z, idx, size, _ = pipeline.encode_forward(N.PRIMITIVES, x, A, 0.05, {"chunk": 256, "max_candidates": 256})
    ref = spade_encode_reference(x, A, 0.05)
    torch.testing.assert_close(sk.SparseCodes(idx, z, size, 1500).to_dense(), ref, atol=1e-12, rtol=0)
    assert (size[::2] < 64).all() and (size[1::2] > 256).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(device, dtype):
    x, A = _inputs(37, 16, 300, device, dtype)
    codes = sk.spade_encode(x, A, 1 / 32, backend="native")
    assert codes.dtype == torch.float32
    baseline = sk.spade_encode(x.cpu(), A.cpu(), 1 / 32, backend="reference").to_dense()
    assert_codes_match_reference(codes.to("cpu"), x.cpu(), A.cpu(), 1 / 32, low_precision_baseline=baseline)


def test_tf32_setting_is_ignored(device):
    x, A = _inputs(50, 64, 700, device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        codes = sk.spade_encode(x, A, 1 / 128, backend="native")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision("highest")
    assert_codes_match_reference(codes.to("cpu"), x.cpu(), A.cpu(), 1 / 128)


@pytest.mark.parametrize("reg_on", ["encoder", "decoder"])
def test_training_step_gradients_match_float64_reference(device, reg_on):
    torch.manual_seed(3)
    layer = sk.SpaDE(
        12, 90, backend="native", dtype=torch.float64, device=device, reg_on=reg_on, use_bias=True
    )
    x = torch.randn(17, 12, device=device, dtype=torch.float64)
    out = layer(x)
    out.loss.backward()
    params = [layer.prototypes, layer.W_dec, layer.lambda_raw, layer.b_dec]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ref = spade_forward_reference(
        x,
        layer.prototypes,
        layer.W_dec,
        layer.lam,
        b_dec=layer.b_dec,
        gamma_reg=layer.gamma_reg,
        reg_on=reg_on,
    )
    ref[2].backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad, atol=1e-10, rtol=1e-8)


def test_native_and_torch_backends_train_step_for_step(device):
    torch.manual_seed(0)
    layers = [sk.SpaDE(10, 64, backend=b, device=device) for b in ("native", "torch")]
    layers[1].load_state_dict(layers[0].state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in layers]
    data = torch.randn(5, 32, 10, device=device)
    for batch in data:
        for m, opt in zip(layers, opts):
            opt.zero_grad()
            m(batch).loss.backward()
            opt.step()
    for p, q in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_half_precision_decoders_take_the_torch_products():
    # The kernels compute in float32/float64; the pipeline routes bfloat16
    # decoder weights to the torch backend's products rather than failing.
    w = torch.rand(4, 3)
    idx = torch.randint(0, 9, (4, 3))
    W = torch.randn(9, 5).bfloat16()
    with pipeline.dense_products(False):
        got = pipeline.product(N.PRIMITIVES, "gather_matmul", w, idx, W)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), T.gather_matmul(w, idx, W.float()), atol=2e-2, rtol=2e-2)


def test_products_route_through_the_kernels_unless_dense():
    calls = []
    prims = N.PRIMITIVES._replace(gather_matmul=lambda *a: calls.append(1) or T.gather_matmul(*a))
    w, idx, M = torch.rand(4, 3), torch.randint(0, 9, (4, 3)), torch.randn(9, 5)
    with pipeline.dense_products(True):  # C/K = 1/3 is past the CPU crossover: the dense GEMM
        torch.testing.assert_close(
            pipeline.product(prims, "gather_matmul", w, idx, M), T.gather_matmul(w, idx, M)
        )
    assert not calls
    with pipeline.dense_products(False):
        pipeline.product(prims, "gather_matmul", w, idx, M)
    assert calls == [1]


def test_torch_compile_matches_eager(device):
    # The candidate widths are data-dependent host values, so the forward graph
    # breaks there; the ops themselves trace through their fake implementations.
    torch.manual_seed(0)
    layer = sk.SpaDE(16, 200, backend="native", device=device)
    x = torch.randn(32, 16, device=device)
    eager = layer(x).loss
    eager.backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(layer, backend="aot_eager")(x).loss
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for p, g in zip(layer.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
