"""The plan of a call: every choice the pipeline makes, made once where the call enters (docs/design.md, "Dispatch").

An encode (``spade_encode``, ``SpaDE.forward``, ``ShardedSpaDE.forward``)
resolves its backend by name, then :func:`make_plan` turns the backend's
:class:`~spade_kernels.backends.interface.Primitives`, the inputs' dtype,
device and shape and the typed :class:`Options` into a :class:`Plan`:

* the candidate search — dense scores and a sort (``search="dense"``), the
  backend's search with a buffer grown by the data, or the ``torch``
  backend's search for an input dtype the backend's kernels do not take;
* the exact stage — the backend's, or the pipeline's on the backend's
  ``gather_sq_dist``;
* the margin's rounding unit, and the working memory of one row, from which
  the row blocks are sized (:mod:`.memory`);
* the products over a support (:func:`products_for`) — the backend's
  kernels, or the ``torch`` backend's PyTorch ops for a dtype the kernels
  have no instantiation for.

Reading :func:`make_plan` tells which function runs.  Two choices are left to
run time, because they depend on data or on autograd's state: the *dense
route* of a product (a densified GEMM, where the support's width, known only
after the encoder ran, is a large fraction of K; :data:`DENSE_FRACTION`), and
a backward that autograd records (:func:`backward_products`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from ..backends import auto_search
from ..backends import torch_ as T
from ..backends.interface import Primitives, subtract_weighted_rows
from ..numerics import compute_dtype
from . import memory
from .search import dense_row_bytes, dense_search, grown_search

__all__ = [
    "DENSE_FRACTION",
    "SEARCHES",
    "Options",
    "Plan",
    "Products",
    "dense_gather_dot",
    "dense_gather_matmul",
    "dense_products",
    "dense_scatter_matmul",
    "make_plan",
    "products_for",
    "resolve_options",
]

#: The candidate searches the pipeline runs: ``"pruned"`` (the backend's), ``"dense"`` (dense scores
#: of a row block and a sort: cheaper for small K), or ``"auto"`` (the measured crossover,
#: :func:`spade_kernels.backends.auto_search`).
SEARCHES = ("auto", "pruned", "dense")


class Options(NamedTuple):
    """The candidate-search options of an encode, typed: the pipeline's ``search`` and every backend's own.

    A backend takes the fields its ``OPTIONS`` names (``torch``: ``chunk``,
    ``topk``, ``max_candidates``; ``native``: ``chunk``, ``max_candidates``;
    ``triton``: ``block_n``, ``slots``, ``max_candidates``, ``prepass``,
    ``precision``); :func:`resolve_options` fills those with the backend's
    defaults and leaves the others ``None``.  The fields cross the
    ``spade_kernels::encode`` op one argument each, in this order.
    """

    search: str = "auto"
    chunk: int | None = None
    topk: int | None = None
    max_candidates: int | None = None
    block_n: int | None = None
    slots: int | None = None
    prepass: int | None = None
    precision: str | None = None

    def of(self, prims: Primitives) -> dict:
        """The backend's own options (its ``select_candidates`` keywords), as a dict."""
        return {name: getattr(self, name) for name in prims.options}


def resolve_options(prims: Primitives, options: Mapping) -> Options:
    """Typed options for ``prims``: the given ones checked, the backend's defaults filled in.

    Unknown names, names this backend does not take, non-positive or non-int
    sizes and an unknown ``search`` raise, naming the allowed ones.
    """
    allowed = {"search": "auto", **prims.options}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"backend {prims.name!r} takes the options {sorted(allowed)}, got unknown option(s) {unknown}"
        )
    opts = {**allowed, **options}
    if opts["search"] not in SEARCHES:
        raise ValueError(f"search must be one of {list(SEARCHES)}, got {opts['search']!r}")
    for name, value in opts.items():
        if isinstance(prims.options.get(name), int) and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"option {name} of backend {prims.name!r} must be a positive int, got {value!r}")
    missing = sorted(set(opts) - set(Options._fields))
    assert not missing, f"backend {prims.name!r} declares options {missing} that Options has no field for"
    return Options(**opts)


