"""SpaDE for ``dictionary_learning`` (saprmarks/dictionary_learning, PyPI ``dictionary-learning``).

Three pieces that plug into that library's own machinery:

- :class:`SpaDEDictionary`, a ``dictionary_learning.dictionary.Dictionary``:
  ``encode`` (dense codes, as the library expects), ``encode_sparse``,
  ``decode``, ``forward(x, output_features=False)``, ``scale_biases`` and
  ``from_pretrained``.  It wraps a :class:`spade_kernels.SpaDE` layer
  (``dictionary.spade``), so every call runs on this package's kernels with
  the backend chosen by ``backend=``.
- :class:`SpaDETrainer`, a ``dictionary_learning.trainers.trainer.SAETrainer``
  for ``dictionary_learning.training.trainSAE``::

      from dictionary_learning.training import trainSAE
      from spade_kernels.sae.integrations.dictionary_learning import SpaDETrainer

      cfg = {"trainer": SpaDETrainer, "steps": steps, "activation_dim": 768,
             "dict_size": 16384, "layer": 6, "lm_name": "gpt2", "device": "cuda"}
      trainSAE(data=buffer, trainer_configs=[cfg], steps=steps, save_dir="runs/spade",
               normalize_activations=True, device="cuda")

- :func:`load_dictionary`, the counterpart of the library's loader of the same
  name: it reads a trainSAE output directory (``ae.pt`` + ``config.json``)
  back into a :class:`SpaDEDictionary`.

SpaDE is not scale-homogeneous: scaling the activations by s needs
prototypes → s·prototypes, W_dec → s·W_dec, b_dec → s·b_dec and λ → λ/s² for
the same codes and s times the reconstruction.  ``scale_biases(s)`` applies
exactly that map, which is what trainSAE means by it: a model trained on
x / norm_factor becomes, after ``scale_biases(norm_factor)``, a model of the
raw activations x.

Checkpoints (``ae.pt``) hold the state dict of the wrapper:
``spade.prototypes``, ``spade.W_dec``, ``spade.lambda_raw`` (λ =
softplus(lambda_raw)) and ``spade.b_dec`` when ``use_bias``.
"""

from __future__ import annotations

import json
import math
import os
from collections import namedtuple

import torch
from dictionary_learning.dictionary import Dictionary
from dictionary_learning.trainers.trainer import SAETrainer, get_sparsity_warmup_fn

from spade_kernels import SparseCodes
from spade_kernels.layer import SpaDE

from ..train import lr_schedule
from ._wrapped import WrappedSpaDE

__all__ = ["SpaDEDictionary", "SpaDETrainer", "load_dictionary"]

#: What ``SpaDETrainer.loss(..., logging=True)`` returns, as the library's trainers do.
LossLog = namedtuple("LossLog", ["x", "x_hat", "f", "losses"])

_AE_NAME = "ae.pt"
_CONFIG_NAME = "config.json"


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be a torch dtype or its name, got {dtype!r}")


