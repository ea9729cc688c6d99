"""spade_kernels: fast, exact SpaDE (Sparsemax Distance Encoder) for PyTorch.

Two floors (docs/design.md, "Layers"):

* the kernel library, here at the package root — the ops (:mod:`.ops`, the
  Triton kernels in ``triton_``), the pipeline and the backends, the
  ``SpaDE`` layer, ``ShardedSpaDE`` (:mod:`.distributed`), the oracle
  (:mod:`.reference`), fault-safe checkpoint files (:mod:`.files`) and the
  benchmark harness (:mod:`.bench`);
* the SAE toolkit built on it, :mod:`spade_kernels.sae` — the trainer, data
  and shards, evaluation, the ``spade-kernels`` command line and the adapters
  for SAELens, dictionary_learning and Overcomplete.  It imports only the
  library's public API.

Public API (docs/design.md, "Public API")::

    sk.sparsemax(input, dim=-1)
    sk.spade_encode(x, prototypes, lam, *, backend="auto") -> sk.SparseCodes
    sk.SparseCodes
    sk.SpaDE(d_in, d_sae, ...), sk.SpaDEOutput
    sk.available_backends(), sk.BACKEND_NAMES
    sk.RangeError
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING

from . import _moved

__version__ = "0.1.0"

#: The backends' names, besides "auto" (:data:`spade_kernels.backends.BACKENDS` holds the backends
#: in this order).  Here, not there, so that the command line's ``--help`` never imports torch.
BACKEND_NAMES = ("reference", "torch", "native", "triton")

#: Public name → the module that defines it.  They are imported on first use (PEP 562), so
#: ``import spade_kernels`` alone imports neither torch nor the extension: the command line's
#: ``--help`` stays fast.  A submodule (``sk.pipeline``, ``sk.reference``) is imported likewise.
_PUBLIC = {
    "RangeError": "numerics",
    "SpaDE": "layer",
    "SpaDEOutput": "layer",
    "SparseCodes": "codes",
    "available_backends": "backends",
    "spade_encode": "encode",
    "sparsemax": "sparsemax_op",
}

__all__ = [
    "BACKEND_NAMES",
    "RangeError",
    "SpaDE",
    "SpaDEOutput",
    "SparseCodes",
    "__version__",
    "available_backends",
    "spade_encode",
    "sparsemax",
]

if TYPE_CHECKING:
    from .backends import available_backends
    from .codes import SparseCodes
    from .encode import spade_encode
    from .layer import SpaDE, SpaDEOutput
    from .numerics import RangeError
    from .sparsemax_op import sparsemax


@functools.cache
def _submodules() -> frozenset:
    """The package's own modules and subpackages (files here, not the former paths ``_moved`` maps).

    Listed once per process: a lookup of a name the package lacks (a library's
    ``hasattr(sk, "__wrapped__")``) does not read the directory again.
    """
    return frozenset(m.name for m in pkgutil.iter_modules(__path__))


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif name in _submodules():
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*__all__, *(m for m in _submodules() if not m.startswith("_"))})


_moved.install()
