"""``SparseCodes``: the padded sparse layout SpaDE codes are returned in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SparseCodes"]


@dataclass
class SparseCodes:
    """Sparse SpaDE codes for a batch, padded to a common width C.

    Attributes
    ----------
    indices : Tensor, int64, shape (..., C)
        Latent index of each stored entry.
    values : Tensor, shape (..., C)
        Code value of each stored entry (differentiable when produced by an
        encoder with autograd enabled).
    support_size : Tensor, int64, shape (...)
        Number of non-zero codes of each row.
    n_latents : int
        Number of latents K (the dense width).
    distances : Tensor, shape (..., C), optional
        ‖x − a_k‖² on the support, when the encoder computed them (the
        sparse backends do, exactly); 0 in padding slots.  Differentiable:
        the layer's distance-weighted regulariser uses them, and its gradient
        is folded into the encoder's backward pass.

    Notes
    -----
    Padding convention: in each row the first ``support_size`` slots hold the
    support, sorted by value in descending order; the remaining slots have
    ``index == 0`` and ``value == 0``.  Padding therefore contributes nothing
    to a gather-matmul or a scatter-add and needs no masking.  ``C`` is the
    largest support size in the batch (at least 1).  A row whose input
    contained NaN has ``support_size == 0`` and NaN values; ``to_dense`` turns
    it into a row of NaN.
    """

    indices: torch.Tensor
    values: torch.Tensor
    support_size: torch.Tensor
    n_latents: int
    distances: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.indices.shape != self.values.shape:
            raise ValueError(
                f"SparseCodes: indices {tuple(self.indices.shape)} and values "
                f"{tuple(self.values.shape)} must have the same shape"
            )
        if self.indices.dtype != torch.int64:
            raise TypeError(f"SparseCodes: indices must be int64, got {self.indices.dtype}")
        if self.distances is not None and self.distances.shape != self.indices.shape:
            raise ValueError(
                f"SparseCodes: distances {tuple(self.distances.shape)} must match indices "
                f"{tuple(self.indices.shape)}"
            )
        if self.support_size.shape != self.indices.shape[:-1]:
            raise ValueError(
                f"SparseCodes: support_size must have shape {tuple(self.indices.shape[:-1])}, "
                f"got {tuple(self.support_size.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        """Dense shape ``(..., n_latents)``."""
        return torch.Size((*self.indices.shape[:-1], self.n_latents))

    @property
    def width(self) -> int:
        """Padded width C."""
        return self.indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to_dense(self) -> torch.Tensor:
        """Dense codes of shape ``(..., n_latents)`` (differentiable in ``values``)."""
        lead = self.indices.shape[:-1]
        idx = self.indices.reshape(-1, self.width)
        val = self.values.reshape(-1, self.width)
        dense = torch.zeros(idx.shape[0], self.n_latents, dtype=val.dtype, device=val.device)
        dense = dense.scatter_add(1, idx, val)
        nan_rows = torch.isnan(val).any(dim=-1, keepdim=True)
        dense = torch.where(nan_rows, torch.full_like(dense, float("nan")), dense)
        return dense.reshape(*lead, self.n_latents)

    @classmethod
    def from_dense(cls, z: torch.Tensor) -> SparseCodes:
        """Sparse layout of dense codes ``z`` (..., K); values stay differentiable."""
        lead, K = z.shape[:-1], z.shape[-1]
        flat = z.reshape(-1, K)
        nan_rows = torch.isnan(flat).any(dim=-1)
        support = (flat > 0) & ~nan_rows[:, None]
        size = support.sum(-1)
        C = max(int(size.max()) if size.numel() else 0, 1)
        key = torch.where(support, flat.detach(), torch.full_like(flat.detach(), -1.0))
        _, idx = torch.topk(key, min(C, K), dim=-1)
        keep = torch.arange(idx.shape[-1], device=z.device) < size[:, None]
        vals = torch.where(keep, flat.gather(-1, idx), torch.zeros((), dtype=z.dtype, device=z.device))
        vals = torch.where(nan_rows[:, None], torch.full_like(vals, float("nan")), vals)
        idx = torch.where(keep, idx, torch.zeros_like(idx))
        width = idx.shape[-1]
        return cls(idx.reshape(*lead, width), vals.reshape(*lead, width), size.reshape(lead), K)

    def reshape_batch(self, batch_shape: tuple[int, ...] | torch.Size) -> SparseCodes:
        """The same codes with leading (batch) dimensions ``batch_shape``."""
        if self.indices.shape[:-1] == tuple(batch_shape):
            return self
        dist = None if self.distances is None else self.distances.reshape(*batch_shape, self.width)
        return SparseCodes(
            self.indices.reshape(*batch_shape, self.width),
            self.values.reshape(*batch_shape, self.width),
            self.support_size.reshape(batch_shape),
            self.n_latents,
            dist,
        )

    def detach(self) -> SparseCodes:
        dist = None if self.distances is None else self.distances.detach()
        return SparseCodes(self.indices, self.values.detach(), self.support_size, self.n_latents, dist)

    def to(self, *args, **kwargs) -> SparseCodes:
        """Move/cast like ``Tensor.to``; indices keep int64."""
        values = self.values.to(*args, **kwargs)
        dist = None if self.distances is None else self.distances.to(*args, **kwargs)
        device = values.device
        return SparseCodes(
            self.indices.to(device), values, self.support_size.to(device), self.n_latents, dist
        )

    def __repr__(self) -> str:
        mean_l0 = self.support_size.float().mean().item() if self.support_size.numel() else 0.0
        return (
            f"SparseCodes(shape={tuple(self.shape)}, width={self.width}, "
            f"mean_l0={mean_l0:.2f}, dtype={self.dtype}, device={self.device})"
        )
