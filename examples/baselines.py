"""The standard SAE baselines of the paper's comparisons: ReLU, JumpReLU and TopK SAEs.

Plain PyTorch, written for the examples (the package itself only ships SpaDE):

* :class:`ReLUSAE`: z = ReLU(W_enc·(x − b_dec) + b_enc), x̂ = z·W_dec + b_dec,
  loss = ‖x − x̂‖² + α·Σ_k z_k·‖W_dec[k]‖ (L1 penalty weighted by the decoder
  norms, so shrinking the decoder cannot cheat the penalty).
* :class:`JumpReLUSAE`: z = p·H(p − θ) with p the pre-activations and a
  learned threshold θ_k > 0 per latent, loss = ‖x − x̂‖² + β·Σ_k H(p_k − θ_k)
  (an L0 penalty); the step H has no gradient, so θ learns through the
  straight-through pseudo-derivative of Rajamanoharan et al. ("Jumping Ahead",
  2024): ∂H(p − θ)/∂θ ≈ −K((p − θ)/ε)/ε with the rectangle kernel K and
  bandwidth ε.  Decoder rows kept at unit norm.
* :class:`TopKSAE`: z = ReLU(TopK_k(W_enc·(x − b_dec) + b_enc)), decoder rows
  kept at unit norm, loss = ‖x − x̂‖² + α_aux·‖e − ê‖², the auxiliary loss of
  Gao et al. ("Scaling and evaluating sparse autoencoders"): e = x − x̂ is the
  residual and ê its reconstruction from the k_aux largest pre-activations of
  the dead latents (no firing for ``dead_steps`` batches), so dead latents get
  a gradient towards what the live ones miss.

Both are trained by :func:`train_sae` with the SpaDE recipe of
:func:`spade_kernels.sae.train.train_spade` (Adam, per-step cosine lr decay,
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

from spade_kernels.sae.train import cosine_lr

__all__ = [
    "JumpReLUSAE",
    "ReLUSAE",
    "TopKSAE",
    "jump_relu",
    "match_relu_l0",
    "match_topk_l0",
    "mean_l0",
    "step",
    "train_sae",
]


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


def _rectangle(u: torch.Tensor, closed: bool = False) -> torch.Tensor:
    """The rectangle kernel on (−½, ½), or on [−½, ½] with ``closed`` (the authors' code's)."""
    inside = ((u >= -0.5) & (u <= 0.5)) if closed else ((u > -0.5) & (u < 0.5))
    return inside.to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """p·H(p − θ); ∂/∂p = H(p − θ), ∂/∂θ = −θ/ε·K((p − θ)/ε) (straight-through)."""

    @staticmethod
    def forward(ctx, p, theta, eps, closed):
        ctx.save_for_backward(p, theta)
        ctx.eps, ctx.closed = eps, closed
        return p * (p > theta).to(p.dtype)

    @staticmethod
    def backward(ctx, grad):
        p, theta = ctx.saved_tensors
        g_p = grad * (p > theta).to(p.dtype)
        g_theta = -(theta / ctx.eps) * _rectangle((p - theta) / ctx.eps, ctx.closed) * grad
        return g_p, g_theta.sum(0), None, None


class _Step(torch.autograd.Function):
    """H(p − θ); no gradient to p, ∂/∂θ = −K((p − θ)/ε)/ε (straight-through)."""

    @staticmethod
    def forward(ctx, p, theta, eps, closed):
        ctx.save_for_backward(p, theta)
        ctx.eps, ctx.closed = eps, closed
        return (p > theta).to(p.dtype)

    @staticmethod
    def backward(ctx, grad):
        p, theta = ctx.saved_tensors
        g_theta = -(1.0 / ctx.eps) * _rectangle((p - theta) / ctx.eps, ctx.closed) * grad
        return torch.zeros_like(p), g_theta.sum(0), None, None


def jump_relu(p: torch.Tensor, theta: torch.Tensor, eps: float, closed: bool = False) -> torch.Tensor:
    """JumpReLU p·H(p − θ) for pre-activations (B, K) and thresholds (K,), bandwidth ε (``closed``: see
    :func:`_rectangle`)."""
    return _JumpReLU.apply(p, theta, eps, closed)


def step(p: torch.Tensor, theta: torch.Tensor, eps: float, closed: bool = False) -> torch.Tensor:
    """The Heaviside step H(p − θ) with the straight-through threshold gradient."""
    return _Step.apply(p, theta, eps, closed)


class JumpReLUSAE(_LinearSAE):
    """JumpReLU SAE with an L0 penalty of weight ``l0_coeff``; unit-norm decoder rows.

    ``threshold_init`` and ``bandwidth`` ε are in the units of the
    pre-activations (the examples' data are standardised, E‖x‖² = d).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0_coeff: float,
        threshold_init: float = 0.1,
        bandwidth: float = 0.05,
        seed: int = 0,
    ) -> None:
        if not (threshold_init > 0 and bandwidth > 0):
            raise ValueError(f"threshold_init and bandwidth must be > 0, got {threshold_init}, {bandwidth}")
        super().__init__(d_in, d_sae, seed=seed)
        self.l0_coeff, self.bandwidth = l0_coeff, bandwidth
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(threshold_init)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return jump_relu(self.pre_acts(x), self.threshold, self.bandwidth)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.pre_acts(x)
        theta = self.threshold
        z = jump_relu(p, theta, self.bandwidth)
        mse = (x - self.decode(z)).pow(2).sum(-1).mean()
        l0 = step(p, theta, self.bandwidth).sum(-1).mean()
        return z, mse + self.l0_coeff * l0, mse

    @torch.no_grad()
    def after_step(self) -> None:
        self.W_dec.copy_(F.normalize(self.W_dec, dim=1))


