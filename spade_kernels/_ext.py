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


def _load() -> bool:
    global reason, cuda_reason
    reason = _load_library("_C")
    if reason is not None:
        cuda_reason = reason
        return False
    # The CUDA implementations register into the schemas _C declared (TORCH_LIBRARY_IMPL).
    cuda_reason = _load_library("_C_cuda")
    if cuda_reason is not None and _library("_C_cuda") is None:
        cuda_reason = (
            "spade_kernels._C_cuda was not built (a CPU-only torch, no nvcc, SPADE_SKIP_CUDA_BUILD, "
            "or a failed CUDA build at install time: see the install log)"
        )
    return True


_LOADED = _load()


def available() -> bool:
    """Whether the C++ ops (``torch.ops.spade.sparsemax_rows``, …) are registered."""
    return _LOADED


def cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels (a CUDA torch and nvcc at build time)."""
    return _LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("spade::exact_codes", "CUDA")


def require(device: torch.device) -> None:
    """Raise a precise error unless the native ops can run on ``device``."""
    if not _LOADED:
        raise RuntimeError(f"the spade C++ ops are not available: {reason}")
    if device.type == "cuda" and not cuda_kernels():
        raise RuntimeError(
            f"the spade CUDA kernels are not available: {cuda_reason}; rebuild with a CUDA torch "
            "and nvcc: pip install --no-build-isolation -e ."
        )


if _LOADED:
    # Fake (meta) implementations: shapes and dtypes only, for torch.compile and opcheck.

    @torch.library.register_fake("spade::sparsemax_rows")
    def _(scores):
        tau_dtype = torch.float32 if scores.device.type == "cuda" else scores.dtype
        # new_empty, not empty_like: the ops return contiguous tensors for any input strides.
        return scores.new_empty(scores.shape), scores.new_empty(scores.shape[:1], dtype=tau_dtype)

    @torch.library.register_fake("spade::select_candidates")
    def _(x, A, aa, lam, margin, chunk, cap):
        B = x.shape[0]
        return x.new_empty((B, cap), dtype=torch.long), x.new_empty((B,), dtype=torch.bool)

    @torch.library.register_fake("spade::exact_codes")
    def _(x, A, lam, cand):
        return (
            x.new_empty(cand.shape),
            cand.new_empty(cand.shape),
            cand.new_empty(cand.shape[:1]),
            x.new_empty(cand.shape),
        )

    @torch.library.register_fake("spade::support_jacobian")
    def _(z, grad_z, D, grad_D, lam):
        return z.new_empty(z.shape), z.new_empty(z.shape[:1])

    @torch.library.register_fake("spade::gather_matmul")
    def _(weights, indices, M):
        return M.new_empty((indices.shape[0], M.shape[1]))

    @torch.library.register_fake("spade::gather_dot")
    def _(G, indices, M):
        return M.new_empty(indices.shape)

    @torch.library.register_fake("spade::gather_sq_dist")
    def _(x, indices, M):
        return M.new_empty(indices.shape)

    @torch.library.register_fake("spade::scatter_matmul")
    def _(weights, indices, X, n_rows):
        return X.new_empty((n_rows, X.shape[1]))
