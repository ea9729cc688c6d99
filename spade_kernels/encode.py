"""``spade_encode``: SpaDE encoder codes through any backend."""

from __future__ import annotations

import torch

from ._validation import check_encode_inputs
from .backends import resolve_backend
from .codes import SparseCodes

__all__ = ["spade_encode"]


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def spade_encode(x: torch.Tensor, prototypes: torch.Tensor, lam, *, backend: str = "auto") -> SparseCodes:
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
        ``"auto"`` (default), ``"reference"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns
    -------
    SparseCodes
        indices/values of shape (..., C), support_size (...), n_latents = K.
        Values are differentiable with respect to x, prototypes and λ.

    Raises
    ------
    TypeError, ValueError
        On non-tensor or integer inputs, mismatched feature dimension,
        tensors on different devices, λ ≤ 0, or an unknown/unavailable backend.
    """
    dtype = check_encode_inputs(x, prototypes, lam)
    impl = resolve_backend(backend, x.device)
    codes = impl.encode(_flatten(x).to(dtype), prototypes.to(dtype), lam)
    return codes.reshape_batch(x.shape[:-1])
