"""The sparse autograd, written once for every sparse backend (docs/design.md, "The pipeline").

* :func:`encode_backward` — the encoder's backward in one pass over the
  support: the sparsemax Jacobian chained through s = −λD (design fact 5),
  then ∂x, ∂prototypes, ∂λ (fact 6), with the regulariser's direct gradient
  on D folded in;
* :func:`sparse_decode` — x̂ = z·W_dec (+ b) as a gather-matmul over the
  support, with a sparse backward (∂z on the support, ∂W_dec by the sparse
  transpose);
* :func:`gather_sq_dist` — ‖x_b − M[idx]‖² on a support, differentiable
  (the regulariser on the decoder rows).

Every product goes through :func:`product`, the one place that routes it:
to the backend's kernel, to the ``torch`` backend's PyTorch op for a dtype
the kernel does not take, or to a dense GEMM when the support is a large
fraction of K (:data:`DENSE_FRACTION`).  All cost O(B·C·d), no B×K tensor,
except the dense route, which is only taken where it measured faster.
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.fx.experimental.symbolic_shapes import guard_or_false

from ..backends import torch_ as T
from ..backends.interface import Primitives
from ..codes import SparseCodes
from ..numerics import compute_dtype
from .memory import budget_bytes, row_blocks

__all__ = [
    "DENSE_FRACTION",
    "backward_primitives",
    "dense_products",
    "encode_backward",
    "gather_sq_dist",
    "product",
    "sparse_decode",
]

#: Support width, as a fraction of K, from which dense GEMMs beat the sparse
#: products, per device type.  CPU: measured at (B, d, K) = (1024, 768,
#: 16384) float32 on 2 threads — crossovers at C/K ≈ 0.023 (scatter), 0.028
#: (gather-matmul), 0.04 (gather-dot); benchmarks/NOTES.md.  Devices without
#: a measured crossover always take the sparse products.
DENSE_FRACTION: dict[str, float] = {"cpu": 1 / 32}
_dense_enabled = True


@contextlib.contextmanager
def dense_products(enabled: bool):
    """Enable or disable the dense route of :func:`product` inside a block (tests, benchmarks)."""
    global _dense_enabled
    before, _dense_enabled = _dense_enabled, enabled
    try:
        yield
    finally:
        _dense_enabled = before


def _densify(weights: torch.Tensor, indices: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    dense = torch.zeros(indices.shape[0], K, dtype=dtype, device=indices.device)
    return dense.scatter_add_(1, indices, weights.to(dtype))


def _dense_route(C, K: int, device: torch.device) -> bool:
    fraction = DENSE_FRACTION.get(device.type)
    if not _dense_enabled or fraction is None:
        return False
    # Under torch.compile the width C is data-dependent (an unbacked size):
    # guard_or_false takes the sparse route there instead of guarding on it.
    return guard_or_false(C >= fraction * K)


def _dense_blocks(rows: int, K: int, t: torch.Tensor):
    """Row blocks whose dense (rows, K) temporaries (two of them) fit the memory budget."""
    return row_blocks(rows, 2 * K * t.element_size(), budget_bytes(t.device))


def _dense_gather_matmul(w, idx, M):
    out = torch.empty(idx.shape[0], M.shape[1], dtype=M.dtype, device=M.device)
    for rs in _dense_blocks(idx.shape[0], M.shape[0], M):
        out[rs] = _densify(w[rs], idx[rs], M.shape[0], M.dtype) @ M
    return out


def _dense_gather_dot(G, idx, M):
    out = torch.empty(idx.shape, dtype=M.dtype, device=M.device)
    for rs in _dense_blocks(idx.shape[0], M.shape[0], M):
        out[rs] = (G[rs].to(M.dtype) @ M.t()).gather(1, idx[rs])
    return out


def _dense_scatter_matmul(w, idx, X, n):
    out = torch.zeros(n, X.shape[1], dtype=X.dtype, device=X.device)
    for rs in _dense_blocks(idx.shape[0], n, X):
        out.addmm_(_densify(w[rs], idx[rs], n, X.dtype).t(), X[rs])
    return out


#: The dense route of each product: densify a row block of the codes, one GEMM (row blocks in the budget).
_DENSE = {
    "gather_matmul": _dense_gather_matmul,
    "gather_dot": _dense_gather_dot,
    "scatter_matmul": _dense_scatter_matmul,
}


def product(prims: Primitives, name: str, first, indices, second, *rest):
    """The product ``name`` (gather_matmul, gather_dot, scatter_matmul, gather_sq_dist) through its route."""
    matrix = second
    n_latents = rest[0] if name == "scatter_matmul" else second.shape[0]
    if name in _DENSE and _dense_route(indices.shape[1], n_latents, indices.device):
        return _DENSE[name](first, indices, second, *rest)
    if matrix.dtype not in prims.product_dtypes:
        return getattr(T, name)(first, indices, second, *rest)
    return getattr(prims, name)(first, indices, second, *rest)


def sq_dist_backward(prims: Primitives, x, M, indices, G, needs=(True, True)):
    """Gradients of Σ G[b,j]·‖x_b − M[idx[b,j]]‖² with respect to x and M (design fact 6), through ``prims``.

    Only those ``needs`` asks for (None otherwise): ∂x costs B×d tensors, and
    a training step's x needs none.
    """
    grad_x = grad_M = None
    if needs[0]:
        grad_x = 2 * (G.sum(1, keepdim=True) * x - product(prims, "gather_matmul", G, indices, M))
    if needs[1]:
        grad_M = product(prims, "scatter_matmul", -2 * G, indices, x, M.shape[0])
        row_w = torch.zeros(M.shape[0], dtype=G.dtype, device=G.device)
        row_w.index_add_(0, indices.reshape(-1), G.reshape(-1))
        grad_M += 2 * row_w.unsqueeze(1) * M
    return grad_x, grad_M


def backward_primitives(prims: Primitives, *tensors) -> Primitives:
    """The primitives a backward pass runs on: the backend's, or the ``torch`` backend's when autograd records it.

    With ``create_graph=True`` (a second derivative, a gradient penalty) the
    backward itself is differentiated, and only PyTorch ops carry a
    derivative: the compiled and Triton kernels have none.  So that backward
    runs on the ``torch`` primitives (same formulas, same values), and every
    backend gives the exact second derivative (docs/design.md, "Autograd").
    """
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return T.PRIMITIVES
    return prims


def _traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is being traced (dynamo, or AOT autograd's fake/proxy tensors, which run outside dynamo)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    return is_fake(t) or get_proxy_mode() is not None


def zero_nan_rows(x: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype`` with the rows whose codes are NaN zeroed (0·NaN would leak them into ∂prototypes).

    Eager: copied only when such a row exists (a B×d copy saved otherwise).
    Traced: branch-free, because AOT autograd traces the backward outside
    dynamo, where a data-dependent ``if`` cannot be guarded.
    """
    nan_rows = torch.isnan(z).any(1, keepdim=True)
    if not _traced(z) and not bool(nan_rows.any()):
        return x.to(dtype)
    return torch.where(nan_rows, torch.zeros((), dtype=dtype, device=x.device), x.to(dtype))


