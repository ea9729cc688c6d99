"""The SpaDE loss, composed once (:func:`spade_loss`), and its reconstruction term (:func:`mean_squared_error`).

The reconstruction term mean_b ‖x_b − x̂_b‖² has one B×d temporary.

Written as ``((x − x̂)²).sum(-1).mean()`` autograd keeps the difference, its
square and, in the backward, three more B×d tensors (2·diff, ·grad, the
negation): at small K and large d they are most of a training step's memory
(docs/design.md, "Memory model").  Here the forward reduces the difference
with one dot product and keeps no tensor of its own (only references to x̂
and x); the backward forms ∂/∂x̂ = 2·g/B·(x̂ − x) in one B×d tensor (and its
negation only if x itself needs a gradient), recorded by autograd when a
second derivative is asked for.
"""

from __future__ import annotations

import torch

from ..backends.interface import Primitives
from ..codes import SparseCodes
from ..numerics import compute_dtype
from .group import ONE_PROCESS, OneProcess
from .plan import products_for
from .sparse import gather_sq_dist, sparse_decode

__all__ = ["mean_squared_error", "spade_loss"]

_HALF = (torch.float16, torch.bfloat16)


class _MeanSquaredError(torch.autograd.Function):
    @staticmethod
    def forward(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        diff = x_hat - x
        flat = diff.reshape(-1)
        # Half types: the sum of squares in float32 (a half accumulator would lose it).
        acc = flat.float() if flat.dtype in _HALF else flat
        value = torch.dot(acc, acc) / max(diff.shape[0], 1) if diff.numel() else acc.new_zeros(())
        return value.to(x_hat.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        # The operands, not the difference: the backward recomputes it, differentiably when a
        # second derivative is asked for (a difference made in forward would carry no graph).
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_hat, x = ctx.saved_tensors
        scale = (grad * (2.0 / max(x_hat.shape[0], 1))).to(x_hat.dtype)
        if torch.is_grad_enabled():  # create_graph: out of place, so autograd records it
            g_hat = (x_hat - x) * scale
        else:
            g_hat = torch.sub(x_hat, x).mul_(scale)
        return g_hat if ctx.needs_input_grad[0] else None, -g_hat if ctx.needs_input_grad[1] else None


def mean_squared_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mean over rows of ‖x̂ − x‖² for (B, d) tensors of one dtype (differentiable in both)."""
    if x_hat.shape != x.shape or x_hat.dim() != 2:
        raise ValueError(
            f"x_hat and x must be (B, d) of one shape, got {tuple(x_hat.shape)} and {tuple(x.shape)}"
        )
    if torch.compiler.is_compiling():
        # Traced graphs get the plain expression (torch 2.11's aot tracing of the Function's
        # backward gave wrong gradients); the compiler plans its memory itself.
        return ((x_hat - x) ** 2).sum(-1).mean()
    return _MeanSquaredError.apply(x_hat, x)


def spade_loss(
    prims: Primitives,
    codes: SparseCodes,
    x: torch.Tensor,
    target: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    gamma: float,
    reg_on: str,
    group: OneProcess = ONE_PROCESS,
):
    """x̂, loss, mse and reg of ``codes`` of x (B, d) — the SpaDE loss (docs/design.md, "Mathematics").

    ``loss = mse + gamma·reg``, ``mse = mean_b ‖target_b − x̂_b‖²``,
    ``reg = mean_b Σ_j z[b,j]·D[b,j]`` with D the distances to the encoder
    prototypes (the codes' own, ``reg_on="encoder"``) or to the decoder rows.
    ``codes`` index this process's latents (the rows of ``W_dec``); over a
    latent ``group`` the decoder's and the regulariser's partial sums are
    summed across the shards, the only difference from one process.  The
    products run on ``prims`` for each matrix's dtype.
    """
    decoded = sparse_decode(products_for(prims, W_dec.dtype), codes, W_dec)
    x_hat = group.sum_partials(decoded)
    if b_dec is not None:
        x_hat = x_hat + b_dec
    if reg_on == "encoder":
        # The encoder's exact support distances: the regulariser's gradient joins the encoder's backward.
        D = codes.distances
    else:
        W = W_dec.to(x.dtype)
        D = gather_sq_dist(products_for(prims, compute_dtype(x.dtype)), x, W, codes.indices)
    reg = group.sum_partials((codes.values * D).sum(-1)).mean()
    mse = mean_squared_error(x_hat, target.to(x_hat.dtype))
    return x_hat, mse + gamma * reg, mse, reg
