"""``SpaDE``: the Sparsemax Distance Encoder as a drop-in ``torch.nn.Module``."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_has_data, check_no_functorch, check_tensor
from .backends import check_backend_name, resolve_backend
from .codes import SparseCodes
from .encode import encode_codes, product_primitives
from .numerics import compute_dtype
from .pipeline import gather_sq_dist, products_for, spade_loss, sparse_decode
from .pipeline.dense import dense_codes
from .reference import squared_distances

__all__ = ["Checkpoint", "SpaDE", "SpaDEOutput", "read_checkpoint"]

WEIGHTS_NAME = "sae_weights.safetensors"
CONFIG_NAME = "cfg.json"


class SpaDEOutput(NamedTuple):
    """Result of :meth:`SpaDE.forward`.

    ``loss = mse + gamma_reg · reg`` with ``mse = mean_b ‖x_b − x̂_b‖²`` and
    ``reg = mean_b Σ_k z[b,k]·‖x_b − a_k‖²`` (distance-weighted L1).
    """

    x_hat: torch.Tensor
    codes: SparseCodes
    loss: torch.Tensor
    mse: torch.Tensor
    reg: torch.Tensor


#: The smallest λ a layer holds without underflow: float32's smallest normal number.
_LAMBDA_MIN = float(torch.finfo(torch.float32).tiny)
#: The largest λ a layer holds: float32's largest finite number.
_LAMBDA_MAX = float(torch.finfo(torch.float32).max)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the ``torch.autocast`` region active for ``device_type`` here, or None."""
    # Only the device types with autocast here; torch.amp.is_autocast_available is not traceable by
    # dynamo (torch 2.11), torch.is_autocast_enabled is.
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _follows_autocast(method):
    """Run a layer method on x under the layer's autocast policy (docs/design.md, "Mixed precision").

    Inside a ``torch.autocast`` region the method runs with autocast turned
    off and ``self._autocast`` set to the region's dtype, which
    :meth:`SpaDE._operands` applies to float32 operands once — so every
    backend sees the same half-precision inputs and no op inside a backend is
    recast behind its back (their exact stages compute in float32 on purpose).
    """

    @functools.wraps(method)
    def wrapper(self, x, *args, **kwargs):
        device_type = self.prototypes.device.type
        dtype = _autocast_dtype(device_type)
        if dtype is None:
            return method(self, x, *args, **kwargs)
        previous = self.__dict__.get("_autocast")
        with torch.autocast(device_type, enabled=False), _set(self, "_autocast", dtype, previous):
            return method(self, x, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _set(obj, name, value, previous):
    obj.__dict__[name] = value
    try:
        yield
    finally:
        obj.__dict__[name] = previous


def _inverse_softplus(y: float) -> float:
    # log(expm1(y)), stable for small and large y.
    return y + math.log(-math.expm1(-y))


class SpaDE(nn.Module):
    """Sparsemax Distance Encoder SAE (Hindupur et al., arXiv 2503.01822).

    z = sparsemax(−λ·‖x − a_k‖²),   x̂ = z·W_dec (+ b_dec).

    Parameters
    ----------
    d_in : int
        Input (activation) dimension d.
    d_sae : int
        Number of latents K.
    lambda_init : float, optional
        Initial λ; default 1/(2·d_in).  λ = softplus(raw parameter) stays > 0.
    gamma_reg : float
        Weight γ of the distance-weighted L1 regulariser (default 0.1).
    use_bias : bool
        Add a decoder bias b_dec (the paper uses none).
    reg_on : {"encoder", "decoder"}
        Distances of the regulariser: to the encoder prototypes (paper
        default) or to the decoder rows.
    backend : str
        Encoder backend (see :func:`spade_kernels.available_backends`).
    backend_options : dict, optional
        Options of the sparse backend's candidate search and the pipeline's
        ``search`` (as for :func:`spade_kernels.spade_encode`), e.g.
        ``{"search": "pruned"}`` or, for ``triton``, ``{"precision": "tf32"}``;
        checked at the first call (they depend on the backend ``auto`` picks).
        Not saved in checkpoints.
    device, dtype
        Parameter placement, as for any ``nn.Module``.

    Notes
    -----
    Paper initialisation: prototypes ~ N(0, 1), ``W_dec`` a copy of the
    prototypes.  :meth:`init_from_data` sets both to random training samples.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        lambda_init: float | None = None,
        gamma_reg: float = 0.1,
        use_bias: bool = False,
        reg_on: str = "encoder",
        backend: str = "auto",
        backend_options: dict | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("d_sae", d_sae)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        settings = self.validate_settings(
            d_in, lambda_init=lambda_init, gamma_reg=gamma_reg, reg_on=reg_on, backend=backend
        )
        self.d_in, self.d_sae = d_in, d_sae
        self.lambda_init = settings["lambda_init"]
        self.gamma_reg = settings["gamma_reg"]
        backend, reg_on = settings["backend"], settings["reg_on"]
        self.use_bias = use_bias
        self.reg_on = reg_on
        self.backend = backend
        if backend_options is not None and not isinstance(backend_options, dict):
            raise TypeError(f"backend_options must be a dict, got {type(backend_options).__name__}")
        self.backend_options = dict(backend_options or {})
        factory = {"device": device, "dtype": dtype}
        self.prototypes = nn.Parameter(torch.empty(d_sae, d_in, **factory))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **factory))
        # λ's raw parameter is at least float32 whatever ``dtype`` is (see _apply).
        raw_dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        self.lambda_raw = nn.Parameter(torch.empty((), device=device, dtype=raw_dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory)) if use_bias else None
        if self.prototypes.device.type != "meta":  # (meta: nothing to fill; to_empty, then reset_parameters)
            self.reset_parameters()

    @staticmethod
    def validate_settings(
        d_in: int,
        *,
        lambda_init: float | None = None,
        gamma_reg: float = 0.1,
        reg_on: str = "encoder",
        backend: str = "auto",
    ) -> dict:
        """The layer's settings checked and normalised, as the constructor takes them.

        Returns ``{"lambda_init", "gamma_reg", "reg_on", "backend"}`` with λ's
        default 1/(2·d_in) filled in and the backend's canonical name; raises
        a ``TypeError``/``ValueError`` naming the setting otherwise.  Adapters
        that hold their own configuration (SAELens, dictionary_learning) call
        this, so every entry point accepts the same values.
        """
        if lambda_init is None:
            lambda_init = 1.0 / (2 * d_in)
        if isinstance(lambda_init, (bool, np.bool_)) or not isinstance(lambda_init, numbers.Real):
            raise TypeError(f"lambda_init must be a float, got {lambda_init!r}")
        lambda_init = float(lambda_init)
        if not (math.isfinite(lambda_init) and lambda_init > 0):
            raise ValueError(f"lambda_init must be a finite float > 0, got {lambda_init!r}")
        if lambda_init > _LAMBDA_MAX:
            raise ValueError(
                f"lambda_init = {lambda_init!r} overflows float32 (λ is held in float32): it must be "
                f"≤ {_LAMBDA_MAX:.3g}"
            )
        if lambda_init < _LAMBDA_MIN:
            # λ = softplus(raw) is held in float32: below its smallest normal value it
            # underflows towards 0, where the codes stop depending on the data.
            raise ValueError(
                f"lambda_init = {lambda_init!r} underflows float32 (λ would round to ~0): "
                f"it must be ≥ {_LAMBDA_MIN:.3g}"
            )
        if (
            isinstance(gamma_reg, (bool, np.bool_))
            or not isinstance(gamma_reg, numbers.Real)
            or not (math.isfinite(gamma_reg) and gamma_reg >= 0)
        ):
            raise ValueError(f"gamma_reg must be a finite float >= 0, got {gamma_reg!r}")
        gamma_reg = float(gamma_reg)
        if reg_on not in ("encoder", "decoder"):
            raise ValueError(f"reg_on must be 'encoder' or 'decoder', got {reg_on!r}")
        # Fail early on unknown names; availability depends on the tensors'
        # device and is checked per call (a layer may be built on the CPU and
        # moved to a GPU afterwards).
        return {
            "lambda_init": float(lambda_init),
            "gamma_reg": float(gamma_reg),
            "reg_on": reg_on,
            "backend": check_backend_name(backend),
        }

    # -- parameters ---------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # λ's raw parameter stays at least float32 through .to(dtype) and
        # .half()/.bfloat16() (and keeps its value: no round trip through the
        # half type): at λ ≈ 1/(2d) it is ≈ −7, where bfloat16's step (0.0625)
        # would swallow every optimizer update.
        before = self.lambda_raw.detach().clone()
        out = super()._apply(fn, recurse)
        raw = self.lambda_raw
        if raw.dtype != torch.promote_types(raw.dtype, torch.float32):
            raw.data = before.to(device=raw.device, dtype=torch.float32)
        return out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper init: prototypes ~ N(0, 1), W_dec = prototypes, λ = lambda_init."""
        nn.init.normal_(self.prototypes)
        self.W_dec.copy_(self.prototypes)
        self.lambda_raw.fill_(_inverse_softplus(self.lambda_init))
        if self.b_dec is not None:
            self.b_dec.zero_()

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> SpaDE:
        """Make a layer trained on ``scale·x`` take ``x`` itself; returns ``self``.

        SpaDE is not scale-homogeneous: ‖s·x − a‖² = s²·‖x − a/s‖², so the
        prototypes become a/s and λ becomes λ·s² (the codes are unchanged), and
        W_dec, b_dec become W_dec/s, b_dec/s (the output is x̂/s, in x's units).

        Raises a ``ValueError`` naming ``scale`` and its allowed range for this
        layer when λ·s² or the divided weights would leave the parameters'
        range (λ is held in float32); the layer is then unchanged.
        """
        if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.Tensor)):
            raise TypeError(f"scale must be a float, got {scale!r}")
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
        lam = F.softplus(self.lambda_raw.double()).item()  # float64: λ·s² may be large
        # λ·s² within the normal range of λ's dtype (float32, or float64 for a float64 layer); the weights
        # divided by s within their dtype's range.
        info = torch.finfo(self.lambda_raw.dtype)
        lo, hi = math.sqrt(float(info.tiny) / lam), math.sqrt(float(info.max) / lam)
        weights = [self.prototypes, self.W_dec] + ([self.b_dec] if self.b_dec is not None else [])
        largest = max(float(w.detach().abs().max()) if w.numel() else 0.0 for w in weights)
        if largest > 0:
            lo = max(lo, largest / float(torch.finfo(self.prototypes.dtype).max))
        if not lo <= scale <= hi:
            raise ValueError(
                f"scale = {scale:.6g} is outside [{lo:.3g}, {hi:.3g}], the range this layer can fold: λ·scale² "
                f"(λ = {lam:.3g}) must stay in {self.lambda_raw.dtype}'s normal range and the weights divided by "
                "scale finite"
            )
        self.prototypes.div_(scale)
        self.W_dec.div_(scale)
        if self.b_dec is not None:
            self.b_dec.div_(scale)
        self.lambda_raw.fill_(_inverse_softplus(lam * scale * scale))
        return self

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> SpaDE:
        """Set prototypes and W_dec to random rows of ``x`` (..., d_in).

        Rows are drawn without replacement when there are at least ``d_sae``
        of them, with replacement otherwise.  Returns ``self``.
        """
        check_tensor("x", x, min_ndim=1)
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[1] != self.d_in:
            raise ValueError(f"x must have {self.d_in} features, got shape {tuple(x.shape)}")
        n = flat.shape[0]
        if n == 0:
            raise ValueError("init_from_data needs at least one sample, got none")
        if n >= self.d_sae:
            pick = torch.randperm(n, generator=generator)[: self.d_sae]
        else:
            pick = torch.randint(n, (self.d_sae,), generator=generator)
        rows = flat[pick.to(flat.device)].to(self.prototypes)
        self.prototypes.copy_(rows)
        self.W_dec.copy_(rows)
        return self

    @property
    def lam(self) -> torch.Tensor:
        """λ = softplus(lambda_raw) (a differentiable 0-d tensor)."""
        return F.softplus(self.lambda_raw)

    # -- encoder / decoder --------------------------------------------------

    def _check_device(self, name: str, t: torch.Tensor) -> None:
        if t.device != self.prototypes.device:
            raise ValueError(
                f"{name} is on {t.device} but the SpaDE parameters are on {self.prototypes.device}"
            )

    def _check_input(self, x: torch.Tensor) -> None:
        check_tensor("x", x, min_ndim=1)
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must have shape (..., {self.d_in}), got {tuple(x.shape)}")
        self._check_device("x", x)
        check_has_data(x)

    def _check_no_functorch(self, what: str, *tensors: torch.Tensor) -> None:
        check_no_functorch(what, *tensors, *(p for p in self.parameters()))

    def _backend(self, x: torch.Tensor, dtype: torch.dtype):
        return resolve_backend(self.backend, x.device, dtype)

    def _operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x flattened to (B, d_in) and the prototypes, both in their common dtype.

        Inside ``torch.autocast`` a float32 common dtype becomes the region's
        (bfloat16/float16); see :func:`_follows_autocast`.
        """
        dtype = torch.promote_types(x.dtype, self.prototypes.dtype)
        half = self.__dict__.get("_autocast")
        if half is not None and dtype == torch.float32:
            dtype = half
        return x.reshape(-1, self.d_in).to(dtype), self.prototypes.to(dtype)

    @_follows_autocast
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Dense encoder scores −λ·‖x − a_k‖², shape (..., d_sae): B×K memory.

        What sparsemax projects (``sparsemax(layer.scores(x))`` equals
        ``layer.encode(x)``); for hooks and analyses that need the dense
        pre-activations.  Differentiable by autograd.
        """
        return -self.lam * self.distances(x)

    @_follows_autocast
    def distances(
        self, x: torch.Tensor, *, to: str = "encoder", codes: SparseCodes | None = None
    ) -> torch.Tensor:
        """Squared distances ‖x − r_k‖² to the prototypes (``to="encoder"``) or the decoder rows.

        Without ``codes``: dense, shape (..., d_sae) (B×K memory).  With
        ``codes`` (of this ``x``): only on their support, shape (..., C),
        computed directly, with a sparse backward; padding slots hold the
        distance to latent 0, and their code is 0.  The regulariser of
        :meth:`forward` is Σ z·D with these distances.
        """
        self._check_input(x)
        if to not in ("encoder", "decoder"):
            raise ValueError(f"to must be 'encoder' or 'decoder', got {to!r}")
        flat, A = self._operands(x)
        rows = A if to == "encoder" else self.W_dec.to(flat.dtype)
        if codes is None:
            return squared_distances(flat, rows, naive=False).reshape(*x.shape[:-1], self.d_sae)
        self._check_no_functorch("SpaDE.distances on a support", x, codes.values)
        idx = codes.indices.reshape(-1, codes.width)
        if idx.shape[0] != flat.shape[0]:
            raise ValueError(f"codes hold {idx.shape[0]} rows but x has {flat.shape[0]}")
        D = gather_sq_dist(products_for(self._primitives(flat), compute_dtype(flat.dtype)), flat, rows, idx)
        return D.reshape(codes.indices.shape)

    def _codes(self, x: torch.Tensor, dense: bool):
        """The codes of x flattened: dense (B, d_sae) when ``dense`` and ``reference``, :class:`SparseCodes` otherwise."""
        self._check_input(x)
        self._check_no_functorch("SpaDE.encode", x)
        flat, A = self._operands(x)
        backend = self._backend(x, flat.dtype)
        if backend.dense and dense:
            return dense_codes(flat, A, self.lam)[0]
        return encode_codes(backend, flat, A, self.lam, self.backend_options)

    @_follows_autocast
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes (..., d_sae)."""
        codes = self._codes(x, dense=True)
        dense = codes.to_dense() if isinstance(codes, SparseCodes) else codes
        return dense.reshape(*x.shape[:-1], self.d_sae)

    @_follows_autocast
    def encode_sparse(self, x: torch.Tensor) -> SparseCodes:
        """Sparse codes, indices/values of shape (..., C); rows in blocks within the memory budget."""
        return self._codes(x, dense=False).reshape_batch(x.shape[:-1])

    @_follows_autocast
    def decode(self, z) -> torch.Tensor:
        """x̂ from dense codes (..., d_sae) or :class:`SparseCodes`.

        Sparse codes are decoded by a gather-matmul over their support (no
        densifying); its backward is sparse as well.
        """
        if isinstance(z, SparseCodes):
            self._check_no_functorch("SpaDE.decode of SparseCodes", z.values)
            if z.n_latents != self.d_sae:
                raise ValueError(f"codes have n_latents={z.n_latents}, expected {self.d_sae}")
            self._check_device("codes", z.values)
            if z.indices.numel() and not (0 <= int(z.indices.min()) and int(z.indices.max()) < self.d_sae):
                raise ValueError(
                    f"codes.indices must lie in [0, {self.d_sae}), got values outside that range"
                )
            return sparse_decode(
                products_for(self._primitives(z.values), self.W_dec.dtype), z, self.W_dec, self.b_dec
            )
        check_tensor("z", z, min_ndim=1)
        if z.shape[-1] != self.d_sae:
            raise ValueError(f"z must have shape (..., {self.d_sae}), got {tuple(z.shape)}")
        self._check_device("z", z)
        out = z.to(self.W_dec.dtype) @ self.W_dec
        return out + self.b_dec if self.b_dec is not None else out

    def _primitives(self, t: torch.Tensor):
        """The primitives of the products over a support of ``t``'s codes."""
        return product_primitives(self._backend(t, t.dtype))

    @_follows_autocast
    def forward(self, x: torch.Tensor) -> SpaDEOutput:
        """Encode, decode and compute the SpaDE loss (docs/design.md, "Mathematics")."""
        self._check_input(x)
        self._check_no_functorch("SpaDE.forward", x)
        flat, A = self._operands(x)
        backend = self._backend(x, flat.dtype)
        codes = encode_codes(backend, flat, A, self.lam, self.backend_options)
        # Against x itself (not its autocast copy), in x̂'s dtype.
        x_hat, loss, mse, reg = spade_loss(
            product_primitives(backend), codes, flat, x.reshape(-1, self.d_in), self.W_dec, self.b_dec,
            self.gamma_reg, self.reg_on,
        )  # fmt: skip
        lead = x.shape[:-1]
        return SpaDEOutput(x_hat.reshape(*lead, self.d_in), codes.reshape_batch(lead), loss, mse, reg)

    def mean_l0(self, codes: SparseCodes) -> torch.Tensor:
        """The mean number of active latents per row of ``codes`` (a 0-d tensor)."""
        return codes.support_size.float().mean()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this layer's parameters (the sharded layer's version is collective)."""
        return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_sae={self.d_sae}, lambda_init={self.lambda_init:.3g}, "
            f"gamma_reg={self.gamma_reg}, use_bias={self.use_bias}, reg_on={self.reg_on!r}, "
            f"backend={self.backend!r}"
        )

    # -- checkpoints (SAELens layout) ---------------------------------------

    def config(self) -> dict:
        """The ``cfg.json`` contents."""
        return {
            "architecture": "spade",
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.prototypes.dtype).removeprefix("torch."),
            "lambda_init": self.lambda_init,
            "gamma_reg": self.gamma_reg,
            "use_bias": self.use_bias,
            "reg_on": self.reg_on,
            # SAELens reads configs without this key as pre-6.0 ones, whose
            # default subtracts b_dec from the input; SpaDE never does.
            "apply_b_dec_to_input": False,
        }

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``sae_weights.safetensors`` and ``cfg.json`` into directory ``path``.

        Each file is written atomically (a temporary file, fsync, rename) with
        the mode the user's umask gives, and temporaries a killed earlier write
        left there are removed first.  The safetensors metadata holds a CRC-32
        of every tensor's bytes, which :meth:`from_pretrained` checks.
        """
        from safetensors.torch import save_file

        from .files import CHECKSUM_KEY, atomic_write, checksums, remove_stale_temporaries

        os.makedirs(path, exist_ok=True)
        remove_stale_temporaries(path)
        tensors = {
            "prototypes": self.prototypes,
            "W_dec": self.W_dec,
            "lambda_raw": self.lambda_raw,
        }
        if self.b_dec is not None:
            tensors["b_dec"] = self.b_dec
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        metadata = {CHECKSUM_KEY: json.dumps(checksums(cpu))}
        atomic_write(os.path.join(path, WEIGHTS_NAME), lambda tmp: save_file(cpu, tmp, metadata=metadata))
        text = json.dumps(self.config(), indent=2)

        def write_cfg(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(os.path.join(path, CONFIG_NAME), write_cfg)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, device=None, dtype=None, backend: str = "auto"
    ) -> SpaDE:
        """Load a layer written by :meth:`save_pretrained`.

        ``path`` is the checkpoint directory or its ``cfg.json``.  Everything
        is checked before the weights are allocated, and every problem raises
        a ``ValueError`` (``FileNotFoundError`` for a missing file) naming the
        file and the field: a malformed ``cfg.json`` or any of its settings,
        weights of another shape or dtype kind, a truncated file.  Then the
        layer is built without initialising it and each tensor is read
        straight into its parameter (memory: the weights once), its CRC-32
        checked where the file records one (files this package wrote), its
        values checked finite, and λ = softplus(lambda_raw) checked to be
        representable in the layer's float32 λ.
        """
        backend = check_backend_name(backend)
        ckpt = read_checkpoint(path, dtype)
        if device is None:
            device = torch.empty(()).device  # torch's default device, as for any module
        layer = cls(**ckpt.settings, backend=backend, device="meta", dtype=ckpt.dtype)
        layer.to_empty(device=device)
        with torch.no_grad():
            for name, param in layer.state_dict().items():
                ckpt.read(name, param)
        ckpt.check_lambda(layer.lambda_raw)
        return layer