def encode_backward(prims: Primitives, x, A, lam, z, idx, D, grad_z, grad_D=None, needs=(True, True, True)):
    """Sparse backward of the encoder (design facts 5–6), one pass over the support.

    ``z``, ``idx``, ``D`` are the forward's values, indices and support
    distances (compute dtype); ``lam`` is the λ tensor.  ``grad_D`` is a direct
    gradient on D (the distance-weighted regulariser's γ/B·z), folded into
    the same pass.  Returns (∂x, ∂prototypes, ∂λ) in the dtypes of x, A, λ,
    or None where ``needs`` says not needed.  Cost O(B·C·d), no B×K tensor.
    """
    cd = z.dtype
    prims = backward_primitives(prims, x, A, lam, z, D, grad_z, grad_D)
    # λ stays a tensor: a Python float here would stop torch.compile's tracing.
    jacobian = prims.support_jacobian if cd in prims.product_dtypes else T.support_jacobian
    G, lam_rows = jacobian(z, grad_z, D, grad_D, lam)
    grad_x = grad_A = grad_lam = None
    if needs[2]:
        grad_lam = lam_rows.sum().to(lam.dtype).reshape(lam.shape)
    if needs[0] or needs[1]:
        xc = zero_nan_rows(x, z, cd)
        gx, gA = sq_dist_backward(prims, xc, A.to(cd), idx, G.to(cd), needs[:2])
        grad_x = gx.to(x.dtype) if gx is not None else None
        grad_A = gA.to(A.dtype) if gA is not None else None
    return grad_x, grad_A, grad_lam


