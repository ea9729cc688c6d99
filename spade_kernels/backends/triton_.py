"""The ``triton`` backend: fused Triton kernels (:mod:`spade_kernels.triton_`).

* ``select_candidates`` — a prepass bound from the first ``prepass``
  prototypes, then one (row block × 256-prototype tile) grid of ``tl.dot``
  programs whose epilogue prunes with an in-register Michelot threshold and a
  per-row bound shared through ``atomic_max``, keeping ≤ ``slots`` survivors
  per (row, tile), and a per-row merge kernel that takes the exact τ of the
  GEMM-form scores and ≤ ``max_candidates`` candidates;
* exact codes — none of its own: the pipeline's exact stage (the ``torch``
  backend's, a sort of a few dozen candidates per row) on distances from the
  Triton ``gather_sq_dist`` kernel;
* the products over a support (``gather_matmul``, ``gather_dot``, atomic
  ``scatter_matmul``, ``support_jacobian``), float32 accumulation.

The kernels take float32/bfloat16/float16 tensors (bfloat16 and float16 on
the tensor cores); the pipeline sends float64 work to the ``torch`` backend.
For float32 inputs the score GEMM is IEEE float32 by default;
``precision="tf32"`` selects candidates from tf32 scores with a statistical
margin (docs/design.md, "Precision contract").
"""

from __future__ import annotations

import torch

from ..triton_ import encode as E
from ..triton_ import sparse as S
from .interface import Primitives, exact_stage_row_bytes, subtract_weighted_rows

__all__ = ["PRIMITIVES"]

_KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


def _margin_eps(dtype: torch.dtype, options) -> tuple[float, bool]:
    tf32 = options["precision"] == "tf32" and dtype == torch.float32
    return E.DOT_EPS["tf32" if tf32 else "ieee"], not tf32


def _row_bytes(K: int, d: int, itemsize: int, options) -> int:
    """Working memory per row: the per-tile slots and counts, the prepass, the candidates, the exact stage."""
    tiles = -(-K // options["block_n"])
    prepass = min(options["prepass"], K)
    max_candidates = options["max_candidates"]
    return (
        tiles * options["slots"] * 8
        + tiles * 4
        + prepass * 16
        + max_candidates * 8
        + exact_stage_row_bytes(max_candidates, 4)
    )


def _scatter_matmul(weights, indices, X, n_rows: int, M=None):
    """The Triton transpose (atomics per slot), then scatter_matmul's M term (one pass over the output)."""
    out = S.scatter_matmul(weights, indices, X, n_rows)
    return out if M is None else subtract_weighted_rows(out, weights, indices, M)


#: The ``triton`` backend as the pipeline sees it.
PRIMITIVES = Primitives(
    name="triton",
    options=E.OPTIONS,
    select_candidates=E.select_candidates,
    exact_codes=None,
    gather_matmul=S.gather_matmul,
    gather_dot=S.gather_dot,
    scatter_matmul=_scatter_matmul,
    gather_sq_dist=E.gather_sq_dist,
    support_jacobian=S.support_jacobian,
    select_dtypes=_KERNEL_DTYPES,
    product_dtypes=_KERNEL_DTYPES,
    margin_eps=_margin_eps,
    row_bytes=_row_bytes,
)