class Checkpoint(NamedTuple):
    """A ``save_pretrained`` checkpoint whose ``cfg.json`` and safetensors header were checked (nothing allocated)."""

    cfg_path: str
    weights_path: str
    settings: dict
    dtype: torch.dtype
    header: dict
    start: int
    crcs: dict

    def read(self, name: str, dest: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Read tensor ``name`` (or its ``rows`` lo:hi) into ``dest`` and check it: CRC-32 (whole tensors), finite."""
        from .files import one_line, read_tensor_into

        try:
            read_tensor_into(
                self.weights_path,
                self.header,
                self.start,
                name,
                dest,
                None if rows else self.crcs.get(name),
                rows,
            )
        except OSError as exc:
            raise ValueError(f"{self.weights_path} cannot be read ({one_line(exc)})") from None
        if not _all_finite(dest):
            raise ValueError(f"{self.weights_path}: {name!r} must hold finite floats (it holds NaN or inf)")

    def check_lambda(self, raw: torch.Tensor) -> None:
        """λ = softplus(raw), in raw's dtype (float32, or float64 for a float64 layer), must be a normal number."""
        lam = F.softplus(raw.detach())
        tiny = float(torch.finfo(raw.dtype).tiny)
        if not float(lam) >= tiny:
            exact = F.softplus(raw.detach().double()).item()
            raise ValueError(
                f"{self.weights_path}: 'lambda_raw' = {raw.item():.6g} gives λ = softplus(lambda_raw) = {exact:.3g}, "
                f"below {str(raw.dtype).removeprefix('torch.')}'s smallest normal number {tiny:.3g}: λ would round to ~0"
            )


def _all_finite(t: torch.Tensor, block: int = 1 << 20) -> bool:
    """``torch.isfinite(t).all()`` in blocks (the mask of a whole weight matrix would be a quarter of it again)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + block]).all()) for i in range(0, flat.numel(), block))


def _dtype_arg(value, where: str) -> torch.dtype:
    """A floating torch dtype from a dtype or its name; ValueError naming ``where`` otherwise."""
    if isinstance(value, str):
        value = getattr(torch, value, value)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"{where} must be a floating torch dtype (float32, float64, bfloat16, float16), got {value!r}"
        )
    return value


def read_checkpoint(path: str | os.PathLike, dtype=None) -> Checkpoint:
    """Check a checkpoint's ``cfg.json`` and its weights' header (:meth:`SpaDE.from_pretrained`'s first half)."""
    from .files import CHECKSUM_KEY, header_dtype, one_line, read_json, read_safetensors_header

    path = os.fspath(path)
    if os.path.basename(path) == CONFIG_NAME and os.path.isfile(path):
        path = os.path.dirname(path) or "."
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r}")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("architecture") != "spade":
        raise ValueError(f"{cfg_path} describes architecture {cfg.get('architecture')!r}, not 'spade'")
    for key in ("d_in", "d_sae"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{cfg_path}: {key!r} must be a positive integer, got {value!r}")
    # SAELens options this layer does not implement: refuse rather than load a different model.
    unsupported = {
        "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input") and cfg.get("use_bias", False),
        # (SAELens folds an "expected_average_only_in" scale into the weights it saves.)
        "normalize_activations": cfg.get("normalize_activations")
        not in (None, "none", "expected_average_only_in"),
        "reshape_activations": cfg.get("reshape_activations") not in (None, "none"),
    }
    for key, bad in unsupported.items():
        if bad:
            raise ValueError(
                f"{cfg_path} sets {key}={cfg[key]!r}, which SpaDE.from_pretrained does not implement; "
                "load it with sae_lens.SAE.load_from_disk (after importing spade_kernels.sae.integrations.sae_lens)"
            )
    use_bias = cfg.get("use_bias", False)
    if not isinstance(use_bias, bool):
        raise ValueError(f"{cfg_path}: 'use_bias' must be true or false, got {use_bias!r}")
    try:
        checked = SpaDE.validate_settings(
            cfg["d_in"],
            # SAELens inference checkpoints carry no training-only keys.
            lambda_init=cfg.get("lambda_init"),
            gamma_reg=cfg.get("gamma_reg", 0.1),
            reg_on=cfg.get("reg_on", "encoder"),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_path}: {exc}") from None
    settings = {
        "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "lambda_init": checked["lambda_init"],
        "gamma_reg": checked["gamma_reg"], "use_bias": use_bias, "reg_on": checked["reg_on"],
    }  # fmt: skip
    dtype = (
        _dtype_arg(dtype, "dtype")
        if dtype is not None
        else _dtype_arg(cfg.get("dtype", "float32"), f"{cfg_path}: 'dtype'")
    )
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path!r}")
    try:
        header, start = read_safetensors_header(weights_path)
    except OSError as exc:
        raise ValueError(f"{weights_path} cannot be read ({one_line(exc)})") from None
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    expected = {"prototypes": (d_sae, d_in), "W_dec": (d_sae, d_in), "lambda_raw": ()}
    if use_bias:
        expected["b_dec"] = (d_in,)
    held = sorted(k for k in header if k != "__metadata__")
    missing = sorted(set(expected) - set(held))
    if missing:
        raise ValueError(f"{weights_path} lacks {missing} (holds {held})")
    unexpected = sorted(set(held) - set(expected))
    if unexpected:
        raise ValueError(f"{weights_path} holds tensors this layer does not have: {unexpected}")
    for name, shape in expected.items():
        info = header[name]
        if tuple(info["shape"]) != shape:
            raise ValueError(
                f"{weights_path}: {name!r} has shape {tuple(info['shape'])} but {cfg_path} "
                f"(d_in={d_in}, d_sae={d_sae}) says {shape}"
            )
        if not header_dtype(info).is_floating_point:
            raise ValueError(f"{weights_path}: {name!r} must hold finite floats, got dtype {info['dtype']}")
    crcs = {}
    recorded = (header.get("__metadata__") or {}).get(CHECKSUM_KEY)
    if recorded is not None:
        try:
            crcs = {k: int(v) for k, v in json.loads(recorded).items()}
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"{weights_path}: its checksum metadata {CHECKSUM_KEY!r} is damaged") from None
    return Checkpoint(cfg_path, weights_path, settings, dtype, header, start, crcs)
