"""Guarded loading of the C++ extension ``spade_kernels._C``.

The extension is an op library (TORCH_LIBRARY registrations, no Python
module), loaded with ``torch.ops.load_library``.  Importing this module never
fails: a missing or broken build only makes :func:`available` false, with
:data:`reason` saying why, and the pure-PyTorch paths are used instead.
"""

from __future__ import annotations

import glob
import os

import torch

__all__ = ["available", "cuda_kernels", "cuda_reason", "reason", "require"]

_DIR = os.path.dirname(os.path.abspath(__file__))
reason: str | None = None
#: Why the CUDA library ``spade_kernels._C_cuda`` is not loaded (``None`` when it is).
cuda_reason: str | None = None


def _library(name: str) -> str | None:
    libs = sorted(glob.glob(os.path.join(_DIR, f"{name}.so")) + glob.glob(os.path.join(_DIR, f"{name}.*.so")))
    libs += sorted(glob.glob(os.path.join(_DIR, f"{name}*.pyd")))
    return libs[0] if libs else None


def _load_library(name: str) -> str | None:
    """Load one library; ``None`` on success, else why not."""
    path = _library(name)
    if path is None:
        return f"spade_kernels.{name} was not built (pip install --no-build-isolation -e . compiles it)"
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:
        return f"spade_kernels.{name} failed to load ({type(exc).__name__}: {exc})".splitlines()[0]
    return None


#: The op whose kernels show that a loaded library is this source's (a build of an older source
#: registers other names, and would only fail at its first call).
_PROBE = "spade_kernels::exact_codes"


def _registers(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE, dispatch_key)
    except RuntimeError:  # "operator ... does not exist": nothing registered under this name
        return False


def _stale(name: str) -> str:
    return (
        f"spade_kernels.{name} is a stale build: it does not register {_PROBE} (built from an older "
        "source); rebuild it: pip install --no-build-isolation -e ."
    )


def _load() -> bool:
    global reason, cuda_reason
    reason = _load_library("_C")
    if reason is None and not _registers("CPU"):
        reason = _stale("_C")
    if reason is not None:
        cuda_reason = reason
        return False
    # The CUDA implementations register into the schemas ops.py declares (TORCH_LIBRARY_IMPL).
    cuda_reason = _load_library("_C_cuda")
    if cuda_reason is not None and _library("_C_cuda") is None:
        cuda_reason = (
            "spade_kernels._C_cuda was not built (a CPU-only torch, no nvcc, SPADE_SKIP_CUDA_BUILD, "
            "or a failed CUDA build at install time: see the install log)"
        )
    elif cuda_reason is None and not _registers("CUDA"):
        cuda_reason = _stale("_C_cuda")
    return True


_LOADED = _load()


def available() -> bool:
    """Whether the compiled C++ ops loaded (their schemas, ``torch.ops.spade_kernels.sparsemax_rows``, …,
    are declared by :mod:`spade_kernels.ops` when it is imported)."""
    return _LOADED


def cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels (a CUDA torch and nvcc at build time)."""
    return _LOADED and _registers("CUDA")


def require(device: torch.device) -> None:
    """Raise a precise error unless the native ops can run on ``device``."""
    if not _LOADED:
        raise RuntimeError(f"the spade C++ ops are not available: {reason}")
    if device.type == "cuda" and not cuda_kernels():
        raise RuntimeError(
            f"the spade CUDA kernels are not available: {cuda_reason}; rebuild with a CUDA torch "
            "and nvcc: pip install --no-build-isolation -e ."
        )
