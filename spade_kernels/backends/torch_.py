"""The ``torch`` backend: SpaDE's fast algorithm in plain PyTorch ops.

Runs on any device torch runs on.  Forward (DESIGN.md §2, facts 1–4 and 7):

1. Scores in GEMM form, s'[b,k] = λ(2·x_b·a_k − ‖a_k‖²) (= s + λ‖x_b‖²),
   computed ``chunk`` prototypes at a time, so no B×K tensor exists.
2. Each chunk is pruned by a threshold that is ≤ τ(row): the sparsemax τ of
   the chunk's top-k entries (subset bound), or the running bound from the
   chunks already seen, whichever is larger.  The top-k is complete when its
   k-th entry is itself below that threshold; rows where it is not double k.
3. Survivors of all chunks are merged into a small per-row candidate buffer
   that is re-pruned with the running bound after every chunk.
4. Exact stage: D on the candidates is recomputed directly as ‖x − a‖²
   (DESIGN.md §4) and τ is the exact sparsemax threshold of the candidates
   (a sort of a few dozen entries).  Candidates ⊇ support, so τ is exact.

Rows whose candidates do not fit ``max_candidates`` (dense supports, small λ)
are resolved exactly by a dense pass over just those rows, in row blocks.

Every comparison against a threshold keeps a margin that covers the rounding
error of the GEMM-form scores, so float rounding can only keep a few extra
candidates, never drop a support entry.

Backward (fact 5–6) is sparse: gathers and index_add over the support, no
B×K tensor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..codes import SparseCodes

__all__ = [
    "encode",
    "gather_dot",
    "gather_matmul",
    "gather_sq_dist",
    "scatter_matmul",
    "sparse_decode",
    "support_sq_dists",
]

#: Prototypes per score chunk: peak extra memory ~ B·CHUNK floats.
DEFAULT_CHUNK = 4096
#: First top-k tried per chunk (doubled per row while incomplete).
DEFAULT_TOPK = 128
#: Candidates kept per row before the row is sent to the exact dense path.
DEFAULT_MAX_CANDIDATES = 2048
#: Elements per row block in gathers (bounds the B·C·d temporaries).
_GATHER_BUDGET = 1 << 22
#: Elements per row block for gather-then-reduce passes (about L2-sized).
_CACHE_BUDGET = 1 << 18


#: Support width, as a fraction of K, from which dense GEMMs beat the gathers
#: and scatters, per device type.  CPU: measured at (B, d, K) = (1024, 768,
#: 16384) float32 on 2 threads — crossovers at C/K ≈ 0.023 (scatter), 0.028
#: (gather-matmul), 0.04 (gather-dot); see benchmarks/NOTES.md.  Devices
#: without a measured crossover always take the sparse path.
DENSE_FRACTION: dict[str, float] = {"cpu": 1 / 32}


#: On CPU float32/float64 tensors, use the C++ extension's ops (``spade::*``,
#: C++/OpenMP, the ``cuda`` backend's CPU twins) when it is built: at
#: (B, d, K, C) = (1024, 768, 16384, 80) on 2 threads they measured 2–5×
#: faster than these PyTorch-op versions for every product, and about 2× for
#: the forward's candidate search (benchmarks/NOTES.md).  The PyTorch-op
#: versions run everywhere else (GPU tensors, half dtypes, no extension).
NATIVE_CPU = True


def _native_cpu(t: torch.Tensor) -> bool:
    if not NATIVE_CPU or t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return False
    from .. import _ext

    return _ext.available()


def _dense(C: int, K: int, device: torch.device) -> bool:
    fraction = DENSE_FRACTION.get(device.type)
    return fraction is not None and C >= fraction * K


def dense_or(kernel_op: Callable, torch_op: Callable, n_latents_arg: int) -> Callable:
    """``kernel_op``, except where supports are wide enough for the dense-GEMM path of ``torch_op``.

    For the backends whose sparse products are kernels (``triton``, ``cuda``):
    the switch is :data:`DENSE_FRACTION` per device type; devices without a
    measured crossover always take the kernels.  ``n_latents_arg`` is the
    position of the argument that gives K (an int, or a tensor with K rows).
    """

    def op(*args):
        indices = args[1]
        K = args[n_latents_arg]
        K = K if isinstance(K, int) else K.shape[0]
        if _dense(indices.shape[1], K, indices.device):
            return torch_op(*args)
        return kernel_op(*args)

    op.__name__ = torch_op.__name__
    return op


def _densify(weights: torch.Tensor, indices: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    dense = torch.zeros(indices.shape[0], K, dtype=dtype, device=indices.device)
    return dense.scatter_add_(1, indices, weights.to(dtype))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather_rows(M: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """M[indices] for a 2-D index block, via index_select (faster than advanced indexing)."""
    return torch.index_select(M, 0, indices.reshape(-1)).view(*indices.shape, M.shape[1])


def _row_blocks(n_rows: int, per_row: int, budget: int = _GATHER_BUDGET):
    step = max(1, budget // max(per_row, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


# --------------------------------------------------------------------------
# Sparse primitives (all O(B·C·d), row-blocked so temporaries stay bounded)
# --------------------------------------------------------------------------


def gather_matmul(weights: torch.Tensor, indices: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """out[b] = Σ_j weights[b, j] · M[indices[b, j]]  → (B, d)."""
    B, C = indices.shape
    if _dense(C, M.shape[0], M.device):
        return _densify(weights, indices, M.shape[0], M.dtype) @ M
    if _native_cpu(M):
        return torch.ops.spade.gather_matmul(weights, indices, M)
    out = torch.empty(B, M.shape[1], dtype=M.dtype, device=M.device)
    for rs in _row_blocks(B, C * M.shape[1], _CACHE_BUDGET):
        out[rs] = torch.bmm(weights[rs].unsqueeze(1).to(M.dtype), _gather_rows(M, indices[rs])).squeeze(1)
    return out


def gather_dot(G: torch.Tensor, indices: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """out[b, j] = ⟨G[b], M[indices[b, j]]⟩  → (B, C)."""
    B, C = indices.shape
    if _dense(C, M.shape[0], M.device):
        return (G.to(M.dtype) @ M.t()).gather(1, indices)
    if _native_cpu(M):
        return torch.ops.spade.gather_dot(G, indices, M)
    out = torch.empty(B, C, dtype=M.dtype, device=M.device)
    for rs in _row_blocks(B, C * M.shape[1], _CACHE_BUDGET):
        out[rs] = torch.bmm(_gather_rows(M, indices[rs]), G[rs].unsqueeze(2).to(M.dtype)).squeeze(2)
    return out


def scatter_matmul(
    weights: torch.Tensor, indices: torch.Tensor, X: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """out[k] = Σ_{b,j: indices[b,j]=k} weights[b, j] · X[b]  → (n_rows, d).

    The sparse-transpose product (∂L/∂prototypes, ∂L/∂W_dec).
    """
    B, C = indices.shape
    d = X.shape[1]
    if _dense(C, n_rows, X.device):
        return _densify(weights, indices, n_rows, X.dtype).t() @ X
    if _native_cpu(X):
        return torch.ops.spade.scatter_matmul(weights, indices, X, n_rows)
    out = torch.zeros(n_rows, d, dtype=X.dtype, device=X.device)
    for rs in _row_blocks(B, C * d):
        contrib = weights[rs].to(X.dtype).unsqueeze(2) * X[rs].unsqueeze(1)
        out.index_add_(0, indices[rs].reshape(-1), contrib.reshape(-1, d))
    return out


def gather_sq_dist(x: torch.Tensor, indices: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """out[b, j] = ‖x[b] − M[indices[b, j]]‖², computed directly (no cancellation)."""
    B, C = indices.shape
    if _native_cpu(x) and M.dtype == x.dtype:
        return torch.ops.spade.gather_sq_dist(x, indices, M)
    out = torch.empty(B, C, dtype=x.dtype, device=x.device)
    # Small row blocks keep the difference tensor in cache between the two passes.
    for rs in _row_blocks(B, C * x.shape[1], _CACHE_BUDGET):
        diff = x[rs].unsqueeze(1) - _gather_rows(M, indices[rs])
        out[rs] = torch.linalg.vector_norm(diff, dim=-1).square_()
    return out


def support_jacobian(z, grad_z, D, grad_D, lam: torch.Tensor):
    """Per-row backward through sparsemax and s = −λD, on the support (facts 5–6).

    Returns ``G`` = ∂L/∂D (B, C) — −λ·(g − mean_S g) plus the direct gradient
    ``grad_D`` — and ``lam_rows`` (B,), each row's share of ∂L/∂λ = −Σ gs·D.
    Entries off the support get G = 0.
    """
    support = z > 0
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    g = torch.where(support, grad_z.to(z.dtype), zero) if grad_z is not None else torch.zeros_like(z)
    mean = g.sum(1, keepdim=True) / support.sum(1, keepdim=True).clamp_min(1)
    gs = torch.where(support, g - mean, zero)  # ∂L/∂s (fact 5)
    G = -lam.detach().to(z.dtype) * gs
    if grad_D is not None:
        G = G + torch.where(support, grad_D.to(z.dtype), zero)
    # where, not a product: D is NaN on rows whose input was NaN (no support).
    return G, -torch.where(support, gs * D, zero).sum(1)


class SparseOps(NamedTuple):
    """The products over a support that every sparse path is built from.

    The ``torch`` backend uses the functions above; the ``triton`` backend
    passes its kernels (same names, same semantics) to the same formulas.
    """

    gather_matmul: Callable
    gather_dot: Callable
    scatter_matmul: Callable
    gather_sq_dist: Callable
    support_jacobian: Callable


TORCH_OPS = SparseOps(gather_matmul, gather_dot, scatter_matmul, gather_sq_dist, support_jacobian)


def _sq_dist_backward(x, M, indices, G, ops: SparseOps = TORCH_OPS):
    """Gradients of Σ G[b,j]·‖x_b − M[idx[b,j]]‖² with respect to x and M."""
    grad_x = 2 * (G.sum(1, keepdim=True) * x - ops.gather_matmul(G, indices, M))
    grad_M = ops.scatter_matmul(-2 * G, indices, x, M.shape[0])
    row_w = torch.zeros(M.shape[0], dtype=G.dtype, device=G.device)
    row_w.index_add_(0, indices.reshape(-1), G.reshape(-1))
    grad_M += 2 * row_w.unsqueeze(1) * M
    return grad_x, grad_M


# --------------------------------------------------------------------------
# Forward: candidate selection and exact threshold
# --------------------------------------------------------------------------


def _sorted_threshold(vals: torch.Tensor) -> torch.Tensor:
    """Sparsemax τ of rows already sorted descending (−inf padding allowed).

    Computed relative to each row's maximum (shift invariance, fact 1): the
    cumulative sums then stay accurate when the scores are large (|s| ≳ 2^24
    would otherwise round 1 + j·s_j > c_j away entirely).
    """
    top = vals[..., :1]
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    rel = vals - top
    finite = torch.isfinite(rel)
    csum = torch.cumsum(torch.where(finite, rel, torch.zeros_like(rel)), dim=-1)
    j = torch.arange(1, vals.shape[-1] + 1, device=vals.device, dtype=vals.dtype)
    k = ((1 + j * rel > csum) & finite).sum(-1, keepdim=True)
    c_k = csum.gather(-1, (k - 1).clamp_min(0))
    tau = (c_k - 1) / k.clamp_min(1).to(vals.dtype) + top
    return torch.where(k > 0, tau, torch.full_like(tau, -math.inf)).squeeze(-1)


def _chunk_survivors(s, bound, margin, k0, cap):
    """Candidates of one score chunk ``s`` (R, kc).

    Returns (vals, idx, new_bound, overflow) where vals is sorted descending
    with −inf for pruned slots.  Every entry of the chunk above ``bound`` (a
    lower bound of the row's τ, raised here with the chunk's own top-k τ) is
    returned, unless the row overflows ``cap``.
    """
    R, kc = s.shape
    vals = torch.full((R, 0), -math.inf, dtype=s.dtype, device=s.device)
    idx = torch.zeros((R, 0), dtype=torch.long, device=s.device)
    bound = bound.clone()
    overflow = torch.zeros(R, dtype=torch.bool, device=s.device)
    todo = torch.arange(R, device=s.device)
    k = min(k0, kc)
    pieces = []
    while todo.numel():
        v, i = torch.topk(s[todo], k, dim=1)
        b = torch.maximum(bound[todo], _sorted_threshold(v))
        bound[todo] = b
        thr = (b - margin[todo]).unsqueeze(1)
        complete = (v[:, -1:] <= thr).squeeze(1) | (k == kc)
        done = complete | (k >= cap)
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


def _merge(buf_val, buf_idx, new_val, new_idx, bound, margin, cap):
    """Merge candidate buffers, re-prune with the union's τ, compact."""
    val = torch.cat([buf_val, new_val], dim=1)
    idx = torch.cat([buf_idx, new_idx], dim=1)
    val, order = torch.sort(val, dim=1, descending=True)
    idx = idx.gather(1, order)
    bound = torch.maximum(bound, _sorted_threshold(val))
    keep = val > (bound - margin).unsqueeze(1)
    count = keep.sum(1)
    overflow = count > cap
    width = int(count.max()) if count.numel() else 0
    width = min(width, cap)
    val = torch.where(keep, val, -math.inf)[:, :width]
    return val, idx[:, :width], bound, overflow


