"""The candidate searches the pipeline adds to a backend's (docs/design.md, "The pipeline").

* :func:`dense_candidates` — exact candidate sets from dense scores of row
  blocks: the overflow path, and the whole search for small K
  (:func:`dense_search`, ``search="dense"``);
* :func:`grown_search` — a backend's ``select_candidates`` with its
  candidate buffer sized by the data.

:func:`~spade_kernels.pipeline.plan.make_plan` picks one of them (or the
``torch`` backend's search) for each encode.
"""

from __future__ import annotations

import math

import torch

from ..backends import torch_ as T
from ..backends.interface import INITIAL_BUFFER
from ..numerics import sorted_threshold
from . import memory

__all__ = [
    "SAMPLE_ROWS",
    "SLOT_BYTES",
    "dense_candidates",
    "dense_row_bytes",
    "dense_search",
    "grown_search",
    "pad",
]


def pad(t: torch.Tensor, width: int, value=0) -> torch.Tensor:
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
    for rs in memory.dense_blocks(R, dense_row_bytes(K, aa.element_size()), x.device):
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
    return torch.cat([pad(i, width, -1) for i in out], dim=0)


def dense_search(x, A, aa, lam: float, margin):
    """The whole candidate search from dense scores (``search="dense"``): (cand, no overflow)."""
    cand = dense_candidates(x, A, aa, lam, margin)
    return cand, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)


#: Rows whose search sizes the candidate buffer of the rest of a row block.
SAMPLE_ROWS = 512
#: Bytes a row's candidate buffer holds per slot, at the least (an int64 index, a score and its bound).
SLOT_BYTES = 16


def grown_search(select, name: str | None, opts: dict, x, A, aa, lam, margin):
    """The backend's search ``select`` with its candidate buffer sized by the data.

    ``name`` is the option that sizes the buffer (``Primitives.buffer_option``;
    None: ``select`` runs once with ``opts``).

    Past ``SAMPLE_ROWS`` rows, the first ``SAMPLE_ROWS`` are searched
    with ``INITIAL_BUFFER`` slots (or K, or the option's value, if smaller);
    the rest with 1.5× the widest candidate set the sample needed.  Up to
    ``2 * SAMPLE_ROWS`` rows are searched in one call instead where the
    prototypes' bytes are at least the buffer the sample could save (the
    tail's rows × slots × ``SLOT_BYTES``): the split reads A twice and
    splits the score GEMM in two, which costs time where A is large (C1) and
    little where it is small, where the split's narrower buffer holds up to
    half the memory (benchmarks/NOTES.md, "The six hungrier rows").  Rows
    that overflow a buffer are searched
    again with four times as many slots, up to the option's value, so only
    they pay for a wider buffer; rows that overflow the largest are flagged
    for the exact dense path.
    """
    if name is None:
        return select(x, A, aa, lam, margin, **opts)
    limit = min(opts[name], A.shape[0])

    def search(rows, size):
        """The search over ``rows`` with ``size`` slots, the overflowing rows searched again with ×4."""
        sub = slice(None) if rows is None else rows
        cand, overflow = select(x[sub], A, aa, lam, margin[sub], **{**opts, name: size})
        while overflow.any() and size < limit:
            size = min(limit, 4 * size)
            again = overflow.nonzero().squeeze(1)
            more, more_overflow = select(
                x[sub][again], A, aa, lam, margin[sub][again], **{**opts, name: size}
            )
            width = max(cand.shape[1], more.shape[1])
            cand = pad(cand, width, -1)
            cand[again] = pad(more, width, -1)
            overflow[again] = more_overflow
        return cand, overflow

    B = x.shape[0]
    size = min(limit, INITIAL_BUFFER)
    if B <= SAMPLE_ROWS or (
        B <= 2 * SAMPLE_ROWS and A.numel() * A.element_size() >= (B - SAMPLE_ROWS) * size * SLOT_BYTES
    ):
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
        torch.cat([pad(cand_head, width, -1), pad(cand_tail, width, -1)]),
        torch.cat([overflow_head, overflow_tail]),
    )
