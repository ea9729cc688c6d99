"""SpaDE as a SAELens architecture named ``"spade"`` (sae-lens 6.x).

Importing this module registers an inference SAE (:class:`SpaDESAE`) and a
training SAE (:class:`SpaDETrainingSAE`) with SAELens, so that SAELens's own
machinery works on SpaDE: ``SAE.load_from_disk``, ``SAE.from_pretrained``,
``HookedSAETransformer.add_sae``, ``SAETrainer`` and
``LanguageModelSAETrainingRunner``::

    from spade_kernels.sae.integrations import sae_lens  # registers "spade"
    from sae_lens import SAE

    cfg = sae_lens.SpaDETrainingSAEConfig(d_in=768, d_sae=16384, gamma_reg=0.1)
    sae = sae_lens.SpaDETrainingSAE(cfg)

Both classes wrap a :class:`spade_kernels.SpaDE` layer (``sae.spade``); the
encoder runs on its kernels, with the backend chosen by ``cfg.backend``.

The SAELens contract, for SpaDE:

- ``hook_sae_acts_pre`` sees the scores −λ·‖x − a_k‖², ``hook_sae_acts_post``
  the codes sparsemax(scores).  Without hooks on them, ``encode``/``forward``
  and the training step take the sparse kernel path; with a hook on the scores
  they compute the scores densely, so that an edited score changes the codes.
- Training loss: SAELens's MSE, ``mean_b Σ_i (x̂ − x)²``, plus the auxiliary
  loss ``dist_weighted_l1 = γ·mean_b Σ_k z[b,k]·D[b,k]`` with γ the
  coefficient ``"dist_weighted_l1"`` (``cfg.gamma_reg``, warm-up
  ``cfg.gamma_reg_warm_up_steps``).
- Checkpoints hold ``prototypes``, ``W_dec``, ``lambda_raw`` (λ =
  softplus(lambda_raw)) and ``b_dec`` when ``use_bias``: the same files as
  :meth:`spade_kernels.SpaDE.save_pretrained`.  SAELens's loader casts every
  tensor to the config dtype, so a bfloat16 checkpoint rounds λ by up to ~1.6%
  (d=768); save in float32 to keep it exact.
- SpaDE is not scale-homogeneous.  Folding an activation scaling factor s (the
  SAE was trained on s·x) sets prototypes → prototypes/s, W_dec → W_dec/s,
  b_dec → b_dec/s and λ → λ·s²; the folded SAE on x then gives the codes the
  unfolded one gives on s·x and 1/s times its reconstruction.
- Decoder-norm folding and whitening folding change SpaDE's codes, so
  ``fold_W_dec_norm`` and ``fold_activation_whitening`` raise
  ``NotImplementedError`` and a training config with
  ``normalize_activations="covariance_whitening"`` is refused.
- ``W_enc`` = 2λ·prototypesᵀ (d_in, d_sae) and ``b_enc`` = −λ·‖a_k‖² (d_sae,)
  are read-only, computed from the weights, for tools that read a linear
  encoder (SAEBench, SAELens's feature-wise metrics): the codes are
  ``sparsemax(x @ W_enc + b_enc)`` (an identity, up to rounding), see
  :attr:`SpaDESAE.W_enc`.

A fresh process must import this module before SAELens can load a SpaDE
checkpoint: without it ``SAE.load_from_disk`` / ``SAE.from_pretrained`` fail
with SAELens's bare ``KeyError: 'spade'``.  :func:`load_from_disk` imports and
loads in one call, and the ``cfg.json`` this module writes names the import
under ``"how_to_load"``.

Run as a program, this module is SAELens's training command line with
``"spade"`` registered and the default architecture (see :func:`main`)::

    python -m spade_kernels.sae.integrations.sae_lens --help
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from typing_extensions import override

import spade_kernels as sk
from spade_kernels import SparseCodes
from spade_kernels.layer import SpaDE

from ._wrapped import WrappedSpaDE

__all__ = [
    "ARCHITECTURE",
    "IMPORT_LINE",
    "SpaDESAE",
    "SpaDESAEConfig",
    "SpaDETrainingSAE",
    "SpaDETrainingSAEConfig",
    "load_from_disk",
    "main",
    "parse_args",
    "register",
]

ARCHITECTURE = "spade"
#: The import that registers ``"spade"`` with SAELens; without it, SAELens's
#: loaders fail on a SpaDE checkpoint with ``KeyError: 'spade'``.
IMPORT_LINE = "import spade_kernels.sae.integrations.sae_lens"
#: Key of the ``cfg.json`` entry that says how to load the checkpoint (SAELens
#: ignores keys that are not config fields, so it reads such files unchanged).
HOW_TO_LOAD_KEY = "how_to_load"
HOW_TO_LOAD = (
    f"{IMPORT_LINE}  # registers the SAELens architecture {ARCHITECTURE!r}; without it "
    f"SAE.load_from_disk / SAE.from_pretrained raise KeyError: {ARCHITECTURE!r}"
)
#: Name of the regulariser's coefficient (``get_coefficients``) and, with
#: ``_loss`` appended, of its entry in ``TrainStepOutput.losses``.
REG_COEFFICIENT = "dist_weighted_l1"
_PARAMETERS = ("prototypes", "W_dec", "lambda_raw", "b_dec")
_PREFIX = "spade."

_FOLD_W_DEC_NORM_ERROR = (
    "fold_W_dec_norm is not supported for SpaDE SAEs: SpaDE codes are sparsemax "
    "outputs that sum to 1 per token and are computed from distances to the "
    "prototypes, not from a linear encoder, so no change of the encoder can "
    "rescale latent k by ‖W_dec[k]‖ while keeping the codes a sparsemax.  Load "
    "with fold_W_dec_norm=False and weight codes by sae.W_dec.norm(dim=-1) in "
    "analysis instead."
)
_WHITENING_ERROR = (
    "activation whitening cannot be folded into a SpaDE SAE: the encoder "
    "compares Euclidean distances, and a whitening map turns them into "
    "Mahalanobis distances in the raw activations, which no prototypes or λ "
    "reproduce.  Use normalize_activations='none' or 'expected_average_only_in'."
)


def _validate_spade_fields(cfg: Any, *, training: bool) -> None:
    """The layer's own checks (:meth:`SpaDE.validate_settings`) on a config's fields; fills λ's default."""
    settings = SpaDE.validate_settings(
        cfg.d_in,
        lambda_init=cfg.lambda_init,
        backend=cfg.backend,
        **({"gamma_reg": cfg.gamma_reg, "reg_on": cfg.reg_on} if training else {}),
    )
    cfg.lambda_init, cfg.backend = settings["lambda_init"], settings["backend"]
    if training:
        cfg.gamma_reg = settings["gamma_reg"]
    if not isinstance(cfg.use_bias, bool):
        raise TypeError(f"use_bias must be a bool, got {type(cfg.use_bias).__name__}")


