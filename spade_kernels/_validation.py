"""Input checks shared by every backend (one place, clear messages)."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = ["check_encode_inputs", "check_has_data", "check_lambda", "check_no_functorch", "check_tensor"]


def check_tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_lambda(lam, device: torch.device) -> None:
    """λ must be a positive scalar (float or 1-element tensor on ``device``)."""
    if isinstance(lam, torch.Tensor):
        if lam.numel() != 1:
            raise ValueError(f"lam must be a scalar, got a tensor of shape {tuple(lam.shape)}")
        if not lam.is_floating_point():
            raise TypeError(f"lam must have a floating dtype, got {lam.dtype}")
        if lam.device != device and lam.device.type != "cpu":
            raise ValueError(f"lam is on {lam.device} but the inputs are on {device}")
        if torch.compiler.is_compiling():
            return  # the value is data-dependent while tracing; eager calls check it
        value = float(lam.detach().reshape(()))
    elif isinstance(lam, numbers.Real) and not isinstance(lam, (bool, np.bool_)):
        value = float(lam)  # Python and NumPy scalars alike (np.float32 is no float subclass)
    else:
        raise TypeError(f"lam must be a positive float or a scalar tensor, got {type(lam).__name__}")
    if not (value > 0 and math.isfinite(value)):  # also rejects NaN
        raise ValueError(f"lam must be a finite number > 0, got {value}")


def check_has_data(x: torch.Tensor) -> None:
    """Refuse meta tensors: each row's support (so the codes' shape) depends on the values."""
    if x.device.type == "meta":
        raise ValueError(
            "SpaDE codes need tensors with data, got tensors on the meta device: each row's support "
            "(and so the codes' shape) depends on the values; materialise the layer first "
            "(layer.to_empty(device=...) and initialise its parameters)"
        )


def check_no_functorch(what: str, *tensors) -> None:
    """Refuse tensors of a ``torch.func`` transform (vmap, grad, jvp, jacrev, functionalize) with one clear error.

    The sparse codes' width depends on the data (no vmap), and the encoder's
    derivative is a ``torch.autograd`` formula (docs/design.md, "Autograd").
    """
    if torch.compiler.is_compiling():
        return  # torch.compile's own tracing tensors are not torch.func's
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if any(isinstance(t, torch.Tensor) and wrapped(t) for t in tensors):
        raise RuntimeError(
            f"{what} does not support torch.func transforms (vmap, grad, jvp, jacrev, functionalize): each "
            "row's support, and so the codes' shape, depends on the data, and the encoder's derivative is a "
            "torch.autograd formula. Use torch.autograd instead (loss.backward(), or torch.autograd.grad "
            "with create_graph=True for a second derivative: exact on every backend); under torch.func, "
            "spade_kernels.sparsemax(layer.scores(x)) gives the same codes densely (B×K memory) and "
            "supports every transform"
        )


def check_encode_inputs(x, prototypes, lam) -> torch.dtype:
    """Validate ``spade_encode`` arguments; returns the common compute dtype."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("prototypes", prototypes, ndim=2)
    check_no_functorch("spade_encode", x, prototypes, lam)
    if x.shape[-1] != prototypes.shape[1]:
        raise ValueError(
            f"x has d={x.shape[-1]} features (shape {tuple(x.shape)}) but prototypes has "
            f"d={prototypes.shape[1]} (shape {tuple(prototypes.shape)}): the last dimensions must match"
        )
    if prototypes.shape[0] == 0:
        raise ValueError("prototypes must have at least one row (K >= 1), got K=0")
    if x.device != prototypes.device:
        raise ValueError(
            f"x is on {x.device} but prototypes is on {prototypes.device}: move them to one device"
        )
    check_has_data(x)  # before λ (whose check reads its value) and the backend: one error for all
    check_lambda(lam, x.device)
    return torch.promote_types(x.dtype, prototypes.dtype)
