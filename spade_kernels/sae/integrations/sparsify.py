"""SpaDE for EleutherAI's sparsify (PyPI ``eai-sparsify`` 1.3.x, imported as ``sparsify``).

sparsify's ``Trainer`` (alias ``SaeTrainer``) builds its sparse coders itself,
as ``sparsify.trainer.SparseCoder(d_in, cfg.sae, device, dtype=float32)``,
and asserts ``isinstance(sae, SparseCoder)`` when it checkpoints.  This
module provides:

- :class:`SpaDECoderConfig`, a ``SparseCoderConfig`` with SpaDE's settings;
- :class:`SpaDESparseCoder`, a ``SparseCoder`` subclass that runs the
  :class:`spade_kernels.SpaDE` layer (``coder.spade``) on this package's
  kernels and speaks sparsify's interface (``forward(x, y, dead_mask=...,
  total_variance=...)`` → ``ForwardOutput`` fields, ``encode``, ``decode``,
  ``save_to_disk``, ``load_from_disk``);
- :class:`SpaDETrainer`, sparsify's ``Trainer`` building
  :class:`SpaDESparseCoder` instead of ``SparseCoder`` (the class is swapped
  only while ``Trainer.__init__`` runs; everything else is sparsify's own
  loop, optimizers, schedules, logging, checkpoints and resuming); sparsify's
  plain ``Trainer`` (or ``SparseCoder``) given a :class:`SpaDECoderConfig`
  raises, instead of building TopK coders from it;
- :func:`load_spade`, which reads a checkpoint the trainer wrote back as a
  plain :class:`spade_kernels.SpaDE`::

    from sparsify import TrainConfig
    from spade_kernels.sae.integrations.sparsify import SpaDECoderConfig, SpaDETrainer, load_spade

    cfg = TrainConfig(SpaDECoderConfig(num_latents=16384, gamma_reg=0.1), batch_size=8,
                      layers=[6], save_dir="runs", run_name="spade")   # sparsify's signum optimizer
    SpaDETrainer(cfg, tokenized_dataset, model).fit()
    layer = load_spade("runs/spade/layers.6")        # a spade_kernels.SpaDE

What the adapter does with sparsify's fixed pieces:

- **b_dec.**  The trainer sets ``b_dec`` to the mean of the first batch's
  activations (before the first step, unless ``finetune``), as an origin for
  its own SAEs, whose encoder reads ``x − b_dec``.  The SpaDE coder uses it
  the same way: it runs the SpaDE layer on ``x − b_dec`` and adds ``b_dec``
  back, z = sparsemax(−λ·‖x − b_dec − a_k‖²), x̂ = z·W_dec + b_dec.  Because
  SpaDE's codes sum to 1, this is exactly the paper's bias-free SpaDE with
  prototypes a_k + b_dec and decoder rows W_dec[k] + b_dec (every distance,
  code, reconstruction and regulariser value the same): ``b_dec`` is a
  learnable common origin of the prototypes and decoder rows, and
  :meth:`SpaDESparseCoder.to_spade` / :func:`load_spade` fold it in that way.
- **Loss.**  The trainer backpropagates ``fvu + auxk_alpha·auxk_loss +
  multi_topk_fvu/8``.  The coder's ``fvu`` has the value of sparsify's FVU,
  Σ‖y − x̂‖² / Σ‖y − ȳ‖² (so sparsify's logs, ``save_best`` and comparisons
  with its other SAEs stay in FVU) but the gradient of SpaDE's objective in
  that normalisation, (Σ_b ‖y_b − x̂_b‖² + γ·Σ_b Σ_k z[b,k]·D[b,k]) /
  Σ‖y − ȳ‖²: the SpaDE loss ``mse + γ·reg`` divided by the batch's variance
  per row, D the squared distances to the prototypes or decoder rows
  (``reg_on``).  The objective's value is the output's extra field ``loss``,
  the regulariser ``mean_b Σ_k z·D`` its field ``reg``.  ``auxk_loss`` and
  ``multi_topk_fvu`` are 0: AuxK (``auxk_alpha > 0``) and Multi-TopK are
  refused, as both rank the dense B×K pre-activations by top-k, which SpaDE's
  kernels never form and which sparsemax codes have no use for.  Nothing
  revives dead latents during training (the regulariser has no gradient for
  a latent without codes); the data init puts every prototype on the data.
- **Codes.**  ``latent_acts``/``latent_indices`` are the sparse codes padded
  to the batch's largest support C (SpaDE's support varies per row; sparsify's
  ``k`` is ignored, and the trainer's rewrites of it are harmless).  A padding
  slot holds activation 0 and the index of the row's largest code — a
  latent that fired in that row, never SparseCodes' padding latent 0 —
  because the trainer marks every listed index as fired
  (``did_fire[latent_indices] = True``): its dead-latent counts
  (``num_tokens_since_fired``, ``dead_pct``) are those of the true supports.
  (A row whose input holds NaN has no support; its slots are NaN and name
  latent 0.)
- **Initialisation.**  ``init="data"`` (default): at the first forward in
  training mode — the trainer's first batch, after it has set ``b_dec`` —
  the prototypes and decoder rows are set to distinct rows of ``x − b_dec``
  (when the batch has fewer distinct rows than latents, the extra rows are
  repeats with Gaussian noise of 10% of the data's per-coordinate RMS, since
  identical prototypes would stay identical), and λ to ``lambda_init`` or, by
  default, 1/(2·mean_b ‖x_b − b_dec‖²): the paper's λ = 1/(2d) for data with
  E‖x‖² = d, whatever the scale of the activations.  ``init="normal"``: the
  paper's N(0, 1) prototypes (W_dec = prototypes), scaled at that first
  forward to the data (× the per-coordinate RMS), with λ as for ``"data"``.
  ``init="none"``: the layer's construction-time init as it is (λ =
  ``lambda_init`` or 1/(2d)).  The coder's ``initialised`` buffer records
  that this happened and is saved, so resuming does not repeat it.  Under
  DDP (``SpaDETrainer`` with ``torch.distributed`` initialised and
  ``distribute_modules=False``) rank 0's initialisation is broadcast.
- **Decoder norms.**  SpaDE's decoder rows are not unit-norm (x̂ is a
  convex combination of them), so ``normalize_decoder`` must be False (the
  default here); ``transcode``, ``skip_connection`` and ``multi_topk`` are
  refused, and so is ``activation="groupmax"``.
- **Losses of the whole model** (``loss_fn="ce"``/``"kl"``): the trainer
  backpropagates the model's loss through the coder's output, so SpaDE's
  regulariser cannot enter; these need ``gamma_reg=0`` (end-to-end SpaDE).
- **Checkpoints.**  ``save_to_disk(path)`` (what the trainer calls) writes
  sparsify's two files: ``sae.safetensors`` with the coder's state
  (``prototypes``, ``W_dec``, ``lambda_raw``, ``b_dec``, ``initialised``;
  what ``Trainer.load_state`` reloads when resuming, bit for bit) and
  ``cfg.json`` (the config, ``d_in`` and ``"architecture":
  "spade-sparsify"``).  :func:`load_spade` turns it into a bias-free
  ``SpaDE`` (b_dec folded in as above; ``save_pretrained`` then gives the
  layer's own format).  ``sparsify.SparseCoder.load_from_disk`` cannot read
  these (it builds a TopK coder); use :meth:`SpaDESparseCoder.load_from_disk`.
- **Mixed precision.**  As sparsify's ``SparseCoder.forward``, the forward
  runs in CUDA bfloat16 autocast where the GPU supports it; the SpaDE layer's
  autocast policy applies (docs/design.md, "Mixed precision"), on the CPU too
  when the caller opens a ``torch.autocast`` region.
- **Optimizers.**  sparsify's three work (``"signum"``, the default,
  ``"adam"``, ``"muon"``: Muon takes the prototypes and decoder, Adam λ and
  ``b_dec``); the learning rates are sparsify's, which assume activations of
  a language model's usual scale.  schedulefree 1.4's ``ScheduleFreeWrapper``
  (around ``"signum"``) swaps tensors through byte views, which fails on 0-d
  tensors such as λ's raw parameter; :class:`SpaDETrainer` gives the wrapper
  it built a swap that works for any shape.  With ``"signum"`` the weights in
  memory during training are the schedule-free train-mode interpolation; the
  trainer's checkpoints switch to the averaged weights (``optimizer.eval()``)
  to save.  Call ``opt.eval()`` for each of ``trainer.optimizers`` before
  using ``trainer.saes`` directly (its ``eval()``/``train()`` round trip
  itself perturbs the weights by float32 rounding).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from schedulefree import ScheduleFreeWrapper
from sparsify import trainer as _sparsify_trainer
from sparsify.config import SparseCoderConfig, TrainConfig
from sparsify.fused_encoder import EncoderOutput
from sparsify.sparse_coder import SparseCoder
from sparsify.trainer import Trainer
from torch import Tensor, nn

from spade_kernels import SparseCodes
from spade_kernels.backends import check_backend_name
from spade_kernels.files import atomic_write, read_json
from spade_kernels.layer import SpaDE

__all__ = [
    "ARCHITECTURE",
    "SpaDECoderConfig",
    "SpaDEForwardOutput",
    "SpaDESparseCoder",
    "SpaDETrainer",
    "load_spade",
    "padded_codes",
]

#: The ``architecture`` entry of the ``cfg.json`` a :class:`SpaDESparseCoder` writes.
ARCHITECTURE = "spade-sparsify"
_WEIGHTS = "sae.safetensors"
_CONFIG = "cfg.json"
_INITS = ("data", "normal", "none")
#: Noise on repeated data rows at ``init="data"``, relative to the data's per-coordinate RMS.
_REPEAT_JITTER = 0.1
_PREFIX = "spade."
# sparsify's SparseCoder.forward runs in bf16 autocast on GPUs that support it; so does this one.
_CUDA_BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class SpaDECoderConfig(SparseCoderConfig):
    """sparsify's ``SparseCoderConfig`` for a SpaDE coder.

    The width is sparsify's: ``num_latents``, or ``expansion_factor`` × d_in
    when it is 0.  ``k`` and ``activation`` are not used (SpaDE's support
    size adapts per row); ``normalize_decoder``, ``multi_topk``,
    ``skip_connection`` and ``transcode`` must stay False.

    Parameters
    ----------
    gamma_reg : float
        γ of SpaDE's distance-weighted regulariser (default 0.1).
    lambda_init : float, optional
        λ at initialisation; None (default) matches it to the data at the
        first training batch for ``init="data"``/``"normal"`` (1/(2·mean
        ‖x − b_dec‖²)) and is 1/(2·d_in) for ``init="none"``.
    reg_on : {"encoder", "decoder"}
        Distances of the regulariser: to the prototypes (paper) or to the
        decoder rows.
    backend : str
        Encoder backend (:func:`spade_kernels.available_backends`).
    init : {"data", "normal", "none"}
        Initialisation (see the module docstring).
    """

    normalize_decoder: bool = False
    gamma_reg: float = 0.1
    lambda_init: float | None = None
    reg_on: str = "encoder"
    backend: str = "auto"
    init: str = "data"

    def __post_init__(self) -> None:
        for name in ("normalize_decoder", "multi_topk", "skip_connection", "transcode"):
            if getattr(self, name):
                raise ValueError(f"SpaDECoderConfig: {name}=True is not supported ({_REFUSED[name]})")
        if self.activation != "topk":
            raise ValueError(
                f"SpaDECoderConfig: activation={self.activation!r} is not supported: SpaDE's codes are "
                "sparsemax(−λ·‖x − a_k‖²); leave activation at its default 'topk' (unused)"
            )
        for name in ("num_latents", "expansion_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SpaDECoderConfig: {name} must be an int >= 0, got {value!r}")
        if self.num_latents == 0 and self.expansion_factor == 0:
            raise ValueError("SpaDECoderConfig: set num_latents or expansion_factor (both are 0)")
        if self.init not in _INITS:
            raise ValueError(f"SpaDECoderConfig: init must be one of {_INITS}, got {self.init!r}")
        settings = SpaDE.validate_settings(
            1,
            lambda_init=self.lambda_init,
            gamma_reg=self.gamma_reg,
            reg_on=self.reg_on,
            backend=self.backend,
        )
        if self.lambda_init is not None:
            self.lambda_init = settings["lambda_init"]
        self.gamma_reg, self.reg_on, self.backend = (
            settings["gamma_reg"],
            settings["reg_on"],
            settings["backend"],
        )


_REFUSED = {
    "normalize_decoder": "x̂ is a convex combination of SpaDE's decoder rows, which must keep their norms",
    "multi_topk": "it re-ranks dense pre-activations by top-k; SpaDE's support is sparsemax's",
    "skip_connection": "a SpaDE has no linear skip path",
    "transcode": "the SpaDE coder is an autoencoder of one activation",
}


class SpaDEForwardOutput(NamedTuple):
    """What :meth:`SpaDESparseCoder.forward` returns: sparsify's ``ForwardOutput`` fields, then ``reg`` and ``loss``.

    ``fvu`` has the FVU's value and the gradient of ``loss`` (see the module
    docstring); ``auxk_loss`` and ``multi_topk_fvu`` are 0.
    """

    sae_out: Tensor
    latent_acts: Tensor
    latent_indices: Tensor
    fvu: Tensor
    auxk_loss: Tensor
    multi_topk_fvu: Tensor
    reg: Tensor
    """mean_b Σ_k z[b,k]·D[b,k], the SpaDE regulariser without γ."""
    loss: Tensor
    """(Σ‖y − x̂‖² + γ·Σ_b Σ_k z·D) / total_variance: what the backward of ``fvu`` differentiates."""


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def padded_codes(codes: SparseCodes) -> tuple[Tensor, Tensor]:
    """``(acts, indices)`` of ``codes`` in sparsify's layout, padding naming no latent that did not fire.

    Slots past a row's support keep activation 0 (NaN in a NaN row) and take
    the index of the row's first slot, its largest code, instead of
    :class:`~spade_kernels.SparseCodes`' padding index 0.
    """
    slots = torch.arange(codes.width, device=codes.indices.device)
    in_support = slots < codes.support_size.unsqueeze(-1)
    indices = torch.where(in_support, codes.indices, codes.indices[..., :1])
    return codes.values, indices


def _strip_prefix(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + key[len(prefix + _PREFIX) :]] = state_dict.pop(key)


def _add_prefix(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    for name in ("prototypes", "W_dec", "lambda_raw"):
        if prefix + name in state_dict:
            state_dict[prefix + _PREFIX + name] = state_dict.pop(prefix + name)


class SpaDESparseCoder(SparseCoder):
    """A SpaDE layer as a sparsify ``SparseCoder``: z = sparsemax(−λ·‖x − b_dec − a_k‖²), x̂ = z·W_dec + b_dec.

    Parameters
    ----------
    d_in : int
        Activation dimension.
    cfg : SpaDECoderConfig
        The coder's settings (the trainer passes ``TrainConfig.sae``).
    device, dtype
        Parameter placement (λ's raw parameter stays at least float32).
    decoder : bool
        Must be True (sparsify's encoder-only loading has no SpaDE meaning).

    Attributes
    ----------
    spade : spade_kernels.SpaDE
        The bias-free layer on ``x − b_dec``; its prototypes, W_dec and λ are
        this coder's parameters, with ``b_dec`` (state dict keys
        ``prototypes``, ``W_dec``, ``lambda_raw``, ``b_dec``).
    initialised : Tensor
        A bool buffer: whether the data-dependent init has run.
    """

    def __init__(
        self,
        d_in: int,
        cfg: SpaDECoderConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        decoder: bool = True,
    ) -> None:
        if not isinstance(cfg, SpaDECoderConfig):
            raise TypeError(f"cfg must be a SpaDECoderConfig, got {type(cfg).__name__}")
        if not decoder:
            raise ValueError("SpaDESparseCoder needs its decoder (decoder=False is not supported)")
        # SparseCoder.__init__ would allocate a linear encoder and a decoder of its own: only nn.Module's runs.
        nn.Module.__init__(self)
        self.cfg = cfg
        self.d_in = d_in
        self.num_latents = cfg.num_latents or d_in * cfg.expansion_factor
        self.spade = SpaDE(
            d_in,
            self.num_latents,
            lambda_init=cfg.lambda_init,
            gamma_reg=cfg.gamma_reg,
            reg_on=cfg.reg_on,
            backend=cfg.backend,
            device=device,
            dtype=dtype,
        )
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=self.spade.prototypes.dtype))
        self.W_skip = None
        self.register_buffer("initialised", torch.tensor(cfg.init == "none", device=device))
        # A seed for the data-dependent init, drawn now so that sparsify's torch.manual_seed(seed)
        # before each coder's construction (TrainConfig.init_seeds) decides it.
        self._init_seed = int(torch.randint(2**62, ()).item())
        self._broadcast_init = False
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    # -- views --------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.spade.prototypes.device

    @property
    def dtype(self) -> torch.dtype:
        return self.spade.prototypes.dtype

    @property
    def prototypes(self) -> nn.Parameter:
        """Prototypes a_k relative to ``b_dec``, shape (num_latents, d_in)."""
        return self.spade.prototypes

    @property
    def W_dec(self) -> nn.Parameter:
        """Decoder rows relative to ``b_dec``, shape (num_latents, d_in)."""
        return self.spade.W_dec

    @property
    def lam(self) -> Tensor:
        """λ = softplus(lambda_raw)."""
        return self.spade.lam

    @property
    def backend(self) -> str:
        """The layer's encoder backend (settable)."""
        return self.spade.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.spade.backend = check_backend_name(name)
        self.cfg.backend = self.spade.backend

    def set_decoder_norm_to_unit_norm(self) -> None:
        raise NotImplementedError(f"normalize_decoder: {_REFUSED['normalize_decoder']}")

    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        raise NotImplementedError(f"normalize_decoder: {_REFUSED['normalize_decoder']}")

    # -- initialisation -----------------------------------------------------

    @torch.no_grad()
    def initialise_from(self, x: Tensor) -> None:
        """Run the data-dependent init (``cfg.init``) on activations ``x`` (N, d_in) and mark it done.

        The first forward in training mode calls this; call it yourself to
        initialise from data of your choice (set ``b_dec`` first).
        """
        centered = (x.reshape(-1, self.d_in) - self.b_dec).to(self.dtype)
        if centered.shape[0] == 0:
            raise ValueError("cannot initialise a SpaDE coder from an empty batch")
        m = float(centered.double().pow(2).sum(-1).mean())
        if not (math.isfinite(m) and m > 0):
            raise ValueError(
                f"cannot initialise a SpaDE coder from this batch: mean ‖x − b_dec‖² = {m!r} (it must be finite and > 0)"
            )
        rms = math.sqrt(m / self.d_in)
        gen = torch.Generator(device="cpu").manual_seed(self._init_seed)
        if self.cfg.init == "data":
            rows = torch.unique(centered, dim=0)
            rows = rows[torch.randperm(rows.shape[0], generator=gen).to(rows.device)]
            K, n = self.num_latents, rows.shape[0]
            if n < K:
                extra = rows[torch.randint(n, (K - n,), generator=gen).to(rows.device)]
                noise = torch.randn(extra.shape, generator=gen, dtype=torch.float64)
                extra = extra + (_REPEAT_JITTER * rms * noise).to(extra)
                rows = torch.cat([rows, extra])
            self.spade.prototypes.copy_(rows[:K])
            self.spade.W_dec.copy_(rows[:K])
        elif self.cfg.init == "normal":
            self.spade.prototypes.mul_(rms)
            self.spade.W_dec.mul_(rms)
        if self.cfg.init != "none":
            lam = self.cfg.lambda_init if self.cfg.lambda_init is not None else 1.0 / (2.0 * m)
            lam = SpaDE.validate_settings(self.d_in, lambda_init=lam)["lambda_init"]
            self.spade.lambda_raw.fill_(_inverse_softplus(lam))
            self.spade.lambda_init = lam
        if self._broadcast_init and dist.is_available() and dist.is_initialized():
            for t in (self.spade.prototypes, self.spade.W_dec, self.spade.lambda_raw):
                dist.broadcast(t.data, src=0)
        self.initialised.fill_(True)

    # -- sparsify's interface -----------------------------------------------

    def encode(self, x: Tensor, *, pre_acts: bool = False) -> EncoderOutput:
        """``EncoderOutput(top_acts, top_indices, pre_acts)`` of ``x`` (..., d_in).

        ``top_acts``/``top_indices`` (..., C): the codes padded as in
        :func:`padded_codes`.  ``pre_acts`` is None unless asked for, then the
        dense scores −λ·‖x − b_dec − a_k‖² (..., num_latents), a B×K tensor
        the sparse path never forms.
        """
        centered = x - self.b_dec
        acts, indices = padded_codes(self.spade.encode_sparse(centered))
        return EncoderOutput(acts, indices, self.spade.scores(centered) if pre_acts else None)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """x̂ = Σ_slots top_acts·W_dec[top_indices] + b_dec, shape (..., d_in) (a sparse gather-matmul)."""
        if top_acts.shape != top_indices.shape:
            raise ValueError(
                f"top_acts {tuple(top_acts.shape)} and top_indices {tuple(top_indices.shape)} must have one shape"
            )
        width = top_acts.shape[-1]
        codes = SparseCodes(
            top_indices.long(),
            top_acts.to(self.dtype),
            torch.full(top_acts.shape[:-1], width, dtype=torch.int64, device=top_acts.device),
            self.num_latents,
        )
        return self.spade.decode(codes) + self.b_dec

    @torch.autocast("cuda", dtype=torch.bfloat16, enabled=_CUDA_BF16)
    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        dead_mask: Tensor | None = None,
        total_variance: Tensor | None = None,
    ) -> SpaDEForwardOutput:
        """Encode, decode and score rows ``x`` (N, d_in) against targets ``y`` (default ``x``).

        ``total_variance`` is the denominator of the FVU (default Σ‖y − ȳ‖²
        over these rows; the trainer passes that of the whole batch when it
        splits it into micro-batches).  ``dead_mask`` (AuxK) is refused.
        """
        if dead_mask is not None:
            raise ValueError(
                "SpaDESparseCoder does not implement AuxK (auxk_alpha > 0): it ranks the dense pre-activations "
                "of dead latents by top-k, which SpaDE's kernels never form; train with auxk_alpha=0"
            )
        if x.dim() != 2:
            raise ValueError(f"x must be rows (N, {self.d_in}), got shape {tuple(x.shape)}")
        if y is None:
            y = x
        elif y.shape != x.shape:
            raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
        if self.training and torch.is_grad_enabled() and not bool(self.initialised):
            self.initialise_from(x)
        out = self.spade(x - self.b_dec)
        sae_out = out.x_hat + self.b_dec
        if total_variance is None:
            total_variance = (y - y.mean(0)).pow(2).sum()
        fvu = (y - sae_out).pow(2).sum() / total_variance
        # γ·Σ_b Σ_k z·D in the FVU's normalisation; it reaches the gradient of ``fvu``, not its value.
        reg = self.spade.gamma_reg * out.reg * x.shape[0] / total_variance
        acts, indices = padded_codes(out.codes)
        zero = sae_out.new_zeros(())
        return SpaDEForwardOutput(
            sae_out, acts, indices, fvu + (reg - reg.detach()), zero, zero, out.reg, fvu + reg
        )

    # -- conversions and checkpoints -------------------------------------------

    @torch.no_grad()
    def to_spade(self, *, backend: str | None = None) -> SpaDE:
        """A new bias-free :class:`spade_kernels.SpaDE` computing this coder's codes and x̂.

        prototypes = a_k + b_dec, W_dec = W_dec + b_dec (the codes sum to 1),
        λ and γ the same; the distances, hence the regulariser, are those of
        the coder for either ``reg_on``.
        """
        s = self.spade
        layer = SpaDE(
            self.d_in, self.num_latents, lambda_init=s.lambda_init, gamma_reg=s.gamma_reg, reg_on=s.reg_on,
            backend=s.backend if backend is None else backend, device=self.device, dtype=self.dtype,
        )  # fmt: skip
        layer.prototypes.copy_(s.prototypes + self.b_dec)
        layer.W_dec.copy_(s.W_dec + self.b_dec)
        layer.lambda_raw.copy_(s.lambda_raw)
        return layer

    @classmethod
    @torch.no_grad()
    def from_spade(cls, layer: SpaDE, cfg: SpaDECoderConfig | None = None) -> SpaDESparseCoder:
        """A coder computing ``layer``'s codes and x̂ (weights copied; b_dec = 0; a layer bias folded into W_dec).

        ``cfg`` defaults to the layer's settings with ``init="none"``; its
        width must match.  To fine-tune it with :class:`SpaDETrainer`, set
        ``TrainConfig.finetune`` so that the trainer keeps ``b_dec``.
        """
        if not isinstance(layer, SpaDE):
            raise TypeError(f"layer must be a spade_kernels.SpaDE, got {type(layer).__name__}")
        if cfg is None:
            cfg = SpaDECoderConfig(
                num_latents=layer.d_sae, gamma_reg=layer.gamma_reg, lambda_init=layer.lambda_init,
                reg_on=layer.reg_on, backend=layer.backend, init="none",
            )  # fmt: skip
        coder = cls(layer.d_in, cfg, layer.prototypes.device, layer.prototypes.dtype)
        if coder.num_latents != layer.d_sae:
            raise ValueError(f"cfg gives {coder.num_latents} latents but the layer has {layer.d_sae}")
        coder.spade.prototypes.copy_(layer.prototypes)
        coder.spade.W_dec.copy_(layer.W_dec if layer.b_dec is None else layer.W_dec + layer.b_dec)
        coder.spade.lambda_raw.copy_(layer.lambda_raw)
        coder.spade.lambda_init = layer.lambda_init
        coder.initialised.fill_(True)
        return coder

    def save_to_disk(self, path: Path | str) -> None:
        """Write ``sae.safetensors`` (the state dict) and ``cfg.json`` into directory ``path``, each atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(path / _WEIGHTS, lambda tmp: save_file(tensors, tmp))
        # λ's initial value as the layer has it: with init="data" it was chosen from the data.
        record = {**self.cfg.to_dict(), "lambda_init": self.spade.lambda_init}
        text = json.dumps({**record, "d_in": self.d_in, "architecture": ARCHITECTURE}, indent=2)

        def write_cfg(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(path / _CONFIG, write_cfg)

    @classmethod
    def load_from_disk(
        cls, path: Path | str, device: str | torch.device = "cpu", *, decoder: bool = True
    ) -> SpaDESparseCoder:
        """Load a directory written by :meth:`save_to_disk` (the trainer's checkpoints: ``<save_dir>/<run>/<hookpoint>``)."""
        path = Path(path)
        cfg_path = path / _CONFIG
        if not cfg_path.exists():
            raise FileNotFoundError(f"no {_CONFIG} in {os.fspath(path)!r}")
        raw = read_json(cfg_path)
        if not isinstance(raw, dict) or raw.get("architecture") != ARCHITECTURE:
            found = raw.get("architecture") if isinstance(raw, dict) else None
            raise ValueError(
                f"{cfg_path} does not describe a SpaDE coder of sparsify (architecture {found!r}, expected "
                f"{ARCHITECTURE!r}); a spade_kernels.SpaDE directory loads with SpaDE.from_pretrained"
            )
        raw = dict(raw)
        raw.pop("architecture")
        d_in = raw.pop("d_in", None)
        if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
            raise ValueError(f"{cfg_path}: 'd_in' must be a positive integer, got {d_in!r}")
        try:
            cfg = SpaDECoderConfig.from_dict(raw, drop_extra_fields=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{cfg_path}: {exc}") from None
        weights = path / _WEIGHTS
        if not weights.exists():
            raise FileNotFoundError(f"no {_WEIGHTS} in {os.fspath(path)!r}")
        state = load_file(os.fspath(weights), device=str(device))
        if "prototypes" not in state:
            raise ValueError(f"{weights} holds no 'prototypes' (holds {sorted(state)})")
        coder = cls(d_in, cfg, device=device, dtype=state["prototypes"].dtype, decoder=decoder)
        try:
            coder.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{weights} does not fit {cfg_path}: {exc}") from None
        return coder


def load_spade(
    path: Path | str, *, device: str | torch.device = "cpu", dtype=None, backend: str = "auto"
) -> SpaDE:
    """The :class:`spade_kernels.SpaDE` of a checkpoint written by :class:`SpaDETrainer` (or ``save_to_disk``).

    ``path`` is a coder's directory (``<save_dir>/<run_name>/<hookpoint>``);
    b_dec is folded in (:meth:`SpaDESparseCoder.to_spade`), so the layer has
    no bias and gives the coder's codes and reconstruction.
    """
    layer = SpaDESparseCoder.load_from_disk(path, device=device).to_spade(backend=check_backend_name(backend))
    return layer if dtype is None else layer.to(dtype)


def _refuse_spade_config_in_a_plain_coder(cls, *args, **kwargs):
    """``SparseCoder.__new__``: a plain ``SparseCoder`` built from a :class:`SpaDECoderConfig` is refused.

    sparsify's own ``Trainer`` builds ``SparseCoder(d_in, cfg.sae, …)``; given
    a SpaDE config it would silently train TopK coders.  Subclasses (this
    module's coder) are built as usual.
    """
    cfg = args[1] if len(args) > 1 else kwargs.get("cfg")
    if cls is SparseCoder and isinstance(cfg, SpaDECoderConfig):
        raise TypeError(
            "a SpaDECoderConfig given to sparsify's own SparseCoder (or Trainer) would build a TopK coder; "
            "train with spade_kernels.sae.integrations.sparsify.SpaDETrainer, or build SpaDESparseCoder"
        )
    return object.__new__(cls)


if SparseCoder.__new__ is object.__new__:  # once, however often this module is imported
    SparseCoder.__new__ = _refuse_spade_config_in_a_plain_coder


def _swap(x: Tensor, y: Tensor) -> None:
    """Exchange the contents of two tensors of one shape in place (``ScheduleFreeWrapper.swap`` for any dim)."""
    a, b = x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)
    a.bitwise_xor_(b)
    b.bitwise_xor_(a)
    a.bitwise_xor_(b)


class SpaDETrainer(Trainer):
    """sparsify's ``Trainer`` training :class:`SpaDESparseCoder` coders.

    ``cfg.sae`` must be a :class:`SpaDECoderConfig`.  While
    ``Trainer.__init__`` runs, ``sparsify.trainer.SparseCoder`` is this
    module's coder (the trainer builds its coders through that name); the
    rest is sparsify's own trainer.  Refused: ``auxk_alpha > 0`` (AuxK), and
    ``loss_fn="ce"``/``"kl"`` with ``gamma_reg > 0`` (the regulariser cannot
    enter the model's loss).
    """

    def __init__(self, cfg: TrainConfig, dataset, model) -> None:
        if not isinstance(cfg.sae, SpaDECoderConfig):
            raise TypeError(f"cfg.sae must be a SpaDECoderConfig, got {type(cfg.sae).__name__}")
        if cfg.auxk_alpha != 0:
            raise ValueError(
                f"auxk_alpha={cfg.auxk_alpha!r}: AuxK is not implemented for SpaDE (it ranks the dense "
                "pre-activations of dead latents by top-k, which SpaDE's kernels never form); use auxk_alpha=0"
            )
        if cfg.loss_fn in ("ce", "kl") and cfg.sae.gamma_reg != 0:
            raise ValueError(
                f"loss_fn={cfg.loss_fn!r} backpropagates the model's loss through the coder's output only, so "
                f"SpaDE's regulariser (gamma_reg={cfg.sae.gamma_reg}) cannot enter it; set gamma_reg=0 for "
                "end-to-end SpaDE"
            )
        builder = _sparsify_trainer.SparseCoder
        _sparsify_trainer.SparseCoder = SpaDESparseCoder
        try:
            super().__init__(cfg, dataset, model)
        finally:
            _sparsify_trainer.SparseCoder = builder
        for opt in self.optimizers:
            if isinstance(opt, ScheduleFreeWrapper):
                # Its swap views each parameter as bytes, which fails on 0-d tensors (λ's raw parameter).
                opt.swap = _swap

    def fit(self) -> None:
        """sparsify's ``Trainer.fit``; under DDP, rank 0's data-dependent init is broadcast to the other ranks."""
        ddp = dist.is_available() and dist.is_initialized() and not self.cfg.distribute_modules
        for sae in self.saes.values():
            sae._broadcast_init = ddp
        super().fit()
