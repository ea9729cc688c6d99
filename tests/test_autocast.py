"""Mixed precision: a float32 SpaDE layer inside ``torch.autocast`` (docs/design.md, "Mixed precision").

Every backend, bfloat16 and float16, encode / forward / backward, against the
float32 layer and the float64 reference, within the precision contract's
half-precision tolerance; the policy itself (the backends see the autocast
dtype's inputs); and fp16 with a GradScaler (no inf/NaN gradients, no skipped
steps) on data at the scale trainers feed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import registered_backends, runs_on

import spade_kernels as sk
from spade_kernels.reference import spade_forward_reference
from spade_kernels.testing import assert_codes_match_reference

HALF = [torch.bfloat16, torch.float16]
PARAMS = ["prototypes", "W_dec", "lambda_raw"]


def _layer(backend: str, d: int = 16, K: int = 96, device="cpu", seed: int = 0) -> sk.SpaDE:
    torch.manual_seed(seed)
    return sk.SpaDE(d, K, backend=backend, gamma_reg=0.2, device=device)


def _grads(layer: sk.SpaDE, x: torch.Tensor, dtype: torch.dtype | None):
    layer.zero_grad(set_to_none=True)
    if dtype is None:
        out = layer(x)
    else:
        with torch.autocast(x.device.type, dtype=dtype):
            out = layer(x)
    out.loss.backward()
    return out, {n: getattr(layer, n).grad.detach().clone() for n in PARAMS}


def _float64_grads(layer: sk.SpaDE, x: torch.Tensor, cast: torch.dtype | None):
    """Loss gradients in float64 at the parameters and input rounded to ``cast`` (what autocast hands over)."""

    def rounded(t):
        return (t.to(cast) if cast is not None else t).double()

    P = rounded(layer.prototypes.detach()).requires_grad_()
    W = layer.W_dec.detach().double().requires_grad_()
    raw = layer.lambda_raw.detach().double().requires_grad_()
    loss = spade_forward_reference(rounded(x), P, W, torch.nn.functional.softplus(raw), gamma_reg=0.2)[2]
    loss.backward()
    return {"prototypes": P.grad, "W_dec": W.grad, "lambda_raw": raw.grad}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", HALF)
def test_encode_under_autocast_meets_the_half_contract(backend, dtype, device):
    layer = _layer(backend, device=device)
    x = torch.randn(40, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        z = layer.encode(x)
        codes = layer.encode_sparse(x)
        z_ref = _layer("reference", device=device).encode(x)
    assert z.dtype == torch.float32 and codes.values.dtype == torch.float32
    torch.testing.assert_close(codes.to_dense(), z, rtol=0, atol=0)
    # The contract on the inputs autocast hands over (x and the prototypes rounded to dtype).
    assert_codes_match_reference(
        z, x.to(dtype), layer.prototypes.detach().to(dtype), layer.lam.item(), low_precision_baseline=z_ref
    )


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_runs_the_backends_half_path(backend, dtype, device):
    """Under autocast the float32 layer computes what a layer in ``dtype`` computes on x in ``dtype``."""
    layer = _layer(backend, device=device)
    x = torch.randn(24, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        z = layer.encode(x)
    half = _layer(backend, device=device).to(dtype)
    assert torch.equal(half.prototypes.detach(), layer.prototypes.detach().to(dtype))
    torch.testing.assert_close(z, half.encode(x.to(dtype)), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF)
def test_forward_backward_under_autocast(backend, dtype, device):
    layer = _layer(backend, device=device)
    x = torch.randn(32, 16, device=device)
    out32, g32 = _grads(layer, x, None)
    out, g = _grads(layer, x, dtype)
    # x̂ and the loss come back in float32 (the decode over the support and the loss run in float32).
    assert out.x_hat.dtype == torch.float32 and out.loss.dtype == torch.float32
    for n in PARAMS:
        assert g[n].dtype == getattr(layer, n).dtype == torch.float32, n
        assert torch.isfinite(g[n]).all(), n
    # Against float64 at the rounded inputs: the reference backend's own half error sets the scale.
    exact = _float64_grads(layer, x, dtype)
    ref_layer = _layer("reference", device=device)
    _, g_ref = _grads(ref_layer, x, dtype)
    for n in PARAMS:
        tol = 2 * _rel(g_ref[n], exact[n]) + 2e-3
        assert _rel(g[n], exact[n]) <= tol, (n, _rel(g[n], exact[n]), tol)
    # And near the float32 results: rounding the inputs to dtype moves the loss by ~its unit roundoff.
    eps = torch.finfo(dtype).eps
    assert abs(out.loss.item() - out32.loss.item()) <= 50 * eps * abs(out32.loss.item())
    for n in PARAMS:
        assert _rel(g[n], g32[n]) <= 200 * eps, (n, _rel(g[n], g32[n]))


def test_autocast_leaves_a_half_layer_and_float64_alone():
    x = torch.randn(8, 16)
    for dtype in (torch.bfloat16, torch.float64):
        layer = _layer("torch").to(dtype)
        plain = layer.encode(x.to(dtype))
        with torch.autocast("cpu", dtype=torch.float16):
            torch.testing.assert_close(layer.encode(x.to(dtype)), plain, rtol=0, atol=0)


def test_autocast_disabled_region_is_float32():
    layer = _layer("torch")
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
        z = layer.encode(x)
    torch.testing.assert_close(z, layer.encode(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    # The Triton interpreter's run takes ~15 s: in the slow set, which CI runs.
    "backend_name",
    [pytest.param(*p.values, id=p.id, marks=[*p.marks, *([pytest.mark.slow] if p.id == "triton" else [])])
     for p in registered_backends()],
)  # fmt: skip
def test_float16_grad_scaler_never_skips_a_step(backend_name, device):
    backend = runs_on(backend_name, device)
    """fp16 AMP as trainers run it (GradScaler defaults): no inf/NaN gradients from the kernels, no skipped step."""
    torch.manual_seed(3)
    d, K = 32, 128
    layer = sk.SpaDE(d, K, backend=backend, device=device)
    data = torch.randn(8, 64, d, device=device)  # E‖x‖² = d, as trainers standardise
    layer.init_from_data(data.reshape(-1, d))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device)  # init_scale 2**16: λ's scaled gradient is ~1e5, past float16
    scales = [scaler.get_scale()]
    for x in data:
        opt.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = layer(x).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        for p in layer.parameters():
            assert torch.isfinite(p.grad).all()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    # A step with an inf/NaN gradient is skipped and halves the scale.
    assert scales == [2.0**16] * len(scales), scales


def test_functional_encode_ignores_an_enclosing_autocast(backend):
    """``sk.spade_encode`` computes in its arguments' dtypes: autocast must not recast its exact stage."""
    x, A = torch.randn(48, 32), torch.randn(256, 32)
    plain = sk.spade_encode(x, A, 1 / 64, backend=backend).to_dense()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sk.spade_encode(x, A, 1 / 64, backend=backend).to_dense()
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
