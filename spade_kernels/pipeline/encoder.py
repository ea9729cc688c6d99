"""The encoder forward, written once for every sparse backend (docs/design.md, "The pipeline").

For x (B, d), prototypes A (K, d), λ and a :class:`~spade_kernels.pipeline.plan.Plan`
(which decided every callee below, :func:`~spade_kernels.pipeline.plan.make_plan`):

1. :func:`~spade_kernels.numerics.sanitize` — squared norms; rows with a
   non-finite input (or every row, for a non-finite prototype) become NaN rows;
2. the margin — the rounding slack of the backend's score GEMM
   (:func:`~spade_kernels.numerics.score_margin`);
3. candidate search — ``plan.select``: dense scores (:func:`~.search.dense_search`),
   the backend's ``select_candidates`` (:func:`~.search.grown_search`), or the
   ``torch`` backend's for inputs its kernels do not take; a superset of
   every row's support, or an overflow flag;
4. exact codes — ``plan.exact`` on the candidates: D recomputed directly,
   the exact τ;
5. overflow rows — resolved exactly by :func:`~.search.dense_candidates` (dense scores
   of just those rows, in row blocks) and the ``torch`` backend's exact stage,
   which has no width limit;
6. :func:`finish_codes` — trimmed to the widest support, NaN rows marked;
7. the threshold over the layer's latent group — the local codes in one
   process, the all-gathered τ for a latent-sharded layer
   (:mod:`spade_kernels.pipeline.group`).

No B×K tensor exists except the row blocks of step 5.
"""

from __future__ import annotations

import math

import torch

from ..numerics import RangeError, ieee_matmul, sanitize, sanitize_prototypes, score_margin
from . import memory
from .group import ONE_PROCESS, OneProcess
from .plan import Plan
from .rows import RowWriter, held_row_bytes
from .search import dense_candidates, pad

__all__ = ["empty_codes", "encode_forward", "encode_rows", "finish_codes"]


def finish_codes(z, idx, size, D, nan_rows, contiguous: bool = True):
    """Codes trimmed to width C = max support (at least 1); rows in ``nan_rows`` become NaN.

    ``contiguous=False`` leaves the trimmed tensors as views of the wider
    ones where no NaN row needs a copy: for a row block whose codes are
    copied into a :class:`~spade_kernels.pipeline.rows.RowWriter` next, a
    compact copy would only be held beside the untrimmed codes and the
    writer's buffers (the block's peak).
    """
    C = max(int(size.max()) if size.numel() else 0, 1)
    z, idx, D = (t[:, :C] if t.shape[1] >= C else pad(t, C) for t in (z, idx, D))  # a view where it trims
    if nan_rows.any():
        z = z.masked_fill(nan_rows.unsqueeze(1), math.nan)
        D = D.masked_fill(nan_rows.unsqueeze(1), math.nan)
        size = size.masked_fill(nan_rows, 0)
        idx = idx.masked_fill(nan_rows.unsqueeze(1), 0)
    if not contiguous:
        return z, idx, size, D
    return z.contiguous(), idx.contiguous(), size, D.contiguous()


def empty_codes(x: torch.Tensor, cd: torch.dtype):
    """The codes of a batch of zero rows: (values, indices, support_size, D)."""
    return (
        x.new_zeros((0, 1), dtype=cd),
        x.new_zeros((0, 1), dtype=torch.long),
        x.new_zeros(0, dtype=torch.long),
        x.new_zeros((0, 1), dtype=cd),
    )


def _replace_rows(parts, rows, new):
    """Each of (z, idx, size, D) with the rows ``rows`` replaced by ``new``'s, widths padded to match."""
    out = []
    for old, repl in zip(parts, new):
        if old.dim() == 2:
            width = max(old.shape[1], repl.shape[1])
            old, repl = pad(old, width), pad(repl, width)
        old = old.clone()
        old[rows] = repl
        out.append(old)
    return out


