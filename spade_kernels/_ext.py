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

__all__ = ["available", "reason"]

_DIR = os.path.dirname(os.path.abspath(__file__))
reason: str | None = None


def _load() -> bool:
    global reason
    libs = sorted(glob.glob(os.path.join(_DIR, "_C*.so")) + glob.glob(os.path.join(_DIR, "_C*.pyd")))
    if not libs:
        reason = "spade_kernels._C was not built (pip install --no-build-isolation -e . compiles it)"
        return False
    try:
        torch.ops.load_library(libs[0])
    except (OSError, RuntimeError) as exc:
        reason = f"spade_kernels._C failed to load ({type(exc).__name__}: {exc})".splitlines()[0]
        return False
    return True


_LOADED = _load()


def available() -> bool:
    """Whether the C++ ops (``torch.ops.spade.sparsemax_rows``, …) are registered."""
    return _LOADED


if _LOADED:

    @torch.library.register_fake("spade::sparsemax_rows")
    def _(scores):
        return torch.empty_like(scores), scores.new_empty(scores.shape[:1])
