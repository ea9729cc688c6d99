"""The encoder forward, written once for every sparse backend (docs/design.md, "The pipeline").

For x (B, d), prototypes A (K, d), λ and a backend's :class:`Primitives`:

1. :func:`~spade_kernels.numerics.sanitize` — squared norms; rows with a
   non-finite input (or every row, for a non-finite prototype) become NaN rows;
2. the margin — the rounding slack of the backend's score GEMM
   (:func:`~spade_kernels.numerics.score_margin`);
3. candidate search — the backend's ``select_candidates`` (the ``torch``
   backend's for inputs its kernels do not take), a superset of every row's
   support, or an overflow flag;
4. exact codes — the backend's ``exact_codes`` on the candidates: D
   recomputed directly, the exact τ;
5. overflow rows — resolved exactly by :func:`dense_candidates` (dense scores
   of just those rows, in row blocks) and the ``torch`` backend's exact stage,
   which has no width limit;
6. :func:`finish_codes` — trimmed to the widest support, NaN rows marked.

No B×K tensor exists except the row blocks of step 5.
"""

from __future__ import annotations

import functools
import math

import torch

from ..backends import torch_ as T
from ..backends.interface import INITIAL_BUFFER, Primitives, backend_options, resolve_options
from ..numerics import ieee_matmul, sanitize, score_margin, sorted_threshold
from .memory import budget_bytes, row_blocks
from .sparse import product

__all__ = ["dense_candidates", "empty_codes", "encode_forward", "finish_codes"]


def _pad(t: torch.Tensor, width: int, value=0) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def dense_row_bytes(K: int, itemsize: int) -> int:
    """Working memory per row of :func:`dense_candidates`: the row's scores, their sort (values and
    int64 order), the masked copy and the top-k's indices."""
    return K * (3 * itemsize + 16)


def dense_candidates(x, A, aa, lam: float, margin, chunk: int = T.OPTIONS["chunk"]):
    """Exact candidate sets from dense scores, in row blocks sized from the memory budget.

    Every entry above τ − margin of its row (τ from a sort of the whole row):
    a superset of the support whatever its width.  The overflow path for the
    rows a search could not hold, and the whole search (``search="dense"``)
    where K is small enough for dense scores to be cheaper.  Returns (R, W)
    int64, −1 padded.
    """
    cd = aa.dtype
    R, K = x.shape[0], A.shape[0]
    out = []
    budget = budget_bytes(x.device)
    for rs in row_blocks(R, dense_row_bytes(K, aa.element_size()), budget):
        s = torch.empty(rs.stop - rs.start, K, dtype=cd, device=x.device)
        for c0 in range(0, K, chunk):  # chunked so prototypes are upcast a chunk at a time
            c1 = min(K, c0 + chunk)
            torch.addmm(
                aa[c0:c1], x[rs].to(cd), A[c0:c1].to(cd).t(), beta=-lam, alpha=2 * lam, out=s[:, c0:c1]
            )
        tau = sorted_threshold(torch.sort(s, dim=1, descending=True).values)
        keep = s > (tau - margin[rs]).unsqueeze(1)
        v, i = torch.topk(torch.where(keep, s, -math.inf), max(int(keep.sum(1).max()), 1), dim=1)
        del s, keep
        out.append(torch.where(torch.isfinite(v), i, torch.full_like(i, -1)))
    width = max(i.shape[1] for i in out)
    return torch.cat([_pad(i, width, -1) for i in out], dim=0)


#: Rows whose search sizes the candidate buffer of the rest of a row block.
SAMPLE_ROWS = 512


