"""Contracts every backend keeps under autograd's and PyTorch's transforms.

* Second derivatives (``create_graph=True``) are exact on every backend: they
  equal plain autograd through the paper's dense formulation
  (``reference.spade_forward_reference``) in float64, and no backend warns.
* ``torch.compile(fullgraph=True)`` traces a training step through every
  sparse backend, with aot_eager and inductor, and gives eager's results.
* ``torch.func``: ``sparsemax`` supports vmap (and grad/jacrev); the layer and
  ``spade_encode`` refuse every transform with one error that says what to use.
"""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import registered_backends, runs_on
from torch.func import functional_call, grad, jacrev, jvp, vmap

import spade_kernels as sk
from spade_kernels.reference import spade_encode_reference, spade_forward_reference, sparsemax_reference

PARAMS = ("prototypes", "W_dec", "lambda_raw", "b_dec")


def _layer(backend, *, reg_on="encoder", use_bias=False, dtype=torch.float64, K=24, d=8):
    torch.manual_seed(1)
    return sk.SpaDE(d, K, backend=backend, reg_on=reg_on, use_bias=use_bias, dtype=dtype)


def _second_derivatives(loss_fn, params: dict, wrt: str):
    """∂/∂params of ‖∂loss/∂params[wrt]‖² (a gradient penalty), through autograd's create_graph."""
    names = [k for k, v in params.items() if v is not None]
    g = torch.autograd.grad(loss_fn(), params[wrt], create_graph=True)[0]
    hs = torch.autograd.grad((g * g).sum(), [params[k] for k in names], allow_unused=True)
    return {k: torch.zeros_like(params[k]) if h is None else h for k, h in zip(names, hs)}


def _oracle(layer, x, wrt):
    """The same second derivatives by plain autograd through the dense, sort-based formulation."""
    p = {
        k: getattr(layer, k).detach().clone().requires_grad_()
        for k in PARAMS
        if getattr(layer, k) is not None
    }
    p["x"] = x.detach().clone().requires_grad_()

    def loss():
        lam = F.softplus(p["lambda_raw"])
        return spade_forward_reference(
            p["x"], p["prototypes"], p["W_dec"], lam, b_dec=p.get("b_dec"), reg_on=layer.reg_on,
            gamma_reg=layer.gamma_reg,
        )[2]  # fmt: skip

    return _second_derivatives(loss, p, wrt)


@pytest.mark.parametrize("reg_on,use_bias", [("encoder", False), ("decoder", True)])
@pytest.mark.parametrize("wrt", ["prototypes", "W_dec", "lambda_raw", "x"])
def test_second_derivative_is_exact_on_every_backend(backend, reg_on, use_bias, wrt):
    layer = _layer(backend, reg_on=reg_on, use_bias=use_bias)
    x = torch.randn(32, 8, dtype=torch.float64)
    p = {k: getattr(layer, k) for k in PARAMS}
    p["x"] = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never "an autograd kernel was not registered" and a number
        ours = _second_derivatives(lambda: layer(p["x"]).loss, p, wrt)
    expected = _oracle(layer, x, wrt)
    assert any(h.abs().max() > 1e-3 for h in expected.values())  # a second derivative worth checking
    for name, h in expected.items():
        torch.testing.assert_close(ours[name], h, rtol=1e-8, atol=1e-10, msg=f"∂/∂{name} of ‖∂L/∂{wrt}‖²")


def test_gradgradcheck_of_the_loss(backend):
    # Finite differences of the gradient itself: independent of any formula above.
    layer = _layer(backend, K=12, d=4)
    x = torch.randn(10, 4, dtype=torch.float64)

    def loss(A, W, raw):
        return functional_call(layer, {"prototypes": A, "W_dec": W, "lambda_raw": raw}, (x,)).loss

    args = tuple(getattr(layer, k).detach().clone().requires_grad_() for k in PARAMS[:3])
    assert torch.autograd.gradgradcheck(loss, args, eps=1e-6, atol=1e-5)