class TopKSAE(_LinearSAE):
    """TopK SAE: the ``k`` largest pre-activations, then ReLU; unit-norm decoder rows; auxiliary loss.

    ``aux_coeff`` α_aux (Gao et al.'s 1/32; 0 turns the auxiliary loss off),
    ``aux_k`` the dead latents used for it (default d_in/2, at least 1),
    ``dead_steps`` the batches without firing after which a latent is dead.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        k: int,
        aux_coeff: float = 1 / 32,
        aux_k: int | None = None,
        dead_steps: int = 100,
        seed: int = 0,
    ) -> None:
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must lie in [1, d_sae={d_sae}], got {k}")
        super().__init__(d_in, d_sae, seed=seed)
        self.k, self.aux_coeff, self.dead_steps = k, aux_coeff, dead_steps
        self.aux_k = max(1, d_in // 2) if aux_k is None else aux_k
        self.register_buffer("steps_since_fired", torch.zeros(d_sae, dtype=torch.long))

    def _topk(self, p: torch.Tensor, k: int) -> torch.Tensor:
        values, indices = p.topk(k, dim=-1)
        return torch.zeros_like(p).scatter(-1, indices, F.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._topk(self.pre_acts(x), self.k)

    def dead(self) -> torch.Tensor:
        """Mask of the latents that have not fired for ``dead_steps`` training batches."""
        return self.steps_since_fired >= self.dead_steps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.pre_acts(x)
        z = self._topk(p, self.k)
        x_hat = self.decode(z)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        loss = mse
        if self.training:
            with torch.no_grad():
                fired = (z > 0).any(0)
                self.steps_since_fired.add_(1).masked_fill_(fired, 0)
            dead = self.dead()
            n_dead = int(dead.sum())
            if self.aux_coeff > 0 and n_dead > 0:
                # The residual, reconstructed from the dead latents alone (no decoder bias).
                e = (x - x_hat).detach()
                z_aux = self._topk(p.masked_fill(~dead, -math.inf), min(self.aux_k, n_dead))
                aux = (e - z_aux @ self.W_dec).pow(2).sum(-1).mean()
                loss = loss + self.aux_coeff * aux
        return z, loss, mse

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
