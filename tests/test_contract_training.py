"""The training step's contract, for every registered sparse backend: the layer's loss and gradients.

Gradients against plain autograd through the paper's dense formulation in
float64; step for step with the ``torch`` backend under Adam; overflow rows;
half-precision layers.
"""

import pytest
import torch

import spade_kernels as sk
from spade_kernels.reference import spade_forward_reference

PARAMS = ["prototypes", "W_dec", "lambda_raw"]


@pytest.mark.parametrize("reg_on", ["encoder", "decoder"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_training_step_gradients_match_float64_reference(sparse_backend, device, reg_on, use_bias):
    torch.manual_seed(3)
    layer = sk.SpaDE(
        12, 90, backend=sparse_backend, dtype=torch.float64, device=device, reg_on=reg_on, use_bias=use_bias
    )
    with torch.no_grad():
        layer.W_dec.add_(0.1 * torch.randn_like(layer.W_dec))  # decoder ≠ encoder
        if use_bias:
            layer.b_dec.normal_()
    x = torch.randn(17, 12, device=device, dtype=torch.float64)
    out = layer(x)
    out.loss.backward()
    names = PARAMS + (["b_dec"] if use_bias else [])
    grads = {n: getattr(layer, n).grad.clone() for n in names}
    ref = {n: getattr(layer, n).detach().clone().requires_grad_() for n in names}
    _, z, loss, _, _ = spade_forward_reference(
        x, ref["prototypes"], ref["W_dec"], torch.nn.functional.softplus(ref["lambda_raw"]),
        b_dec=ref.get("b_dec"), gamma_reg=layer.gamma_reg, reg_on=reg_on,
    )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(out.loss, loss, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out.codes.to_dense(), z, atol=1e-12, rtol=0)
    for n in names:
        torch.testing.assert_close(grads[n], ref[n].grad, atol=1e-10, rtol=1e-8, msg=n)


@pytest.mark.parametrize("reg_on", ["encoder", "decoder"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_float32_training_step_matches_float64_reference(sparse_backend, device, reg_on, use_bias):
    torch.manual_seed(5)
    m = sk.SpaDE(
        12, 60, backend=sparse_backend, reg_on=reg_on, use_bias=use_bias, gamma_reg=0.3, device=device
    )
    with torch.no_grad():
        m.W_dec.add_(0.1 * torch.randn_like(m.W_dec))
        if use_bias:
            m.b_dec.normal_()
    x = torch.randn(3, 7, 12, device=device)
    out = m(x)
    out.loss.backward()
    names = PARAMS + (["b_dec"] if use_bias else [])
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


#: How far five Adam steps may drift from the torch backend's: the Triton kernels sum in another order.
STEP_TOLERANCE = {"triton": 1e-4}


def test_step_for_step_with_the_torch_backend(sparse_backend, device):
    torch.manual_seed(7)
    data = torch.randn(5, 24, 10, device=device)
    layers = [sk.SpaDE(10, 40, backend=b, device=device, use_bias=True) for b in ("torch", sparse_backend)]
    layers[1].load_state_dict(layers[0].state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in layers]
    for batch in data:
        for m, opt in zip(layers, opts):
            opt.zero_grad()
            m(batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
    tol = STEP_TOLERANCE.get(sparse_backend, 1e-5)
    for p, q in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(p, q, atol=tol, rtol=tol)


def test_the_layer_matches_the_torch_backend_with_leading_dims(sparse_backend, device):
    torch.manual_seed(3)
    layers = [sk.SpaDE(16, 48, backend=b, device=device) for b in ("torch", sparse_backend)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 5, 16, device=device)
    outs = [m(x) for m in layers]
    for out in outs:
        out.loss.backward()
    torch.testing.assert_close(outs[0].loss, outs[1].loss, atol=1e-5, rtol=1e-5)
    for p, q in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_a_training_step_with_overflow_rows(sparse_backend, device):
    # λ tiny: every row is dense and overflows every buffer; still exact, still differentiable.
    m = sk.SpaDE(6, 50, backend=sparse_backend, lambda_init=1e-4, device=device)
    ref = sk.SpaDE(6, 50, backend="torch", lambda_init=1e-4, device=device)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(9, 6, device=device)
    a, b = m(x), ref(x)
    assert int(a.codes.support_size.min()) == 50
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_a_bfloat16_training_step(sparse_backend, device):
    m = sk.SpaDE(16, 64, backend=sparse_backend, dtype=torch.bfloat16, device=device)
    out = m(torch.randn(10, 16, device=device, dtype=torch.bfloat16))
    out.loss.backward()
    assert out.x_hat.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert m.prototypes.grad.dtype == m.W_dec.grad.dtype == torch.bfloat16
    assert m.lambda_raw.grad.dtype == torch.float32  # λ's raw parameter is kept in float32
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_bfloat16_gradients_against_float64_reference(sparse_backend, device):
    # bf16 parameters and inputs; the reference runs in float64 on the same (bf16-rounded)
    # values.  Gradients come back in bf16: ~3 significant digits.
    torch.manual_seed(11)
    m = sk.SpaDE(16, 48, backend=sparse_backend, dtype=torch.bfloat16, device=device, gamma_reg=0.2)
    x = torch.randn(12, 16, device=device, dtype=torch.bfloat16)
    m(x).loss.backward()
    ref = {n: getattr(m, n).detach().double().requires_grad_() for n in PARAMS}
    loss = spade_forward_reference(
        x.double(),
        ref["prototypes"],
        ref["W_dec"],
        torch.nn.functional.softplus(ref["lambda_raw"]),
        gamma_reg=0.2,
    )[2]
    loss.backward()
    for n in PARAMS:
        ours, theirs = getattr(m, n).grad.double(), ref[n].grad
        scale = theirs.abs().max().clamp_min(1e-6)
        assert ((ours - theirs).abs().max() / scale) < 3e-2, n
