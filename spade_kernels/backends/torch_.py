"""The ``torch`` backend: SpaDE's primitives in PyTorch ops only, on any device.

It implements the backend interface (:class:`spade_kernels.pipeline.Primitives`,
docs/design.md "The backend interface") and is also what the pipeline falls
back to for the work another backend's kernels do not take (overflow rows,
dtypes a kernel has no instantiation for):

* :func:`select_candidates` — scores in GEMM form, s'[b,k] = λ(2·x_b·a_k −
  ‖a_k‖²) (= s + λ‖x_b‖²), ``chunk`` prototypes at a time so no B×K tensor
  exists; each chunk pruned by a threshold ≤ τ(row) (the sparsemax τ of the
  chunk's top-k, raised by the running bound of the chunks seen, k doubled
  per row while the top-k is incomplete: design facts 3 and 7); survivors
  merged into a per-row buffer of ``max_candidates`` slots.  Rows that do not
  fit are flagged; the pipeline resolves them exactly.
* :func:`exact_codes` — D recomputed directly on the candidates, scores
  relative to the nearest one, the exact τ (a sort of a few dozen entries).
* the products over a support (:func:`gather_matmul`, :func:`gather_dot`,
  :func:`scatter_matmul`, :func:`gather_sq_dist`, :func:`support_jacobian`),
  O(B·C·d), row-blocked so temporaries stay bounded.

Every comparison against a threshold keeps the margin of
:func:`spade_kernels.numerics.score_margin`, so rounding can only keep extra
candidates, never drop a support entry.
"""

from __future__ import annotations

import math

import torch

from ..numerics import compute_dtype, sorted_threshold
from .interface import (
    DEFAULT_CHUNK,
    DEFAULT_MAX_CANDIDATES,
    Primitives,
    exact_stage_row_bytes,
    subtract_weighted_rows,
)

__all__ = [
    "OPTIONS",
    "PRIMITIVES",
    "exact_codes",
    "gather_dot",
    "gather_matmul",
    "gather_sq_dist",
    "scatter_matmul",
    "select_candidates",
    "support_jacobian",
    "tiles",
]

#: Options of :func:`select_candidates` and their defaults.
OPTIONS = {
    "chunk": DEFAULT_CHUNK,
    "topk": 128,  # first top-k tried per chunk (doubled per row while incomplete)
    "max_candidates": DEFAULT_MAX_CANDIDATES,
}
#: Elements per row block in gathers (bounds the B·C·d temporaries).
GATHER_BUDGET = 1 << 22
#: Elements per row block for gather-then-reduce passes (about L2-sized).
CACHE_BUDGET = 1 << 18


