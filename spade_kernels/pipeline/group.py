"""Where a layer's latents live: the one place the forward and backward differ for a latent-sharded layer.

The encoder and the loss (:mod:`.encoder`, :mod:`.sparse`, :mod:`.loss`)
are written once and take a *latent group*: :data:`ONE_PROCESS` for a layer
that holds all its K latents, or :class:`spade_kernels.distributed.LatentGroup`
for one whose latents are split over the ranks of a process group.  Every
step below is the identity here; the latent group replaces each with a
collective (docs/design.md, "Sharding the latents"), and those are the only
differences between the encoder and loss of ``SpaDE`` and ``ShardedSpaDE``:

* :meth:`OneProcess.threshold` — the sparsemax threshold of each row: in one
  process the exact stage's own τ; across a latent group the τ of the
  all-gathered local supports (the subset bound makes their union hold the
  row's support);
* :meth:`OneProcess.row_sums` — each row's Σ ∂L/∂z and support size over
  the support, for the sparsemax Jacobian;
* :meth:`OneProcess.sum` — a gradient of a replicated input (∂x, ∂λ) summed
  over the shards;
* :meth:`OneProcess.sum_partials` — the decoder's and the regulariser's
  partial sums over the shards, differentiably.
"""

from __future__ import annotations

import torch

__all__ = ["ONE_PROCESS", "OneProcess"]


class OneProcess:
    """The latent group of a layer held by one process: every latent is local, every step the identity."""

    #: Whether the latents are split over processes (its backward then runs collectives).
    sharded = False
    #: Where this rank's latents start in the layer's (global latent indices = local + offset).
    offset = 0

    def threshold(self, codes, error: Exception | None, x: torch.Tensor, lam: float):
        """The codes under each row's threshold over the whole layer (here: the local codes themselves).

        ``codes`` are (values, indices, support_size, D) as
        :func:`~spade_kernels.pipeline.encoder.finish_codes` lays them out, or
        None with ``error`` when this process's encode failed (a latent group
        must still take part in the collective, and raises on every rank).
        """
        if error is not None:
            raise error
        return codes

    def row_sums(self, total: torch.Tensor, count: torch.Tensor):
        """Per-row sums of ∂L/∂z over the support and of the support's size (here: as they are)."""
        return total, count

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """A gradient of a replicated input summed over the shards (here: ``t``)."""
        return t

    def sum_partials(self, t: torch.Tensor) -> torch.Tensor:
        """Partial forward sums (x̂, the regulariser's rows) summed over the shards, differentiably (here: ``t``)."""
        return t


#: The latent group of a layer in one process.
ONE_PROCESS = OneProcess()