def _grown_search(prims: Primitives, x, A, aa, lam, margin, opts):
    """The backend's search with its candidate buffer sized by the data (``Primitives.buffer_option``).

    The first ``SAMPLE_ROWS`` rows are searched with ``INITIAL_BUFFER`` slots
    (or K, or the option's value, if smaller); the rest with 1.5× the widest
    candidate set the sample needed.  Rows that overflow a buffer are searched
    again with four times as many slots, up to the option's value, so only
    they pay for a wider buffer; rows that overflow the largest are flagged
    for the exact dense path.
    """
    name = prims.buffer_option
    if name is None:
        return prims.select_candidates(x, A, aa, lam, margin, **opts)
    limit = min(opts[name], A.shape[0])

    def search(rows, size):
        """The search over ``rows`` with ``size`` slots, the overflowing rows searched again with ×4."""
        sub = slice(None) if rows is None else rows
        cand, overflow = prims.select_candidates(x[sub], A, aa, lam, margin[sub], **{**opts, name: size})
        while overflow.any() and size < limit:
            size = min(limit, 4 * size)
            again = overflow.nonzero().squeeze(1)
            more, more_overflow = prims.select_candidates(
                x[sub][again], A, aa, lam, margin[sub][again], **{**opts, name: size}
            )
            width = max(cand.shape[1], more.shape[1])
            cand = _pad(cand, width, -1)
            cand[again] = _pad(more, width, -1)
            overflow[again] = more_overflow
        return cand, overflow

    B = x.shape[0]
    size = min(limit, INITIAL_BUFFER)
    if B <= SAMPLE_ROWS:
        return search(None, size)
    # A sample of the rows sizes the buffer for the rest: 1.5× its widest
    # candidate set (a power of two, at least 16), grown only where a row needs more.
    head = torch.arange(SAMPLE_ROWS, device=x.device)
    cand_head, overflow_head = search(head, size)
    widest = int((cand_head >= 0).sum(1).max()) if not bool(overflow_head.all()) else limit
    size = min(limit, max(16, 1 << max(0, math.ceil(1.5 * widest) - 1).bit_length()))
    cand_tail, overflow_tail = search(torch.arange(SAMPLE_ROWS, B, device=x.device), size)
    width = max(cand_head.shape[1], cand_tail.shape[1])
    return (
        torch.cat([_pad(cand_head, width, -1), _pad(cand_tail, width, -1)]),
        torch.cat([overflow_head, overflow_tail]),
    )


def finish_codes(z, idx, size, D, nan_rows):
    """Codes trimmed to width C = max support (at least 1); rows in ``nan_rows`` become NaN."""
    C = max(int(size.max()) if size.numel() else 0, 1)
    z, idx, D = _pad(z, C)[:, :C], _pad(idx, C)[:, :C], _pad(D, C)[:, :C]
    if nan_rows.any():
        z = z.masked_fill(nan_rows.unsqueeze(1), math.nan)
        D = D.masked_fill(nan_rows.unsqueeze(1), math.nan)
        size = size.masked_fill(nan_rows, 0)
        idx = idx.masked_fill(nan_rows.unsqueeze(1), 0)
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
            old, repl = _pad(old, width), _pad(repl, width)
        old = old.clone()
        old[rows] = repl
        out.append(old)
    return out


@torch.no_grad()
def encode_forward(prims: Primitives, x: torch.Tensor, A: torch.Tensor, lam: float, options=None):
    """Sparse SpaDE codes of x (B, d) through ``prims`` (no autograd).

    Returns (values, indices, support_size, D) in the compute dtype, as
    :func:`finish_codes` lays them out.  ``options`` are the backend's
    candidate-search options (see its ``OPTIONS``) and the pipeline's
    ``search`` (``"auto"`` means ``"pruned"`` here: the caller,
    :func:`spade_kernels.encode.encode_sparse`, resolves it).  One call is one
    row block: its memory is ``prims.row_bytes`` per row.
    """
    opts = resolve_options(prims, options or {})
    search = opts["search"]
    opts = backend_options(prims, opts)
    x, A, aa, xx, nan_rows = sanitize(x, A)
    if x.shape[0] == 0:
        return empty_codes(x, aa.dtype)
    eps, worst_case = prims.margin_eps(x.dtype, opts)
    margin = score_margin(xx, aa, lam, x.shape[1], eps, worst_case)
    with ieee_matmul():
        if search == "dense":
            cand, overflow = dense_candidates(x, A, aa, lam, margin), torch.zeros_like(nan_rows)
        elif x.dtype in prims.select_dtypes:
            cand, overflow = _grown_search(prims, x, A, aa, lam, margin, opts)
        else:
            cand, overflow = T.select_candidates(x, A, aa, lam, margin, **_torch_options(opts))
    overflow = overflow & ~nan_rows
    width = max(int((cand >= 0).sum(1).max()), 1)
    cand = cand[:, :width].contiguous()
    sq_dist = functools.partial(product, prims, "gather_sq_dist")
    if prims.exact_codes is not None:
        codes = prims.exact_codes(x, A, lam, cand)
    else:
        codes = T.exact_codes(x, A, lam, cand, sq_dist=sq_dist)
    if overflow.any():
        rows = overflow.nonzero().squeeze(1)
        with ieee_matmul():
            dense = dense_candidates(x[rows], A, aa, lam, margin[rows])
        codes = _replace_rows(codes, rows, T.exact_codes(x[rows], A, lam, dense, sq_dist=sq_dist))
    return finish_codes(*codes, nan_rows)


def _torch_options(opts) -> dict:
    """The ``torch`` backend's search options, taking the ones another backend shares with it."""
    return {k: opts.get(k, v) for k, v in T.OPTIONS.items()}
