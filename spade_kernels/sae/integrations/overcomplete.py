"""SpaDE as an Overcomplete SAE (overcomplete 0.3.x, KempnerInstitute/overcomplete).

:class:`SpaDESAE` subclasses ``overcomplete.sae.SAE`` and runs on this
package's layer and kernels, so Overcomplete's own training loops work on it::

    from overcomplete.sae import train_sae, train_sae_amp
    from spade_kernels.sae.integrations.overcomplete import SpaDESAE, spade_criterion

    sae = SpaDESAE(768, 16384, gamma_reg=0.1)
    logs = train_sae(sae, loader, spade_criterion(), torch.optim.Adam(sae.parameters(), 1e-3), nb_epochs=1)

Overcomplete's contract, for SpaDE:

- ``encode(x)`` → ``(pre_codes, codes)``, ``forward(x)`` → ``(pre_codes,
  codes, x_hat)``, ``get_dictionary()`` → the decoder ``W_dec`` (nb_concepts,
  dim).  Codes are dense (N, nb_concepts) tensors, because Overcomplete's
  loops read them as such every step: ``DeadCodeTracker.update(z)`` in
  ``train_sae`` and ``train_sae_amp``, and ``l0_eps(z)`` in their monitoring.
  That one tensor is the only B×K one of the step: the encoder never forms the
  B×K scores or distances, x̂ is decoded from the support, and the loss comes
  from the support's distances (a criterion that does not use the dense codes
  sends no gradient through them).
- ``pre_codes``: SpaDE's pre-activations are the B×K squared distances, which
  the kernels never form.  By default ``pre_codes`` is the codes tensor itself;
  ``SpaDESAE(..., pre_codes="distances")`` returns the dense distances
  ‖x − a_k‖² (as the paper's notebook does), at the cost of a B×K tensor.
- :func:`spade_criterion` is the SpaDE loss, ``mean_b ‖x_b − x̂_b‖² +
  γ·mean_b Σ_k z[b,k]·‖x_b − a_k‖²`` — exactly ``SpaDE.forward(x).loss`` —
  read from the terms ``forward`` attaches to its codes
  (``codes.spade_terms``; Overcomplete criteria get no other handle on the
  encoder's distances).  Note the MSE is summed over features (the paper's and
  the layer's), where Overcomplete's ``mse_l1`` averages over them.
- Input: ``input_shape`` an int d (x of shape (N, d)), a pair (T, C) (tokens:
  x (N, T, C), one row per token) or a triple (C, H, W) (images: x (N, C, H,
  W), one row per pixel, channels as features) — the layouts Overcomplete's
  own SAEs flatten to (N·T, C) and (N·H·W, C), so x̂ has that flat shape and
  Overcomplete's R² monitoring lines it up with x.  x already flattened to
  (M, dim) rows is accepted too.
- Mixed precision: ``train_sae_amp`` runs the forward under autocast; the
  layer's policy (docs/design.md, "Mixed precision") applies.
- State dict keys are the layer's parameter names (``prototypes``, ``W_dec``,
  ``lambda_raw``, ``b_dec`` with ``use_bias``); :meth:`SpaDESAE.save_pretrained`
  / :meth:`SpaDESAE.from_pretrained` read and write the files of
  :meth:`spade_kernels.SpaDE.save_pretrained`, and :meth:`SpaDESAE.from_spade`
  / :attr:`SpaDESAE.spade` convert without copying.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from overcomplete.base import BaseDictionaryLearning
from overcomplete.sae import SAE

from spade_kernels import SparseCodes
from spade_kernels.layer import SpaDE

from ._wrapped import WrappedSpaDE

__all__ = ["SpaDESAE", "SpaDETerms", "spade_criterion"]

_PRE_CODES = ("codes", "distances")
_PREFIX = "spade."


class SpaDETerms(NamedTuple):
    """The loss terms of one :meth:`SpaDESAE.forward` (attached to its codes as ``codes.spade_terms``)."""

    mse: torch.Tensor
    reg: torch.Tensor
    gamma_reg: float


def _check_input_shape(input_shape) -> tuple[int, ...]:
    shape = (
        (input_shape,) if isinstance(input_shape, int) and not isinstance(input_shape, bool) else input_shape
    )
    if (
        not isinstance(shape, (tuple, list))
        or not 1 <= len(shape) <= 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ValueError(
            "input_shape must be d, (T, C) for tokens or (C, H, W) for images (positive ints), "
            f"got {input_shape!r}"
        )
    return tuple(shape)


class SpaDESAE(WrappedSpaDE, SAE):
    """SpaDE as an ``overcomplete.sae.SAE``: z = sparsemax(−λ·‖x − a_k‖²), x̂ = z·W_dec (+ b_dec).

    Parameters
    ----------
    input_shape : int or tuple
        d, (T, C) or (C, H, W), without the batch dimension (see the module
        docstring for how tokens and pixels become rows).
    nb_concepts : int
        Number of latents K.
    gamma_reg, lambda_init, reg_on, use_bias, backend, dtype
        As for :class:`spade_kernels.SpaDE`.
    pre_codes : {"codes", "distances"}
        What ``encode``/``forward`` return as pre-codes: the codes tensor
        itself (default, no extra memory) or the dense squared distances.
    device : str or torch.device
        Where the parameters live (Overcomplete's ``device`` argument).

    Attributes
    ----------
    spade : spade_kernels.SpaDE
        The layer; its parameters are this SAE's parameters.
    """

    def __init__(
        self,
        input_shape,
        nb_concepts: int,
        *,
        gamma_reg: float = 0.1,
        lambda_init: float | None = None,
        reg_on: str = "encoder",
        use_bias: bool = False,
        backend: str = "auto",
        pre_codes: str = "codes",
        device="cpu",
        dtype=None,
    ) -> None:
        shape = _check_input_shape(input_shape)
        if pre_codes not in _PRE_CODES:
            raise ValueError(f"pre_codes must be one of {_PRE_CODES}, got {pre_codes!r}")
        # Overcomplete's SAE.__init__ builds a linear encoder and a
        # DictionaryLayer; SpaDE has neither, so only the base class is set up.
        BaseDictionaryLearning.__init__(self, nb_concepts=nb_concepts, device=device)
        dim = shape[0] if len(shape) in (1, 3) else shape[1]
        self.input_shape = shape
        self.pre_codes = pre_codes
        self.spade = SpaDE(
            dim,
            nb_concepts,
            gamma_reg=gamma_reg,
            lambda_init=lambda_init,
            reg_on=reg_on,
            use_bias=use_bias,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        self._register_state_dict_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    # -- views of the layer ----------------------------------------------------

    @property
    def gamma_reg(self) -> float:
        """γ of the layer (what :func:`spade_criterion` uses unless given its own)."""
        return self.spade.gamma_reg

    def get_dictionary(self) -> torch.Tensor:
        """The decoder rows ``W_dec``, shape (nb_concepts, dim)."""
        return self.spade.W_dec

    # -- Overcomplete's SAE API --------------------------------------------------

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as (M, dim) rows: tokens and pixels flattened as Overcomplete flattens them."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        shape, dim = self.input_shape, self.spade.d_in
        if x.dim() == 2 and x.shape[1] == dim:
            return x
        if x.dim() == len(shape) + 1 and tuple(x.shape[1:]) == shape:
            if len(shape) == 2:  # (N, T, C) -> (N·T, C)
                return x.reshape(-1, dim)
            if len(shape) == 3:  # (N, C, H, W) -> (N·H·W, C)
                return x.permute(0, 2, 3, 1).reshape(-1, dim)
        raise ValueError(
            f"x must have shape (N, {', '.join(map(str, shape))}) or (M, {dim}) rows, got {tuple(x.shape)}"
        )

    def _pre_codes(self, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return codes if self.pre_codes == "codes" else self.spade.distances(rows)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pre_codes, codes)``, codes dense (M, nb_concepts): rows ≥ 0 summing to 1."""
        rows = self._rows(x)
        codes = self.spade.encode(rows)
        return self._pre_codes(rows, codes), codes

    def encode_sparse(self, x: torch.Tensor) -> SparseCodes:
        """Codes of x's rows in the sparse layout of :class:`spade_kernels.SparseCodes` (no B×K tensor)."""
        return self.spade.encode_sparse(self._rows(x))

    def decode(self, z) -> torch.Tensor:
        """x̂ (M, dim) from dense codes (M, nb_concepts) or :class:`~spade_kernels.SparseCodes`."""
        return self.spade.decode(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pre_codes, codes, x_hat)``; the codes carry the loss terms for :func:`spade_criterion`.

        Encodes sparsely, decodes over the support and computes the loss terms
        there; the dense codes are built from the sparse ones for
        Overcomplete's loop (see the module docstring).
        """
        rows = self._rows(x)
        out = self.spade(rows)
        codes = out.codes.to_dense()
        codes.spade_terms = SpaDETerms(out.mse, out.reg, self.spade.gamma_reg)
        return self._pre_codes(rows, codes), codes, out.x_hat

    def tied(self, bias: bool = False):
        """Not available: SpaDE's encoder is its prototypes, not a linear map to tie to the dictionary."""
        raise NotImplementedError("SpaDE has no linear encoder to tie; its encoder is the prototypes")

    def untied(self, bias: bool = False, copy_from_dictionary: bool = True):
        """Not available (see :meth:`tied`)."""
        raise NotImplementedError("SpaDE has no linear encoder to untie; its encoder is the prototypes")

    # -- conversions -------------------------------------------------------------

    @classmethod
    def from_spade(cls, layer: SpaDE, input_shape=None, *, pre_codes: str = "codes") -> SpaDESAE:
        """An SAE around ``layer`` itself (parameters shared, not copied); ``input_shape`` defaults to d."""
        if not isinstance(layer, SpaDE):
            raise TypeError(f"layer must be a spade_kernels.SpaDE, got {type(layer).__name__}")
        shape = _check_input_shape(layer.d_in if input_shape is None else input_shape)
        dim = shape[0] if len(shape) in (1, 3) else shape[1]
        if dim != layer.d_in:
            raise ValueError(f"input_shape {shape} has {dim} features but the layer takes {layer.d_in}")
        sae = cls(
            shape,
            layer.d_sae,
            gamma_reg=layer.gamma_reg,
            lambda_init=layer.lambda_init,
            reg_on=layer.reg_on,
            use_bias=layer.use_bias,
            backend=layer.backend,
            pre_codes=pre_codes,
            device="meta",
        )
        sae.spade = layer
        sae.device = str(layer.prototypes.device)
        return sae

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the layer's checkpoint (:meth:`spade_kernels.SpaDE.save_pretrained`)."""
        self.spade.save_pretrained(path)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, input_shape=None, *, device="cpu", dtype=None, backend: str = "auto",
        pre_codes: str = "codes",
    ) -> SpaDESAE:  # fmt: skip
        """Load a :meth:`spade_kernels.SpaDE.save_pretrained` directory (SAELens's files too)."""
        layer = SpaDE.from_pretrained(path, device=device, dtype=dtype, backend=backend)
        return cls.from_spade(layer, input_shape, pre_codes=pre_codes)


