"""Numerics shared by the reference, the encoder pipeline and every backend.

Each piece is written once (docs/design.md, "Facts the algorithms rest on"):

* :func:`sorted_threshold` — the sort-based sparsemax threshold τ of rows
  already sorted descending, relative to each row's maximum;
* :func:`score_margin` — the rounding slack of GEMM-form scores, so pruning
  can only keep extra candidates, never drop a support entry;
* :func:`sanitize` — squared norms and the rows that must come out NaN;
* :func:`ieee_matmul` — float32 GEMMs in full IEEE precision inside a block.
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = [
    "RangeError",
    "compute_dtype",
    "ieee_matmul",
    "sanitize",
    "sanitize_prototypes",
    "score_margin",
    "sorted_threshold",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the encoder computes in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sorted_threshold(vals: torch.Tensor) -> torch.Tensor:
    """Sparsemax τ of rows already sorted in descending order (last dimension).

    −inf entries are allowed (they never enter the support; sorted last, they
    keep the support a prefix).  With cumulative sums c_j of the sorted row,
    the support size is the largest j with 1 + j·s_j > c_j and
    τ = (c_k − 1)/k (Martins & Astudillo, 2016).  Computed relative to each
    row's maximum (shift invariance), so the sums stay accurate when the
    scores are large (|s| ≳ 2^24 would otherwise round 1 + j·s_j > c_j away).
    A row with no finite entry gets τ = −inf; NaN entries give NaN.
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


class RangeError(ValueError):
    """Finite values too large for SpaDE's squared distances in the compute dtype (a ``ValueError``)."""


def squared_norms(t: torch.Tensor, name: str) -> torch.Tensor:
    """‖row‖² of a (N, d) tensor in its compute dtype; ValueError when a finite row's overflows.

    A row with a non-finite entry has a non-finite norm (the NaN policy
    handles it).  A row of finite entries whose squared norm overflows
    (float32 entries of magnitude ~1e19 and up) would otherwise turn into a
    NaN row silently, on every backend: it is refused instead.  Checked only
    when some norm is non-finite, so it costs nothing otherwise.
    """
    cd = compute_dtype(t.dtype)
    sq = torch.linalg.vector_norm(t, dim=1, dtype=cd).square()
    bad = ~torch.isfinite(sq)
    if t.numel() and bool(bad.any()) and bool(torch.isfinite(t[bad]).all(1).any()):
        raise RangeError(
            f"{name} holds finite values too large for SpaDE's squared distances in {cd} "
            f"(|entries| up to {float(t.detach()[bad].abs().nan_to_num(0, posinf=0).max()):.3g}): scale the inputs "
            "down (e.g. spade_kernels.sae.data.scale_to_unit_norm) or compute in float64"
        )
    return sq


def sanitize_prototypes(A: torch.Tensor):
    """The prototypes' half of :func:`sanitize`, computed once per encode: (A, aa, any_bad).

    A prototype with a non-finite entry is zeroed (``any_bad`` is then True:
    every row of the batch comes out NaN); A is only copied when one exists.
    """
    cd = compute_dtype(A.dtype)
    aa = squared_norms(A, "prototypes")
    finite = torch.isfinite(aa)
    if bool(finite.all()):
        return A, aa, False
    A = torch.where(finite.unsqueeze(1), A, torch.zeros_like(A))
    return A, torch.linalg.vector_norm(A, dim=1, dtype=cd).square(), True


def sanitize(x: torch.Tensor, A: torch.Tensor, prototypes=None):
    """Squared norms in the compute dtype, and the rows that must come out NaN.

    A non-finite entry makes its squared norm non-finite, which is a cheap
    test.  Rows of x with one are zeroed (and reported); a non-finite
    prototype makes every row NaN.  Returns (x, A, aa, xx, nan_rows); x and A
    are only copied when they hold a non-finite value.  ``prototypes`` is
    :func:`sanitize_prototypes`'s result for A when the caller has it (row
    blocks of one batch share it).
    """
    cd = compute_dtype(x.dtype)
    A, aa, any_bad = sanitize_prototypes(A) if prototypes is None else prototypes
    xx = squared_norms(x, "x")
    nan_rows = ~torch.isfinite(xx)
    if any_bad:
        nan_rows = torch.ones_like(nan_rows)
    if nan_rows.any():
        x = torch.where(nan_rows.unsqueeze(1), torch.zeros_like(x), x)
        xx = torch.linalg.vector_norm(x, dim=1, dtype=cd).square()
    return x, A, aa, xx, nan_rows


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
