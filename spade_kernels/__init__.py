"""spade_kernels: fast, exact SpaDE (Sparsemax Distance Encoder) for PyTorch.

Public API (docs/design.md, "Public API")::

    sk.sparsemax(input, dim=-1)
    sk.spade_encode(x, prototypes, lam, *, backend="auto") -> sk.SparseCodes
    sk.SparseCodes
    sk.SpaDE(d_in, d_sae, ...), sk.SpaDEOutput
    sk.available_backends()
"""

from .backends import available_backends
from .codes import SparseCodes
from .encode import spade_encode
from .layer import SpaDE, SpaDEOutput
from .sparsemax import sparsemax

__version__ = "0.1.0"

__all__ = [
    "SpaDE",
    "SpaDEOutput",
    "SparseCodes",
    "__version__",
    "available_backends",
    "spade_encode",
    "sparsemax",
]
