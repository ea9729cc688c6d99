"""The memory budget every row-blocked stage is sized from (docs/design.md, "Memory model").

Encode, the layer's forward and backward, the reference and the dense routes
process rows in blocks whose working memory fits a budget, so peak extra
memory is the budget plus the outputs, whatever B is:

* default: 256 MiB on the CPU; on a GPU a quarter of the free memory at the
  call, at most 4 GiB;
* ``SPADE_MEMORY_BUDGET_MB`` (environment) overrides the default;
* :func:`memory_budget` overrides both inside a block (``with
  sk.pipeline.memory_budget(64 * 2**20): ...``).

The dense paths (the ``reference`` backend, the dense routes of the
products) size their blocks to the whole budget.  The sparse pipeline's
blocks take ``1 / SPARSE_SHARE`` of it: its per-row memory is small, and past
a few thousand rows a block stops getting faster (measured on the CPU:
encode at (300000, 2, 128) took 1.13 s in 32 MiB blocks and 1.38 s in 256
MiB ones; at (65536, 128, 512) 1.02 and 0.98 s), so the fast path keeps
well under the budget.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = [
    "DEFAULT_CPU_BUDGET",
    "SPARSE_SHARE",
    "budget_bytes",
    "dense_blocks",
    "dense_product_blocks",
    "encode_blocks",
    "memory_budget",
    "row_blocks",
]

DEFAULT_CPU_BUDGET = 256 * 2**20
#: The sparse pipeline's row blocks take this fraction (1/SPARSE_SHARE) of the budget.
SPARSE_SHARE = 4
_GPU_CAP = 4 * 2**30
_override: int | None = None


@contextlib.contextmanager
def memory_budget(nbytes: int):
    """Use ``nbytes`` as the working-memory budget of row-blocked stages inside this block."""
    global _override
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"memory_budget takes a positive number of bytes, got {nbytes!r}")
    before, _override = _override, nbytes
    try:
        yield
    finally:
        _override = before


def budget_bytes(device: torch.device) -> int:
    """The working-memory budget of one row block on ``device``, in bytes."""
    if _override is not None:
        return _override
    env = os.environ.get("SPADE_MEMORY_BUDGET_MB")
    if env:
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(f"SPADE_MEMORY_BUDGET_MB must be a positive number of MiB, got {env!r}")
        return int(value * 2**20)
    if device.type == "cuda" and not torch.compiler.is_compiling():
        free, _ = torch.cuda.mem_get_info(device)
        return max(DEFAULT_CPU_BUDGET, min(_GPU_CAP, free // 4))
    return DEFAULT_CPU_BUDGET


def row_blocks(n_rows: int, bytes_per_row: int, budget: int, held_bytes_per_row: int = 0):
    """Slices of at most ``budget // bytes_per_row`` rows (at least one) covering ``n_rows``.

    As few blocks as the budget allows.  Without ``held_bytes_per_row`` they
    are of equal sizes, differing by at most one row: 1024 rows in blocks of
    661 would be 661 + 363, and the small block runs its GEMMs less
    efficiently than two of 512.  ``held_bytes_per_row`` is what each block
    leaves held for all ``n_rows`` rows from the first block on (the batch's
    codes in a :class:`~spade_kernels.pipeline.rows.RowWriter`): the blocks
    after the first run beside it, so the first is made larger by that share
    and the rest equal, balancing the first block's working memory against
    a later block's plus the held bytes (at most ``budget // bytes_per_row``
    rows still).
    """
    most = max(1, budget // max(int(bytes_per_row), 1))
    n_blocks = max(1, -(-n_rows // most))
    if n_blocks == 1 or held_bytes_per_row <= 0:
        sizes = [n_rows // n_blocks + (1 if i < n_rows % n_blocks else 0) for i in range(n_blocks)]
    else:
        # work(first) = held + work(rest): first = B/n + held·B·(n−1) / (bytes_per_row·n).
        extra = held_bytes_per_row * n_rows * (n_blocks - 1) // (max(int(bytes_per_row), 1) * n_blocks)
        first = min(most, -(-n_rows // n_blocks) + extra)
        rest, extra_rows = divmod(n_rows - first, n_blocks - 1)
        sizes = [first] + [rest + (1 if i < extra_rows else 0) for i in range(n_blocks - 1)]
    start = 0
    for size in sizes if n_rows else ():
        yield slice(start, start + size)
        start += size


# Every row block of the package is sized by one of the functions below (and nowhere else).


def encode_blocks(
    n_rows: int, bytes_per_row: int, device: torch.device, held_bytes_per_row: int = 0
) -> list[slice]:
    """The row blocks of a sparse encode: ``1 / SPARSE_SHARE`` of the budget; one block while traced.

    ``bytes_per_row`` is the plan's (:attr:`spade_kernels.pipeline.plan.Plan.row_bytes`);
    ``held_bytes_per_row`` the codes each row leaves held (:func:`row_blocks`).
    Under ``torch.compile`` the batch is one block: the graph holds one op call.
    """
    if torch.compiler.is_compiling():
        return [slice(0, n_rows)]
    return list(row_blocks(n_rows, bytes_per_row, budget_bytes(device) // SPARSE_SHARE, held_bytes_per_row))


def dense_blocks(n_rows: int, bytes_per_row: int, device: torch.device) -> list[slice]:
    """The row blocks of a dense stage (the reference's codes, the dense candidate search): the whole budget."""
    return list(row_blocks(n_rows, bytes_per_row, budget_bytes(device)))


def dense_product_blocks(n_rows: int, K: int, t: torch.Tensor) -> list[slice]:
    """The row blocks of a product's dense route: two dense (rows, K) temporaries of ``t``'s dtype per block."""
    return dense_blocks(n_rows, 2 * K * t.element_size(), t.device)
