"""Backend registry: which backends exist, which are usable here and why not, and what ``auto`` picks.

A backend's name says what runs:

* ``reference`` — plain PyTorch, dense B×K distances and a sort-based
  sparsemax: the oracle;
* ``torch`` — the fast algorithm in PyTorch ops only, on any device;
* ``native`` — the compiled extension, whose ops dispatch by device: C++/OpenMP
  kernels for CPU tensors, CUDA kernels for CUDA tensors;
* ``triton`` — fused Triton kernels (CUDA, or the CPU interpreter with
  ``TRITON_INTERPRET=1``).

The sparse backends are :class:`~spade_kernels.backends.interface.Primitives`
values, composed by :mod:`spade_kernels.pipeline`; this module only
imports them when they are used (nothing touches a GPU or imports triton at
import time).  ``auto`` is decided here and nowhere else (:func:`auto_backend`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = [
    "BACKENDS",
    "Backend",
    "auto_backend",
    "auto_search",
    "available_backends",
    "backend_status",
    "check_backend_name",
    "extension_summary",
    "resolve_backend",
]


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Looked up once, at import (without importing triton): ``torch.compile``
#: traces backend resolution, and torch 2.11's dynamo refuses to trace ``find_spec``.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _always() -> str | None:
    return None


def _anywhere(device: torch.device) -> str | None:
    return None


def _native_status() -> str | None:
    from .. import _ext

    return None if _ext.available() else _ext.reason


def _native_device(device: torch.device) -> str | None:
    from .. import _ext

    if device.type == "cpu" or (device.type == "cuda" and _ext.cuda_kernels()):
        return None
    if device.type == "cuda":
        return f"the spade CUDA kernels are not available: {_ext.cuda_reason}"
    return f"it runs on CPU and CUDA tensors, got tensors on {device}"


def _triton_status() -> str | None:
    if not _TRITON_INSTALLED:
        return "the triton package is not installed (pip install triton)"
    if not (_triton_interpreter() or torch.cuda.is_available()):
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU interpreter, slowly)"
    return None


def _triton_device(device: torch.device) -> str | None:
    if device.type == "cuda" or _triton_interpreter():
        return None
    return f"it needs CUDA tensors, got tensors on {device}"


@dataclass(frozen=True)
class Backend:
    """One backend: its name, what it runs, where, and (sparse backends) its primitives.

    ``dense`` is true for ``reference`` only, which computes dense codes and
    has no primitives; the others are composed by the pipeline from
    :meth:`primitives`.
    """

    name: str
    description: str
    dense: bool
    _status: Callable[[], str | None]
    _device: Callable[[torch.device], str | None]
    _load: Callable[[], ModuleType] | None = None

    def unavailable_reason(self) -> str | None:
        """``None`` when usable in this environment, else why not."""
        return self._status()

    def device_reason(self, device: torch.device) -> str | None:
        """``None`` when this backend runs on tensors on ``device``, else why not."""
        return self._device(device)

    def supports(self, device: torch.device) -> bool:
        return self.unavailable_reason() is None and self.device_reason(device) is None

    def primitives(self):
        """The backend's :class:`~spade_kernels.backends.interface.Primitives` (imports its module once)."""
        if self._load is None:
            raise TypeError(f"backend {self.name!r} is dense: it has no primitives")
        return self._load().PRIMITIVES


# One function per module, each a plain import statement: torch.compile traces the first call of a
# process through here, and dynamo runs an import statement but not importlib.import_module.
def _load_torch() -> ModuleType:
    from . import torch_

    return torch_


def _load_native() -> ModuleType:
    from . import native

    return native


def _load_triton() -> ModuleType:
    from . import triton_

    return triton_


BACKENDS: dict[str, Backend] = {
    "reference": Backend(
        "reference",
        "plain PyTorch: dense B×K distances + sort-based sparsemax (the oracle)",
        True,
        _always,
        _anywhere,
    ),
    "torch": Backend(
        "torch",
        "PyTorch ops only, any device: chunked GEMM-form scores, per-chunk pruning, exact τ over survivors, sparse backward",
        False,
        _always,
        _anywhere,
        _load_torch,
    ),
    "native": Backend(
        "native",
        "the compiled extension: C++/OpenMP kernels on CPU tensors, CUDA kernels on CUDA tensors",
        False,
        _native_status,
        _native_device,
        _load_native,
    ),
    "triton": Backend(
        "triton",
        "fused Triton kernels: tiled score GEMM + in-register pruning, per-row exact merge, sparse backward",
        False,
        _triton_status,
        _triton_device,
        _load_triton,
    ),
}


