"""The paper's baseline SAEs as its authors wrote them: ReLU, TopK and JumpReLU.

Reimplemented here from a reading of the authors' repository
(Sai-Sumedh/SaeConceptDuality-SpaDE at 53e30e6: ``models.py``,
``functions/train_test.py``, ``functions/utils.py``, the experiments'
``trainmodel.py``, ``settings.txt`` and hyper-parameter CSVs); no code is
copied.  What they share (λ = 1/(2d) fixed, d the input dimension):

* initialisation: encoder rows W_e ~ N(0, 1) (unscaled), decoder rows equal
  to them (their ``Ad = Aeᵀ``), biases 0; no data initialisation;
* the decoder is normalised inside every forward pass, each row divided by
  1e-6 + its norm (the stored parameter is never renormalised); x̂ = z·Ŵ_d + b_d;
* loss = Σ_dims (x − x̂)² averaged over the batch, plus the model's penalty.

The models:

* :class:`AuthorsReLUSAE`: z = ReLU(λ·(W_e(x − b_d) + b_e)); penalty γ·mean Σ_k |z_k|
  (plain L1 on the codes).
* :class:`AuthorsTopKSAE`: z = λ·TopK_k(ReLU(W_e(x − b_d))) — no encoder bias,
  λ applied after the selection; auxiliary loss of weight 1 (their CSV's
  ``topk_relu,1.0,k``): e = x − x̂ (*not* detached), ê = TopK_{aux_k}(λ·ReLU(W_e(x − b_d))
  on the dead latents)·Ŵ_d + b_d with aux_k = k (at most the number dead), loss
  term mean Σ (e − ê)²; a latent is dead after 20 consecutive training batches
  in which it is below 1e-12 on every row.  With no dead latent ê = b_d, so the
  term is mean‖x − x̂ − b_d‖², not 0, as in their code.
* :class:`AuthorsJumpReLUSAE`: π = ReLU(λ·(W_e(x − b_d) + b_e)), z = π·H(π − θ) with
  θ = exp(log θ), θ₀ = 1e-3, bandwidth ε = 1e-3; the jump's straight-through
  threshold gradient −(θ/ε)·rect((π − θ)/ε); penalty β·mean Σ_k H(z_k − θ_k)
  on the *codes* z (so only π in (θ, θ + ε/2] move θ through it), whose
  straight-through gradient reaches θ only (−(1/ε)·rect((z − θ)/ε)), never z.

SpaDE in the authors' configuration is the package's own layer with its
defaults (prototypes ~ N(0, 1), W_dec = prototypes, λ learned from 1/(2d), no
biases, γ·Σ z·‖x − a‖² on the encoder's prototypes): see ``paper_separability.train_one``.
Each class has the interface :func:`baselines.train_sae` trains (forward → (z,
loss, mse), ``init_from_data`` — here a no-op — and ``after_step``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from baselines import jump_relu, step
from torch import nn

__all__ = ["AuthorsJumpReLUSAE", "AuthorsReLUSAE", "AuthorsTopKSAE", "config_of"]

#: Added to each decoder row's norm when it is normalised in the forward pass.
NORM_EPS = 1e-6
#: Below this on every row of a batch, a TopK latent did not fire in that batch.
DEAD_EPS = 1e-12


class _AuthorsSAE(nn.Module):
    """Parameters, initialisation and decoder shared by the authors' ReLU, TopK and JumpReLU SAEs."""

    variant = "authors"

    def __init__(self, d_in: int, d_sae: int, *, seed: int = 0, encoder_bias: bool = True) -> None:
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(d_sae, d_in, generator=gen)
        self.W_enc = nn.Parameter(W)  # (d_sae, d_in)
        self.W_dec = nn.Parameter(W.clone())  # rows: decoder directions, before normalisation
        self.b_enc = nn.Parameter(torch.zeros(d_sae)) if encoder_bias else None
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("lam", torch.tensor(1.0 / (2 * d_in)))

    def init_from_data(self, x: torch.Tensor) -> _AuthorsSAE:
        """No data initialisation in the authors' runs (``weight_init = 'random'``)."""
        del x
        return self

    def after_step(self) -> None:
        """Nothing: the decoder is normalised in the forward pass, not after steps."""

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc.T
        return pre if self.b_enc is None else pre + self.b_enc

    def decoder_rows(self) -> torch.Tensor:
        return self.W_dec / (NORM_EPS + self.W_dec.norm(dim=1, keepdim=True))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.decoder_rows() + self.b_dec

    @staticmethod
    def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return (x - x_hat).pow(2).sum(-1).mean()


class AuthorsReLUSAE(_AuthorsSAE):
    """The authors' ReLU SAE: z = ReLU(λ·(W_e(x − b_d) + b_e)), plain L1 penalty ``l1_coeff``·mean Σ|z|."""

    def __init__(self, d_in: int, d_sae: int, *, l1_coeff: float, seed: int = 0) -> None:
        super().__init__(d_in, d_sae, seed=seed)
        self.l1_coeff = l1_coeff

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.lam * self.linear(x))

    def forward(self, x: torch.Tensor):
        z = self.encode(x)
        mse = self.mse(x, self.decode(z))
        return z, mse + self.l1_coeff * z.abs().sum(-1).mean(), mse


