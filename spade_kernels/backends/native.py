"""The ``native`` backend: the compiled extension's ops, which dispatch by device.

CPU tensors run the C++/OpenMP implementations (``spade_kernels._C``), CUDA
tensors the CUDA kernels (``spade_kernels._C_cuda``); both follow one
algorithm per op (csrc/include/spade, one header each) and the same
candidate-buffer policy, so the CPU tests hit the GPU's overflow boundaries.
The ops and their contracts are :mod:`spade_kernels.ops`:

* ``select_candidates`` — the score GEMM ``chunk`` prototypes at a time
  (the CPU BLAS / cuBLAS) and the selection epilogue, a per-row buffer of
  ``max_candidates`` slots and a running bound ≤ τ;
* ``exact_codes`` — D recomputed directly on the candidates, the exact τ,
  the sorted support;
* the products over a support, deterministic (the sparse transpose sums
  latent-sorted segments, no atomics).

The kernels compute in float32 or float64; the pipeline hands them inputs in
the compute dtype and sends half-precision decoder weights to the ``torch``
backend's products (``product_dtypes``).
"""

from __future__ import annotations

import torch

from .. import ops
from ..numerics import compute_dtype
from .interface import DEFAULT_CHUNK, DEFAULT_MAX_CANDIDATES, Primitives

__all__ = ["OPTIONS", "PRIMITIVES", "exact_codes", "select_candidates"]

#: Prototypes per score chunk on CPU tensors when ``chunk`` is not given: a row's first chunk,
#: which the bound cannot prune yet, is short, and a block's chunk of scores stays near the core
#: (benchmarks/NOTES.md, "A training step per stage, third pass": the search at (4096, 2, 16384)
#: took 98 ms with 1024, 145 with 4096; at C1 the same within noise).  CUDA tensors: DEFAULT_CHUNK.
CPU_CHUNK = 1024

#: Options of :func:`select_candidates` and their defaults (``chunk`` None: by device, above).
OPTIONS = {"chunk": None, "max_candidates": DEFAULT_MAX_CANDIDATES}

_KERNEL_DTYPES = frozenset({torch.float32, torch.float64})


def select_candidates(x, A, aa, lam: float, margin, *, chunk: int | None, max_candidates: int):
    """``spade_kernels::select_candidates`` on inputs in the compute dtype (see :mod:`spade_kernels.ops`)."""
    cd = aa.dtype
    if chunk is None:
        chunk = CPU_CHUNK if x.device.type == "cpu" else DEFAULT_CHUNK
    chunk = max(1, min(chunk, A.shape[0]))
    return ops.select_candidates(x.to(cd), A.to(cd), aa, lam, margin.to(cd), chunk, max_candidates)


def exact_codes(x, A, lam: float, cand):
    """``spade_kernels::exact_codes`` on inputs in the compute dtype."""
    cd = compute_dtype(torch.promote_types(x.dtype, A.dtype))
    return ops.exact_codes(x.to(cd), A.to(cd), lam, cand)


def row_bytes(K: int, d: int, itemsize: int, options) -> int:
    """Working memory per row (docs/design.md, "Memory model"): a score chunk, the buffer, the exact stage.

    The buffer (int32 indices, values, int64 candidates) holds
    ``max_candidates`` slots (the pipeline passes the size it is growing it
    to), and ``exact_codes`` writes values, indices and D of that width.
    """
    c = min(options["chunk"] or DEFAULT_CHUNK, K)  # the larger of the devices' defaults: a bound for both
    max_candidates = min(options["max_candidates"], K)
    e = itemsize
    return e * c + max_candidates * (4 + e + 8) + max_candidates * (2 * e + 16)


#: The ``native`` backend as the pipeline sees it.
PRIMITIVES = Primitives(
    name="native",
    options=OPTIONS,
    select_candidates=select_candidates,
    exact_codes=exact_codes,
    gather_matmul=ops.gather_matmul,
    gather_dot=ops.gather_dot,
    scatter_matmul=ops.scatter_matmul,
    gather_sq_dist=ops.gather_sq_dist,
    support_jacobian=ops.support_jacobian,
    select_dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    product_dtypes=_KERNEL_DTYPES,
    row_bytes=row_bytes,
    buffer_option="max_candidates",
)