def _local_codes(
    plan: Plan, x: torch.Tensor, A: torch.Tensor, lam: float, prototypes=None, contiguous: bool = True
):
    """Steps 1–6 (the module's docstring) on this process's prototypes (``prototypes``: their
    :func:`~spade_kernels.numerics.sanitize_prototypes`, when the caller computed it once for its row
    blocks; ``contiguous``: :func:`finish_codes`'s)."""
    x, A, aa, xx, nan_rows = sanitize(x, A, prototypes)
    if x.shape[0] == 0:
        return empty_codes(x, aa.dtype)
    margin = score_margin(xx, aa, lam, x.shape[1], plan.margin_eps, plan.worst_case_margin)
    with ieee_matmul():
        cand, overflow = plan.select(x, A, aa, lam, margin)
    overflow = overflow & ~nan_rows
    width = max(int((cand >= 0).sum(1).max()), 1)
    codes = plan.exact(x, A, lam, cand[:, :width].contiguous())
    del cand  # not held beside the codes and their trimmed copy
    if overflow.any():
        rows = overflow.nonzero().squeeze(1)
        with ieee_matmul():
            dense = dense_candidates(x[rows], A, aa, lam, margin[rows])
        codes = _replace_rows(codes, rows, plan.exact_unbounded(x[rows], A, lam, dense))
    return finish_codes(*codes, nan_rows, contiguous=contiguous)


@torch.no_grad()
def encode_forward(
    plan: Plan,
    x: torch.Tensor,
    A: torch.Tensor,
    lam: float,
    group: OneProcess = ONE_PROCESS,
    prototypes=None,
    contiguous: bool = True,
):
    """Sparse SpaDE codes of x (B, d) as ``plan`` says (no autograd).

    Returns (values, indices, support_size, D) in the compute dtype, as
    :func:`finish_codes` lays them out, under each row's threshold over the
    latent ``group`` (:meth:`~spade_kernels.pipeline.group.OneProcess.threshold`:
    the local codes in one process).  One call is one row block: its memory
    is ``plan.row_bytes`` per row.  ``prototypes``: A's
    :func:`~spade_kernels.numerics.sanitize_prototypes`, where the caller
    computed it once for several row blocks.  ``contiguous=False`` (one
    process only): the codes may be views of wider tensors, for a caller that
    copies them at once (:func:`encode_rows`'s blocks).
    """
    try:
        codes = _local_codes(plan, x, A, lam, prototypes, contiguous or group.sharded)
    except RangeError as exc:
        return group.threshold(None, exc, x, lam)
    return group.threshold(codes, None, x, lam)


@torch.no_grad()
def encode_rows(plan: Plan, x: torch.Tensor, A: torch.Tensor, lam: float):
    """:func:`encode_forward` of a whole batch in one process, in row blocks that fit the memory budget.

    The blocks (:func:`~spade_kernels.pipeline.memory.encode_blocks`, sized
    from ``plan.row_bytes``, the first larger by the codes the later ones
    run beside, :func:`~spade_kernels.pipeline.rows.held_row_bytes`) bound
    the search's working memory whatever B is; they share one :func:`~spade_kernels.numerics.sanitize_prototypes`
    (‖a_k‖² once, not once a block), and their codes are written into one
    :class:`~spade_kernels.pipeline.rows.RowWriter`.  One call, so one
    backward: the K×d gradient of the prototypes is formed once per batch,
    not once per block (docs/design.md, "Memory model").
    """
    held = held_row_bytes(A.shape[0], x.element_size())
    blocks = memory.encode_blocks(x.shape[0], plan.row_bytes, x.device, held)
    if len(blocks) <= 1:
        return encode_forward(plan, x, A, lam)
    prototypes = sanitize_prototypes(A)
    out = RowWriter(x.shape[0], A.shape[0])
    for rows in blocks:
        out.add(*encode_forward(plan, x[rows], A, lam, prototypes=prototypes, contiguous=False))
    codes = out.codes()  # views of the first C columns, not copied (the codes are held once)
    return codes.values, codes.indices, codes.support_size, codes.distances