def _strip_prefix(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + key[len(prefix + _PREFIX) :]] = state_dict.pop(key)
    return state_dict


def _add_prefix(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + _PREFIX + key[len(prefix) :]] = state_dict.pop(key)


def spade_criterion(gamma_reg: float | None = None):
    """The SpaDE loss as an Overcomplete criterion ``criterion(x, x_hat, pre_codes, codes, dictionary)``.

    ``mse + γ·reg`` with the terms :meth:`SpaDESAE.forward` computed on the
    support (``mse = mean_b ‖x_b − x̂_b‖²``, ``reg = mean_b Σ_k z·‖x_b −
    a_k‖²``); γ is ``gamma_reg`` when given, else the model's.  The codes
    must be the ones ``SpaDESAE.forward`` returned.
    """
    if gamma_reg is not None:
        gamma_reg = float(gamma_reg)
        if not gamma_reg >= 0 or gamma_reg == float("inf"):
            raise ValueError(f"gamma_reg must be a finite float ≥ 0, got {gamma_reg!r}")

    def criterion(x, x_hat, pre_codes, codes, dictionary):
        terms = getattr(codes, "spade_terms", None)
        if not isinstance(terms, SpaDETerms):
            raise TypeError(
                "spade_criterion needs the codes returned by SpaDESAE.forward (they carry the loss terms "
                "computed on the support); got codes without them"
            )
        gamma = terms.gamma_reg if gamma_reg is None else gamma_reg
        return terms.mse + gamma * terms.reg

    return criterion
