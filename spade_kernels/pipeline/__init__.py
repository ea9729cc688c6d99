"""The SpaDE pipeline: the encoder and the sparse autograd, written once (docs/design.md, "The pipeline").

No backend owns this package: every sparse backend is a :class:`Primitives`
value (:mod:`spade_kernels.backends.interface`) that the pipeline composes — :mod:`.encoder` the
forward (candidate search → exact codes → exact resolution of overflow
rows), :mod:`.sparse` the backward, the sparse decoder and the support
distances, and the routing of every product over a support.
"""

from ..backends.interface import Primitives, resolve_options
from .encoder import encode_forward
from .loss import mean_squared_error
from .sparse import DENSE_FRACTION, dense_products, encode_backward, gather_sq_dist, product, sparse_decode

__all__ = [
    "DENSE_FRACTION",
    "Primitives",
    "dense_products",
    "encode_backward",
    "encode_forward",
    "gather_sq_dist",
    "mean_squared_error",
    "product",
    "resolve_options",
    "sparse_decode",
]
