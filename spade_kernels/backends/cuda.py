"""The ``cuda`` backend: the C++ extension's ops (``torch.ops.spade.*``).

Forward (DESIGN.md §2 facts 1–4, 7):

1. ``spade::select_candidates`` computes the GEMM-form scores
   s' = λ(2·x·aᵀ − ‖a‖²) ``chunk`` prototypes at a time with ``at::addmm``
   (cuBLAS on the GPU, the CPU BLAS otherwise) and reduces each chunk with the
   selection epilogue (``csrc/include/spade/select.cuh``): a per-row buffer of
   ``max_candidates`` slots and a running lower bound of τ.  Live memory is
   O(B·chunk + B·max_candidates).
2. Rows whose candidates overflow the buffer are resolved exactly by the
   ``torch`` backend's dense search, for those rows only.
3. ``spade::exact_codes`` recomputes D directly on the candidates and takes
   the exact τ (``exact.cuh``).

Backward and decoder: the ``torch`` backend's formulas on the extension's
support products (``sparse.cuh``): ``support_jacobian``, ``gather_matmul``,
``gather_dot``, ``gather_sq_dist`` and a deterministic, atomic-free
``scatter_matmul``.

Every op has a CUDA implementation and a C++/OpenMP twin of the same
algorithm, so the whole backend also runs on CPU tensors (that is how CI,
which has no GPU, tests it).  The kernels compute in float32 or float64;
float16/bfloat16 inputs are upcast to float32 first (as in the ``torch``
backend), and half-precision decoder weights use the ``torch`` primitives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _ext
from ..codes import SparseCodes
from . import torch_ as T

__all__ = ["NATIVE_IMPL", "NATIVE_OPS", "encode", "encode_forward"]

#: Prototypes per score chunk: the live score block is B × CHUNK.
DEFAULT_CHUNK = 4096
#: Candidate slots per row; rows with more go to the exact dense path.
DEFAULT_MAX_CANDIDATES = 2048

_KERNEL_DTYPES = (torch.float32, torch.float64)


def _native(name: str, torch_op: Callable, data_arg: int) -> Callable:
    """``torch.ops.spade.<name>`` for float32/float64 data, else the ``torch`` primitive."""

    def op(*args):
        if args[data_arg].dtype not in _KERNEL_DTYPES:
            return torch_op(*args)
        _ext.require(args[data_arg].device)
        return getattr(torch.ops.spade, name)(*args)

    op.__name__ = name
    return op


def support_jacobian(z, grad_z, D, grad_D, lam: torch.Tensor):
    """:func:`~spade_kernels.backends.torch_.support_jacobian` as the extension op."""
    _ext.require(z.device)
    return torch.ops.spade.support_jacobian(z, grad_z, D, grad_D, lam.detach().to(z.device))


#: The extension's support products in the shape the shared sparse formulas expect.
NATIVE_OPS = T.SparseOps(
    T.dense_or(_native("gather_matmul", T.gather_matmul, 2), T.gather_matmul, 2),
    T.dense_or(_native("gather_dot", T.gather_dot, 2), T.gather_dot, 2),
    T.dense_or(_native("scatter_matmul", T.scatter_matmul, 2), T.scatter_matmul, 3),
    _native("gather_sq_dist", T.gather_sq_dist, 2),
    support_jacobian,
)


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


@torch.no_grad()
def encode_forward(
    x: torch.Tensor,
    A: torch.Tensor,
    lam: float,
    *,
    chunk: int = DEFAULT_CHUNK,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
):
    """Sparse SpaDE codes of x (B, d), float32 or float64, through the extension (no autograd).

    Returns (values, indices, support_size, D_support), as
    :func:`spade_kernels.backends.torch_.encode_forward`.
    """
    _ext.require(x.device)
    if x.shape[0] == 0:
        return T.empty_codes(x)
    B, d = x.shape
    K = A.shape[0]
    x, A, aa, xx, nan_rows = T.sanitize(x, A)
    margin = T.score_margin(xx, aa, lam, d, torch.finfo(x.dtype).eps)
    chunk = max(1, min(chunk, K))
    with T.ieee_matmul():
        cand, overflow = torch.ops.spade.select_candidates(x, A, aa, lam, margin, chunk, max_candidates)
        overflow_rows = overflow.nonzero().squeeze(1)
        if overflow_rows.numel():
            dense = T._dense_candidates(x[overflow_rows], A, aa, lam, margin[overflow_rows], chunk, B * chunk)
    width = max(int((cand >= 0).sum(1).max()), 1)
    z, idx, size, D = torch.ops.spade.exact_codes(x, A, lam, cand[:, :width].contiguous())
    if overflow_rows.numel():
        # Wide supports: the torch backend's exact stage (no width limit).
        none = torch.zeros(overflow_rows.numel(), dtype=torch.bool, device=x.device)
        z_o, idx_o, size_o, D_o = T.exact_codes(x[overflow_rows], A, lam, dense, none)
        width = max(z.shape[1], z_o.shape[1])
        z, idx, D = _pad(z, width), _pad(idx, width), _pad(D, width)
        z[overflow_rows], idx[overflow_rows], D[overflow_rows] = (
            _pad(z_o, width),
            _pad(idx_o, width),
            _pad(D_o, width),
        )
        size[overflow_rows] = size_o
    return T.finish_codes(z, idx, size, D, nan_rows)


#: The ``cuda`` backend: extension forward + shared sparse backward on the extension's products.
NATIVE_IMPL = T.EncoderImpl(encode_forward, NATIVE_OPS)


def encode(x: torch.Tensor, prototypes: torch.Tensor, lam, **options) -> SparseCodes:
    """Differentiable sparse SpaDE codes through the C++/CUDA extension.

    ``options``: ``chunk``, ``max_candidates`` (see the module constants).
    Gradients reach x, prototypes and λ (a sparse backward, no B×K tensor).
    """
    return T.encode_with(NATIVE_IMPL, x, prototypes, lam, **options)
