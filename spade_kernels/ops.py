"""The native ops ``torch.ops.spade_kernels.*``: schema, fake implementation and wrapper of each, side by side.

The implementations are compiled (csrc/ops.h): C++/OpenMP for CPU tensors
in ``spade_kernels._C``, CUDA kernels for CUDA tensors in
``spade_kernels._C_cuda``; :mod:`spade_kernels._ext` loads them.  The schemas
are declared here, so each op's contract is in one place: the schema, the
fake implementation ``torch.compile`` and ``opcheck`` use (shapes and dtypes
only), and the documented wrapper callers use.  A wrapper raises a precise
error when the library its tensors need is not loaded.

The ops compute in float32 or float64 (``sparsemax_rows`` on CUDA also takes
bfloat16/float16 scores).  They check shapes, dtypes and devices and raise a
``RuntimeError`` naming the op and the argument.  Index ranges are not
checked (on a GPU that would synchronise); on both devices an index outside
[0, n) gives NaN in the gathers' outputs that use it, counts as an empty
slot in ``exact_codes``, and is dropped by ``scatter_matmul``.

Adding an op: its schema, fake and wrapper here; its kernels (CPU row
function and CUDA kernel) in a header of csrc/include/spade; its checks,
driver and entry in ``SPADE_OPS`` in csrc/ops.h; its test in tests/test_ops.py
(csrc/README.md).
"""

from __future__ import annotations

import torch

from . import _ext

__all__ = [
    "SPARSEMAX_DTYPES",
    "cached_output_bytes",
    "exact_codes",
    "gather_dot",
    "gather_matmul",
    "gather_sq_dist",
    "release_cached_outputs",
    "scatter_matmul",
    "select_candidates",
    "sparsemax_rows",
    "support_jacobian",
]

_LIB = torch.library.Library("spade_kernels", "DEF")


def _define(schema: str):
    """Declare ``spade_kernels::<schema>``; the decorated function is its fake implementation."""

    def register(fake):
        _LIB.define(schema)
        torch.library.register_fake(f"spade_kernels::{schema.split('(')[0]}", fake, lib=_LIB)
        return fake

    return register


def _op(name: str, device: torch.device):
    _ext.require(device)
    return getattr(torch.ops.spade_kernels, name)


# -- sparsemax_rows -------------------------------------------------------------


#: The dtypes ``sparsemax_rows`` takes, per device type (what ``sk.sparsemax`` sends it).
SPARSEMAX_DTYPES = {
    "cpu": frozenset({torch.float32, torch.float64}),
    "cuda": frozenset({torch.float32, torch.bfloat16, torch.float16}),
}


@_define("sparsemax_rows(Tensor scores) -> (Tensor, Tensor)")
def _(scores):
    tau_dtype = torch.float32 if scores.device.type == "cuda" else scores.dtype
    # new_empty, not empty_like: the ops return contiguous tensors for any input strides.
    return scores.new_empty(scores.shape), scores.new_empty(scores.shape[:1], dtype=tau_dtype)