# -- products over a support --------------------------------------------------------------


#: Support width, as a fraction of K, from which dense GEMMs beat the sparse
#: products, per device type.  CPU: measured at (B, d, K) = (1024, 768,
#: 16384) float32 on 2 threads — crossovers at C/K ≈ 0.023 (scatter), 0.028
#: (gather-matmul), 0.04 (gather-dot); benchmarks/NOTES.md.  Devices without
#: a measured crossover always take the sparse products.
DENSE_FRACTION: dict[str, float] = {"cpu": 1 / 32}
_dense_enabled = True


@contextlib.contextmanager
def dense_products(enabled: bool):
    """Enable or disable the dense route of the products inside a block (tests, benchmarks)."""
    global _dense_enabled
    before, _dense_enabled = _dense_enabled, enabled
    try:
        yield
    finally:
        _dense_enabled = before


def _dense_route(C, K: int, device: torch.device) -> bool:
    fraction = DENSE_FRACTION.get(device.type)
    if not _dense_enabled or fraction is None:
        return False
    if not (torch.compiler.is_compiling() or isinstance(C, torch.SymInt)):
        return C >= fraction * K  # eager: a plain width
    # Traced (dynamo, which reports a SymInt as an int, or an AOT trace of the backward), the width
    # C is data-dependent (an unbacked size): guard_or_false takes the sparse route there instead
    # of guarding on it.  Imported here: symbolic_shapes costs ~0.2 s at import, which an eager
    # process never needs.
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    return guard_or_false(C >= fraction * K)