# The autograd Functions below have a separate setup_context, as torch.func's transforms require.


class _GatherSqDistFn(torch.autograd.Function):
    @staticmethod
    def forward(x, M, indices, prims):
        cd = compute_dtype(torch.promote_types(x.dtype, M.dtype))
        out = product(prims, "gather_sq_dist", x.to(cd), indices, M.to(cd))
        dtype = torch.promote_types(x.dtype, M.dtype)
        # No no-op .to() on the output: torch 2.11's AOT autograd then gave a wrong ∂M (tested).
        return out if out.dtype == dtype else out.to(dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, M, indices, prims = inputs
        # The inputs themselves are saved (a cast made here would carry no graph for a second derivative).
        ctx.save_for_backward(x, M, indices)
        ctx.prims = prims

    @staticmethod
    def backward(ctx, grad):
        x, M, indices = ctx.saved_tensors
        prims = backward_primitives(ctx.prims, x, M, grad)
        cd = compute_dtype(torch.promote_types(x.dtype, M.dtype))
        gx, gM = sq_dist_backward(prims, x.to(cd), M.to(cd), indices, grad.to(cd), ctx.needs_input_grad[:2])
        gx = gx.to(x.dtype) if gx is not None else None
        return gx, gM.to(M.dtype) if gM is not None else None, None, None


def gather_sq_dist(
    prims: Primitives, x: torch.Tensor, M: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """‖x_b − M[indices[b, j]]‖² on the given support, computed directly; sparse backward."""
    return _GatherSqDistFn.apply(x, M, indices, prims)


class _SparseDecodeFn(torch.autograd.Function):
    @staticmethod
    def forward(values, indices, W, bias, prims):
        out = product(prims, "gather_matmul", values, indices, W)
        return out + bias if bias is not None else out

    @staticmethod
    def setup_context(ctx, inputs, output):
        values, indices, W, bias, prims = inputs
        ctx.save_for_backward(values, indices, W)
        ctx.has_bias, ctx.prims = bias is not None, prims

    @staticmethod
    def backward(ctx, grad):
        values, indices, W = ctx.saved_tensors
        prims = backward_primitives(ctx.prims, values, W, grad)
        grad_v = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # ∂L/∂z only on the stored support: gathered dot products.
            grad_v = product(prims, "gather_dot", grad, indices, W).to(values.dtype)
        if ctx.needs_input_grad[2]:
            # Rows whose input was NaN have NaN values in their padding slots
            # (index 0): keep 0·NaN out of W_dec's gradient.
            clean = torch.where(
                torch.isnan(values), torch.zeros((), dtype=values.dtype, device=values.device), values
            )
            grad_W = product(prims, "scatter_matmul", clean, indices, grad.to(W.dtype), W.shape[0])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad.sum(0)
        return grad_v, None, grad_W, grad_b, None


def sparse_decode(
    prims: Primitives, codes: SparseCodes, W: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x̂ = codes · W (+ bias) as a gather-matmul over the support; sparse backward.

    codes may have leading dimensions (..., C); the output is (..., d).
    """
    lead = codes.indices.shape[:-1]
    idx = codes.indices.reshape(-1, codes.width)
    val = codes.values.reshape(-1, codes.width)
    out = _SparseDecodeFn.apply(val, idx, W, bias, prims)
    return out.reshape(*lead, W.shape[1])
