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

Each takes the :class:`~spade_kernels.pipeline.plan.Products` its caller
chose (:func:`~spade_kernels.pipeline.plan.products_for`).  All cost
O(B·C·d), no B×K tensor, except a product's dense route, which is only taken
where it measured faster.
"""

from __future__ import annotations

import functools

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from ..backends import torch_ as T
from ..codes import SparseCodes
from ..numerics import compute_dtype
from .group import ONE_PROCESS, OneProcess
from .plan import Products, backward_products

__all__ = ["encode_backward", "gather_sq_dist", "sparse_decode", "sq_dist_backward"]


def sq_dist_backward(products: Products, x, M, indices, G, needs=(True, True)):
    """Gradients of Σ G[b,j]·‖x_b − M[idx[b,j]]‖² with respect to x and M (design fact 6), through ``products``.

    Only those ``needs`` asks for (None otherwise): ∂x costs B×d tensors, and
    a training step's x needs none.
    """
    grad_x = grad_M = None
    if needs[0]:
        grad_x = 2 * (G.sum(1, keepdim=True) * x - products.gather_matmul(G, indices, M))
    if needs[1]:
        # Σ_j −2G·(x_b − M_k) per latent k: the transpose with its M term in the same pass.
        grad_M = products.scatter_matmul(-2 * G, indices, x, M.shape[0], M)
    return grad_x, grad_M


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


def encode_backward(
    products: Products, x, A, lam, z, idx, D, grad_z, grad_D=None, needs=(True, True, True),
    group: OneProcess = ONE_PROCESS,
):  # fmt: skip
    """Sparse backward of the encoder (design facts 5–6), one pass over the support.

    ``z``, ``idx``, ``D`` are the forward's values, indices and support
    distances (compute dtype); ``lam`` is the λ tensor.  ``grad_D`` is a direct
    gradient on D (the distance-weighted regulariser's γ/B·z), folded into
    the same pass.  Returns (∂x, ∂prototypes, ∂λ) in the dtypes of x, A, λ,
    or None where ``needs`` says not needed.  Cost O(B·C·d), no B×K tensor.
    Over a latent ``group`` the Jacobian's row statistics and the gradients
    of the replicated x and λ are summed over the shards.
    """
    cd = z.dtype
    products = backward_products(products, cd, x, A, lam, z, D, grad_z, grad_D)
    # A sharded layer's rows span every shard: the PyTorch Jacobian with summed row statistics.
    jacobian = (
        functools.partial(T.support_jacobian, row_sums=group.row_sums)
        if group.sharded
        else products.support_jacobian
    )
    # λ stays a tensor: a Python float here would stop torch.compile's tracing.
    G, lam_rows = jacobian(z, grad_z, D, grad_D, lam)
    grad_x = grad_A = grad_lam = None
    if needs[2]:
        grad_lam = group.sum(lam_rows.sum().reshape(1)).to(lam.dtype).reshape(lam.shape)
    if needs[0] or needs[1]:
        xc = zero_nan_rows(x, z, cd)
        gx, gA = sq_dist_backward(products, xc, A.to(cd), idx, G.to(cd), needs[:2])
        grad_x = group.sum(gx).to(x.dtype) if gx is not None else None
        grad_A = gA.to(A.dtype) if gA is not None else None
    return grad_x, grad_A, grad_lam


# The autograd Functions below have a separate setup_context, as torch.func's transforms require.


class _GatherSqDistFn(torch.autograd.Function):
    @staticmethod
    def forward(x, M, indices, products):
        cd = compute_dtype(torch.promote_types(x.dtype, M.dtype))
        out = products.gather_sq_dist(x.to(cd), indices, M.to(cd))
        dtype = torch.promote_types(x.dtype, M.dtype)
        # No no-op .to() on the output: torch 2.11's AOT autograd then gave a wrong ∂M (tested).
        return out if out.dtype == dtype else out.to(dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, M, indices, products = inputs
        # The inputs themselves are saved (a cast made here would carry no graph for a second derivative).
        ctx.save_for_backward(x, M, indices)
        ctx.products = products

    @staticmethod
    def backward(ctx, grad):
        x, M, indices = ctx.saved_tensors
        cd = compute_dtype(torch.promote_types(x.dtype, M.dtype))
        products = backward_products(ctx.products, cd, x, M, grad)
        gx, gM = sq_dist_backward(
            products, x.to(cd), M.to(cd), indices, grad.to(cd), ctx.needs_input_grad[:2]
        )
        gx = gx.to(x.dtype) if gx is not None else None
        return gx, gM.to(M.dtype) if gM is not None else None, None, None


def gather_sq_dist(
    products: Products, x: torch.Tensor, M: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """‖x_b − M[indices[b, j]]‖² on the given support, computed directly; sparse backward.

    ``products`` are those of the compute dtype of x and M.
    """
    return _GatherSqDistFn.apply(x, M, indices, products)


class _SparseDecodeFn(torch.autograd.Function):
    @staticmethod
    def forward(values, indices, W, bias, products):
        out = products.gather_matmul(values, indices, W)
        return out + bias if bias is not None else out

    @staticmethod
    def setup_context(ctx, inputs, output):
        values, indices, W, bias, products = inputs
        ctx.save_for_backward(values, indices, W)
        ctx.has_bias, ctx.products = bias is not None, products

    @staticmethod
    def backward(ctx, grad):
        values, indices, W = ctx.saved_tensors
        products = backward_products(ctx.products, W.dtype, values, W, grad)
        grad_v = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # ∂L/∂z only on the stored support: gathered dot products.
            grad_v = products.gather_dot(grad, indices, W).to(values.dtype)
        if ctx.needs_input_grad[2]:
            # Rows whose input was NaN have NaN values in their padding slots
            # (index 0): keep 0·NaN out of W_dec's gradient.
            clean = torch.where(
                torch.isnan(values), torch.zeros((), dtype=values.dtype, device=values.device), values
            )
            grad_W = products.scatter_matmul(clean, indices, grad.to(W.dtype), W.shape[0])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad.sum(0)
        return grad_v, None, grad_W, grad_b, None


def sparse_decode(
    products: Products, codes: SparseCodes, W: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x̂ = codes · W (+ bias) as a gather-matmul over the support; sparse backward.

    ``products`` are those of W's dtype.  codes may have leading dimensions
    (..., C); the output is (..., d).
    """
    lead = codes.indices.shape[:-1]
    idx = codes.indices.reshape(-1, codes.width)
    val = codes.values.reshape(-1, codes.width)
    out = _SparseDecodeFn.apply(val, idx, W, bias, products)
    return out.reshape(*lead, W.shape[1])