def auto_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """What ``backend="auto"`` runs for tensors on ``device`` of ``dtype``: (name, why).

    The one place the choice is made.  CPU: ``native`` (its C++ ops measured
    1.4–1.9× faster than the ``torch`` backend's PyTorch ops for the encoder
    and 2–5× for the support products at (1024, 768, 16384), benchmarks/NOTES.md),
    else ``torch``.  CUDA: ``triton`` for float32/bfloat16/float16, then
    ``native``, then ``torch`` — an order by design, not yet measured on a GPU
    (float64 skips ``triton``, which has no float64 kernels).
    """
    if device.type == "cpu":
        order = ("native", "torch")
        basis = "measured on CPU: native's C++ ops beat the PyTorch ops"
    elif device.type == "cuda":
        order = ("native", "torch") if dtype == torch.float64 else ("triton", "native", "torch")
        basis = "CUDA order by design (not yet measured on a GPU)"
    else:
        order, basis = ("torch",), f"only the torch backend runs on {device.type} tensors"
    for name in order:
        if BACKENDS[name].supports(device):
            skipped = [n for n in order[: order.index(name)]]
            why = basis + (f"; {', '.join(skipped)} not usable here" if skipped else "")
            return name, why
    return "torch", basis


#: The largest K at which the pipeline's dense search (dense scores of a row
#: block and a sort) beats a backend's pruned search, per (device type,
#: backend) — measured on the CPU at B = 16384, d ∈ {2, 128}, K ∈ {128, 256,
#: 512, 2048} (benchmarks/NOTES.md, "Cost at every shape"): the ``torch`` backend's
#: top-k search loses to it at K = 128 (0.209 vs 0.139 s at d = 2) and wins
#: from K = 256; ``native``'s selection wins at every K (0.071 vs 0.126 s at
#: K = 128).  Pairs without a measurement always prune.
DENSE_SEARCH_MAX_K: dict[tuple[str, str], int] = {("cpu", "torch"): 128}


def auto_search(device: torch.device, K: int, d: int, backend: str) -> str:
    """The candidate search ``search="auto"`` runs: ``"dense"`` up to the measured K, else ``"pruned"``."""
    limit = DENSE_SEARCH_MAX_K.get((device.type, backend))
    return "dense" if limit is not None and K <= limit else "pruned"


def backend_status() -> dict[str, str | None]:
    """``{name: None if available else the reason it is not}`` for every backend."""
    return {name: b.unavailable_reason() for name, b in BACKENDS.items()}


def extension_summary() -> str:
    """One line on the compiled extension: loaded or why not, with or without its CUDA kernels."""
    from .. import _ext

    if not _ext.available():
        return f"not loaded ({_ext.reason})"
    if _ext.cuda_kernels():
        return "spade_kernels._C: CPU ops + CUDA kernels (spade_kernels._C_cuda)"
    return (
        "spade_kernels._C: CPU ops only (the native backend runs on CPU tensors; no CUDA kernels: "
        f"{_ext.cuda_reason})"
    )


def available_backends() -> list[str]:
    """Names of the backends usable in this environment.

    See :func:`backend_status` (or ``spade-kernels info``) for why the others
    are not, and :func:`auto_backend` for what ``auto`` picks.
    """
    return [name for name, reason in backend_status().items() if reason is None]


def check_backend_name(name) -> str:
    """``name`` itself when it is ``"auto"`` or a backend's name (availability is checked per call)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {['auto', *BACKENDS]}")
    return name


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Backend:
    """The backend object for ``name`` on tensors of ``device`` and ``dtype`` (``"auto"``: :func:`auto_backend`)."""
    name = check_backend_name(name)
    if name == "auto":
        return BACKENDS[auto_backend(device, dtype)[0]]
    backend = BACKENDS[name]
    reason = backend.unavailable_reason()
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available: {reason}")
    device_reason = backend.device_reason(device)
    if device_reason is not None:
        raise ValueError(f"backend {name!r} cannot run here: {device_reason}")
    return backend
