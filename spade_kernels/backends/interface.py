"""The backend interface: the primitives a backend provides to the pipeline (:mod:`spade_kernels.pipeline`).

A backend is a :class:`Primitives` value (docs/design.md, "The backend
interface").  The pipeline (:mod:`spade_kernels.pipeline`) composes them into
the encoder and the sparse autograd; a backend never composes them itself,
and no backend module imports another.  Work a backend does not take (inputs
outside ``select_dtypes``, matrices outside ``product_dtypes``, rows whose
candidates overflowed) goes to the ``torch`` backend's PyTorch primitives,
chosen by the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_MAX_CANDIDATES",
    "INITIAL_BUFFER",
    "Primitives",
    "default_margin_eps",
    "exact_stage_row_bytes",
    "subtract_weighted_rows",
]

#: Prototypes per score chunk of the chunked searches (``torch``, ``native``):
#: the live score block is rows × chunk.
DEFAULT_CHUNK = 4096
#: Candidate slots per row of those searches; rows with more overflow (and
#: are resolved exactly by the pipeline).
DEFAULT_MAX_CANDIDATES = 2048


def default_margin_eps(dtype: torch.dtype, options: Mapping) -> tuple[float, bool]:
    """Rounding unit of the score GEMM (IEEE, in the compute dtype) and whether the margin is worst-case."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps, True


class Primitives(NamedTuple):
    """What a backend computes; the pipeline does the rest.

    Candidate selection and exact codes (forward):

    ``select_candidates(x, A, aa, lam, margin, **options) -> (cand, overflow)``
        x (B, d), A (K, d) in the inputs' (promoted) dtype; aa (K,) = ‖a_k‖²
        and margin (B,) in the compute dtype (float32, or float64 for float64
        inputs); lam a float.  cand (B, W) int64 holds each row's candidates
        first, then −1; it must contain the row's whole support unless the
        row is flagged in overflow (B,) bool.
    ``exact_codes(x, A, lam, cand) -> (values, indices, support_size, D)``
        the exact codes over the candidates (D = ‖x − a‖² recomputed
        directly), each row's support sorted by value descending, zero padded
        to cand's width, values and D in the compute dtype.  ``None``: the
        pipeline's exact stage (the ``torch`` backend's) on the backend's
        ``gather_sq_dist``.

    Products over a support (backward, decoder, regulariser), the semantics of
    the ``torch`` backend's functions of the same names:
    ``gather_matmul(w, idx, M)``, ``gather_dot(G, idx, M)``,
    ``scatter_matmul(w, idx, X, n_rows, M=None)``, ``gather_sq_dist(x, idx, M)``,
    ``support_jacobian(z, grad_z, D, grad_D, lam_tensor)``.

    ``options`` are the defaults of the backend's ``select_candidates``
    options (the only ones it accepts, besides the pipeline's ``search``;
    each a field of :class:`spade_kernels.pipeline.plan.Options`);
    ``margin_eps(dtype, options)`` gives the rounding unit of its score GEMM
    and whether the margin is the worst-case bound.

    Memory (docs/design.md, "Memory model"): ``row_bytes(K, d, itemsize,
    options)`` is the working memory of one row of the candidate search and
    the exact stage, from which the pipeline sizes its row blocks;
    ``buffer_option``, where not None, names the option that sizes a
    preallocated candidate buffer, which the pipeline starts at
    ``INITIAL_BUFFER`` slots and grows (×4, up to the option's value) only for
    the rows that overflow it.
    """

    name: str
    options: Mapping[str, object]
    select_candidates: Callable
    exact_codes: Callable | None
    gather_matmul: Callable
    gather_dot: Callable
    scatter_matmul: Callable
    gather_sq_dist: Callable
    support_jacobian: Callable
    select_dtypes: frozenset
    product_dtypes: frozenset
    row_bytes: Callable
    margin_eps: Callable = default_margin_eps
    buffer_option: str | None = None


#: First size of a growable candidate buffer (``Primitives.buffer_option``).
INITIAL_BUFFER = 256


def exact_stage_row_bytes(width: int, itemsize: int) -> int:
    """Working memory per row of the pipeline's exact stage over ``width`` candidates (D, scores, sort, masks)."""
    return width * (4 * itemsize + 24)


def subtract_weighted_rows(
    out: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, M: torch.Tensor
) -> torch.Tensor:
    """out[k] −= (Σ_{b,j: indices[b,j]=k} weights[b, j]) · M[k], in place; returns out.

    scatter_matmul's M term, for the products that form the plain transpose
    first: one pass over the n_rows×d output (no temporary of its size).
    """
    row_w = torch.zeros(M.shape[0], dtype=out.dtype, device=out.device)
    row_w.index_add_(0, indices.reshape(-1), weights.reshape(-1).to(out.dtype))
    return out.addcmul_(row_w.unsqueeze(1), M.to(out.dtype), value=-1)
