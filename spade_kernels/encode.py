"""The encoder entry: SpaDE codes through any backend, in one process or over a latent group.

:func:`encode_codes` is the one encoder the package has; ``spade_encode``,
``SpaDE.forward`` and ``ShardedSpaDE.forward`` all call it.  It decides, where
the call enters, what runs (docs/design.md, "Dispatch"):

* ``reference`` — dense codes of row blocks (:mod:`spade_kernels.pipeline.dense`),
  differentiable by autograd;
* a sparse backend in one process — the pipeline's forward over the batch's
  row blocks (:func:`spade_kernels.pipeline.encode_rows`) inside one custom op,
  ``spade_kernels::encode``, on the plan :func:`~spade_kernels.pipeline.make_plan`
  made, with typed options.  Its fake implementation has a data-dependent
  width (the widest support in the batch), so ``torch.compile(...,
  fullgraph=True)`` traces an encode, and a whole training step of the layer,
  without a graph break; its autograd formula is the pipeline's sparse
  backward (:func:`spade_kernels.pipeline.encode_backward`);
* a sparse backend over a latent group (``ShardedSpaDE``) — the same forward
  and backward with the group's collectives
  (:mod:`spade_kernels.pipeline.group`), through an autograd Function
  (collectives run eagerly; a custom op cannot take a process group).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._validation import check_encode_inputs
from .backends import BACKENDS, Backend, resolve_backend
from .codes import SparseCodes
from .numerics import compute_dtype
from .pipeline import encode_backward, encode_forward, encode_rows
from .pipeline.dense import PRIMITIVES as DENSE_PRIMITIVES
from .pipeline.dense import dense_sparse_codes
from .pipeline.group import ONE_PROCESS, OneProcess
from .pipeline.plan import Options, make_plan, products_for, resolve_options

__all__ = ["encode_codes", "encode_sparse", "product_primitives", "spade_encode"]


def product_primitives(backend: Backend):
    """The primitives of the products over a support of ``backend``'s codes (``reference``: dense GEMMs)."""
    return DENSE_PRIMITIVES if backend.dense else backend.primitives()


