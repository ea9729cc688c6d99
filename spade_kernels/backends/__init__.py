"""Backend registry: which implementations exist, which are usable, and why not.

A backend turns (x, prototypes, λ) into codes.  ``reference`` computes dense
codes (the oracle); the others compute :class:`~spade_kernels.SparseCodes`
directly.  Nothing here touches a GPU at import time.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..codes import SparseCodes

__all__ = [
    "BACKENDS",
    "Backend",
    "available_backends",
    "backend_status",
    "check_backend_name",
    "resolve_backend",
]


@dataclass(frozen=True)
class Backend:
    """One implementation of the SpaDE encoder.

    ``dense`` backends return dense codes from :meth:`encode_dense` and are
    decoded densely; sparse backends return :class:`SparseCodes`.
    """

    name: str
    description: str
    dense: bool
    _status: Callable[[], str | None]
    _encode: Callable[..., object]

    def unavailable_reason(self) -> str | None:
        """``None`` when usable here, else why not."""
        return self._status()

    def device_reason(self, device: torch.device) -> str | None:
        """``None`` when this backend runs on tensors on ``device``, else why not."""
        if self.name in ("reference", "torch"):
            return None
        if self.name == "cuda":
            from .. import _ext

            if device.type == "cpu" or (device.type == "cuda" and _ext.cuda_kernels()):
                return None
            if device.type == "cuda":
                return f"the spade CUDA kernels are not available: {_ext.cuda_reason}"
            return f"it runs on CUDA and CPU tensors, got tensors on {device}"
        if device.type == "cuda" or _triton_interpreter():
            return None
        return f"it needs CUDA tensors, got tensors on {device}"

    def supports(self, device: torch.device) -> bool:
        return self.device_reason(device) is None

    def sparse_ops(self):
        """The products over a support (decoder, regulariser, backward) this backend runs on."""
        if self.name == "triton":
            from ..triton_.sparse import TRITON_OPS

            return TRITON_OPS
        if self.name == "cuda":
            from .cuda import NATIVE_OPS

            return NATIVE_OPS
        from .torch_ import TORCH_OPS

        return TORCH_OPS

    def encode_dense(self, x: torch.Tensor, prototypes: torch.Tensor, lam) -> torch.Tensor:
        if self.dense:
            return self._encode(x, prototypes, lam)
        return self._encode(x, prototypes, lam).to_dense()

    def encode(self, x: torch.Tensor, prototypes: torch.Tensor, lam) -> SparseCodes:
        if self.dense:
            return SparseCodes.from_dense(self._encode(x, prototypes, lam))
        return self._encode(x, prototypes, lam)


def _always() -> str | None:
    return None


def reference_codes_and_distances(x, prototypes, lam):
    """Dense codes z and distances D of the ``reference`` backend (B×K each)."""
    from ..reference import squared_distances
    from ..sparsemax import sparsemax_sort

    # Distances in the input dtype (the paper's low-precision path), the
    # projection in float32 at least: codes of half inputs stay float32.
    D = squared_distances(x, prototypes, naive=False)
    return sparsemax_sort((-lam * D).to(torch.promote_types(D.dtype, torch.float32)), dim=-1), D


def _reference_encode(x, prototypes, lam):
    return reference_codes_and_distances(x, prototypes, lam)[0]


def _torch_encode(x, prototypes, lam):
    from . import torch_

    return torch_.encode(x, prototypes, lam)


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Looked up once, at import (without importing triton): ``torch.compile``
#: traces backend resolution, and torch 2.11's dynamo refuses to trace ``find_spec``.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_status() -> str | None:
    if not _TRITON_INSTALLED:
        return "the triton package is not installed (pip install triton)"
    if not (_triton_interpreter() or torch.cuda.is_available()):
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU interpreter, slowly)"
    return None


def _triton_encode(x, prototypes, lam):
    from ..triton_ import encode

    return encode.encode(x, prototypes, lam)


def _cuda_status() -> str | None:
    from .. import _ext

    return None if _ext.available() else _ext.reason


def _cuda_encode(x, prototypes, lam):
    from . import cuda

    return cuda.encode(x, prototypes, lam)


BACKENDS: dict[str, Backend] = {
    "reference": Backend(
        "reference",
        "plain PyTorch: dense B×K distances + sort-based sparsemax (the oracle)",
        True,
        _always,
        _reference_encode,
    ),
    "torch": Backend(
        "torch",
        "chunked GEMM-form scores, per-chunk pruning, exact τ over survivors, sparse backward",
        False,
        _always,
        _torch_encode,
    ),
    "triton": Backend(
        "triton",
        "fused Triton kernels: tiled distance GEMM + in-register pruning, per-row exact merge",
        False,
        _triton_status,
        _triton_encode,
    ),
    "cuda": Backend(
        "cuda",
        "C++/CUDA extension: cuBLAS chunks + selection epilogue, exact merge, sparse backward (C++/OpenMP twins on CPU tensors)",
        False,
        _cuda_status,
        _cuda_encode,
    ),
}

#: Preference order of ``backend="auto"`` per device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)}


def backend_status() -> dict[str, str | None]:
    """``{name: None if available else the reason it is not}`` for every backend."""
    return {name: b.unavailable_reason() for name, b in BACKENDS.items()}


def available_backends() -> list[str]:
    """Names of the backends usable in this environment.

    See :func:`backend_status` (or ``spade-kernels info``) for why the others
    are not.
    """
    return [name for name, reason in backend_status().items() if reason is None]


def check_backend_name(name) -> None:
    """Raise unless ``name`` is ``"auto"`` or a known backend (availability is checked per call)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {['auto', *BACKENDS]}")


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend object for ``name`` (``"auto"`` picks the fastest usable one)."""
    check_backend_name(name)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            backend = BACKENDS[candidate]
            if backend.unavailable_reason() is None and backend.supports(device):
                return backend
    backend = BACKENDS[name]
    reason = backend.unavailable_reason()
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available: {reason}")
    device_reason = backend.device_reason(device)
    if device_reason is not None:
        raise ValueError(f"backend {name!r} cannot run here: {device_reason}")
    return backend
