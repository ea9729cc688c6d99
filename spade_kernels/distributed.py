"""SpaDE across processes: latents sharded over a process group, data parallel around it (docs/design.md, "Sharding the latents").

Built on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs); nothing here has
a transport of its own.

* :class:`ShardedSpaDE` holds the latents [lo, hi) of a *latent group*: its
  slice of the prototypes and of the decoder, and λ (and b_dec) replicated.
  Its forward and backward are :class:`~spade_kernels.SpaDE`'s encoder and
  loss with a :class:`LatentGroup`, which turns the pipeline's group steps
  (:mod:`spade_kernels.pipeline.group`) into collectives.  They are exact — the same codes, loss and gradients as one process —
  by the subset bound: the sparsemax threshold of a rank's slice of a row is
  ≤ the row's, so the row's global support lies inside the union of the
  ranks' local supports.  Forward communication: an all-gather of each
  rank's local support scores (B·C floats per rank) for the exact global τ,
  and a sum of the decoder's partial outputs (B·d) and of the regulariser's
  partial sums.  Backward: the per-row sum of ∂L/∂z and size of the global
  support (2·B floats), the λ gradient (one float), and ∂x (B·d) only when x
  requires a gradient.  Prototype and decoder gradients stay on their shard.
* Data parallel: wrap the sharded layer in ``DistributedDataParallel`` over
  the *data group* (the ranks that hold the same slice, one per replica);
  :func:`mesh_groups` makes the two groups of a 2-D layout from a
  ``DeviceMesh``.
* :func:`init` starts the process group with a bounded timeout, so a rank
  that dies makes the others fail with an error instead of hanging.

Inputs are replicated within a latent group: every rank of it passes the same
batch.  ``forward(x).codes`` holds this rank's part of the codes (global
latent indices); :meth:`ShardedSpaDE.mean_l0` gives the global L0.
"""

from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist
from torch import nn

from .backends import resolve_backend
from .codes import SparseCodes
from .encode import encode_codes, product_primitives
from .layer import SpaDE, SpaDEOutput, read_checkpoint
from .numerics import RangeError, compute_dtype, sorted_threshold
from .pipeline import OneProcess, spade_loss
from .pipeline.encoder import finish_codes

__all__ = ["DEFAULT_TIMEOUT_S", "LatentGroup", "ShardedSpaDE", "init", "mesh_groups", "shard_range"]

#: Seconds a collective waits for a peer before it fails (instead of torch's 30 minutes).
DEFAULT_TIMEOUT_S = 120.0


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs) -> None:
    """``torch.distributed.init_process_group`` with a bounded timeout (NCCL on GPUs, gloo otherwise).

    Under ``torchrun`` the rank and world size come from the environment.  A
    collective that waits longer than ``timeout_s`` for a peer (a rank that
    died, or one stuck elsewhere) raises instead of hanging; with gloo a peer
    whose process ended fails the next collective at once.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # Errors (and the timeout) surface in the calling thread instead of hanging it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def shard_range(n_latents: int, world_size: int, rank: int) -> tuple[int, int]:
    """The latents [lo, hi) of ``rank``: contiguous, as even as possible (the first K mod P ranks hold one more)."""
    base, extra = divmod(n_latents, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def mesh_groups(data: int, latent: int, device_type: str = "cpu"):
    """(data group, latent group) of this rank in a 2-D layout: ``data`` replicas × ``latent`` shards.

    Built on ``torch.distributed.device_mesh``: consecutive ranks form a
    latent group (they hold the K latents between them and see the same
    batch); ranks at the same position of every latent group form a data group
    (they hold the same slice and average its gradients, e.g. through
    ``DistributedDataParallel(layer, process_group=data_group)``).
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (data, latent), mesh_dim_names=("data", "latent"))
    return mesh.get_group("data"), mesh.get_group("latent")


# -- collectives with the autograd a replicated loss needs ----------------------------


class _SumAcrossShards(torch.autograd.Function):
    """Sum of each rank's partial tensor over the group; backward: the identity.

    Every rank computes the same loss from the summed tensor, so each rank's
    partial receives that loss's gradient as it is (not summed again).
    """

    @staticmethod
    def forward(partial, group):
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _all_gather_padded(t: torch.Tensor, group, fill: float) -> torch.Tensor:
    """Each rank's (B, C_r) ``t`` side by side, (B, Σ_r max C), padded with ``fill``."""
    width = torch.tensor([t.shape[1]], device=t.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
    padded = torch.nn.functional.pad(t, (0, int(width) - t.shape[1]), value=fill).contiguous()
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts, dim=1)


