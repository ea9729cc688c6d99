"""Two standard SAE baselines for the synthetic comparisons: a ReLU SAE and a TopK SAE.

Plain PyTorch, written for the examples (the package itself only ships SpaDE):

* :class:`ReLUSAE`: z = ReLU(W_enc·(x − b_dec) + b_enc), x̂ = z·W_dec + b_dec,
  loss = ‖x − x̂‖² + α·Σ_k z_k·‖W_dec[k]‖ (L1 penalty weighted by the decoder
  norms, so shrinking the decoder cannot cheat the penalty).
* :class:`TopKSAE`: z = ReLU(TopK_k(W_enc·(x − b_dec) + b_enc)), decoder rows
  kept at unit norm, loss = ‖x − x̂‖² (Gao et al., "Scaling and evaluating
  sparse autoencoders"; no auxiliary dead-latent loss).

Both are trained by :func:`train_sae` with the SpaDE recipe of
:func:`spade_kernels.train.train_spade` (Adam, per-step cosine lr decay,
gradient clipping, shuffled mini-batches), so all three models see the same
batches in the same order for a given seed.  :func:`match_relu_l0` and
:func:`match_topk_l0` tune α and k until the baseline's mean L0 matches a
target (SpaDE's).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spade_kernels.train import cosine_lr

__all__ = ["ReLUSAE", "TopKSAE", "match_relu_l0", "match_topk_l0", "mean_l0", "train_sae"]


class _LinearSAE(nn.Module):
    """Shared parameters and initialisation of the two linear-encoder SAEs."""

    def __init__(self, d_in: int, d_sae: int, *, seed: int = 0) -> None:
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        gen = torch.Generator().manual_seed(seed)
        # Unit-norm random decoder directions, encoder initialised as its transpose.
        W_dec = F.normalize(torch.randn(d_sae, d_in, generator=gen), dim=1)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())  # (d_sae, d_in): pre = (x − b_dec)·W_encᵀ
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, n: int = 4096) -> _LinearSAE:
        """Fit the scale of the initialisation to the data (a few rows of ``x`` suffice).

        The decoder bias goes to the data mean (a cheap stand-in for the
        geometric median), and the encoder is rescaled so the initial
        reconstruction has the right size: with K ≫ d unit directions a
        transposed-decoder encoder reconstructs about K/(2d) times the input,
        which the first hundreds of steps would otherwise spend undoing.
        ReLU and TopK codes are positively homogeneous in the encoder (b_enc
        is 0), so one least-squares factor fixes it exactly.
        """
        sample = x[:n]
        self.b_dec.copy_(sample.mean(0))
        centred = sample - self.b_dec
        recon = self.decode(self.encode(sample)) - self.b_dec
        scale = float((centred * recon).sum() / recon.pow(2).sum().clamp_min(1e-12))
        if scale > 0:
            self.W_enc.mul_(scale)
        return self

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes (B, d_sae)."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def after_step(self) -> None:
        """Called after each optimiser step (constraint projections)."""


class ReLUSAE(_LinearSAE):
    """ReLU SAE with a decoder-norm-weighted L1 penalty of weight ``l1_coeff``."""

    def __init__(self, d_in: int, d_sae: int, *, l1_coeff: float, seed: int = 0) -> None:
        super().__init__(d_in, d_sae, seed=seed)
        self.l1_coeff = l1_coeff

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_acts(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, loss, mse); mse = mean_b ‖x_b − x̂_b‖² as in SpaDE."""
        z = self.encode(x)
        mse = (x - self.decode(z)).pow(2).sum(-1).mean()
        l1 = (z * self.W_dec.norm(dim=1)).sum(-1).mean()
        return z, mse + self.l1_coeff * l1, mse


