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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
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
    "SpaDESAE",
    "SpaDESAEConfig",
    "SpaDETrainingSAE",
    "SpaDETrainingSAEConfig",
    "register",
]

ARCHITECTURE = "spade"
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


register()
