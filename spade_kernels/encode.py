"""``spade_encode``: SpaDE encoder codes through any backend.

The sparse backends run the pipeline's forward (:func:`spade_kernels.pipeline.encode_forward`)
inside one custom op, ``spade_kernels::encode``, whose fake implementation
has a data-dependent width (the widest support in the batch).  So
``torch.compile(..., fullgraph=True)`` traces an encode — and a whole
training step of the layer — through any sparse backend without a graph
break, and its autograd formula is the pipeline's sparse backward
(:func:`spade_kernels.pipeline.encode_backward`) on the backend's products.
"""

from __future__ import annotations

import torch

from ._validation import check_encode_inputs
from .backends import BACKENDS, auto_search, resolve_backend
from .backends.interface import resolve_options
from .codes import SparseCodes
from .numerics import compute_dtype
from .pipeline import encode_backward, encode_forward
from .pipeline.encoder import dense_row_bytes
from .pipeline.memory import SPARSE_SHARE, budget_bytes, row_blocks
from .pipeline.rows import RowWriter

__all__ = ["encode_sparse", "spade_encode"]


def _format_options(options: dict) -> str:
    """The op's ``options`` string, ``name=value,...`` (ints and plain strings; traceable by torch.compile)."""
    return ",".join(f"{k}={options[k]}" for k in sorted(options))