def _densify(weights: torch.Tensor, indices: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    dense = torch.zeros(indices.shape[0], K, dtype=dtype, device=indices.device)
    return dense.scatter_add_(1, indices, weights.to(dtype))


def dense_gather_matmul(w, idx, M):
    out = torch.empty(idx.shape[0], M.shape[1], dtype=M.dtype, device=M.device)
    for rs in memory.dense_product_blocks(idx.shape[0], M.shape[0], M):
        out[rs] = _densify(w[rs], idx[rs], M.shape[0], M.dtype) @ M
    return out


def dense_gather_dot(G, idx, M):
    out = torch.empty(idx.shape, dtype=M.dtype, device=M.device)
    for rs in memory.dense_product_blocks(idx.shape[0], M.shape[0], M):
        out[rs] = (G[rs].to(M.dtype) @ M.t()).gather(1, idx[rs])
    return out


def dense_scatter_matmul(w, idx, X, n, M=None):
    out = torch.zeros(n, X.shape[1], dtype=X.dtype, device=X.device)
    for rs in memory.dense_product_blocks(idx.shape[0], n, X):
        out.addmm_(_densify(w[rs], idx[rs], n, X.dtype).t(), X[rs])
    return out if M is None else subtract_weighted_rows(out, w, idx, M)


def _routed(kernel: Callable, dense: Callable, latents_arg: int | None, first, indices, second, *rest):
    """``kernel``, or ``dense`` where the support is a large fraction of the K latents (the dense route).

    K is the rows of the product's matrix, or its argument ``latents_arg``
    (scatter_matmul's n_rows).  Bound to its kernel by ``functools.partial``
    in :func:`products_for`.
    """
    K = second.shape[0] if latents_arg is None else rest[latents_arg]
    if _dense_route(indices.shape[1], K, indices.device):
        return dense(first, indices, second, *rest)
    return kernel(first, indices, second, *rest)


class Products(NamedTuple):
    """The products over a support one dtype runs on (semantics: the ``torch`` backend's functions).

    ``gather_matmul(w, idx, M)``, ``gather_dot(G, idx, M)``,
    ``scatter_matmul(w, idx, X, n_rows, M=None)`` (each with its dense route),
    ``gather_sq_dist(x, idx, M)``, ``support_jacobian(z, grad_z, D, grad_D, lam)``.
    ``name`` is the backend whose kernels they are.
    """

    name: str
    gather_matmul: Callable
    gather_dot: Callable
    scatter_matmul: Callable
    gather_sq_dist: Callable
    support_jacobian: Callable


def products_for(prims: Primitives, dtype: torch.dtype) -> Products:
    """The products for matrices of ``dtype``: the backend's kernels, or the ``torch`` backend's ops
    where the kernels have no ``dtype`` instantiation (``Primitives.product_dtypes``)."""
    kernels = prims if dtype in prims.product_dtypes else T.PRIMITIVES
    return Products(
        name=kernels.name,
        gather_matmul=functools.partial(_routed, kernels.gather_matmul, dense_gather_matmul, None),
        gather_dot=functools.partial(_routed, kernels.gather_dot, dense_gather_dot, None),
        scatter_matmul=functools.partial(_routed, kernels.scatter_matmul, dense_scatter_matmul, 0),
        gather_sq_dist=kernels.gather_sq_dist,
        support_jacobian=kernels.support_jacobian,
    )


def backward_products(products: Products, dtype: torch.dtype, *tensors) -> Products:
    """The products a backward pass runs on: ``products``, or the ``torch`` backend's when autograd records it.

    With ``create_graph=True`` (a second derivative, a gradient penalty) the
    backward itself is differentiated, and only PyTorch ops carry a
    derivative: the compiled and Triton kernels have none.  So that backward
    runs on the ``torch`` products (same formulas, same values), and every
    backend gives the exact second derivative (docs/design.md, "Autograd").
    """
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return products_for(T.PRIMITIVES, dtype)
    return products


# -- the plan of an encode ---------------------------------------------------------------


class Plan(NamedTuple):
    """What one encode runs, decided by :func:`make_plan` (every field a value or a function, often a partial)."""

    backend: str
    options: Options
    #: (x, A, aa, lam, margin) -> (cand, overflow): the candidate search.
    select: Callable
    #: (x, A, lam, cand) -> (values, indices, support_size, D): the exact stage.
    exact: Callable
    #: The exact stage of the rows whose candidates overflowed (no width limit).
    exact_unbounded: Callable
    #: Rounding unit of the score GEMM and whether the margin is the worst-case bound.
    margin_eps: float
    worst_case_margin: bool
    #: Working memory of one row of one encode block (search, exact stage, the row's input).
    row_bytes: int
    #: The encoder's products (compute dtype), its backward's: ``products_for(prims, compute dtype)``,
    #: which the op's backward builds again from the backend's name.
    products: Products


def make_plan(
    prims: Primitives, device: torch.device, dtype: torch.dtype, K: int, d: int, options: Options
) -> Plan:
    """The :class:`Plan` of an encode of (B, d) inputs of ``dtype`` against K prototypes through ``prims``.

    ``options`` are resolved (:func:`resolve_options`); ``search="auto"`` is
    decided here from the measured crossover.
    """
    cd = compute_dtype(dtype)
    itemsize = cd.itemsize
    own = options.of(prims)
    search = options.search if options.search != "auto" else auto_search(device, K, d, prims.name)
    if search == "dense":
        select, work = dense_search, dense_row_bytes(K, itemsize)
    elif dtype in prims.select_dtypes:
        select = functools.partial(grown_search, prims.select_candidates, prims.buffer_option, own)
        work = prims.row_bytes(K, d, itemsize, own)
    else:  # the backend's kernels do not take this dtype: the torch backend's search, its defaults
        torch_own = {k: own.get(k, v) for k, v in T.OPTIONS.items()}
        select = functools.partial(T.select_candidates, **torch_own)
        work = T.row_bytes(K, d, itemsize, torch_own)
    # The pipeline's exact stage recomputes D with the backend's kernel for the inputs' dtype.
    exact_unbounded = functools.partial(T.exact_codes, sq_dist=products_for(prims, dtype).gather_sq_dist)
    exact = prims.exact_codes if prims.exact_codes is not None else exact_unbounded
    eps, worst_case = prims.margin_eps(dtype, own)
    return Plan(
        backend=prims.name,
        options=Options(search, *options[1:]),
        select=select,
        exact=exact,
        exact_unbounded=exact_unbounded,
        margin_eps=eps,
        worst_case_margin=worst_case,
        row_bytes=work + d * itemsize,
        products=products_for(prims, cd),
    )