class TopKSAE(_LinearSAE):
    """TopK SAE: the ``k`` largest pre-activations, then ReLU; unit-norm decoder rows."""

    def __init__(self, d_in: int, d_sae: int, *, k: int, seed: int = 0) -> None:
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must lie in [1, d_sae={d_sae}], got {k}")
        super().__init__(d_in, d_sae, seed=seed)
        self.k = k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = self.pre_acts(x).topk(self.k, dim=-1)
        return torch.zeros(x.shape[0], self.d_sae, dtype=x.dtype, device=x.device).scatter(
            -1, indices, F.relu(values)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        mse = (x - self.decode(z)).pow(2).sum(-1).mean()
        return z, mse, mse

    @torch.no_grad()
    def after_step(self) -> None:
        self.W_dec.copy_(F.normalize(self.W_dec, dim=1))


def train_sae(
    model: _LinearSAE,
    x: torch.Tensor,
    *,
    batch_size: int = 256,
    lr: float = 1e-2,
    lr_final: float = 1e-4,
    clip: float | None = 1.0,
    epochs: int = 1,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` in place with the SpaDE recipe; returns the per-step loss."""
    model.init_from_data(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    total = epochs * math.ceil(n / batch_size)
    losses, step = [], 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, lr, lr_final)
            _, loss, _ = model(x[order[start : start + batch_size]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            model.after_step()
            losses.append(loss.item())
            step += 1
    return losses


@torch.no_grad()
def mean_l0(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 4096) -> float:
    """Mean number of codes > 0 per sample."""
    total = sum(int((encode(x[i : i + batch_size]) > 0).sum()) for i in range(0, x.shape[0], batch_size))
    return total / x.shape[0]


def match_topk_l0(
    x: torch.Tensor, target: float, d_sae: int, *, max_tries: int = 6, log=print, **train_kwargs
) -> tuple[TopKSAE, list[dict]]:
    """Train TopK SAEs for k near ``target`` and keep the one whose mean L0 is closest.

    The ReLU after the top-k can zero some of the k entries, so the achieved
    L0 is at most k: k starts at round(target) and moves up while the achieved
    L0 is below the target (down while above), at most ``max_tries`` times.
    Returns the chosen model and the trace [{"k", "l0"}, ...].
    """
    seed = train_kwargs.get("seed", 0)
    tried: dict[int, tuple[TopKSAE, float]] = {}
    k = min(max(1, round(target)), d_sae)
    for _ in range(max_tries):
        if k in tried:
            break
        model = TopKSAE(x.shape[1], d_sae, k=k, seed=seed)
        train_sae(model, x, **train_kwargs)
        tried[k] = (model, mean_l0(model.encode, x))
        log(f"  TopK k={k}: mean L0 {tried[k][1]:.2f} (target {target:.2f})")
        k = k + 1 if tried[k][1] < target else k - 1
        if not 1 <= k <= d_sae:
            break
    best = min(tried, key=lambda key: abs(tried[key][1] - target))
    return tried[best][0], [{"k": key, "l0": l0} for key, (_, l0) in sorted(tried.items())]


def match_relu_l0(
    x: torch.Tensor,
    target: float,
    d_sae: int,
    *,
    l1_init: float = 0.3,
    rel_tol: float = 0.03,
    max_tries: int = 10,
    log=print,
    **train_kwargs,
) -> tuple[ReLUSAE, list[dict]]:
    """Tune the L1 coefficient α of a ReLU SAE so its mean L0 matches ``target``.

    L0 falls as α grows: α is multiplied/divided by 4 until the target is
    bracketed, then narrowed by interpolating log α linearly in L0 (kept
    inside the middle 80% of the bracket so each try makes progress).  Stops
    when the mean L0 is within ``rel_tol`` of the target or after
    ``max_tries`` trainings, and keeps the closest model.  Returns the model
    and the trace [{"l1_coeff", "l0"}, ...].
    """
    seed = train_kwargs.get("seed", 0)
    above = below = None  # (α, L0) with L0 above / below the target
    alpha, trace, best = l1_init, [], None
    for _ in range(max_tries):
        model = ReLUSAE(x.shape[1], d_sae, l1_coeff=alpha, seed=seed)
        train_sae(model, x, **train_kwargs)
        l0 = mean_l0(model.encode, x)
        trace.append({"l1_coeff": alpha, "l0": l0})
        log(f"  ReLU α={alpha:.4g}: mean L0 {l0:.2f} (target {target:.2f})")
        if best is None or abs(l0 - target) < abs(best[1] - target):
            best = (model, l0)
        if abs(l0 - target) <= rel_tol * target:
            break
        if l0 > target:
            above = (alpha, l0)
        else:
            below = (alpha, l0)
        if above is None or below is None:
            alpha = alpha * 4 if below is None else alpha / 4
            continue
        (a_lo, l_lo), (a_hi, l_hi) = above, below
        frac = min(max((l_lo - target) / (l_lo - l_hi), 0.1), 0.9)
        alpha = math.exp(math.log(a_lo) + frac * (math.log(a_hi) - math.log(a_lo)))
    return best[0], trace
