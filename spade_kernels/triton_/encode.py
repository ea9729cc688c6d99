"""Triton kernels of the encoder forward: the candidate search and the support distances.

For x (B, d), prototypes A (K, d), λ (docs/design.md, "The pipeline"; the
``triton`` backend's ``select_candidates`` is :func:`select_candidates`):

0. ``bound`` — a per-row lower bound of τ: the sparsemax threshold of the
   GEMM-form scores of the first ``prepass`` prototypes (subset bound, fact 3).
   It makes the first wave of tiles prune as well as the later ones.
1. ``_select_tiles_kernel`` — a (row block × prototype tile) grid, so the
   GPU fills at B = 4096.  Each program computes its score tile with
   ``tl.dot`` (fp32 accumulation), forms GEMM-form scores
   s' = λ(2·x·a − ‖a‖²), raises the row's bound with the tile's own Michelot
   threshold (a few iterations from max − 1 stay below τ), publishes it with
   ``atomic_max`` for the tiles that run later, and writes the largest
   entries above ``bound − margin`` into fixed per-(row, tile) slots, with
   the full counts (a count above the slots marks the row as overflowing).
2. ``_select_merge_kernel`` — one program per row: Michelot over the row's
   slots from the final bound gives the exact τ of the GEMM-form scores; the
   entries above ``τ − margin`` are compacted into ≤ ``max_candidates`` candidates.
3. ``_gather_sq_dist_kernel`` — D = ‖x − a‖² recomputed directly on the
   candidates (the backend's ``gather_sq_dist``; the exact τ follows in the
   pipeline's exact stage).

Rows whose survivors overflow a slot or ``max_candidates`` are flagged; the pipeline
resolves them exactly.  No B×K tensor exists at any point: extra memory is
B·(K/block_n)·slots·8 bytes of slots plus B·prepass floats.  The kernels are
registered with ``torch.library.triton_op`` (so ``torch.compile`` sees them
and ``opcheck`` tests them).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..numerics import ieee_matmul, sorted_threshold
from ._utils import _INTERPRET, _launch, kernel_op

__all__ = ["OPTIONS", "gather_sq_dist", "select_candidates", "select_merge", "select_tiles"]


#: Options of :func:`select_candidates` and their defaults (tests shrink them
#: to exercise every path at tiny sizes).
OPTIONS = {
    "block_n": 256,  # prototypes per tile (slot layout depends on it, so not autotuned)
    "slots": 8,  # survivors stored per (row, tile)
    "max_candidates": 512,  # candidates per row handed to the exact stage
    "prepass": 1024,  # prototypes used for the initial per-row bound
    "precision": "ieee",  # fp32 inputs: "ieee" (exact products) or "tf32"
}
#: Rounding unit of the scores' dot products per input precision (for the margin):
#: fp32 accumulation (2^-23 also covers truncating accumulators), tf32 inputs.
DOT_EPS = {"ieee": 2.0**-23, "tf32": 2.0**-11}
_MICHELOT_TILE_ITERS = 4


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------


@triton.jit
def _michelot_update(tau, total, count):
    """One step of Michelot's iteration (design fact 4), the one copy both kernels use.

    ``total`` and ``count`` are the sum and number of the values above ``tau``
    (all relative to a common reference); the iterate never decreases.
    """
    return tl.maximum(tau, (total - 1.0) / tl.maximum(count, 1.0))


def _select_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_D": 16}, num_warps=4)]
    shapes = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 4), (64, 32, 4, 4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s) for bm, bd, w, s in shapes
    ]


def _prune_select_configs(configs, named_args, **_):
    # fp32 tiles (IEEE, no tensor-core path) with BLOCK_D = 64 compile to a
    # 13 KB stack frame on sm_90; BLOCK_D = 32 keeps them near the register
    # budget (scripts/triton_aot_check.py, benchmarks/NOTES.md).
    if named_args["x_ptr"].dtype == torch.float32:
        small = [c for c in configs if c.kwargs["BLOCK_D"] <= 32]
        return small or configs
    return configs


@triton.autotune(
    configs=_select_configs(), key=["D", "K"], prune_configs_by={"early_config_prune": _prune_select_configs}
)
@triton.jit
def _select_tiles_kernel(
    x_ptr, a_ptr, aa_ptr, margin_ptr, bound_ptr,
    slot_val_ptr, slot_idx_ptr, count_ptr,
    B, K, D, N_TILES, lam,
    stride_xb, stride_xd, stride_ak, stride_ad,
    BLOCK_N: tl.constexpr, SLOTS: tl.constexpr, PRECISION: tl.constexpr,
    MICHELOT_ITERS: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    col_ok = cols < K

    # Score tile: acc = x_rows · a_colsᵀ, fp32 accumulation.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        xt = tl.load(
            x_ptr + rows[:, None] * stride_xb + offs_d[None, :] * stride_xd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        at = tl.load(
            a_ptr + cols[None, :] * stride_ak + offs_d[:, None] * stride_ad,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        if DOT_UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)

    # GEMM-form scores s' = λ(2·x·a − ‖a‖²) (= s + λ‖x‖², same threshold shift per row).
    aa = tl.load(aa_ptr + cols, mask=col_ok, other=0.0)
    s = lam * (2.0 * acc - aa[None, :])
    s = tl.where(col_ok[None, :], s, float("-inf"))

    # Tile-local Michelot from max − 1 (≤ τ by fact 2): every iterate stays ≤ the
    # tile's τ ≤ the row's τ (fact 3, 4), so a few iterations give a valid bound.
    # Relative to the row maximum, so the sums stay accurate for large scores.
    top = tl.max(s, axis=1)
    top = tl.where(top > float("-inf"), top, 0.0)
    rel = s - top[:, None]
    tau_rel = tl.zeros((BLOCK_M,), dtype=tl.float32) - 1.0
    for _ in tl.static_range(MICHELOT_ITERS):
        above = rel > tau_rel[:, None]
        cnt = tl.sum(above.to(tl.float32), axis=1)
        tot = tl.sum(tl.where(above, rel, 0.0), axis=1)
        tau_rel = _michelot_update(tau_rel, tot, cnt)
    tau = tau_rel + top
    bound = tl.load(bound_ptr + rows, mask=row_ok, other=float("-inf"))
    tau = tl.maximum(tau, bound)
    tl.atomic_max(bound_ptr + rows, tau, mask=row_ok)

    # Survivors: everything above τ_bound − margin (margin covers GEMM rounding).
    # The count is stored in full (a count above SLOTS flags the row); the
    # SLOTS largest survivors are extracted by repeated max/argmax, which stops
    # as soon as no row of the tile has one left (usually after 0–2 rounds).
    # A cumsum-and-scatter compaction spills registers on sm_90 (see NOTES.md).
    margin = tl.load(margin_ptr + rows, mask=row_ok, other=0.0)
    keep = (s > (tau - margin)[:, None]) & row_ok[:, None]
    tl.store(count_ptr + rows * N_TILES + pid_n, tl.sum(keep.to(tl.int32), axis=1), mask=row_ok)
    cur = tl.where(keep, s, float("-inf"))
    local = tl.arange(0, BLOCK_N)
    slot0 = (rows * N_TILES + pid_n) * SLOTS
    j = 0
    while (j < SLOTS) & (tl.max(tl.max(cur, axis=1), axis=0) > float("-inf")):
        best = tl.max(cur, axis=1)
        arg = tl.argmax(cur, axis=1)
        found = best > float("-inf")
        tl.store(slot_val_ptr + slot0 + j, best, mask=found)
        tl.store(slot_idx_ptr + slot0 + j, (pid_n * BLOCK_N + arg).to(tl.int32), mask=found)
        cur = tl.where(local[None, :] == arg[:, None], float("-inf"), cur)
        j += 1


@triton.jit
def _select_merge_kernel(
    slot_val_ptr, slot_idx_ptr, count_ptr, bound_ptr, margin_ptr,
    cand_ptr, cand_count_ptr,
    N_TILES, MAX_CANDIDATES,
    SLOTS: tl.constexpr, BLOCK_T: tl.constexpr, MAX_ITERS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    n_slots = N_TILES * SLOTS
    base = row * n_slots
    margin = tl.load(margin_ptr + row)
    # Michelot over the row's slots, from the final bound (≤ τ): monotone, exact.
    # Values are taken relative to the bound so the sums stay accurate.
    ref = tl.load(bound_ptr + row)
    ref = tl.where(ref > float("-inf"), ref, 0.0)
    tau = tl.zeros((), dtype=tl.float32)
    prev = tau - 1.0
    it = 0
    while (tau > prev) & (it < MAX_ITERS):
        prev = tau
        tot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        cnt = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for t0 in range(0, n_slots, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            ok = offs < n_slots
            c = tl.load(count_ptr + row * N_TILES + offs // SLOTS, mask=ok, other=0)
            v = tl.load(slot_val_ptr + base + offs, mask=ok & (offs % SLOTS < c), other=float("-inf")) - ref
            above = v > tau
            tot += tl.where(above, v, 0.0)
            cnt += above.to(tl.float32)
        n = tl.sum(cnt, axis=0)
        tau = _michelot_update(prev, tl.sum(tot, axis=0), n)
        it += 1

    # Candidates for the exact stage: GEMM-form score above τ − margin.
    total = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for t0 in range(0, n_slots, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        ok = offs < n_slots
        c = tl.load(count_ptr + row * N_TILES + offs // SLOTS, mask=ok, other=0)
        live = ok & (offs % SLOTS < c)
        v = tl.load(slot_val_ptr + base + offs, mask=live, other=float("-inf")) - ref
        sel = live & (v > tau - margin)
        pos = tl.sum(total, axis=0) + tl.cumsum(sel.to(tl.int32), axis=0) - 1
        idx = tl.load(slot_idx_ptr + base + offs, mask=sel, other=0)
        tl.store(cand_ptr + row * MAX_CANDIDATES + pos, idx.to(tl.int64), mask=sel & (pos < MAX_CANDIDATES))
        total += sel.to(tl.int32)
    tl.store(cand_count_ptr + row, tl.sum(total, axis=0))


@triton.jit
def _gather_sq_dist_kernel(
    x_ptr, a_ptr, idx_ptr, out_ptr,
    W, D,
    stride_xb, stride_xd, stride_ak, stride_ad, stride_ib, stride_ic,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < W
    idx = tl.load(idx_ptr + row * stride_ib + offs_c * stride_ic, mask=c_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_C,), dtype=out_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        xv = tl.load(x_ptr + row * stride_xb + offs_d * stride_xd, mask=d_ok, other=0.0)
        av = tl.load(
            a_ptr + idx[:, None] * stride_ak + offs_d[None, :] * stride_ad,
            mask=c_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        diff = xv[None, :].to(acc.dtype) - av.to(acc.dtype)
        acc += tl.sum(diff * diff, axis=1)
    tl.store(out_ptr + row * W + offs_c, acc, mask=c_ok)


# --------------------------------------------------------------------------
# launchers, registered as torch.library ops
# --------------------------------------------------------------------------


@kernel_op("spade_kernels::triton_select_tiles")
def select_tiles(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    sq_norms: torch.Tensor,
    margin: torch.Tensor,
    bound: torch.Tensor,
    lam: float,
    block_n: int,
    slots: int,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel 1: per-(row, tile) survivor slots, counts and the raised bound."""
    B, d = x.shape
    K = prototypes.shape[0]
    n_tiles = triton.cdiv(K, block_n)
    # Unused slots are defined (−inf / 0) so the op's output is deterministic.
    slot_val = torch.full((B, n_tiles, slots), -math.inf, dtype=torch.float32, device=x.device)
    slot_idx = torch.zeros((B, n_tiles, slots), dtype=torch.int32, device=x.device)
    counts = torch.empty((B, n_tiles), dtype=torch.int32, device=x.device)
    bound = bound.clone()

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_M"]), n_tiles)

    _launch(
        _select_tiles_kernel, grid,
        x, prototypes, sq_norms, margin, bound, slot_val, slot_idx, counts,
        B, K, d, n_tiles, lam,
        x.stride(0), x.stride(1), prototypes.stride(0), prototypes.stride(1),
        BLOCK_N=block_n, SLOTS=slots, PRECISION=precision, MICHELOT_ITERS=_MICHELOT_TILE_ITERS,
        # Triton's interpreter multiplies bfloat16 tiles wrongly (triton 3.9):
        # upcast there; on a GPU bfloat16 tiles go to the tensor cores as they are.
        DOT_UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
    )  # fmt: skip
    return slot_val, slot_idx, counts, bound


