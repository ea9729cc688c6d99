"""The reconstruction term of the SpaDE loss, mean_b ‖x_b − x̂_b‖², with one B×d temporary.

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

__all__ = ["mean_squared_error"]

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