def _with_how_to_load(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with the ``"how_to_load"`` note right after ``"architecture"`` (or at the end)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        out[key] = value
        if key == "architecture":
            out[HOW_TO_LOAD_KEY] = HOW_TO_LOAD
    out.setdefault(HOW_TO_LOAD_KEY, HOW_TO_LOAD)
    return out


@dataclass
class SpaDESAEConfig(SAEConfig):
    """Configuration of the inference :class:`SpaDESAE`.

    SAELens's :class:`~sae_lens.SAEConfig` fields (``d_in``, ``d_sae``,
    ``dtype``, ``device``, ``normalize_activations``, …) plus:

    Parameters
    ----------
    lambda_init : float, optional
        λ of a freshly built SAE (default 1/(2·d_in)); a loaded SAE takes λ
        from its weights.
    use_bias : bool
        Decoder bias ``b_dec`` (the paper uses none).
    backend : str
        Encoder backend of :func:`spade_kernels.spade_encode` (``"auto"``,
        ``"torch"``, ``"native"``, ``"triton"`` or ``"reference"``).
    apply_b_dec_to_input : bool
        Subtract ``b_dec`` from the input before encoding (default False here,
        unlike SAELens's other SAEs; ignored without a bias).
    """

    apply_b_dec_to_input: bool = False
    lambda_init: float | None = None
    use_bias: bool = False
    backend: str = "auto"

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_spade_fields(self, training=False)

    def to_dict(self) -> dict[str, Any]:
        """SAELens's dict (the ``cfg.json`` of ``save_model``) plus the ``"how_to_load"`` note."""
        return _with_how_to_load(super().to_dict())


@dataclass
class SpaDETrainingSAEConfig(TrainingSAEConfig):
    """Configuration of :class:`SpaDETrainingSAE`.

    The fields of :class:`SpaDESAEConfig` and SAELens's
    :class:`~sae_lens.TrainingSAEConfig`, plus:

    Parameters
    ----------
    gamma_reg : float
        Coefficient γ of the distance-weighted L1 regulariser (default 0.1).
    gamma_reg_warm_up_steps : int
        Linear warm-up of γ, in steps (SAELens's coefficient scheduler).
    reg_on : {"encoder", "decoder"}
        Distances of the regulariser: to the prototypes (paper) or to the
        decoder rows.
    decoder_init_norm : float, optional
        SAELens's decoder-norm initialisation; default None keeps the paper's
        W_dec = prototypes.  When set, only the decoder rows are rescaled.
    """

    apply_b_dec_to_input: bool = False
    decoder_init_norm: float | None = None
    lambda_init: float | None = None
    use_bias: bool = False
    backend: str = "auto"
    gamma_reg: float = 0.1
    gamma_reg_warm_up_steps: int = 0
    reg_on: Literal["encoder", "decoder"] = "encoder"

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        _validate_spade_fields(self, training=True)
        if self.normalize_activations == "covariance_whitening":
            raise ValueError(f"normalize_activations='covariance_whitening' is refused: {_WHITENING_ERROR}")
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        """SAELens's dict (the ``cfg.json`` of ``save_model``) plus the ``"how_to_load"`` note."""
        return _with_how_to_load(super().to_dict())

    def get_inference_sae_cfg_dict(self) -> dict[str, Any]:
        """The inference config (the ``cfg.json`` of ``save_inference_model``) plus the ``"how_to_load"`` note."""
        return _with_how_to_load(super().get_inference_sae_cfg_dict())


def _hooked(hook_point: torch.nn.Module) -> bool:
    """Whether any hook is attached to ``hook_point``."""
    return bool(
        hook_point._forward_hooks
        or hook_point._forward_pre_hooks
        or hook_point._backward_hooks
        or hook_point._backward_pre_hooks
    )


def _to_coo(codes: SparseCodes, values: torch.Tensor) -> torch.Tensor:
    """``values`` (…, C) on the support of ``codes`` as a sparse COO tensor (…, K).

    Padding slots are left out, so ``.bool()`` of the result is the support.
    """
    lead = codes.indices.shape[:-1]
    width = codes.width
    idx = codes.indices.reshape(-1, width)
    keep = torch.arange(width, device=idx.device) < codes.support_size.reshape(-1, 1)
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)[keep]
    coords = (*torch.unravel_index(rows, tuple(lead)), idx[keep]) if len(lead) else (idx[keep],)
    return torch.sparse_coo_tensor(
        torch.stack(coords), values.reshape(-1, width)[keep], codes.shape, check_invariants=False
    )


