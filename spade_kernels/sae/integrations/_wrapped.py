"""Read-through views shared by the adapters that wrap a :class:`spade_kernels.SpaDE`."""

from __future__ import annotations

import torch

from spade_kernels.backends import check_backend_name
from spade_kernels.layer import SpaDE


class WrappedSpaDE:
    """Mixin for a module holding its weights in a ``SpaDE`` submodule ``spade``.

    ``backend`` (settable), ``prototypes``, ``W_dec``, ``b_dec`` and ``lam`` read through to it, so the
    trainer library sees the usual SAE attribute names and the layer keeps a
    single copy of each tensor.
    """

    spade: SpaDE

    @property
    def backend(self) -> str:
        """Encoder backend of the wrapped layer (settable)."""
        return self.spade.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.spade.backend = check_backend_name(name)

    @property
    def prototypes(self) -> torch.nn.Parameter:
        """Encoder prototypes a_k, shape (d_sae, d_in)."""
        return self.spade.prototypes

    @property
    def W_dec(self) -> torch.nn.Parameter:
        """Decoder rows, shape (d_sae, d_in)."""
        return self.spade.W_dec

    @property
    def b_dec(self) -> torch.nn.Parameter | None:
        """Decoder bias (d_in,), or None without ``use_bias``."""
        return self.spade.b_dec

    @property
    def lam(self) -> torch.Tensor:
        """λ = softplus(lambda_raw), a differentiable 0-d tensor."""
        return self.spade.lam