# The op is declared through a Library, not ``torch.library.custom_op``: a custom_op's kernel is
# wrapped to keep dynamo out, and that wrapper imports torch._dynamo (and, through it, triton) on
# the first call of a process, ~0.7 s that an eager CPU encode never needs.  The schema, kernel,
# fake and autograd formula below are what custom_op would have registered.
_LIB = torch.library.Library("spade_kernels", "FRAGMENT")
_LIB.define(
    "encode(Tensor x, Tensor prototypes, Tensor lam, str backend, str search, int? chunk, int? topk, "
    "int? max_candidates, int? block_n, int? slots, int? prepass, str? precision) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def _encode_kernel(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    lam: torch.Tensor,
    backend: str,
    search: str,
    chunk: int | None,
    topk: int | None,
    max_candidates: int | None,
    block_n: int | None,
    slots: int | None,
    prepass: int | None,
    precision: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    options = Options(search, chunk, topk, max_candidates, block_n, slots, prepass, precision)
    K, d = prototypes.shape
    plan = make_plan(BACKENDS[backend].primitives(), x.device, x.dtype, K, d, options)
    # The op's dtypes are its inputs' (docs/design.md, "Mixed precision"): an
    # enclosing autocast must not recast the exact stage's float32 products.
    with torch.autocast(x.device.type, enabled=False):
        z, idx, size, D = encode_rows(plan, x, prototypes, float(lam))
    return z, idx, size, D


_LIB.impl("encode", _encode_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("spade_kernels::encode", lib=_LIB)
def _(x, prototypes, lam, backend, *options):
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
    x, prototypes, lam, backend = inputs[:4]
    z, idx, size, D = output
    ctx.save_for_backward(x, prototypes, lam, z, idx, D)
    ctx.backend = backend
    ctx.mark_non_differentiable(idx, size)


def _backward(ctx, grad_z, _gi, _gs, grad_D):
    x, prototypes, lam, z, idx, D = ctx.saved_tensors
    products = products_for(BACKENDS[ctx.backend].primitives(), z.dtype)
    with torch.autocast(x.device.type, enabled=False):
        gx, gA, glam = encode_backward(
            products, x, prototypes, lam, z, idx, D, grad_z, grad_D, ctx.needs_input_grad[:3]
        )
    return gx, gA, glam, *(None,) * 9


torch.library.register_autograd("spade_kernels::encode", _backward, setup_context=_setup_context, lib=_LIB)
_encode_op = torch.ops.spade_kernels.encode.default


class _LatentGroupEncode(torch.autograd.Function):
    """The encoder over a latent group: :func:`encode_forward` / :func:`encode_backward` with the group."""

    @staticmethod
    def forward(x, A, lam, plan, group):
        return encode_forward(plan, x, A, float(lam), group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, A, lam, plan, group = inputs
        z, idx, size, D = output
        ctx.save_for_backward(x, A, lam, z, idx, D)
        ctx.plan, ctx.group = plan, group
        ctx.mark_non_differentiable(idx, size)

    @staticmethod
    def backward(ctx, grad_z, _grad_idx, _grad_size, grad_D):
        x, A, lam, z, idx, D = ctx.saved_tensors
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, A, lam, grad_z, grad_D)
        ):
            # torch.distributed's collectives have no derivative: a second derivative through this
            # backward would silently miss the other shards' terms.
            raise RuntimeError(
                "ShardedSpaDE has no double backward (create_graph=True): its backward's collectives are "
                "not differentiable; a SpaDE layer in one process gives the exact second derivative on "
                "every backend"
            )
        gx, gA, glam = encode_backward(
            ctx.plan.products, x, A, lam, z, idx, D, grad_z, grad_D, ctx.needs_input_grad[:3], ctx.group
        )
        return gx, gA, glam, None, None


def _lam_tensor(lam, device: torch.device) -> torch.Tensor:
    lam_t = lam if isinstance(lam, torch.Tensor) else torch.tensor(float(lam), dtype=torch.float64)
    lam_t = lam_t.reshape(()).to(device)
    return lam_t if lam_t.dtype in (torch.float32, torch.float64) else lam_t.float()


def encode_sparse(
    backend: str, x: torch.Tensor, prototypes: torch.Tensor, lam, options: Options
) -> SparseCodes:
    """Differentiable sparse codes of x (B, d) through the sparse backend ``backend`` in one process.

    ``x`` and ``prototypes`` in one dtype; ``options`` resolved for the
    backend (:func:`~spade_kernels.pipeline.resolve_options`).  One call of
    the op, which searches in row blocks sized from the memory budget
    (:func:`spade_kernels.pipeline.encode_rows`), so the working memory is
    the budget whatever B is, and one call of its backward, which forms the
    prototypes' K×d gradient once for the batch.  float16/bfloat16
    inputs give float32 codes: rounding them to an 8- or 11-bit mantissa would
    break Σz = 1 by more than the precision contract allows.
    """
    K, d = prototypes.shape
    options = make_plan(BACKENDS[backend].primitives(), x.device, x.dtype, K, d, options).options
    z, idx, size, D = _encode_op(x, prototypes, _lam_tensor(lam, x.device), backend, *options)
    return SparseCodes(idx, z, size, K, distances=D)


def encode_codes(
    backend: Backend,
    x: torch.Tensor,
    prototypes: torch.Tensor,
    lam,
    options: Mapping | None = None,
    group: OneProcess = ONE_PROCESS,
) -> SparseCodes:
    """The SpaDE encoder: codes of x (B, d) with their support distances, differentiable in x, A and λ.

    ``backend`` is resolved (:func:`spade_kernels.backends.resolve_backend`);
    ``x`` and ``prototypes`` share one dtype; ``options`` are the sparse
    backend's (unknown ones raise).  The codes index the latents of
    ``prototypes`` (over a latent ``group``: this rank's slice, under the
    threshold of the whole layer).
    """
    options = dict(options or {})
    if backend.dense:
        if options:
            raise TypeError(f"backend 'reference' takes no options, got {sorted(options)}")
        if group.sharded:
            raise ValueError("ShardedSpaDE runs a sparse backend (torch, native or triton), not 'reference'")
        return dense_sparse_codes(x, prototypes, lam, distances=True)
    prims = backend.primitives()
    resolved = resolve_options(prims, options)  # unknown options raise here, not in the op
    if not group.sharded:
        return encode_sparse(backend.name, x, prototypes, lam, resolved)
    K, d = prototypes.shape
    plan = make_plan(prims, x.device, x.dtype, K, d, resolved)
    z, idx, size, D = _LatentGroupEncode.apply(x, prototypes, _lam_tensor(lam, x.device), plan, group)
    return SparseCodes(idx, z, size, K, distances=D)


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
    return encode_codes(impl, flat, prototypes.to(dtype), lam, options).reshape_batch(x.shape[:-1])