@kernel_op("spade_kernels::triton_select_merge")
def select_merge(
    slot_val: torch.Tensor,
    slot_idx: torch.Tensor,
    counts: torch.Tensor,
    bound: torch.Tensor,
    margin: torch.Tensor,
    max_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel 2: candidates (B, max_candidates; −1 = empty) and each row's candidate count."""
    B, n_tiles, slots = slot_val.shape
    cand = torch.full((B, max_candidates), -1, dtype=torch.int64, device=slot_val.device)
    cand_count = torch.empty((B,), dtype=torch.int32, device=slot_val.device)
    block_t = min(1024, triton.next_power_of_2(max(n_tiles * slots, 16)))
    _launch(
        _select_merge_kernel, (B,),
        slot_val, slot_idx, counts, bound, margin, cand, cand_count,
        n_tiles, max_candidates, SLOTS=slots, BLOCK_T=block_t, MAX_ITERS=256,
    )  # fmt: skip
    return cand, cand_count


@kernel_op("spade_kernels::triton_gather_sq_dist")
def gather_sq_dist(x: torch.Tensor, indices: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Kernel 3: D[b, j] = ‖x_b − prototypes[indices[b, j]]‖², computed directly.

    Accumulates in float32 (float64 for float64 inputs).  The argument order
    of every backend's ``gather_sq_dist``.
    """
    B, W = indices.shape
    d = x.shape[1]
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty((B, W), dtype=out_dtype, device=x.device)
    block_c = 16 if _INTERPRET else 32
    block_d = 16 if _INTERPRET else min(128, triton.next_power_of_2(d))
    grid = (B, triton.cdiv(W, block_c))
    _launch(
        _gather_sq_dist_kernel, grid,
        x, prototypes, indices, out, W, d,
        x.stride(0), x.stride(1), prototypes.stride(0), prototypes.stride(1),
        indices.stride(0), indices.stride(1),
        BLOCK_C=block_c, BLOCK_D=block_d,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------
# composition: the backend's candidate search
# --------------------------------------------------------------------------


def _prepass_bound(x, A, aa, lam, n):
    """τ of the GEMM-form scores of the first n prototypes: a lower bound of τ(row)."""
    n = min(n, A.shape[0])
    with ieee_matmul():
        s = torch.addmm(aa[:n], x.to(aa.dtype), A[:n].t().to(aa.dtype), beta=-lam, alpha=2 * lam)
    return sorted_threshold(torch.sort(s, dim=1, descending=True).values)


def select_candidates(x, A, aa, lam: float, margin, *, block_n, slots, max_candidates, prepass, precision):
    """Candidates of every row's support through kernels 1 and 2: (cand, overflow).

    ``x``, ``A`` float32/bfloat16/float16 (one dtype); ``aa`` and ``margin``
    float32.  cand (B, W) int64 with each row's candidates first, then −1;
    overflow (B,) marks the rows whose survivors overflowed a slot or ``max_candidates``.
    """
    if precision not in DOT_EPS:
        raise ValueError(f"precision must be one of {sorted(DOT_EPS)}, got {precision!r}")
    dtype = torch.promote_types(x.dtype, A.dtype)  # tl.dot needs one dtype
    x, A = x.to(dtype), A.to(dtype)
    bound = _prepass_bound(x, A, aa, lam, prepass).float()
    margin = margin.float()
    slot_val, slot_idx, counts, bound = select_tiles(
        x, A, aa.float(), margin, bound, float(lam), block_n, slots, precision
    )
    cand, cand_count = select_merge(slot_val, slot_idx, counts, bound, margin, max_candidates)
    overflow = (counts > slots).any(1) | (cand_count > max_candidates)
    cand = torch.where(overflow.unsqueeze(1), torch.full_like(cand, -1), cand)
    return cand, overflow
