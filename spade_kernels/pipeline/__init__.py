"""The SpaDE pipeline: the encoder, the loss and the sparse autograd, written once (docs/design.md, "The pipeline").

No backend owns this package: every sparse backend is a :class:`Primitives`
value (:mod:`spade_kernels.backends.interface`) that the pipeline composes:

* :mod:`.plan` — what a call runs, decided where it enters (:func:`make_plan`,
  :func:`products_for`, typed :class:`Options`);
* :mod:`.encoder` — the forward (candidate search → exact codes → exact
  resolution of overflow rows → the threshold over the latent group);
* :mod:`.sparse` — the backward, the sparse decoder and the support distances;
* :mod:`.loss` — the SpaDE loss, composed once (:func:`spade_loss`);
* :mod:`.group` — the steps where a latent-sharded layer communicates
  (:data:`ONE_PROCESS`: none);
* :mod:`.memory` — every row block's size, from one budget;
* :mod:`.dense` — the ``reference`` backend's dense codes.
"""

from ..backends.interface import Primitives
from .encoder import encode_forward, encode_rows
from .group import ONE_PROCESS, OneProcess
from .loss import mean_squared_error, spade_loss
from .memory import memory_budget
from .plan import (
    DENSE_FRACTION,
    Options,
    Plan,
    Products,
    dense_products,
    make_plan,
    products_for,
    resolve_options,
)
from .sparse import encode_backward, gather_sq_dist, sparse_decode

__all__ = [
    "DENSE_FRACTION",
    "ONE_PROCESS",
    "OneProcess",
    "Options",
    "Plan",
    "Primitives",
    "Products",
    "dense_products",
    "encode_backward",
    "encode_forward",
    "encode_rows",
    "gather_sq_dist",
    "make_plan",
    "mean_squared_error",
    "memory_budget",
    "products_for",
    "resolve_options",
    "spade_loss",
    "sparse_decode",
]