class LatentGroup(OneProcess):
    """The ranks of a process group that hold a layer's latents between them: the pipeline's steps as collectives.

    The encoder and the loss are the one-process pipeline's
    (:mod:`spade_kernels.pipeline.group` lists the steps); this class is all
    a latent-sharded layer adds.  ``offset`` is where this rank's latents
    start.
    """

    sharded = True

    def __init__(self, group, offset: int):
        self.group, self.offset = group, offset

    def threshold(self, codes, error, x: torch.Tensor, lam: float):
        """Each row's codes on this rank's latents under the sparsemax threshold of the whole row.

        By the subset bound the row's support lies inside the union of the
        ranks' local supports, so τ of their all-gathered scores is the row's
        exact τ.  A rank whose encode failed (prototypes too large for the
        distances) still takes part in the first collective, and every rank
        raises.
        """
        cd = compute_dtype(x.dtype)
        if error is None:
            z_loc, idx, size, D = codes
            nan = torch.isnan(z_loc).any(1).to(cd)
        else:
            nan = torch.zeros(x.shape[0], dtype=cd, device=x.device)
        flags = torch.cat([nan, nan.new_full((1,), float(error is not None))])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        if flags[-1] > 0:
            raise error or RangeError(
                "another shard's prototypes hold finite values too large for the distances"
            )
        # A row is NaN everywhere if it is NaN anywhere (a non-finite prototype on any shard).
        nan_rows = flags[:-1] > 0
        valid = torch.arange(z_loc.shape[1], device=D.device) < size.unsqueeze(1)
        s = torch.where(valid, -lam * D, torch.full_like(D, -math.inf))
        union = _all_gather_padded(torch.where(nan_rows.unsqueeze(1), -math.inf, s), self.group, -math.inf)
        tau = sorted_threshold(torch.sort(union, dim=1, descending=True).values)
        z = torch.where(valid, (s - tau.unsqueeze(1)).clamp_min(0), torch.zeros_like(s))
        # This rank's part of the global support, sorted, then laid out as the pipeline lays out codes.
        z, order = torch.sort(z, dim=1, descending=True)
        on = z > 0
        idx = torch.where(on, idx.gather(1, order), torch.zeros_like(idx))
        D = torch.where(on, D.gather(1, order), torch.zeros_like(D))
        return finish_codes(z, idx, on.sum(1), D, nan_rows)

    def row_sums(self, total: torch.Tensor, count: torch.Tensor):
        stats = torch.cat([total, count.to(total.dtype)], dim=1)
        dist.all_reduce(stats, group=self.group)
        return stats[:, :1], stats[:, 1:]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def sum_partials(self, t: torch.Tensor) -> torch.Tensor:
        return _SumAcrossShards.apply(t, self.group)


# -- the layer -------------------------------------------------------------------------

_SETTINGS = ("d_in", "d_sae", "lambda_init", "gamma_reg", "use_bias", "reg_on", "backend")