class _SpaDEMixin(WrappedSpaDE):
    """What :class:`SpaDESAE` and :class:`SpaDETrainingSAE` share.

    The weights live in a :class:`spade_kernels.SpaDE` submodule ``spade``;
    ``prototypes``, ``W_dec``, ``b_dec`` and ``lam`` read through to it, and
    checkpoints store its tensors without the ``spade.`` prefix.
    """

    spade: SpaDE

    # -- weights ------------------------------------------------------------

    def initialize_weights(self) -> None:
        cfg = self.cfg
        self.spade = SpaDE(
            cfg.d_in,
            cfg.d_sae,
            lambda_init=cfg.lambda_init,
            gamma_reg=getattr(cfg, "gamma_reg", 0.0),
            use_bias=cfg.use_bias,
            reg_on=getattr(cfg, "reg_on", "encoder"),
            backend=cfg.backend,
            device=self.device,
            dtype=self.dtype,
        )

    def get_activation_fn(self):
        return sk.sparsemax

    # -- the encoder as a linear map (read-only) ------------------------------

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder's linear part: 2λ·prototypesᵀ, shape (d_in, d_sae); read-only.

        SpaDE's score of latent k is s_k(x) = −λ‖x − a_k‖² = x·(2λ a_k) − λ‖a_k‖²
        − λ‖x‖².  The last term is the same for every latent and sparsemax is
        unchanged by adding a constant to all its inputs, so the codes are
        those of a sparsemax-activated linear encoder (an identity, equal up
        to rounding)::

            encode(x) == sparsemax(sae_in @ W_enc + b_enc)
            hidden_pre == sae_in @ W_enc + b_enc − λ·‖sae_in‖²   (per token)

        with sae_in = ``process_sae_in(x)`` (x − b_dec when
        ``apply_b_dec_to_input``).  Column k is thus the direction latent k
        responds to, 2λ·a_k, and its norm 2λ‖a_k‖ is that latent's gain; this
        is what tools that read ``W_enc`` (SAEBench's feature-wise metrics, its
        absorption probe, SAELens's ``get_featurewise_weight_based_metrics``)
        see.  Unlike a ReLU SAE's ``W_enc`` it is not a free parameter: it is
        computed from ``prototypes`` and λ on each access (differentiably, in
        the prototypes' dtype), it is not in the state dict, assigning to it
        raises, and writing into the returned tensor changes nothing.
        """
        A = self.spade.prototypes
        return (2 * self.spade.lam).to(A.dtype) * A.T

    @W_enc.setter
    def W_enc(self, value) -> None:
        raise AttributeError(
            "W_enc of a SpaDE SAE is computed from the prototypes (W_enc = 2λ·prototypes.T) and "
            "cannot be set; change sae.spade.prototypes or sae.spade.lambda_raw instead"
        )

    @property
    def b_enc(self) -> torch.Tensor:
        """The encoder's per-latent offset −λ·‖a_k‖², shape (d_sae,); read-only.

        The constant that, with :attr:`W_enc`, gives the codes exactly:
        ``encode(x) == sparsemax(sae_in @ W_enc + b_enc)``.  Computed from
        ``prototypes`` and λ on each access, as ``W_enc``.
        """
        A = self.spade.prototypes
        return -self.spade.lam.to(A.dtype) * A.pow(2).sum(-1)

    @b_enc.setter
    def b_enc(self, value) -> None:
        raise AttributeError(
            "b_enc of a SpaDE SAE is computed from the prototypes (b_enc = −λ·‖a_k‖²) and cannot be set"
        )

    def init_from_data(self, x: torch.Tensor, *, generator: torch.Generator | None = None):
        """Prototypes and W_dec = random rows of ``x`` (see :meth:`spade_kernels.SpaDE.init_from_data`)."""
        self.spade.init_from_data(x, generator=generator)
        return self

    # -- encoder / decoder --------------------------------------------------

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        """SAELens's input pipeline (dtype, reshape, input hook, run-time norm, −b_dec)."""
        sae_in = self.reshape_fn_in(sae_in.to(self.dtype))
        sae_in = self.hook_sae_input(sae_in)
        sae_in = self.run_time_activation_norm_fn_in(sae_in)
        if self.cfg.apply_b_dec_to_input and self.b_dec is not None:
            sae_in = sae_in - self.b_dec
        return sae_in

    def _scores_and_codes(self, sae_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (codes, scores −λ·D) of an encoder input, through the two hooks."""
        hidden_pre = self.hook_sae_acts_pre(self.spade.scores(sae_in))
        # float32 at least, as the layer's codes: sparsemax of half scores is
        # computed in float32 anyway.
        z = self.activation_fn(hidden_pre.to(torch.promote_types(hidden_pre.dtype, torch.float32)))
        return self.hook_sae_acts_post(z), hidden_pre

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes (..., d_sae).

        Runs the SpaDE kernels unless a hook on ``hook_sae_acts_pre`` needs
        the dense scores.
        """
        sae_in = self.process_sae_in(x)
        if _hooked(self.hook_sae_acts_pre):
            return self._scores_and_codes(sae_in)[0]
        return self.hook_sae_acts_post(self.spade.encode(sae_in))

    def encode_sparse(self, x: torch.Tensor) -> SparseCodes:
        """Codes as :class:`spade_kernels.SparseCodes` (no hooks run on them)."""
        return self.spade.encode_sparse(self.process_sae_in(x))

    def _output(self, x_hat: torch.Tensor) -> torch.Tensor:
        x_hat = self.hook_sae_recons(x_hat)
        x_hat = self.run_time_activation_norm_fn_out(x_hat)
        return self.reshape_fn_out(x_hat, self.d_head)

    def decode(self, feature_acts) -> torch.Tensor:
        """x̂ from dense codes, sparse COO codes or :class:`spade_kernels.SparseCodes`."""
        if isinstance(feature_acts, torch.Tensor) and feature_acts.is_sparse:
            feature_acts = feature_acts.to_dense()
        return self._output(self.spade.decode(feature_acts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x``; sparse end to end when the code hooks are unused."""
        if self.use_error_term or _hooked(self.hook_sae_acts_pre) or _hooked(self.hook_sae_acts_post):
            return super().forward(x)
        codes = self.spade.encode_sparse(self.process_sae_in(x))
        return self.hook_sae_output(self._output(self.spade.decode(codes)))

    # -- folding --------------------------------------------------------------

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold the factor s the SAE's inputs were scaled by into its weights.

        An SAE trained on s·x becomes one that takes x: prototypes/s, W_dec/s,
        b_dec/s and λ·s² (‖s·x − a‖² = s²·‖x − a/s‖²), so the codes stay the
        same and the reconstruction comes out in the units of x.
        """
        s = float(scaling_factor)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scaling_factor must be a finite float > 0, got {scaling_factor!r}")
        self.spade.fold_input_scale(s)
        self.cfg.normalize_activations = "none"

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(_FOLD_W_DEC_NORM_ERROR)

    def fold_and_get_W_dec_norm(self) -> torch.Tensor:
        raise NotImplementedError(_FOLD_W_DEC_NORM_ERROR)

    def fold_activation_whitening(self, mean, whitening_matrix, unwhitening_matrix) -> None:
        raise NotImplementedError(_WHITENING_ERROR)

    # -- checkpoints ----------------------------------------------------------

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        """``spade.prototypes`` → ``prototypes`` etc.: the layout of ``SpaDE.save_pretrained``."""
        for key in [k for k in state_dict if k.startswith(_PREFIX)]:
            state_dict[key.removeprefix(_PREFIX)] = state_dict.pop(key)

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        for name in _PARAMETERS:
            if name in state_dict:
                state_dict[_PREFIX + name] = state_dict.pop(name)


class SpaDESAE(_SpaDEMixin, SAE[SpaDESAEConfig]):
    """Inference SpaDE SAE for SAELens (architecture ``"spade"``).

    ``encode`` gives dense codes (..., d_sae), ``encode_sparse`` the
    :class:`spade_kernels.SparseCodes`, ``decode`` accepts either, and
    ``forward`` reconstructs through the sparse path.
    """

    def __init__(self, cfg: SpaDESAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)


class SpaDETrainingSAE(_SpaDEMixin, TrainingSAE[SpaDETrainingSAEConfig]):
    """Training SpaDE SAE for SAELens (architecture ``"spade"``).

    :meth:`training_forward_pass` runs the SpaDE layer's sparse forward (the
    regulariser's distances come from the encoder, its gradient joins the
    encoder's sparse backward); ``feature_acts``/``hidden_pre`` of the step
    output are sparse COO tensors of the codes and scores on the support.
    With hooks on the code hook points it falls back to SAELens's dense step,
    :meth:`encode_with_hidden_pre` + :meth:`calculate_aux_loss`.
    """

    def __init__(self, cfg: SpaDETrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        if self.cfg.decoder_init_norm is not None:
            with torch.no_grad():
                W = self.spade.W_dec
                W.mul_(self.cfg.decoder_init_norm / W.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            REG_COEFFICIENT: TrainCoefficientConfig(
                value=self.cfg.gamma_reg, warm_up_steps=self.cfg.gamma_reg_warm_up_steps
            )
        }

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (codes, scores): scores = −λ·‖x − a_k‖², codes = sparsemax(scores)."""
        return self._scores_and_codes(self.process_sae_in(x))

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """γ·mean_b Σ_k z[b,k]·D[b,k] from the dense codes and scores (D = −scores/λ)."""
        if self.cfg.reg_on == "encoder":
            D = -hidden_pre / self.lam
        else:
            # Distances of the encoder input (without re-running the input hook) to W_dec.
            x = self.run_time_activation_norm_fn_in(self.reshape_fn_in(step_input.sae_in.to(self.dtype)))
            if self.cfg.apply_b_dec_to_input and self.b_dec is not None:
                x = x - self.b_dec
            D = self.spade.distances(x, to="decoder").reshape(hidden_pre.shape)
        reg = (feature_acts * D).sum(-1).mean()
        return {f"{REG_COEFFICIENT}_loss": step_input.coefficients[REG_COEFFICIENT] * reg}

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if _hooked(self.hook_sae_acts_pre) or _hooked(self.hook_sae_acts_post):
            return super().training_forward_pass(step_input)
        sae_in = self.process_sae_in(step_input.sae_in)
        out = self.spade(sae_in)
        sae_out = self._output(out.x_hat)
        # MSE as SAELens computes it (the layer's own is on the encoder input).
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        reg_loss = step_input.coefficients[REG_COEFFICIENT] * out.reg
        codes = out.codes.detach()
        with torch.no_grad():
            lam = self.lam.detach()
            D = codes.distances
            if D is None:  # dense backends keep no support distances
                D = self.spade.distances(sae_in.detach(), codes=codes)
            feature_acts = _to_coo(codes, codes.values)
            hidden_pre = _to_coo(codes, -lam * D)
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=mse_loss + reg_loss,
            losses={"mse_loss": mse_loss, f"{REG_COEFFICIENT}_loss": reg_loss},
            metrics={"lambda": lam},
        )


def _same_class(a: type, b: type) -> bool:
    return a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


def _register_into(registry: dict, register_fn, classes: tuple[type, type], kind: str) -> None:
    current = registry.get(ARCHITECTURE)
    if current is None:
        register_fn(ARCHITECTURE, *classes)
    elif tuple(current) != classes:
        if not all(_same_class(a, b) for a, b in zip(current, classes)):
            raise ValueError(
                f"SAELens {kind} architecture {ARCHITECTURE!r} is already registered to "
                f"{current[0].__module__}.{current[0].__qualname__}, not to spade_kernels"
            )
        # This module was reloaded: point SAELens at the new class objects.
        registry[ARCHITECTURE] = classes


def register() -> None:
    """Register ``"spade"`` with SAELens; idempotent (done on import of this module).

    Raises
    ------
    ValueError
        If another library registered a different class under ``"spade"``.
    """
    _register_into(SAE_CLASS_REGISTRY, register_sae_class, (SpaDESAE, SpaDESAEConfig), "inference")
    _register_into(
        SAE_TRAINING_CLASS_REGISTRY,
        register_sae_training_class,
        (SpaDETrainingSAE, SpaDETrainingSAEConfig),
        "training",
    )


def load_from_disk(path: str | os.PathLike, *, training: bool = False, **kwargs: Any) -> SAE:
    """Register ``"spade"`` and load a SAELens checkpoint directory in one call.

    The same as ``import spade_kernels.sae.integrations.sae_lens`` followed by
    ``sae_lens.SAE.load_from_disk(path, **kwargs)`` (or
    ``TrainingSAE.load_from_disk`` with ``training=True``), so that a script
    that only loads never meets SAELens's ``KeyError: 'spade'``.  ``kwargs``
    are SAELens's: ``device``, ``dtype``, ``converter``, ``fold_W_dec_norm``.
    """
    register()
    loader = TrainingSAE if training else SAE
    return loader.load_from_disk(os.fspath(path), **kwargs)


# -- command line ---------------------------------------------------------------

PROG = "python -m spade_kernels.sae.integrations.sae_lens"
_ARCHITECTURE_FLAGS = ("--architecture", "--sae")

CLI_DESCRIPTION = f"""\
Train a SpaDE SAE on a language model's activations with SAELens's own
LanguageModelSAETrainingRunner, configured by SAELens's own flags.

This is SAELens's training command line (python -m
sae_lens.llm_sae_training_runner, the parser of LanguageModelSAERunnerConfig)
with these differences only:
  * it first imports spade_kernels.sae.integrations.sae_lens, which registers
    the SAELens architecture "spade"; SAELens's own command, in a fresh
    process, does not know it;
  * --architecture defaults to spade, not standard (SAELens's help below still
    prints "default: standard"; any registered architecture can be chosen);
  * it prints where the trained SAE was saved and the line that loads it.
Every other flag, default and step is SAELens's.  The SpaDE flags are those of
"SpaDETrainingSAEConfig" at the end of this help: --lambda_init (default
1/(2*d_in)), --gamma_reg (0.1), --gamma_reg_warm_up_steps, --reg_on
{{encoder,decoder}}, --use_bias, --apply_b_dec_to_input, --backend
{{auto,torch,native,triton,reference}} and --decoder_init_norm.  --d_in must be
the width of the activations at --hook_name (SAELens's default is 512).

Example (GPT-2 through TransformerLens, SAELens's default model class):
  {PROG} \\
      --model_name gpt2 --hook_name blocks.6.hook_resid_pre \\
      --d_in 768 --d_sae 16384 --gamma_reg 0.1 --lr 1e-2 \\
      --dataset_path NeelNanda/pile-10k --context_size 128 \\
      --training_tokens 2000000 --log_to_wandb False --output_path runs/spade-gpt2
Any Hugging Face causal LM, by hub id or local directory: --model_class_name
AutoModelForCausalLM --model_name <id or path> --hook_name <module name, e.g.
transformer.h.6>.
A saved SAE loads in any process with
  {IMPORT_LINE}
  from sae_lens import SAE; sae = SAE.load_from_disk("runs/spade-gpt2")
or with
  from spade_kernels.sae.integrations.sae_lens import load_from_disk
  sae = load_from_disk("runs/spade-gpt2")
SAELens's help follows.
"""


@contextlib.contextmanager
def _program_name(name: str):
    """argparse names the program after ``sys.argv[0]``; show ``name`` in usage lines."""
    saved = sys.argv[:1]
    sys.argv[:1] = [name]
    try:
        yield
    finally:
        sys.argv[:1] = saved


def _names_architecture(args: Sequence[str]) -> bool:
    return any(
        a in _ARCHITECTURE_FLAGS or a.startswith(tuple(f + "=" for f in _ARCHITECTURE_FLAGS)) for a in args
    )


def parse_args(argv: Sequence[str]) -> LanguageModelSAERunnerConfig:
    """SAELens's command-line parser with ``"spade"`` registered and the default architecture.

    Returns SAELens's ``LanguageModelSAERunnerConfig`` whose ``sae`` is a
    :class:`SpaDETrainingSAEConfig` (unless ``--architecture`` names another
    registered architecture).  Parsing is SAELens's own
    (``sae_lens.llm_sae_training_runner._parse_cfg_args``, simple_parsing):
    every field of the runner config and of the SAE config is a flag.
    ``--help`` (or no arguments) prints :data:`CLI_DESCRIPTION`, then
    SAELens's help for the chosen architecture, and exits.
    """
    try:
        from sae_lens.llm_sae_training_runner import _parse_cfg_args
    except ImportError as exc:  # pragma: no cover - depends on the SAELens version
        raise ImportError(
            "this SAELens has no sae_lens.llm_sae_training_runner._parse_cfg_args (its command-line "
            f"parser), which {PROG} reuses; use sae-lens >=6.54,<7"
        ) from exc
    register()
    args = list(argv)
    if not args or "-h" in args or "--help" in args:
        print(CLI_DESCRIPTION)
        args = args or ["--help"]
    if not _names_architecture(args):
        args = ["--architecture", ARCHITECTURE, *args]
    with _program_name(PROG):
        return _parse_cfg_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spade_kernels.sae.integrations.sae_lens [SAELens flags]``.

    Parses the flags with :func:`parse_args` and runs SAELens's
    ``LanguageModelSAETrainingRunner(cfg).run()``: the model, dataset,
    activation store, trainer, checkpoints and final save are all SAELens's.
    Returns the exit status: 0, or 2 when SAELens's parser or a config's
    checks refuse a flag or a value (the message goes to stderr).
    """
    from sae_lens import LanguageModelSAETrainingRunner

    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except (argparse.ArgumentError, TypeError, ValueError) as exc:  # a flag or a config value refused
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    LanguageModelSAETrainingRunner(cfg).run()
    if cfg.output_path is not None:
        print(f"{cfg.sae.architecture()} SAE saved to {cfg.output_path}; load it with")
        print(f"  {IMPORT_LINE}")
        print(f"  from sae_lens import SAE; sae = SAE.load_from_disk({str(cfg.output_path)!r})")
    return 0


if __name__ == "__main__":
    # ``python -m``: this file runs as ``__main__``.  Hand over to the module
    # imported under its own name, so that SAELens registers (and checkpoints
    # name) the importable classes, not copies defined in ``__main__``.
    from spade_kernels.sae.integrations.sae_lens import main as _main

    sys.exit(_main())
else:
    register()