class SpaDEDictionary(WrappedSpaDE, Dictionary):
    """SpaDE as a ``dictionary_learning`` dictionary.

    z = sparsemax(−λ·‖x − a_k‖²),   x̂ = z·W_dec (+ b_dec).

    Parameters
    ----------
    activation_dim : int
        Activation dimension d.
    dict_size : int
        Number of latents K.
    lambda_init, gamma_reg, use_bias, reg_on, backend, device, dtype
        As for :class:`spade_kernels.SpaDE`.

    Attributes
    ----------
    spade : spade_kernels.SpaDE
        The wrapped layer; its parameters are this dictionary's parameters.
    """

    def __init__(
        self,
        activation_dim: int,
        dict_size: int,
        *,
        lambda_init: float | None = None,
        gamma_reg: float = 0.1,
        use_bias: bool = False,
        reg_on: str = "encoder",
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.spade = SpaDE(
            activation_dim,
            dict_size,
            lambda_init=lambda_init,
            gamma_reg=gamma_reg,
            use_bias=use_bias,
            reg_on=reg_on,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        self.activation_dim = activation_dim
        self.dict_size = dict_size

    # -- Dictionary API -------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes f of shape (..., dict_size): rows are ≥ 0 and sum to 1."""
        return self.spade.encode(x)

    def encode_sparse(self, x: torch.Tensor) -> SparseCodes:
        """Codes in the sparse layout of :class:`spade_kernels.SparseCodes`."""
        return self.spade.encode_sparse(x)

    def decode(self, f) -> torch.Tensor:
        """x̂ from dense codes (..., dict_size) or :class:`~spade_kernels.SparseCodes`."""
        return self.spade.decode(f)

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """Reconstruction x̂ of ``x``; ``(x̂, f)`` with dense codes f when ``output_features``.

        Encodes sparsely and decodes over the support only; the dense f is
        built only when asked for.
        """
        codes = self.spade.encode_sparse(x)
        x_hat = self.spade.decode(codes)
        if output_features:
            return x_hat, codes.to_dense()
        return x_hat

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Turn this model of activations x into the equivalent model of ``scale``·x.

        prototypes, W_dec and b_dec are multiplied by ``scale`` and λ divided by
        ``scale``², so that the new model on s·x gives the codes the old one
        gives on x and s times its reconstruction.  trainSAE calls
        ``scale_biases(norm_factor)`` after training on x / norm_factor, which
        makes the saved model take raw activations.
        """
        if isinstance(scale, torch.Tensor):
            scale = scale.item()
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
        if scale == 1.0:
            return  # trainSAE's check that the method exists; keep λ bit-exact
        # The model of scale·x is this model with its input scale 1/scale folded in.
        self.spade.fold_input_scale(1.0 / scale)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype=None,
        device=None,
        *,
        backend: str = "auto",
        **kwargs,
    ) -> SpaDEDictionary:
        """Load a SpaDE dictionary.

        Parameters
        ----------
        path : path-like
            An ``ae.pt`` state dict written by trainSAE (final or
            ``checkpoints/ae_<step>.pt``); a trainSAE output directory (see
            :func:`load_dictionary`); or a directory written by
            :meth:`spade_kernels.SpaDE.save_pretrained`.
        dtype, device
            Where to put the parameters (default: the checkpoint's dtype, CPU).
        backend : str
            Encoder backend.
        **kwargs
            ``gamma_reg``, ``lambda_init``, ``reg_on`` for a bare ``ae.pt``
            (they matter only for further training; λ itself is in the file).
        """
        dtype = _resolve_dtype(dtype)
        path = os.fspath(path)
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, _AE_NAME)):
                return load_dictionary(path, device=device, dtype=dtype, backend=backend)[0]
            layer = SpaDE.from_pretrained(path, device=device, dtype=dtype, backend=backend)
            return cls._wrap(layer)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no SpaDE checkpoint at {path!r}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "spade.prototypes" not in state:
            raise ValueError(
                f"{path!r} is not a SpaDEDictionary state dict (no 'spade.prototypes'; keys: {sorted(state)})"
            )
        dict_size, activation_dim = state["spade.prototypes"].shape
        dictionary = cls(
            activation_dim,
            dict_size,
            use_bias="spade.b_dec" in state,
            backend=backend,
            dtype=dtype or state["spade.prototypes"].dtype,
            **kwargs,
        )
        dictionary.load_state_dict(state)
        return dictionary.to(device) if device is not None else dictionary

    @classmethod
    def _wrap(cls, layer: SpaDE) -> SpaDEDictionary:
        dictionary = cls(
            layer.d_in,
            layer.d_sae,
            lambda_init=layer.lambda_init,
            gamma_reg=layer.gamma_reg,
            use_bias=layer.use_bias,
            reg_on=layer.reg_on,
            backend=layer.backend,
            device="meta",
        )
        dictionary.spade = layer
        return dictionary


def load_dictionary(
    base_path: str | os.PathLike, device=None, *, dtype=None, backend: str | None = None
) -> tuple[SpaDEDictionary, dict]:
    """Load a trainSAE output directory of a :class:`SpaDETrainer` run.

    Mirrors ``dictionary_learning.utils.load_dictionary``: ``base_path`` holds
    ``ae.pt`` and ``config.json`` (trainSAE writes one such directory per
    trainer, ``save_dir/trainer_<i>``); returns ``(dictionary, config)``.
    ``backend`` defaults to the run's own (``"auto"`` where it saved none).
    """
    base_path = os.fspath(base_path)
    config_path = os.path.join(base_path, _CONFIG_NAME)
    ae_path = os.path.join(base_path, _AE_NAME)
    for p in (config_path, ae_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"no {os.path.basename(p)} in {base_path!r}")
    with open(config_path) as f:
        config = json.load(f)
    trainer_cfg = config.get("trainer", {})
    if trainer_cfg.get("dict_class") != SpaDEDictionary.__name__:
        raise ValueError(
            f"{config_path} describes dict_class {trainer_cfg.get('dict_class')!r}, not "
            f"{SpaDEDictionary.__name__!r}; load other runs with dictionary_learning.utils.load_dictionary"
        )
    dictionary = SpaDEDictionary.from_pretrained(
        ae_path,
        dtype=dtype,
        device=device,
        backend=backend if backend is not None else trainer_cfg.get("backend", "auto"),
        lambda_init=trainer_cfg.get("lambda_init"),
        gamma_reg=trainer_cfg.get("gamma_reg", 0.1),
        reg_on=trainer_cfg.get("reg_on", "encoder"),
    )
    return dictionary, config


class SpaDETrainer(SAETrainer):
    """The paper's SpaDE recipe as a ``dictionary_learning`` trainer.

    Loss: ``mean_b ‖x_b − x̂_b‖² + γ·mean_b Σ_k z[b,k]·‖x_b − a_k‖²``, with γ
    ramped linearly from 0 over ``sparsity_warmup_steps`` when given.
    Adam; learning rate warmed up linearly over ``warmup_steps`` (the paper
    uses none), held until ``decay_start`` (default: the end of the warm-up)
    and then decayed by a per-step cosine from ``lr`` to ``lr_final`` at the
    last step; gradient-norm clipping at ``grad_clip``.

    Scale.  ``lr``, ``lambda_init`` (default 1/(2d)), ``grad_clip`` and the
    N(0, 1) initialisation are the paper's, stated for activations with
    E‖x‖² = d.  With ``match_data_scale`` (default) the first batch's mean
    squared norm m sets s = √(m/d), and the trainer starts from the equivalent
    model for that scale (``scale_biases(s)``: prototypes and W_dec ×s,
    λ ÷s²), multiplies the learning rate of prototypes, W_dec and b_dec by s
    (Adam's steps are in the parameters' units) and the clipping threshold by
    s (the weights' gradients, which dominate the norm, scale by s).  Training
    then takes nearly the same course whether or not trainSAE normalises the
    activations (to E‖x‖² = 1, where λ starts at 1/2 for any d).  λ's raw
    parameter keeps its learning rate: λ = softplus(raw) is scale-free only
    while λ ≪ 1, so the match is close there and looser when λ grows past ~1.

    ``init="data"`` sets prototypes and W_dec to random rows of the first
    batch instead.  When the batch is smaller than ``dict_size`` rows repeat,
    and every prototype gets a jitter of 0.1× the per-coordinate RMS: tied
    prototypes would get identical gradients and stay tied.

    The constructor follows the library's trainers: ``steps``,
    ``activation_dim``, ``dict_size``, ``layer``, ``lm_name`` are required,
    ``seed`` seeds torch before the dictionary is built, ``device`` defaults
    to CUDA when available, and ``backend`` picks the SpaDE encoder.
    """

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int,
        lm_name: str,
        dict_class: type = SpaDEDictionary,
        lr: float = 1e-2,
        lr_final: float = 1e-4,
        warmup_steps: int = 0,
        decay_start: int | None = None,
        gamma_reg: float = 0.1,
        sparsity_warmup_steps: int | None = None,
        lambda_init: float | None = None,
        init: str = "paper",
        match_data_scale: bool = True,
        grad_clip: float | None = 1.0,
        use_bias: bool = False,
        reg_on: str = "encoder",
        backend: str = "auto",
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str = "SpaDETrainer",
        submodule_name: str | None = None,
    ) -> None:
        super().__init__(seed)
        if layer is None or lm_name is None:
            raise ValueError("layer and lm_name must be given (the library's trainers require them)")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if not (0 <= warmup_steps < steps):
            raise ValueError(f"warmup_steps must be in [0, steps={steps}), got {warmup_steps!r}")
        if decay_start is None:
            decay_start = warmup_steps
        if not (warmup_steps <= decay_start < steps):
            raise ValueError(
                f"decay_start must be in [warmup_steps={warmup_steps}, steps={steps}), got {decay_start!r}"
            )
        for name, value in (("lr", lr), ("lr_final", lr_final)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
        if init not in ("paper", "data"):
            raise ValueError(f"init must be 'paper' or 'data', got {init!r}")

        self.layer = layer
        self.lm_name = lm_name
        self.submodule_name = submodule_name
        self.wandb_name = wandb_name
        self.steps = steps
        self.lr, self.lr_final = float(lr), float(lr_final)
        self.warmup_steps, self.decay_start = warmup_steps, decay_start
        self.gamma_reg = float(gamma_reg)
        self.sparsity_warmup_steps = sparsity_warmup_steps
        self.init = init
        self.match_data_scale = match_data_scale
        self.grad_clip = grad_clip

        if seed is not None:
            torch.manual_seed(seed)
            torch.cuda.manual_seed_all(seed)
        self.ae = dict_class(
            activation_dim,
            dict_size,
            lambda_init=lambda_init,
            gamma_reg=gamma_reg,
            use_bias=use_bias,
            reg_on=reg_on,
            backend=backend,
        )
        self.device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.ae.to(self.device)

        layer_ = self.ae.spade
        weights = [p for p in (layer_.prototypes, layer_.W_dec, layer_.b_dec) if p is not None]
        self.optimizer = torch.optim.Adam([{"params": weights}, {"params": [layer_.lambda_raw]}], lr=self.lr)
        # Group 0 (prototypes, W_dec, b_dec) also carries the data-scale factor
        # set at step 0; group 1 (λ's raw parameter) does not.
        self._weight_lr_scale = 1.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda=[lambda s: self._lr_factor(s) * self._weight_lr_scale, self._lr_factor],
        )
        self.sparsity_warmup_fn = get_sparsity_warmup_fn(steps, sparsity_warmup_steps)
        self._initialised = False
        self.logging_parameters = ["lam"]

    # -- schedule ---------------------------------------------------------------

    def _lr_factor(self, step: int) -> float:
        """lr(step) / lr: linear warm-up, constant, cosine decay to lr_final / lr (:func:`~spade_kernels.sae.train.lr_schedule`)."""
        rate = lr_schedule(
            step,
            self.steps,
            self.lr,
            self.lr_final,
            warmup_steps=self.warmup_steps,
            decay_start=self.decay_start,
        )
        return rate / self.lr

    @property
    def lam(self) -> float:
        """Current λ (logged by trainSAE through ``logging_parameters``)."""
        return self.ae.lam.item()

    # -- initialisation from the first batch ---------------------------------------

    @torch.no_grad()
    def _initialise(self, x: torch.Tensor) -> None:
        self._initialised = True
        x = x.reshape(-1, self.ae.activation_dim)
        m = x.double().pow(2).sum(-1).mean().item()
        if self.match_data_scale and math.isfinite(m) and m > 0:
            s = math.sqrt(m / self.ae.activation_dim)
            self.ae.scale_biases(s)
            self._weight_lr_scale = s
            # LambdaLR set step 0's rates before s was known.
            self.optimizer.param_groups[0]["lr"] = self.lr * self._lr_factor(0) * s
        if self.init == "data":
            layer = self.ae.spade
            layer.init_from_data(x)
            if x.shape[0] < layer.d_sae:
                rms = math.sqrt(m / self.ae.activation_dim) if math.isfinite(m) and m > 0 else 1.0
                layer.prototypes.add_(0.1 * rms * torch.randn_like(layer.prototypes))
                layer.W_dec.copy_(layer.prototypes)

    # -- SAETrainer API -----------------------------------------------------------

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, **kwargs):
        """SpaDE loss on ``x``; with ``logging``, ``LossLog(x, x_hat, f, losses)`` with dense f."""
        out = self.ae.spade(x)
        scale = 1.0 if step is None else self.sparsity_warmup_fn(step)
        loss = out.mse + self.gamma_reg * scale * out.reg
        if not logging:
            return loss
        with torch.no_grad():
            l2 = (x - out.x_hat).norm(dim=-1).mean()
        return LossLog(
            x,
            out.x_hat,
            out.codes.to_dense(),
            {
                "l2_loss": l2.item(),
                "mse_loss": out.mse.item(),
                "sparsity_loss": out.reg.item(),
                "loss": loss.item(),
            },
        )

    def update(self, step: int, activations: torch.Tensor) -> float:
        """One optimiser step on a batch; returns the loss before the step."""
        activations = activations.to(self.device)
        if not self._initialised:
            self._initialise(activations)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(activations, step=step)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.ae.parameters(), self.grad_clip * self._weight_lr_scale)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    @property
    def config(self) -> dict:
        layer = self.ae.spade
        return {
            "trainer_class": type(self).__name__,
            "dict_class": type(self.ae).__name__,
            "activation_dim": self.ae.activation_dim,
            "dict_size": self.ae.dict_size,
            "lr": self.lr,
            "lr_final": self.lr_final,
            "warmup_steps": self.warmup_steps,
            "decay_start": self.decay_start,
            "gamma_reg": self.gamma_reg,
            "sparsity_warmup_steps": self.sparsity_warmup_steps,
            "lambda_init": layer.lambda_init,
            "init": self.init,
            "match_data_scale": self.match_data_scale,
            "grad_clip": self.grad_clip,
            "use_bias": layer.use_bias,
            "reg_on": layer.reg_on,
            "backend": layer.backend,
            "steps": self.steps,
            "seed": self.seed,
            "device": str(self.device),
            "layer": self.layer,
            "lm_name": self.lm_name,
            "wandb_name": self.wandb_name,
            "submodule_name": self.submodule_name,
        }