@contextlib.contextmanager
def ieee_matmul():
    """Run float32 matmuls in full IEEE precision inside this block.

    The candidate margin assumes float32 rounding; TF32 (``allow_tf32``) or a
    reduced ``float32_matmul_precision`` — common in SAE trainers — would
    round 8192× coarser.  Restored on exit.
    """
    precision = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision(precision)


def _select_candidates(x, A, aa, lam, margin, chunk, k0, cap):
    """Indices (B, W) of every entry that may be in the support (−1 = none)."""
    B, K = x.shape[0], A.shape[0]
    buf_val = torch.full((B, 0), -math.inf, dtype=x.dtype, device=x.device)
    buf_idx = torch.zeros((B, 0), dtype=torch.long, device=x.device)
    bound = torch.full((B,), -math.inf, dtype=x.dtype, device=x.device)
    overflow = torch.zeros(B, dtype=torch.bool, device=x.device)
    for c0 in range(0, K, chunk):
        c1 = min(K, c0 + chunk)
        # s' = λ(2 x·a − ‖a‖²): one GEMM plus a column bias (fact 1).
        s = torch.addmm(aa[c0:c1], x, A[c0:c1].to(x.dtype).t(), beta=-lam, alpha=2 * lam)
        v, i, bound, ovf = _chunk_survivors(s, bound, margin, k0, cap)
        del s
        buf_val, buf_idx, bound, ovf2 = _merge(buf_val, buf_idx, v, i + c0, bound, margin, cap)
        overflow |= ovf | ovf2
        buf_val[overflow] = -math.inf
    idx = torch.where(torch.isfinite(buf_val), buf_idx, torch.full_like(buf_idx, -1))
    return idx, overflow