class AuthorsTopKSAE(_AuthorsSAE):
    """The authors' TopK SAE (their ``topk_relu``) with their auxiliary loss; see the module docstring."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        k: int,
        aux_coeff: float = 1.0,
        aux_k: int | None = None,
        dead_batches: int = 20,
        seed: int = 0,
    ) -> None:
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must lie in [1, d_sae={d_sae}], got {k}")
        super().__init__(d_in, d_sae, seed=seed, encoder_bias=False)
        self.k, self.aux_coeff, self.dead_batches = k, aux_coeff, dead_batches
        self.aux_k = k if aux_k is None else aux_k
        self.register_buffer("batches_silent", torch.zeros(d_sae, dtype=torch.long))

    @staticmethod
    def _top(a: torch.Tensor, k: int) -> torch.Tensor:
        if k == 0:
            return torch.zeros_like(a)
        idx = a.topk(k, dim=-1).indices
        return a * torch.zeros_like(a).scatter(-1, idx, 1.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.lam * self._top(F.relu(self.linear(x)), self.k)

    def forward(self, x: torch.Tensor):
        a = F.relu(self.linear(x))
        z = self.lam * self._top(a, self.k)
        x_hat = self.decode(z)
        mse = self.mse(x, x_hat)
        loss = mse
        if self.training and self.aux_coeff:
            with torch.no_grad():
                silent = (z.abs() < DEAD_EPS).all(0)
                self.batches_silent.add_(1).masked_fill_(~silent, 0)
            dead = self.batches_silent >= self.dead_batches
            err = x - x_hat  # not detached: the auxiliary term trains the main path too
            aux_codes = self._top(self.lam * a * dead, min(int(dead.sum()), self.aux_k))
            aux = (err - self.decode(aux_codes)).pow(2).sum(-1).mean()
            loss = loss + self.aux_coeff * aux
        return z, loss, mse


class AuthorsJumpReLUSAE(_AuthorsSAE):
    """The authors' JumpReLU SAE: θ₀ = ε = 1e-3, L0 penalty ``l0_coeff`` (β) on the codes; see the module docstring."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0_coeff: float,
        threshold_init: float = 1e-3,
        bandwidth: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__(d_in, d_sae, seed=seed)
        self.l0_coeff, self.bandwidth, self.threshold_init = l0_coeff, bandwidth, threshold_init
        self.log_threshold = nn.Parameter(torch.full((d_sae,), float(torch.tensor(threshold_init).log())))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return jump_relu(
            F.relu(self.lam * self.linear(x)), self.log_threshold.exp(), self.bandwidth, closed=True
        )

    def forward(self, x: torch.Tensor):
        theta = self.log_threshold.exp()
        z = jump_relu(F.relu(self.lam * self.linear(x)), theta, self.bandwidth, closed=True)
        mse = self.mse(x, self.decode(z))
        l0 = step(z, theta, self.bandwidth, closed=True).sum(-1).mean()  # on the codes, as their code has it
        return z, mse + self.l0_coeff * l0, mse


def config_of(model: nn.Module) -> dict:
    """The full configuration of an authors' baseline, for the results JSON (marked ``"variant": "authors"``)."""
    cfg = {"variant": "authors", "class": type(model).__name__, "init": "encoder ~ N(0,1), decoder = encoder, biases 0",
           "lambda": float(model.lam), "decoder": f"rows normalised in the forward pass (eps {NORM_EPS})",
           "mse": "sum over dims, mean over batch"}  # fmt: skip
    if isinstance(model, AuthorsReLUSAE):
        cfg.update(
            l1_coeff=model.l1_coeff, penalty="l1_coeff * mean sum |z|", encoder="relu(lam*(W_e(x-b_d)+b_e))"
        )
    elif isinstance(model, AuthorsTopKSAE):
        cfg.update(k=model.k, aux_coeff=model.aux_coeff, aux_k="k (at most the dead count)" if model.aux_k == model.k else model.aux_k, dead_batches=model.dead_batches,
                   dead_eps=DEAD_EPS, encoder="lam*topk(relu(W_e(x-b_d))) (no encoder bias)",
                   aux="mean sum (e - (topk_aux(dead lam*relu(pre)) W + b_d))^2, e = x - x_hat not detached")  # fmt: skip
    elif isinstance(model, AuthorsJumpReLUSAE):
        cfg.update(l0_coeff=model.l0_coeff, threshold_init=model.threshold_init,
                   bandwidth=model.bandwidth, encoder="jumprelu(relu(lam*(W_e(x-b_d)+b_e)))",
                   penalty="l0_coeff * mean sum step(z - theta), straight-through to theta only")  # fmt: skip
    return cfg