def sparsemax_rows(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact sparsemax of each row of a 2-D tensor, without a sort: (projection, τ).

    Only entries above max − 1 can be in the support; Michelot's iteration
    over them gives the exact τ (relative to the row maximum).  Rows with NaN
    or +inf, or only −inf, give NaN.  CPU: float32/float64 (float64
    arithmetic, τ in the scores' dtype); CUDA: float32/bfloat16/float16
    (float32 arithmetic, τ float32).
    """
    return _op("sparsemax_rows", scores.device)(scores)


# -- candidate selection and exact codes ------------------------------------------------


@_define(
    "select_candidates(Tensor x, Tensor A, Tensor aa, float lam, Tensor margin, int chunk, int max_candidates)"
    " -> (Tensor, Tensor)"
)
def _(x, A, aa, lam, margin, chunk, max_candidates):
    B = x.shape[0]
    W = torch.library.get_ctx().new_dynamic_size()  # the widest row's count: data-dependent
    return x.new_empty((B, W), dtype=torch.long), x.new_empty((B,), dtype=torch.bool)


def select_candidates(x, A, aa, lam: float, margin, chunk: int, max_candidates: int):
    """Candidates of every row's support from K-chunked GEMM-form scores: (cand, overflow).

    Scores s' = λ(2·x·aᵀ − ‖a‖²) ``chunk`` prototypes at a time (the BLAS /
    cuBLAS GEMM), each chunk reduced by the selection of
    csrc/include/spade/select.h to a buffer of ``max_candidates`` candidates per row with
    a running bound ≤ τ, keeping every entry above bound − ``margin``.
    ``x``, ``A``, ``aa`` (‖a‖², (K,)) and ``margin`` ((B,)) share one dtype
    (float32 or float64).  cand (B, W) int64 holds each row's candidates
    first, then −1 (W ≤ ``max_candidates``, the widest row's count); overflow (B,) bool
    marks the rows that needed more than ``max_candidates`` (their cand row is all −1).
    Live memory O(B·chunk + B·max_candidates).
    """
    return _op("select_candidates", x.device)(x, A, aa, lam, margin, chunk, max_candidates)


@_define("exact_codes(Tensor x, Tensor A, float lam, Tensor cand) -> (Tensor, Tensor, Tensor, Tensor)")
def _(x, A, lam, cand):
    return (
        x.new_empty(cand.shape),
        cand.new_empty(cand.shape),
        cand.new_empty(cand.shape[:1]),
        x.new_empty(cand.shape),
    )


def exact_codes(x, A, lam: float, cand):
    """Exact sparsemax codes over candidate sets: (values, indices, support_size, D).

    For each row, D = ‖x − a‖² recomputed directly on its candidates
    ``cand`` (B, W; −1 or any index outside [0, K) is an empty slot), scores
    relative to the nearest candidate, the exact τ, and the support sorted by
    value descending, zero padded to width W.
    """
    return _op("exact_codes", x.device)(x, A, lam, cand)


# -- products over a support ------------------------------------------------------


@_define(
    "support_jacobian(Tensor z, Tensor? grad_z, Tensor D, Tensor? grad_D, Tensor lam) -> (Tensor, Tensor)"
)
def _(z, grad_z, D, grad_D, lam):
    return z.new_empty(z.shape), z.new_empty(z.shape[:1])


def support_jacobian(z, grad_z, D, grad_D, lam: torch.Tensor):
    """Backward through sparsemax and s = −λD on each row's support: (G, lam_rows).

    G = −λ·(g − mean_S g) + grad_D on the support S (z > 0), 0 elsewhere, and
    lam_rows = −Σ_S (g − mean_S g)·D, each row's share of ∂L/∂λ.  ``grad_z``
    and ``grad_D`` may be None (zero); ``lam`` is a one-element tensor.
    """
    return _op("support_jacobian", z.device)(z, grad_z, D, grad_D, lam.detach().to(z.device))


@_define("gather_matmul(Tensor weights, Tensor indices, Tensor M) -> Tensor")
def _(weights, indices, M):
    return M.new_empty((indices.shape[0], M.shape[1]))


def gather_matmul(weights, indices, M):
    """out[b] = Σ_j weights[b, j] · M[indices[b, j]]  → (B, d) (the decoder, and ∂x)."""
    return _op("gather_matmul", M.device)(weights, indices, M)


@_define("gather_dot(Tensor G, Tensor indices, Tensor M) -> Tensor")
def _(G, indices, M):
    return M.new_empty(indices.shape)


def gather_dot(G, indices, M):
    """out[b, j] = ⟨G[b], M[indices[b, j]]⟩  → (B, C) (∂L/∂z of the decoder on the support)."""
    return _op("gather_dot", M.device)(G, indices, M)


@_define("gather_sq_dist(Tensor x, Tensor indices, Tensor M) -> Tensor")
def _(x, indices, M):
    return M.new_empty(indices.shape)


def gather_sq_dist(x, indices, M):
    """out[b, j] = ‖x[b] − M[indices[b, j]]‖², computed directly  → (B, C)."""
    return _op("gather_sq_dist", M.device)(x, indices, M)


@_define("scatter_matmul(Tensor weights, Tensor indices, Tensor X, int n_rows, Tensor? M=None) -> Tensor")
def _(weights, indices, X, n_rows, M=None):
    return X.new_empty((n_rows, X.shape[1]))


def scatter_matmul(weights, indices, X, n_rows: int, M=None):
    """out[k] = Σ_{b,j: indices[b,j]=k} weights[b, j] · X[b]  → (n_rows, d) (∂W_dec).

    With ``M`` (n_rows, d), in X's dtype: Σ weights[b, j] · (X[b] − M[k]),
    the prototypes' gradient of Σ G·‖x_b − a_k‖² with weights −2G in one
    pass (on the CPU each row starts from −(Σ weights)·M[k]).  Deterministic: the
    entries are sorted by latent and each latent's segment is summed in
    order (no atomics).  Its CPU output (K×d, ≥ 2 MiB) comes from the
    outputs the CPU library keeps for reuse (:func:`release_cached_outputs`).
    """
    return _op("scatter_matmul", X.device)(weights, indices, X, n_rows, M)


# -- the CPU library's kept outputs ----------------------------------------------
#
# A training step frees its K×d gradients (zero_grad(set_to_none=True)) and the
# next backward asks for blocks of the same sizes: the CPU library keeps freed
# large outputs of scatter_matmul (at most SPADE_KERNELS_OUTPUT_CACHE_MB, default
# 256; 0 keeps none) and hands them out again, so a step does not pay the
# kernel's zeroing of fresh pages (docs/design.md, "Memory model").


def release_cached_outputs() -> int:
    """Free the CPU outputs the library keeps for reuse; returns the bytes freed (0 without the library)."""
    return int(torch.ops.spade_kernels.release_cached_outputs()) if _ext.available() else 0


def cached_output_bytes() -> int:
    """Bytes of freed CPU outputs the library keeps for reuse now (0 without the library)."""
    return int(torch.ops.spade_kernels.cached_output_bytes()) if _ext.available() else 0