def test_second_derivative_of_spade_encode(backend, product_route):
    # A loss whose gradient on the codes depends on the inputs (z², z·D), so the second derivative runs
    # through the support Jacobian and every product of the encoder's backward, on both product routes.
    from spade_kernels.reference import squared_distances

    x = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, dtype=torch.float64)

    def penalty(loss_fn):
        g = torch.autograd.grad(loss_fn(x, A, lam), x, create_graph=True)[0]
        return torch.autograd.grad((g * g).sum(), (A, lam))

    def ours(x, A, lam):
        codes = sk.spade_encode(x, A, lam, backend=backend)
        z, D = codes.values, codes.distances
        if D is None:  # the reference's codes carry no support distances
            D = ((x.unsqueeze(1) - A[codes.indices]) ** 2).sum(-1)
        return (z * z * w[codes.indices]).sum() + (z * D).sum()

    def dense(x, A, lam):
        z = spade_encode_reference(x, A, lam)
        return (z * z * w).sum() + (z * squared_distances(x, A)).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = penalty(ours)
    for g, e in zip(got, penalty(dense)):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)


def test_float32_second_derivative_runs_on_the_torch_primitives(sparse_backend, monkeypatch):
    backend = sparse_backend
    if backend == "torch":
        pytest.skip("the torch backend's primitives are the ones a recorded backward runs on")
    # create_graph=True: the kernels have no derivative, so the backward that autograd records runs on
    # the torch backend's ops (backward_products); a plain backward keeps the backend's kernels.
    from spade_kernels.pipeline import sparse

    seen = []
    real = sparse.backward_products

    def spy(products, dtype, *tensors):
        out = real(products, dtype, *tensors)
        seen.append(out.name)
        return out

    monkeypatch.setattr(sparse, "backward_products", spy)
    layer64 = _layer(backend)
    layer = copy.deepcopy(layer64).float()
    x = torch.randn(32, 8)
    layer(x).loss.backward()
    assert set(seen) == {backend}
    seen.clear()
    layer.zero_grad()
    g = torch.autograd.grad(layer(x).loss, layer.prototypes, create_graph=True)[0]
    (g * g).sum().backward()
    assert "torch" in seen
    expected = _oracle(layer64, x.double(), "prototypes")["prototypes"]
    torch.testing.assert_close(layer.prototypes.grad.double(), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif("native" not in sk.available_backends(), reason="the extension is not built")
def test_native_ops_refuse_inputs_that_require_grad():
    # Called directly (not through the package's autograd formulas), an op that has no derivative
    # raises instead of warning and returning gradients that treat it as a constant.
    from spade_kernels import ops

    w = torch.rand(6, 3, requires_grad=True)
    idx = torch.randint(0, 5, (6, 3))
    M = torch.randn(5, 4)
    with pytest.raises(
        RuntimeError, match=r"spade_kernels::gather_matmul: argument 'weights' requires grad.*no derivative"
    ):
        ops.gather_matmul(w, idx, M)
    with torch.no_grad():
        assert ops.gather_matmul(w, idx, M).shape == (6, 4)
    torch.testing.assert_close(
        ops.gather_matmul(w.detach(), idx, M), (w.detach().unsqueeze(2) * M[idx]).sum(1)
    )


# -- torch.compile ------------------------------------------------------------------------------


def _compile_cases():
    # Under the interpreter the Triton ops are opaque custom ops: aot_eager checks their tracing;
    # inductor adds only time here (on a GPU it compiles the kernels); 14 s on the CPU machine.
    # The torch backend's ops are aten ops that inductor lowers like any model's (15 s of compiling).
    # Every inductor case, and the interpreter's aot_eager case (14 s), run with -m slow (CI runs it),
    # so the README's test command stays under 5 minutes; aot_eager of native and torch by default.
    cases = []
    for p in registered_backends(sparse_only=True):
        for compiler, reg_on, use_bias in (("aot_eager", "decoder", True), ("inductor", "encoder", False)):
            slow = [pytest.mark.slow] if compiler == "inductor" or p.id == "triton" else []
            cases.append(pytest.param(p.id, compiler, reg_on, use_bias, id=f"{p.id}-{compiler}",
                                      marks=[*p.marks, *slow]))  # fmt: skip
    return cases


@pytest.mark.parametrize("backend,compiler,reg_on,use_bias", _compile_cases())
def test_full_graph_compile_of_a_training_step_equals_eager(backend, compiler, reg_on, use_bias, device):
    runs_on(backend, device)
    torch._dynamo.reset()
    layer = _layer(backend, reg_on=reg_on, use_bias=use_bias, dtype=torch.float32, K=64, d=16)
    x = torch.randn(20, 16)

    def step(x):
        out = layer(x)
        return out.loss, out.x_hat

    loss, x_hat = step(x)
    loss.backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(step, backend=compiler, fullgraph=True)
    c_loss, c_x_hat = compiled(x)
    c_loss.backward()
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_x_hat, x_hat, rtol=1e-5, atol=1e-6)
    for p, g in zip(layer.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    x2 = torch.randn(33, 16)  # another batch size: a recompile, dynamic
    torch.testing.assert_close(compiled(x2)[0], step(x2)[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the inference path through the compiled kernels, too
        torch.testing.assert_close(compiled(x)[0], loss, rtol=1e-5, atol=1e-6)


def test_full_graph_compile_of_the_functional_encoder(sparse_backend):
    torch._dynamo.reset()
    x, A = torch.randn(6, 16), torch.randn(40, 16)
    lam = torch.tensor(1 / 32)

    def f(x, A, lam):
        codes = sk.spade_encode(x, A, lam, backend=sparse_backend)
        return codes.values.sum(-1), codes.support_size

    sums, sizes = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=False)(x, A, lam)
    torch.testing.assert_close(sums, torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(sizes, sk.spade_encode(x, A, lam, backend="torch").support_size)


@pytest.mark.slow  # 9 s, a process compiling from cold: in the slow set (CI runs it), so the README's test command stays under 5 minutes
@pytest.mark.skipif("native" not in sk.available_backends(), reason="the extension is not built")
def test_full_graph_compile_as_the_first_call_of_a_process():
    # The backend's module is imported while dynamo traces (no eager call before): a plain import
    # statement, which dynamo runs, not importlib.import_module, which it refuses.
    code = (
        "import torch, spade_kernels as sk\n"
        "m = sk.SpaDE(16, 64, backend='native', reg_on='decoder', use_bias=True)\n"
        "x = torch.randn(20, 16)\n"
        "loss = torch.compile(lambda x: m(x).loss, backend='aot_eager', fullgraph=True)(x)\n"
        "loss.backward()\n"
        "torch.testing.assert_close(loss, m(x).loss)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


# -- torch.func -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("in_dim", [0, 1, 2])
def test_vmap_of_sparsemax(dim, in_dim):
    x = torch.randn(5, 3, 7, dtype=torch.float64)
    out = vmap(lambda t: sk.sparsemax(t, dim=dim), in_dims=in_dim)(x)
    expected = torch.stack(
        [sparsemax_reference(x.select(in_dim, i), dim=dim) for i in range(x.shape[in_dim])]
    )
    torch.testing.assert_close(out, expected)


def test_torch_func_derivatives_of_sparsemax():
    x = torch.randn(4, 9, dtype=torch.float64)
    jac = jacrev(sk.sparsemax)(x[0])
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(sparsemax_reference, x[0]))
    w = torch.arange(9.0, dtype=torch.float64)
    per_row = vmap(grad(lambda t: (sk.sparsemax(t) * w).sum()))(x)
    assert per_row.shape == x.shape
    xr = x.clone().requires_grad_()
    expected = torch.autograd.grad((sparsemax_reference(xr) * w).sum(), xr)[0]
    torch.testing.assert_close(per_row, expected)
    torch.testing.assert_close(vmap(vmap(sk.sparsemax))(x[None]), sparsemax_reference(x[None]))
    assert torch.autograd.gradgradcheck(sk.sparsemax, (x.clone().requires_grad_(),))


def test_torch_func_on_the_layer_is_one_clear_error(backend):
    layer = _layer(backend)
    x = torch.randn(6, 8, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    attempts = {
        "vmap encode": lambda: vmap(layer.encode)(x),
        "vmap encode_sparse": lambda: vmap(layer.encode_sparse)(x),
        "vmap forward": lambda: vmap(lambda r: layer(r).loss)(x),
        "vmap spade_encode": lambda: vmap(
            lambda r: sk.spade_encode(r, layer.prototypes, 0.1, backend=backend).values
        )(x),
        "grad": lambda: grad(lambda p: functional_call(layer, p, (x,)).loss)(params),
        "jacrev": lambda: jacrev(layer.encode)(x),
        "jvp": lambda: jvp(lambda r: layer(r).loss, (x,), (x,)),
    }
    for attempt in attempts.values():
        with pytest.raises(
            RuntimeError, match="does not support torch.func transforms.*torch.autograd instead"
        ):
            attempt()
    # What the message offers: the dense scores and sparsemax, under any transform.
    dense = vmap(lambda r: sk.sparsemax(layer.scores(r)))(x)
    torch.testing.assert_close(dense, layer.encode(x), rtol=1e-10, atol=1e-12)