def _dense_candidates(x, A, aa, lam, margin, chunk, budget):
    """Exact candidate sets for a few rows (the overflow path), in row blocks."""
    R, K = x.shape[0], A.shape[0]
    out = []
    width = 1
    for rs in _row_blocks(R, K, budget):
        s = torch.empty(rs.stop - rs.start, K, dtype=x.dtype, device=x.device)
        for c0 in range(0, K, chunk):  # chunked so prototypes are upcast a chunk at a time
            c1 = min(K, c0 + chunk)
            torch.addmm(aa[c0:c1], x[rs], A[c0:c1].to(x.dtype).t(), beta=-lam, alpha=2 * lam, out=s[:, c0:c1])
        tau = _sorted_threshold(torch.sort(s, dim=1, descending=True).values)
        keep = s > (tau - margin[rs]).unsqueeze(1)
        count = keep.sum(1)
        v, i = torch.topk(torch.where(keep, s, -math.inf), int(count.max()), dim=1)
        i = torch.where(torch.isfinite(v), i, torch.full_like(i, -1))
        out.append(i)
        width = max(width, i.shape[1])
    return torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[1]), value=-1) for i in out], dim=0)


def replace_rows(cand: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``cand`` with ``cand[rows] = new``, both −1-padded to a common width."""
    width = max(cand.shape[1], new.shape[1])
    cand = torch.nn.functional.pad(cand, (0, width - cand.shape[1]), value=-1)
    cand[rows] = torch.nn.functional.pad(new, (0, width - new.shape[1]), value=-1)
    return cand


def sanitize(x: torch.Tensor, A: torch.Tensor):
    """Squared norms in the compute dtype, and rows that must come out NaN.

    A non-finite entry makes its squared norm non-finite, which is a cheap
    test.  Rows of x with one are zeroed (and reported); a non-finite
    prototype makes every row NaN.  Returns (x, A, aa, xx, nan_rows); x and A
    are only copied when they hold a non-finite value.
    """
    cd = _compute_dtype(x.dtype)
    aa = torch.linalg.vector_norm(A, dim=1, dtype=cd).square()
    xx = torch.linalg.vector_norm(x, dim=1, dtype=cd).square()
    nan_rows = ~torch.isfinite(xx)
    if not bool(torch.isfinite(aa).all()):
        nan_rows = torch.ones_like(nan_rows)
    if nan_rows.any():
        x = torch.where(nan_rows.unsqueeze(1), torch.zeros_like(x), x)
        A = torch.where(torch.isfinite(aa).unsqueeze(1), A, torch.zeros_like(A))
        aa = torch.linalg.vector_norm(A, dim=1, dtype=cd).square()
        xx = torch.linalg.vector_norm(x, dim=1, dtype=cd).square()
    return x, A, aa, xx, nan_rows


def score_margin(
    xx: torch.Tensor, aa: torch.Tensor, lam: float, d: int, eps: float, worst_case: bool = True
) -> torch.Tensor:
    """Per-row slack covering the rounding of GEMM-form scores, doubled.

    A length-d dot product accumulated with unit roundoff ``eps`` errs by at
    most d·eps·Σ|x_i·a_i| ≤ d·eps·(‖x‖² + ‖a‖²)/2 (worst case, any summation
    order); s' = λ(2·x·a − ‖a‖²) adds the bias's rounding.  Comparing two such
    scores (an entry and a threshold built from others) needs twice that.
    Every threshold comparison keeps this slack, so rounding can only add
    candidates, never drop a support entry.  ``eps`` = 2^-23 also covers
    accumulators that truncate instead of rounding.

    ``worst_case=False`` gives the statistical size 8·√d·eps instead of the
    bound (independent rounding errors); only the explicit tf32 option of the
    Triton backend uses it, because with tf32's eps the bound would prune
    nothing.
    """
    scale = lam * (xx + aa.max()) + torch.finfo(xx.dtype).tiny
    factor = 2 * (d + 2) if worst_case else 8 * math.sqrt(d)
    return factor * eps * scale


def candidates(
    x, A, aa, lam, margin, *, chunk=DEFAULT_CHUNK, topk=DEFAULT_TOPK, max_candidates=DEFAULT_MAX_CANDIDATES
):
    """Candidate sets (B, W; −1 = empty slot) that contain every row's support."""
    K = A.shape[0]
    chunk = min(chunk, K)
    cand, overflow = _select_candidates(x, A, aa, lam, margin, chunk, topk, max_candidates)
    if overflow.any():
        rows = overflow.nonzero().squeeze(1)
        dense = _dense_candidates(x[rows], A, aa, lam, margin[rows], chunk, x.shape[0] * chunk)
        cand = replace_rows(cand, rows, dense)
    return cand


def exact_codes(x, A, lam, cand, nan_rows, sq_dist=None):
    """Exact sparsemax over candidate sets ``cand`` (B, W; −1 = empty slot).

    D is recomputed directly on the candidates by ``sq_dist(x, indices, A)``
    (default :func:`gather_sq_dist`).  Returns (values, indices, support_size,
    D) with the support sorted by value descending, padded with index 0 /
    value 0 to width C = max support; rows in ``nan_rows`` are NaN.
    """
    valid = cand >= 0
    safe = torch.where(valid, cand, torch.zeros_like(cand))
    D = (sq_dist or gather_sq_dist)(x, safe, A)
    # Scores relative to the row's nearest candidate (shift invariance): the
    # codes s − τ then never subtract two large numbers.
    D_min = torch.where(valid, D, torch.full_like(D, math.inf)).amin(1, keepdim=True)
    D_min = torch.where(torch.isfinite(D_min), D_min, torch.zeros_like(D_min))
    s = torch.where(valid, -lam * (D - D_min), torch.full_like(D, -math.inf))
    s, order = torch.sort(s, dim=1, descending=True)
    safe = safe.gather(1, order)
    D = D.gather(1, order)
    tau = _sorted_threshold(s)
    z = (s - tau.unsqueeze(1)).clamp_min(0)
    support = z > 0
    safe = torch.where(support, safe, torch.zeros_like(safe))
    D = torch.where(support, D, torch.zeros_like(D))
    return finish_codes(z, safe, support.sum(1), D, nan_rows)


def finish_codes(z, idx, size, D, nan_rows):
    """Codes sorted by value descending and zero padded, trimmed to width C = max support.

    Rows in ``nan_rows`` become NaN (values and D) with an empty support.
    """
    C = max(int(size.max()) if size.numel() else 0, 1)
    z, idx, D = z[:, :C], idx[:, :C], D[:, :C]
    if nan_rows.any():
        z[nan_rows] = math.nan
        D[nan_rows] = math.nan
        size[nan_rows] = 0
        idx[nan_rows] = 0
    return z, idx, size, D


def empty_codes(x: torch.Tensor):
    """The codes of a batch of zero rows: (values, indices, support_size, D)."""
    return (
        x.new_zeros((0, 1)),
        x.new_zeros((0, 1), dtype=torch.long),
        x.new_zeros(0, dtype=torch.long),
        x.new_zeros((0, 1)),
    )


@torch.no_grad()
def encode_forward(x, A, lam, **options):
    """Sparse SpaDE codes of x (B, d) in the compute dtype (no autograd).

    ``options``: ``chunk``, ``topk``, ``max_candidates``.  Returns (values,
    indices, support_size, D_support).  On CPU float32/float64 tensors with
    the extension built (:data:`NATIVE_CPU`), the candidate search and the
    exact stage are the extension's C++ ops (``topk`` does not apply there).
    """
    if x.shape[0] == 0:
        return empty_codes(x)
    if _native_cpu(x) and options.get("max_candidates", DEFAULT_MAX_CANDIDATES) >= 256:
        from .cuda import encode_forward as native_forward

        return native_forward(x, A, lam, **{k: v for k, v in options.items() if k != "topk"})
    x, A, aa, xx, nan_rows = sanitize(x, A)
    margin = score_margin(xx, aa, lam, x.shape[1], torch.finfo(x.dtype).eps)
    with ieee_matmul():
        cand = candidates(x, A, aa, lam, margin, **options)
    return exact_codes(x, A, lam, cand, nan_rows)


def encode_backward(
    x, A, lam, z, idx, D, grad_z, grad_D=None, needs_input_grad=(True, True, True), ops=TORCH_OPS
):
    """Sparse backward of the encoder (DESIGN.md §2 facts 5–6), one pass over the support.

    ``z``, ``idx``, ``D`` are the forward's values, indices and support
    distances (compute dtype); ``lam`` is the λ tensor.  ``grad_D`` is a direct
    gradient on D (the distance-weighted regulariser's γ/B·z), folded into
    the same pass.  Returns (∂x, ∂prototypes, ∂λ) in the dtypes of x, A, λ,
    or None where not needed.  Cost O(B·C·d), no B×K tensor.
    """
    cd = z.dtype
    # λ stays a tensor: a Python float here would stop torch.compile's tracing.
    G, lam_rows = ops.support_jacobian(z, grad_z, D, grad_D, lam)
    grad_x = grad_A = grad_lam = None
    if needs_input_grad[2]:
        grad_lam = lam_rows.sum().to(lam.dtype).reshape(lam.shape)
    if needs_input_grad[0] or needs_input_grad[1]:
        # 0·NaN would leak NaN input rows into ∂prototypes; branch-free so
        # that torch.compile can trace the backward.
        nan_rows = torch.isnan(z).any(1, keepdim=True)
        xc = torch.where(nan_rows, torch.zeros((), dtype=cd, device=x.device), x.to(cd))
        gx, gA = _sq_dist_backward(xc, A.to(cd), idx, G, ops)
        grad_x, grad_A = gx.to(x.dtype), gA.to(A.dtype)
    return grad_x, grad_A, grad_lam


class EncoderImpl(NamedTuple):
    """How a sparse backend computes codes: its no-grad forward and its support products."""

    forward: Callable
    ops: SparseOps


class EncodeFn(torch.autograd.Function):
    """Differentiable codes of a sparse backend: ``impl.forward``, then the shared sparse backward."""

    @staticmethod
    def forward(ctx, x, A, lam, options, impl):
        cd = _compute_dtype(x.dtype)
        z, idx, size, D = impl.forward(x.to(cd), A.to(cd), float(lam), **options)
        lam_t = lam if isinstance(lam, torch.Tensor) else torch.tensor(float(lam), dtype=cd)
        ctx.save_for_backward(x, A, lam_t, z, idx, D)
        ctx.ops = impl.ops
        ctx.mark_non_differentiable(idx, size)
        # float16/bfloat16 inputs keep float32 codes: rounding them to a 8- or
        # 11-bit mantissa would break Σz = 1 by more than the contract allows.
        return z.to(torch.promote_types(x.dtype, torch.float32)), idx, size, D

    @staticmethod
    def backward(ctx, grad_z, _gi, _gs, grad_D):
        x, A, lam, z, idx, D = ctx.saved_tensors
        grads = encode_backward(x, A, lam, z, idx, D, grad_z, grad_D, ctx.needs_input_grad[:3], ctx.ops)
        return (*grads, None, None)


TORCH_IMPL = EncoderImpl(encode_forward, TORCH_OPS)


def encode(x: torch.Tensor, prototypes: torch.Tensor, lam, **options) -> SparseCodes:
    """Differentiable sparse SpaDE codes of x (B, d); gradients reach x, prototypes, λ.

    ``options``: ``chunk``, ``topk``, ``max_candidates`` (see module constants).
    """
    return encode_with(TORCH_IMPL, x, prototypes, lam, **options)


def encode_with(impl: EncoderImpl, x: torch.Tensor, prototypes: torch.Tensor, lam, **options) -> SparseCodes:
    """Differentiable sparse codes through ``impl`` (any sparse backend's forward and products)."""
    values, indices, size, D = EncodeFn.apply(x, prototypes, lam, options, impl)
    return SparseCodes(indices, values, size, prototypes.shape[0], distances=D)


class _SupportSqDistFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, M, indices, ops):
        cd = _compute_dtype(torch.promote_types(x.dtype, M.dtype))
        xc, Mc = x.to(cd), M.to(cd)
        ctx.save_for_backward(xc, Mc, indices)
        ctx.x_dtype, ctx.M_dtype, ctx.ops = x.dtype, M.dtype, ops
        ctx.mark_non_differentiable(indices)
        return ops.gather_sq_dist(xc, indices, Mc).to(torch.promote_types(x.dtype, M.dtype))

    @staticmethod
    def backward(ctx, grad):
        xc, Mc, indices = ctx.saved_tensors
        gx, gM = _sq_dist_backward(xc, Mc, indices, grad.to(xc.dtype), ctx.ops)
        return gx.to(ctx.x_dtype), gM.to(ctx.M_dtype), None, None


