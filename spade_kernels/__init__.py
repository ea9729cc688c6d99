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
    sk.available_backends()
    sk.RangeError
"""

from . import _moved
from .backends import available_backends
from .codes import SparseCodes
from .encode import spade_encode
from .layer import SpaDE, SpaDEOutput
from .numerics import RangeError
from .sparsemax import sparsemax

__version__ = "0.1.0"

__all__ = [
    "RangeError",
    "SpaDE",
    "SpaDEOutput",
    "SparseCodes",
    "__version__",
    "available_backends",
    "spade_encode",
    "sparsemax",
]

_moved.install()