def tiles(n_rows: int, per_row: int, budget: int = GATHER_BUDGET):
    """The row tiles of one product kernel: slices of at most ``budget // per_row`` rows covering ``n_rows``.

    A kernel's own tiling (cache-sized, like a CUDA kernel's block), not a
    memory budget's row blocks (those are sized in
    :mod:`spade_kernels.pipeline.memory` only).

    One slice while traced (``torch.compile``: dynamo, or AOT autograd's
    symbolic sizes), where the support's width is data-dependent: the
    compiler plans that memory.
    """
    if torch.compiler.is_compiling() or isinstance(n_rows, torch.SymInt) or isinstance(per_row, torch.SymInt):
        yield slice(0, n_rows)
        return
    step = max(1, budget // max(per_row, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _gather_rows(M: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """M[indices] for a 2-D index block, via index_select (faster than advanced indexing)."""
    return torch.index_select(M, 0, indices.reshape(-1)).view(*indices.shape, M.shape[1])


# --------------------------------------------------------------------------
# Products over a support
# --------------------------------------------------------------------------


def gather_matmul(weights: torch.Tensor, indices: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """out[b] = Σ_j weights[b, j] · M[indices[b, j]]  → (B, d), in M's dtype."""
    B, C = indices.shape
    out = torch.empty(B, M.shape[1], dtype=M.dtype, device=M.device)
    for rs in tiles(B, C * M.shape[1], CACHE_BUDGET):
        out[rs] = torch.bmm(weights[rs].unsqueeze(1).to(M.dtype), _gather_rows(M, indices[rs])).squeeze(1)
    return out


def gather_dot(G: torch.Tensor, indices: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """out[b, j] = ⟨G[b], M[indices[b, j]]⟩  → (B, C), in M's dtype."""
    B, C = indices.shape
    out = torch.empty(B, C, dtype=M.dtype, device=M.device)
    for rs in tiles(B, C * M.shape[1], CACHE_BUDGET):
        out[rs] = torch.bmm(_gather_rows(M, indices[rs]), G[rs].unsqueeze(2).to(M.dtype)).squeeze(2)
    return out


def scatter_matmul(
    weights: torch.Tensor, indices: torch.Tensor, X: torch.Tensor, n_rows: int, M: torch.Tensor | None = None
) -> torch.Tensor:
    """out[k] = Σ_{b,j: indices[b,j]=k} weights[b, j] · X[b]  → (n_rows, d), in X's dtype.

    The sparse-transpose product (∂L/∂W_dec); with ``M`` (n_rows, d),
    Σ weights[b, j] · (X[b] − M[k]) (∂L/∂prototypes, :func:`subtract_weighted_rows`).
    """
    B, C = indices.shape
    d = X.shape[1]
    out = torch.zeros(n_rows, d, dtype=X.dtype, device=X.device)
    for rs in tiles(B, C * d):
        contrib = weights[rs].to(X.dtype).unsqueeze(2) * X[rs].unsqueeze(1)
        out.index_add_(0, indices[rs].reshape(-1), contrib.reshape(-1, d))
    return out if M is None else subtract_weighted_rows(out, weights, indices, M)


def gather_sq_dist(x: torch.Tensor, indices: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """out[b, j] = ‖x[b] − M[indices[b, j]]‖², computed directly (no cancellation), in x's dtype."""
    B, C = indices.shape
    out = torch.empty(B, C, dtype=x.dtype, device=x.device)
    # Small row blocks keep the difference tensor in cache between the two passes.
    for rs in tiles(B, C * x.shape[1], CACHE_BUDGET):
        diff = x[rs].unsqueeze(1) - _gather_rows(M, indices[rs]).to(x.dtype)
        out[rs] = torch.linalg.vector_norm(diff, dim=-1).square_()
    return out


def support_jacobian(z, grad_z, D, grad_D, lam: torch.Tensor, row_sums=None):
    """Per-row backward through sparsemax and s = −λD, on the support (design facts 5–6).

    Returns ``G`` = ∂L/∂D (B, C) — −λ·(g − mean_S g) plus the direct gradient
    ``grad_D`` — and ``lam_rows`` (B,), each row's share of ∂L/∂λ = −Σ gs·D.
    Entries off the support get G = 0.  ``row_sums(total, count)``, where
    given, sums each row's Σ_S g and |S| over the shards of a latent group
    (:meth:`spade_kernels.pipeline.group.OneProcess.row_sums`): a row's
    support then spans every shard's latents.
    """
    support = z > 0
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    g = torch.where(support, grad_z.to(z.dtype), zero) if grad_z is not None else torch.zeros_like(z)
    total, count = g.sum(1, keepdim=True), support.sum(1, keepdim=True)
    if row_sums is not None:
        total, count = row_sums(total, count)
    mean = total / count.clamp_min(1)
    gs = torch.where(support, g - mean, zero)  # ∂L/∂s (fact 5)
    G = -lam.to(z.dtype) * gs  # not detached: a second derivative reaches λ through it
    if grad_D is not None:
        G = G + torch.where(support, grad_D.to(z.dtype), zero)
    # where, not a product: D is NaN on rows whose input was NaN (no support).
    return G, -torch.where(support, gs * D, zero).sum(1)


# --------------------------------------------------------------------------
# Candidate selection
# --------------------------------------------------------------------------


def _chunk_survivors(s, bound, margin, k0, max_candidates):
    """Candidates of one score chunk ``s`` (R, kc).

    Returns (vals, idx, new_bound, overflow) where vals is sorted descending
    with −inf for pruned slots.  Every entry of the chunk above ``bound`` (a
    lower bound of the row's τ, raised here with the chunk's own top-k τ) is
    returned, unless the row overflows ``max_candidates``.
    """
    R, kc = s.shape
    bound = bound.clone()
    overflow = torch.zeros(R, dtype=torch.bool, device=s.device)
    todo = torch.arange(R, device=s.device)
    k = min(k0, kc)
    pieces = []
    while todo.numel():
        v, i = torch.topk(s[todo], k, dim=1)
        b = torch.maximum(bound[todo], sorted_threshold(v))
        bound[todo] = b
        thr = (b - margin[todo]).unsqueeze(1)
        complete = (v[:, -1:] <= thr).squeeze(1) | (k == kc)
        done = complete | (k >= max_candidates)
        overflow[todo[~complete & done]] = True
        keep = v > thr
        pieces.append((todo[done], torch.where(keep, v, -math.inf)[done], i[done]))
        todo = todo[~done]
        k = min(2 * k, kc)
    width = max(p[1].shape[1] for p in pieces)
    vals = torch.full((R, width), -math.inf, dtype=s.dtype, device=s.device)
    idx = torch.zeros((R, width), dtype=torch.long, device=s.device)
    for rows, v, i in pieces:
        vals[rows, : v.shape[1]] = v
        idx[rows, : i.shape[1]] = i
    return vals, idx, bound, overflow


def _merge(buf_val, buf_idx, new_val, new_idx, bound, margin, max_candidates):
    """Merge candidate buffers, re-prune with the union's τ, compact."""
    val = torch.cat([buf_val, new_val], dim=1)
    idx = torch.cat([buf_idx, new_idx], dim=1)
    val, order = torch.sort(val, dim=1, descending=True)
    idx = idx.gather(1, order)
    bound = torch.maximum(bound, sorted_threshold(val))
    keep = val > (bound - margin).unsqueeze(1)
    count = keep.sum(1)
    overflow = count > max_candidates
    width = min(int(count.max()) if count.numel() else 0, max_candidates)
    val = torch.where(keep, val, -math.inf)[:, :width]
    return val, idx[:, :width], bound, overflow


def select_candidates(x, A, aa, lam: float, margin, *, chunk: int, topk: int, max_candidates: int):
    """Candidate sets that contain every row's support, and the rows that overflowed.

    ``x`` (B, d) and ``A`` (K, d) in any float dtype (computed in the compute
    dtype of ``aa``); ``aa`` = ‖a_k‖², ``margin`` the rounding slack per row.
    Returns ``(cand, overflow)``: cand (B, W) int64 with each row's candidates
    first and −1 after them; overflow (B,) bool, rows whose candidates did not
    fit ``max_candidates`` (their cand row is all −1).
    """
    cd = aa.dtype
    x = x.to(cd)
    B, K = x.shape[0], A.shape[0]
    chunk = max(1, min(chunk, K))
    buf_val = torch.full((B, 0), -math.inf, dtype=cd, device=x.device)
    buf_idx = torch.zeros((B, 0), dtype=torch.long, device=x.device)
    bound = torch.full((B,), -math.inf, dtype=cd, device=x.device)
    overflow = torch.zeros(B, dtype=torch.bool, device=x.device)
    for c0 in range(0, K, chunk):
        c1 = min(K, c0 + chunk)
        # s' = λ(2 x·a − ‖a‖²): one GEMM plus a column bias (fact 1).
        s = torch.addmm(aa[c0:c1], x, A[c0:c1].to(cd).t(), beta=-lam, alpha=2 * lam)
        v, i, bound, ovf = _chunk_survivors(s, bound, margin, topk, max_candidates)
        del s
        buf_val, buf_idx, bound, ovf2 = _merge(buf_val, buf_idx, v, i + c0, bound, margin, max_candidates)
        overflow |= ovf | ovf2
        buf_val[overflow] = -math.inf
    cand = torch.where(torch.isfinite(buf_val), buf_idx, torch.full_like(buf_idx, -1))
    return cand, overflow


# --------------------------------------------------------------------------
# Exact codes over candidate sets
# --------------------------------------------------------------------------


def exact_codes(x, A, lam: float, cand, sq_dist=None):
    """Exact sparsemax codes over candidate sets ``cand`` (B, W; −1 = empty slot).

    D is recomputed directly on the candidates by ``sq_dist(x, indices, A)``
    (default :func:`gather_sq_dist`), in the compute dtype.  Returns (values,
    indices, support_size, D), each row's support sorted by value descending
    and padded with index 0 / value 0 / D 0 to width W.
    """
    cd = compute_dtype(torch.promote_types(x.dtype, A.dtype))
    valid = cand >= 0
    safe = torch.where(valid, cand, torch.zeros_like(cand))
    D = (sq_dist or gather_sq_dist)(x.to(cd), safe, A).to(cd)
    # Scores relative to the row's nearest candidate (shift invariance): the
    # codes s − τ then never subtract two large numbers.
    D_min = torch.where(valid, D, torch.full_like(D, math.inf)).amin(1, keepdim=True)
    D_min = torch.where(torch.isfinite(D_min), D_min, torch.zeros_like(D_min))
    s = torch.where(valid, -lam * (D - D_min), torch.full_like(D, -math.inf))
    s, order = torch.sort(s, dim=1, descending=True)
    safe = safe.gather(1, order)
    D = D.gather(1, order)
    tau = sorted_threshold(s)
    z = (s - tau.unsqueeze(1)).clamp_min(0)
    support = z > 0
    zero = torch.zeros((), dtype=cd, device=x.device)
    return (
        torch.where(support, z, zero),
        torch.where(support, safe, torch.zeros_like(safe)),
        support.sum(1),
        torch.where(support, D, zero),
    )


def row_bytes(K: int, d: int, itemsize: int, options) -> int:
    """Working memory per row of :func:`select_candidates` and :func:`exact_codes` (docs/design.md, "Memory model").

    A chunk of scores, the top-k values and indices, the merge's concatenated,
    sorted and gathered buffers, and the exact stage over ≤ ``max_candidates``.
    """
    c = min(options["chunk"], K)
    k = min(options["topk"], c)
    w = min(options["max_candidates"], K)
    e = itemsize
    return e * c + 2 * (e + 8) * k + 3 * (e + 8) * (w + k) + exact_stage_row_bytes(w, e)


#: The ``torch`` backend as the pipeline sees it.
PRIMITIVES = Primitives(
    name="torch",
    options=OPTIONS,
    select_candidates=select_candidates,
    exact_codes=exact_codes,
    gather_matmul=gather_matmul,
    gather_dot=gather_dot,
    scatter_matmul=scatter_matmul,
    gather_sq_dist=gather_sq_dist,
    support_jacobian=support_jacobian,
    select_dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    product_dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    row_bytes=row_bytes,
)