def support_sq_dists(x: torch.Tensor, M: torch.Tensor, indices: torch.Tensor, ops: SparseOps = TORCH_OPS):
    """‖x_b − M[indices[b, j]]‖² on the given support, computed directly; sparse backward."""
    return _SupportSqDistFn.apply(x, M, indices, ops)


class _SparseDecodeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W, bias, ops):
        out = ops.gather_matmul(values, indices, W)
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(values, indices, W)
        ctx.has_bias, ctx.ops = bias is not None, ops
        return out

    @staticmethod
    def backward(ctx, grad):
        values, indices, W = ctx.saved_tensors
        grad_v = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # ∂L/∂z only on the stored support: gathered dot products.
            grad_v = ctx.ops.gather_dot(grad, indices, W).to(values.dtype)
        if ctx.needs_input_grad[2]:
            # Rows whose input was NaN have NaN values in their padding slots
            # (index 0): keep 0·NaN out of W_dec's gradient.
            clean = torch.where(
                torch.isnan(values), torch.zeros((), dtype=values.dtype, device=values.device), values
            )
            grad_W = ctx.ops.scatter_matmul(clean, indices, grad.to(W.dtype), W.shape[0])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad.sum(0)
        return grad_v, None, grad_W, grad_b, None


def sparse_decode(
    codes: SparseCodes, W: torch.Tensor, bias: torch.Tensor | None = None, ops: SparseOps = TORCH_OPS
) -> torch.Tensor:
    """x̂ = codes · W (+ bias) as a gather-matmul over the support; sparse backward.

    codes may have leading dimensions (..., C); the output is (..., d).
    """
    lead = codes.indices.shape[:-1]
    idx = codes.indices.reshape(-1, codes.width)
    val = codes.values.reshape(-1, codes.width)
    out = _SparseDecodeFn.apply(val, idx, W, bias, ops)
    return out.reshape(*lead, W.shape[1])
