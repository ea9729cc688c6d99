"""The reconstruction term of the SpaDE loss, mean_b ‖x_b − x̂_b‖², with one B×d temporary.

Written as ``((x − x̂)²).sum(-1).mean()`` autograd keeps the difference, its
square and, in the backward, three more B×d tensors (2·diff, ·grad, the
negation): at small K and large d they are most of a training step's memory
(docs/design.md, "Memory model").  Here the forward keeps only the difference
and reduces it with one dot product; the backward forms ∂/∂x̂ = 2·g/B·diff
(and its negation only if x itself needs a gradient).
"""

from __future__ import annotations

import torch

__all__ = ["mean_squared_error"]

_HALF = (torch.float16, torch.bfloat16)


class _MeanSquaredError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        diff = x_hat - x
        flat = diff.reshape(-1)
        # Half types: the sum of squares in float32 (a half accumulator would lose it).
        acc = flat.float() if flat.dtype in _HALF else flat
        value = torch.dot(acc, acc) / max(diff.shape[0], 1) if diff.numel() else acc.new_zeros(())
        ctx.save_for_backward(diff)
        return value.to(x_hat.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (diff,) = ctx.saved_tensors
        scale = grad * (2.0 / max(diff.shape[0], 1))
        g_hat = diff * scale.to(diff.dtype)
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
