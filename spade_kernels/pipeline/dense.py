"""The ``reference`` backend's computation: dense B×K distances and a sort-based sparsemax, in row blocks.

Differentiable by autograd through the distances and the closed-form
sparsemax backward; the oracle the fast backends are compared with.

Precision: for float32 inputs the distances are computed in float64 and
rounded to float32, and the projection runs in float32 on them.  The
expanded form ‖x‖² − 2x·a + ‖a‖² in float32 cancels when x is near a
prototype (it put a spurious 6e-8 code into a row at (128, 768, 4096), where
the paper's direct differences and float64 have none); in float64 its error
is far below the float32 rounding of direct differences, so the distances
are correctly rounded, at the cost of a float64 GEMM instead of a B×K×d
difference tensor.  float64 inputs: everything in float64.  float16/bfloat16
inputs keep their own dtype for the distances (the paper's low-precision
path, the baseline of the precision contract's half tolerance) and float32
scores and projection.

Memory: the rows are processed in blocks sized from the memory budget
(:mod:`.memory`); the dense outputs of :func:`dense_codes` are B×K by
definition, while :func:`dense_sparse_codes` keeps only each block's support,
written into one result (:class:`.rows.RowWriter`) when no gradient is needed.
"""

from __future__ import annotations

import torch

from ..backends import torch_ as T
from ..codes import SparseCodes
from ..numerics import squared_norms
from ..reference import squared_distances
from ..sparsemax_op import sparsemax_sort
from . import memory
from .plan import dense_gather_dot, dense_gather_matmul, dense_scatter_matmul
from .rows import codes_of_blocks

__all__ = ["PRIMITIVES", "dense_codes", "dense_row_bytes", "dense_sparse_codes"]

#: The ``reference`` backend's products over a support: its codes come from dense B×K codes, so it
#: decodes and transposes them with dense GEMMs of row blocks (``z @ W_dec`` as the oracle writes it,
#: on every device); distances and the sparsemax Jacobian are the ``torch`` backend's.
PRIMITIVES = T.PRIMITIVES._replace(
    name="reference",
    gather_matmul=dense_gather_matmul,
    gather_dot=dense_gather_dot,
    scatter_matmul=dense_scatter_matmul,
)

_HALF = (torch.float16, torch.bfloat16)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _HALF else torch.float64


def dense_row_bytes(K: int) -> int:
    """Working memory per row: D (float64 and rounded), the scores, the sort (values, int64 order,
    cumulative sums), the codes."""
    return K * 8 * 6


#: Prototypes converted to the work dtype at a time (bounds the float64 copy of A).
_CHUNK = 4096


def _distances(x, prototypes):
    """D in the work dtype, prototypes converted a chunk at a time, rounded to x's dtype."""
    work = _work_dtype(x.dtype)
    xw = x.to(work)
    if prototypes.shape[0] <= _CHUNK:
        return squared_distances(xw, prototypes.to(work), naive=False).to(x.dtype)
    chunks = [
        squared_distances(xw, prototypes[c : c + _CHUNK].to(work), naive=False).to(x.dtype)
        for c in range(0, prototypes.shape[0], _CHUNK)
    ]
    return torch.cat(chunks, dim=1)


def _block(x, prototypes, lam):
    if not bool(torch.isfinite(prototypes).all()):
        # The NaN policy of every backend: a non-finite prototype makes every row NaN.
        nan = torch.full((x.shape[0], prototypes.shape[0]), float("nan"), device=x.device)
        return nan.to(torch.promote_types(x.dtype, torch.float32)), nan.to(x.dtype)
    D = _distances(x, prototypes)
    # The scores in at least float32: λ·D rounded to a half type would add its
    # own error, and λ's gradient Σ ∂L/∂s·D would be summed (and overflow) in it.
    return sparsemax_sort(-lam * D.to(torch.promote_types(D.dtype, torch.float32)), dim=-1), D


def _check_range(x, prototypes) -> None:
    # Finite inputs whose squared distances overflow: refused, as by the sparse backends.
    if x.dtype != torch.float64:
        squared_norms(x, "x")
        squared_norms(prototypes, "prototypes")


def dense_codes(x: torch.Tensor, prototypes: torch.Tensor, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense codes z and distances D (B×K each) of x (B, d); float32 codes for half inputs."""
    _check_range(x, prototypes)
    blocks = memory.dense_blocks(x.shape[0], dense_row_bytes(prototypes.shape[0]), x.device)
    if len(blocks) <= 1:
        return _block(x, prototypes, lam)
    parts = [_block(x[rs], prototypes, lam) for rs in blocks]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _sparse(z: torch.Tensor, D: torch.Tensor, with_distances: bool) -> SparseCodes:
    codes = SparseCodes.from_dense(z)
    if not with_distances:
        return codes
    # The distances on the support (padding slots: latent 0's, whose code is 0), differentiable.
    return SparseCodes(
        codes.indices, codes.values, codes.support_size, codes.n_latents, D.gather(1, codes.indices)
    )


def dense_sparse_codes(
    x: torch.Tensor, prototypes: torch.Tensor, lam, *, distances: bool = False
) -> SparseCodes:
    """The reference's codes in sparse form, a row block at a time: memory is the budget plus the support.

    With ``distances``, the codes carry D on their support (as the sparse
    backends' do), differentiable like the values.
    """
    _check_range(x, prototypes)
    K = prototypes.shape[0]
    if x.shape[0] == 0:
        return _sparse(*_block(x, prototypes, lam), distances)
    blocks = memory.dense_blocks(x.shape[0], dense_row_bytes(K), x.device)
    keep_graph = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (x, prototypes, lam)
    )

    def encode_block(rows: slice):
        c = _sparse(*_block(x[rows], prototypes, lam), distances)
        return c.values, c.indices, c.support_size, c.distances

    return codes_of_blocks(blocks, encode_block, x.shape[0], K, keep_graph)
