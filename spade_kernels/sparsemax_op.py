"""``sparsemax(input, dim)``: exact sparsemax with the closed-form backward.

Forward is the ``native`` backend's sort-free op
``spade_kernels::sparsemax_rows`` where the backend registry says it runs
(``BACKENDS["native"].supports``) and it takes the dtype
(``ops.SPARSEMAX_DTYPES``) — C++ on CPU float32/float64 tensors, the CUDA
kernel on CUDA float32/bfloat16/float16 tensors (pruning to entries above
max − 1, then Michelot's iteration) — and otherwise the sort-based
projection of :mod:`spade_kernels.reference`;
backward is docs/design.md fact 5 — on the support S of each row,
∂L/∂s = g − mean_{j∈S} g_j, and 0 off the support — instead of autograd
through a sort.
"""

from __future__ import annotations

import torch

from . import ops
from .backends import BACKENDS
from .reference import sparsemax_reference

__all__ = ["sparsemax", "sparsemax_backward", "sparsemax_sort"]


def sparsemax_backward(z: torch.Tensor, grad: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Vector-Jacobian product of sparsemax given its output ``z``.

    Rows whose output is NaN get a NaN gradient.
    """
    support = z > 0
    g = torch.where(support, grad, torch.zeros_like(grad))
    size = support.sum(dim=dim, keepdim=True).clamp_min(1)
    mean = g.sum(dim=dim, keepdim=True) / size.to(g.dtype)
    out = torch.where(support, g - mean, torch.zeros_like(g))
    nan_rows = torch.isnan(z).any(dim=dim, keepdim=True)
    return torch.where(nan_rows, torch.full_like(out, float("nan")), out)


def _native(input: torch.Tensor) -> bool:
    """Whether the ``native`` backend's ``sparsemax_rows`` takes this tensor (the registry decides the device)."""
    return input.dtype in ops.SPARSEMAX_DTYPES.get(input.device.type, ()) and BACKENDS["native"].supports(
        input.device
    )


def _forward(input: torch.Tensor, dim: int, sort_based: bool) -> torch.Tensor:
    """The sort-free extension op where it applies (see :func:`_native`), else sort-based."""
    if not sort_based and input.numel() and _native(input):
        rows = input.movedim(dim, -1)
        # contiguous: the op copies strided input anyway, and compiled graphs then see one layout.
        out, _tau = ops.sparsemax_rows(rows.reshape(-1, rows.shape[-1]).contiguous())
        return out.reshape(rows.shape).movedim(-1, dim)
    return sparsemax_reference(input, dim=dim)


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(input: torch.Tensor, dim: int, sort_based: bool) -> torch.Tensor:
        return _forward(input, dim, sort_based)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, dim, _ = inputs
        ctx.save_for_backward(output)
        ctx.dim = dim

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (z,) = ctx.saved_tensors
        return sparsemax_backward(z, grad_output, ctx.dim), None, None

    @staticmethod
    def vmap(info, in_dims, input, dim, sort_based):
        # A per-row op: the vmapped dimension moved to the front is one more batch dimension.
        batch_dim = in_dims[0]
        if batch_dim is None:
            return _Sparsemax.apply(input, dim, sort_based), None
        input = input.movedim(batch_dim, 0)
        return _Sparsemax.apply(input, dim + 1 if dim >= 0 else dim, sort_based), 0


def sparsemax_sort(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """:func:`sparsemax` computed by the plain-PyTorch sort always (the ``reference`` backend's path)."""
    return _Sparsemax.apply(input, dim, True)


def sparsemax(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of ``input`` onto the probability simplex along ``dim``.

    ``sparsemax(s) = argmin_{p ∈ Δ} ‖p − s‖²``: like softmax it sums to one
    along ``dim``, unlike softmax most entries are exactly zero.

    Parameters
    ----------
    input : Tensor
        Any floating dtype.  float16/bfloat16 are computed in float32 and
        rounded back.  −inf entries are allowed (they get 0).
    dim : int
        Dimension to normalise over.

    Returns
    -------
    Tensor
        Same shape and dtype as ``input``.  Rows containing NaN or +inf, or
        only −inf, are NaN (as ``torch.softmax`` does for NaN rows).

    Notes
    -----
    Differentiable; the backward is the closed form
    ``g − mean_{support}(g)`` on the support and 0 elsewhere.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"sparsemax: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"sparsemax: input must have a floating dtype, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("sparsemax: input must have at least one dimension, got a 0-d tensor")
    if not -input.dim() <= dim < input.dim():
        raise ValueError(f"sparsemax: dim={dim} is out of range for a {input.dim()}-d input")
    return _Sparsemax.apply(input, dim, False)