def _parse_options(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


@torch.library.custom_op("spade_kernels::encode", mutates_args=())
def _encode_op(
    x: torch.Tensor, prototypes: torch.Tensor, lam: torch.Tensor, backend: str, options: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    prims = BACKENDS[backend].primitives()
    # The op's dtypes are its inputs' (docs/design.md, "Mixed precision"): an
    # enclosing autocast must not recast the exact stage's float32 products.
    with torch.autocast(x.device.type, enabled=False):
        z, idx, size, D = encode_forward(prims, x, prototypes, float(lam), _parse_options(options))
    return z, idx, size, D


@_encode_op.register_fake
def _(x, prototypes, lam, backend, options):
    C = torch.library.get_ctx().new_dynamic_size()
    B = x.shape[0]
    cd = compute_dtype(x.dtype)
    return (
        x.new_empty((B, C), dtype=cd),
        x.new_empty((B, C), dtype=torch.int64),
        x.new_empty((B,), dtype=torch.int64),
        x.new_empty((B, C), dtype=cd),
    )


def _setup_context(ctx, inputs, output):
    x, prototypes, lam, backend, _ = inputs
    z, idx, size, D = output
    ctx.save_for_backward(x, prototypes, lam, z, idx, D)
    ctx.backend = backend
    ctx.mark_non_differentiable(idx, size)


def _backward(ctx, grad_z, _gi, _gs, grad_D):
    x, prototypes, lam, z, idx, D = ctx.saved_tensors
    prims = BACKENDS[ctx.backend].primitives()
    with torch.autocast(x.device.type, enabled=False):
        gx, gA, glam = encode_backward(
            prims, x, prototypes, lam, z, idx, D, grad_z, grad_D, ctx.needs_input_grad[:3]
        )
    return gx, gA, glam, None, None


_encode_op.register_autograd(_backward, setup_context=_setup_context)


def _block_row_bytes(prims, K: int, d: int, itemsize: int, opts: dict) -> int:
    """Working memory per row of one encode (search, exact stage, the row's own inputs)."""
    work = (
        dense_row_bytes(K, itemsize) if opts["search"] == "dense" else prims.row_bytes(K, d, itemsize, opts)
    )
    return work + d * itemsize


def _concatenate(blocks, K: int) -> SparseCodes:
    """One :class:`SparseCodes` from row blocks (values, indices, support_size, D), differentiably."""
    C = max(b[0].shape[1] for b in blocks)

    def pad(t):
        return torch.nn.functional.pad(t, (0, C - t.shape[1]))

    z, idx, size, D = (torch.cat([pad(b[i]) if i != 2 else b[i] for b in blocks]) for i in range(4))
    return SparseCodes(idx, z, size, K, distances=D)


def encode_sparse(backend: str, x: torch.Tensor, prototypes: torch.Tensor, lam, **options) -> SparseCodes:
    """Differentiable sparse codes of x (B, d) through the sparse backend ``backend`` (a canonical name).

    ``x`` and ``prototypes`` in one dtype; ``options`` are the backend's
    candidate-search options (``OPTIONS`` of its module) and the pipeline's
    ``search``.  Rows are processed in blocks sized from the memory budget
    (:mod:`spade_kernels.pipeline.memory`), each block one call of the
    pipeline's op (and of its backward), so the working memory is the budget
    whatever B is (one block under ``torch.compile``).  float16/bfloat16
    inputs give float32 codes: rounding them to an 8- or 11-bit mantissa would
    break Σz = 1 by more than the precision contract allows.
    """
    prims = BACKENDS[backend].primitives()
    opts = resolve_options(prims, options)  # unknown options raise here, not in the op
    B, d = x.shape
    K = prototypes.shape[0]
    if opts["search"] == "auto":
        opts["search"] = auto_search(x.device, K, d, backend)
    lam_t = lam if isinstance(lam, torch.Tensor) else torch.tensor(float(lam), dtype=torch.float64)
    lam_t = lam_t.reshape(()).to(x.device)
    if lam_t.dtype not in (torch.float32, torch.float64):
        lam_t = lam_t.float()
    text = _format_options(opts)
    if torch.compiler.is_compiling():
        blocks = [slice(0, B)]
    else:
        per_row = _block_row_bytes(prims, K, d, compute_dtype(x.dtype).itemsize, opts)
        blocks = list(row_blocks(B, per_row, budget_bytes(x.device) // SPARSE_SHARE))
    if len(blocks) <= 1:
        z, idx, size, D = _encode_op(x, prototypes, lam_t, backend, text)
        return SparseCodes(idx, z, size, K, distances=D)
    if torch.is_grad_enabled() and (x.requires_grad or prototypes.requires_grad or lam_t.requires_grad):
        return _concatenate([_encode_op(x[rs], prototypes, lam_t, backend, text) for rs in blocks], K)
    out = RowWriter(B, K)
    for rs in blocks:
        out.add(*_encode_op(x[rs], prototypes, lam_t, backend, text))
    return out.codes()


def spade_encode(
    x: torch.Tensor, prototypes: torch.Tensor, lam, *, backend: str = "auto", **options
) -> SparseCodes:
    """SpaDE codes z = sparsemax(−λ·‖x − a_k‖²) in sparse form.

    Parameters
    ----------
    x : Tensor (..., d)
        Inputs; leading dimensions are kept in the result.
    prototypes : Tensor (K, d)
        Encoder prototypes a_k, on the same device as ``x``.
    lam : float or scalar Tensor
        λ > 0.  Pass a tensor that requires grad to get ∂L/∂λ.
    backend : str
        ``"auto"`` (default), ``"reference"``, ``"torch"``, ``"native"`` or
        ``"triton"`` (see :func:`spade_kernels.available_backends`).
    **options
        Candidate-search options of the chosen sparse backend (its module's
        ``OPTIONS``: ``chunk``, ``max_candidates``, …); unknown ones raise.

    Returns
    -------
    SparseCodes
        indices/values of shape (..., C), support_size (...), n_latents = K.
        Values are differentiable with respect to x, prototypes and λ.

    Raises
    ------
    TypeError, ValueError
        On non-tensor or integer inputs, mismatched feature dimension,
        tensors on different devices, λ ≤ 0, an unknown/unavailable backend,
        or an option the backend does not take.
    """
    dtype = check_encode_inputs(x, prototypes, lam)
    impl = resolve_backend(backend, x.device, dtype)
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    if impl.dense:
        if options:
            raise TypeError(f"backend 'reference' takes no options, got {sorted(options)}")
        from .pipeline.dense import dense_sparse_codes

        codes = dense_sparse_codes(flat, prototypes.to(dtype), lam)
    else:
        codes = encode_sparse(impl.name, flat, prototypes.to(dtype), lam, **options)
    return codes.reshape_batch(x.shape[:-1])