class ShardedSpaDE(nn.Module):
    """A SpaDE layer whose latents are split over the ranks of ``process_group`` (the latent group).

    Build it with :meth:`from_dense` (every rank passes an identical
    :class:`~spade_kernels.SpaDE` and keeps its slice) or
    :meth:`from_pretrained` (every rank reads only its slice of a checkpoint).
    ``forward(x)`` returns a :class:`~spade_kernels.SpaDEOutput` with the full
    ``x_hat`` and the global ``loss``, ``mse`` and ``reg`` on every rank, and
    this rank's part of the codes (global latent indices).  Every method that
    communicates must be called by every rank of the group.

    Parameters: this rank's ``prototypes`` and ``W_dec`` rows [lo, hi)
    (``latent_range``), the replicated ``lambda_raw`` and ``b_dec``.
    """

    def __init__(
        self, layer: SpaDE, process_group=None, *, _slice: tuple[torch.Tensor, torch.Tensor] | None = None
    ):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ShardedSpaDE needs an initialised process group (spade_kernels.distributed.init())"
            )
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        for name in _SETTINGS:
            setattr(self, name, getattr(layer, name))
        self.backend_options = dict(layer.backend_options)
        self.latent_range = shard_range(layer.d_sae, self.world_size, self.rank)
        lo, hi = self.latent_range
        self.latent_group = LatentGroup(self.group, lo)
        if hi <= lo:
            raise ValueError(
                f"d_sae={layer.d_sae} latents cannot be split over {self.world_size} ranks (some would hold none)"
            )
        self._check_same_settings(layer)
        with torch.no_grad():
            protos, wdec = _slice if _slice is not None else (layer.prototypes[lo:hi], layer.W_dec[lo:hi])
            self.prototypes = nn.Parameter(protos.detach().clone())
            self.W_dec = nn.Parameter(wdec.detach().clone())
            self.lambda_raw = nn.Parameter(layer.lambda_raw.detach().clone())
            self.b_dec = nn.Parameter(layer.b_dec.detach().clone()) if layer.b_dec is not None else None
        if _slice is None:
            self._check_same_weights(layer)

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_dense(cls, layer: SpaDE, process_group=None) -> ShardedSpaDE:
        """This rank's slice of ``layer``, which must be the same layer on every rank of the group (checked)."""
        return cls(layer, process_group)

    @classmethod
    def from_pretrained(
        cls, path, process_group=None, *, device=None, dtype=None, backend: str = "auto"
    ) -> ShardedSpaDE:
        """Load this rank's slice of a :meth:`SpaDE.save_pretrained` checkpoint (no rank reads the whole layer).

        The checkpoint is checked as :meth:`SpaDE.from_pretrained` checks it
        (settings, header, finite weights, λ), except the per-tensor CRC-32 of
        the sliced weights: a rank reads only its rows.
        """
        ckpt = read_checkpoint(path, dtype)
        settings = ckpt.settings
        group = process_group if process_group is not None else dist.group.WORLD
        lo, hi = shard_range(settings["d_sae"], dist.get_world_size(group), dist.get_rank(group))
        if device is None:
            device = torch.empty(()).device
        protos = torch.empty(hi - lo, settings["d_in"], device=device, dtype=ckpt.dtype)
        wdec = torch.empty_like(protos)
        ckpt.read("prototypes", protos, rows=(lo, hi))
        ckpt.read("W_dec", wdec, rows=(lo, hi))
        # A one-latent stand-in carries the settings and the replicated parameters.
        shell = SpaDE(**{**settings, "d_sae": 1}, backend=backend, device=device, dtype=ckpt.dtype)
        shell.d_sae = settings["d_sae"]
        with torch.no_grad():
            ckpt.read("lambda_raw", shell.lambda_raw)
            if shell.b_dec is not None:
                ckpt.read("b_dec", shell.b_dec)
        ckpt.check_lambda(shell.lambda_raw)
        return cls(shell, process_group, _slice=(protos, wdec))

    def _check_same_settings(self, layer: SpaDE) -> None:
        mine = {name: getattr(layer, name) for name in _SETTINGS}
        mine["dtype"] = str(layer.prototypes.dtype)
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        for rank, theirs in enumerate(everyone):
            for name in mine:
                if theirs[name] != mine[name]:
                    raise ValueError(
                        f"ShardedSpaDE: layer setting {name!r} differs across ranks: {mine[name]!r} on rank "
                        f"{self.rank}, {theirs[name]!r} on rank {rank} (every rank must build the same layer)"
                    )

    def _check_same_weights(self, layer: SpaDE) -> None:
        """The ranks must slice one layer: compare a checksum of every parameter."""
        sums = torch.stack(
            [p.detach().double().sum() for p in (layer.prototypes, layer.W_dec, layer.lambda_raw)]
            + [p.detach().double().square().sum() for p in (layer.prototypes, layer.W_dec)]
        ).cpu()
        if dist.get_backend(self.group) == "nccl":
            sums = sums.cuda()
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(low, high):
            raise ValueError(
                "ShardedSpaDE.from_dense: the layers differ across ranks (their weights' checksums disagree); "
                "build the same layer on every rank (the same seed, or load one checkpoint)"
            )

    # -- the layer -------------------------------------------------------------------

    @property
    def lam(self) -> torch.Tensor:
        """λ = softplus(lambda_raw), the same on every rank."""
        return torch.nn.functional.softplus(self.lambda_raw)

    def _encode(self, x: torch.Tensor):
        """(flat x, the resolved backend, this rank's codes with local indices) — the one encoder, over the group."""
        flat = x.reshape(-1, self.d_in)
        dtype = torch.promote_types(flat.dtype, self.prototypes.dtype)
        flat = flat.to(dtype)
        backend = resolve_backend(self.backend, flat.device, dtype)
        codes = encode_codes(
            backend, flat, self.prototypes.to(dtype), self.lam, self.backend_options, self.latent_group
        )
        return flat, backend, codes

    def _global(self, codes: SparseCodes, lead) -> SparseCodes:
        """``codes`` with the layer's latent indices (this rank's start added)."""
        out = SparseCodes(codes.indices + self.latent_group.offset, codes.values, codes.support_size, self.d_sae,
                          distances=codes.distances)  # fmt: skip
        return out.reshape_batch(lead)

    def encode_sparse(self, x: torch.Tensor) -> SparseCodes:
        """This rank's part of the codes of x (..., d_in): global latent indices, the global threshold."""
        return self._global(self._encode(x)[2], x.shape[:-1])

    def forward(self, x: torch.Tensor) -> SpaDEOutput:
        """Encode, decode and the SpaDE loss, exactly as one process would; every rank of the group calls it.

        The encoder and the loss are :class:`~spade_kernels.SpaDE`'s
        (:func:`~spade_kernels.encode.encode_codes`,
        :func:`~spade_kernels.pipeline.spade_loss`) with this layer's latent
        group, whose collectives are the only difference in the encoder and the loss.
        """
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must have shape (..., {self.d_in}), got {tuple(x.shape)}")
        flat, backend, codes = self._encode(x)
        x_hat, loss, mse, reg = spade_loss(
            product_primitives(backend), codes, flat, flat, self.W_dec, self.b_dec, self.gamma_reg, self.reg_on,
            self.latent_group,
        )  # fmt: skip
        lead = x.shape[:-1]
        return SpaDEOutput(x_hat.reshape(*lead, self.d_in), self._global(codes, lead), loss, mse, reg)

    def mean_l0(self, codes: SparseCodes) -> torch.Tensor:
        """The mean number of active latents per row over all shards (collective; a 0-d tensor)."""
        size = codes.support_size.reshape(-1)
        total = size.sum().to(torch.float64).reshape(1)
        dist.all_reduce(total, group=self.group)
        return (total / max(size.numel(), 1)).reshape(())

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients by the norm of the *whole* layer's gradient (collective); returns that norm.

        The sharded parameters' squared norms are summed over the group; λ's
        and b_dec's (the same on every rank) are counted once.
        """
        device = self.prototypes.device
        sharded = sum(
            (
                p.grad.detach().double().square().sum()
                for p in (self.prototypes, self.W_dec)
                if p.grad is not None
            ),
            torch.zeros((), dtype=torch.float64, device=device),
        )
        dist.all_reduce(sharded, group=self.group)
        shared = [p for p in (self.lambda_raw, self.b_dec) if p is not None and p.grad is not None]
        total = (
            sharded
            + sum(
                (p.grad.detach().double().square().sum() for p in shared),
                torch.zeros((), dtype=torch.float64, device=device),
            )
        ).sqrt()
        scale = max_norm / (float(total) + 1e-6)
        if scale < 1:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return total

    # -- back to one process -----------------------------------------------------------

    def _gather_rows(self, t: torch.Tensor, dst: int | None) -> torch.Tensor | None:
        """Every rank's slice of a (hi − lo, d) tensor stacked in rank order: on every rank, or on ``dst`` only."""
        rows = max(
            shard_range(self.d_sae, self.world_size, r)[1] - shard_range(self.d_sae, self.world_size, r)[0]
            for r in range(self.world_size)
        )
        padded = torch.nn.functional.pad(t.detach(), (0, 0, 0, rows - t.shape[0])).contiguous()
        if dst is None:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded, group=self.group)
        else:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == dst else None
            dist.gather(padded, parts, dst=dist.get_global_rank(self.group, dst), group=self.group)
            if self.rank != dst:
                return None
        sizes = [shard_range(self.d_sae, self.world_size, r) for r in range(self.world_size)]
        return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, sizes)])

    def _dense(self, dst: int | None) -> SpaDE | None:
        protos = self._gather_rows(self.prototypes, dst)
        wdec = self._gather_rows(self.W_dec, dst)
        if protos is None:
            return None
        layer = SpaDE(
            self.d_in, self.d_sae, lambda_init=self.lambda_init, gamma_reg=self.gamma_reg, use_bias=self.use_bias,
            reg_on=self.reg_on, backend=self.backend, backend_options=self.backend_options,
            device=self.prototypes.device, dtype=self.prototypes.dtype,
        )  # fmt: skip
        with torch.no_grad():
            layer.prototypes.copy_(protos)
            layer.W_dec.copy_(wdec)
            layer.lambda_raw.copy_(self.lambda_raw)
            if self.b_dec is not None:
                layer.b_dec.copy_(self.b_dec)
        return layer

    def to_dense(self) -> SpaDE:
        """The whole layer, on every rank (collective): equal to the single-device layer."""
        return self._dense(None)

    def save_pretrained(self, path) -> None:
        """Write the single-device checkpoint (:meth:`SpaDE.save_pretrained`) once, from rank 0 (collective)."""
        layer = self._dense(0)
        if layer is not None:
            layer.save_pretrained(path)
        dist.barrier(group=self.group)

    def extra_repr(self) -> str:
        lo, hi = self.latent_range
        return f"d_in={self.d_in}, d_sae={self.d_sae}, latents=[{lo}, {hi}) of rank {self.rank}/{self.world_size}"
