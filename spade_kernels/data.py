"""Data for training SpaDE: the paper's two synthetic settings and activation files.

The synthetic sets follow the experiments of Hindupur et al. (arXiv 2503.01822)
in spirit: concepts that are not linearly separable (``make_separability``) and
concepts of different intrinsic dimension (``make_heterogeneity``).  Both are
deterministic given ``seed`` and never touch the global RNG.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "SyntheticDataset",
    "load_activations",
    "make_heterogeneity",
    "make_separability",
    "scale_to_unit_norm",
]


@dataclass
class SyntheticDataset:
    """Samples with ground-truth concept labels.

    Attributes
    ----------
    x : Tensor, float32, shape (N, d)
        The samples.
    labels : Tensor, int64, shape (N,)
        Concept id of each sample, in ``[0, n_concepts)``.
    intrinsic_dim : Tensor, int64, shape (n_concepts,)
        Dimension of the manifold each concept lives on.
    name : str
        ``"separability"`` or ``"heterogeneity"``.
    """

    x: torch.Tensor
    labels: torch.Tensor
    intrinsic_dim: torch.Tensor
    name: str

    @property
    def n_concepts(self) -> int:
        return self.intrinsic_dim.numel()


def _balanced_labels(n_samples: int, n_concepts: int, gen: torch.Generator) -> torch.Tensor:
    # Equal class sizes (up to one sample) in shuffled order, so any prefix is a fair sample.
    if n_samples < n_concepts:
        raise ValueError(f"n_samples must be at least the number of concepts ({n_concepts}), got {n_samples}")
    labels = torch.arange(n_samples) % n_concepts
    return labels[torch.randperm(n_samples, generator=gen)]


def make_separability(
    n_samples: int = 32768, *, n_ring: int = 6, noise: float = 0.35, seed: int = 0
) -> SyntheticDataset:
    """2-D Gaussian concepts, some of which no linear encoder can separate.

    Construction (``2·n_ring + 1`` concepts of equal size, all isotropic
    Gaussians with std ``noise``):

    * concept 0 at the origin;
    * concepts 1 … ``n_ring`` on an inner circle of radius 2, equally spaced;
    * concepts ``n_ring + 1`` … ``2·n_ring`` on an outer circle of radius 4,
      rotated by half a step so each sits between two inner ones.

    The centre lies inside the convex hull of the inner ring, and each inner
    cluster inside the hull of the centre and the outer ring, so neither can
    be cut off from the rest by one hyperplane (a ReLU/TopK latent); only the
    outer clusters can.  A distance-based, local encoder like SpaDE can isolate
    every one of them.  ``intrinsic_dim`` is 2 for all.

    Parameters
    ----------
    n_samples : int
        Number of samples N.
    n_ring : int
        Clusters per circle (at least 3, so each ring encloses what is inside).
    noise : float
        Standard deviation of each cluster.
    seed : int
        Seed of the private generator.

    Returns
    -------
    SyntheticDataset
        ``x`` of shape (N, 2).
    """
    if n_ring < 3:
        raise ValueError(f"n_ring must be >= 3 so a ring encloses the centre, got {n_ring}")
    gen = torch.Generator().manual_seed(seed)
    step = 2 * math.pi / n_ring
    angles = step * torch.arange(n_ring)
    inner = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)
    outer = 4.0 * torch.stack([(angles + step / 2).cos(), (angles + step / 2).sin()], 1)
    centres = torch.cat([torch.zeros(1, 2), inner, outer])
    labels = _balanced_labels(n_samples, len(centres), gen)
    x = centres[labels] + noise * torch.randn(n_samples, 2, generator=gen)
    intrinsic = torch.full((len(centres),), 2, dtype=torch.int64)
    return SyntheticDataset(x.float(), labels, intrinsic, "separability")


def make_heterogeneity(
    n_samples: int = 32768,
    d: int = 128,
    *,
    dims: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
    noise: float = 0.05,
    seed: int = 0,
) -> SyntheticDataset:
    """High-dimensional concepts of different intrinsic dimensions.

    Construction: concept i lives on a random affine subspace of dimension
    ``dims[i]``: x = μ_i + U_i·c + ε with offset μ_i ~ N(0, I_d), an
    orthonormal basis U_i (d × d_i, QR of a Gaussian matrix), coefficients
    c ~ N(0, I_{d_i}) and isotropic noise ε ~ N(0, ``noise``²·I_d).  Offsets
    are ~√(2d) apart, larger than the concepts' own extent (√d_i), so the
    concepts are separated; a SpaDE encoder should use more active latents
    for higher-dimensional concepts.

    Parameters
    ----------
    n_samples : int
        Number of samples N (split equally among the concepts).
    d : int
        Ambient dimension.
    dims : tuple of int
        Intrinsic dimension of each concept (each ≤ ``d``).
    noise : float
        Standard deviation of the isotropic off-subspace noise.
    seed : int
        Seed of the private generator.

    Returns
    -------
    SyntheticDataset
        ``x`` of shape (N, d).
    """
    if not dims or any(k < 1 or k > d for k in dims):
        raise ValueError(f"dims must be a non-empty tuple of ints in [1, d={d}], got {dims}")
    gen = torch.Generator().manual_seed(seed)
    labels = _balanced_labels(n_samples, len(dims), gen)
    x = noise * torch.randn(n_samples, d, generator=gen)
    for i, k in enumerate(dims):
        rows = (labels == i).nonzero().squeeze(1)
        basis, _ = torch.linalg.qr(torch.randn(d, k, generator=gen))
        offset = torch.randn(d, generator=gen)
        x[rows] += offset + torch.randn(rows.numel(), k, generator=gen) @ basis.T
    return SyntheticDataset(x, labels, torch.tensor(dims, dtype=torch.int64), "heterogeneity")


def load_activations(path: str | os.PathLike) -> torch.Tensor:
    """Read an activation matrix from a ``.pt``, ``.npy`` or ``.safetensors`` file.

    ``.pt`` and ``.safetensors`` files may hold one tensor, or several with
    one named ``"activations"``.  Leading dimensions are flattened, so
    (batch, seq, d) activations become (batch·seq, d).

    Parameters
    ----------
    path : str or PathLike
        The file.

    Returns
    -------
    Tensor, float32, shape (N, d)

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For an unsupported suffix, no tensor found, a non-float dtype, fewer
        than 2 dimensions or no samples.  The message names the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"activation file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .pt, .npy or .safetensors")
    try:
        data = _READERS[suffix](path)
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"{path}: not a readable {suffix} file ({exc})") from None
    except Exception as exc:  # each reader fails its own way on a damaged file
        # Empty, truncated or foreign files: EOFError, pickle and zip errors,
        # SafetensorError, RuntimeError from torch's stream reader, …
        raise ValueError(f"{path}: not a readable {suffix} file ({type(exc).__name__}: {exc})") from None
    if not data.is_floating_point():
        raise ValueError(f"{path}: activations must be floating point, got {data.dtype}")
    if data.dim() < 2 or data.shape[-1] == 0 or data.numel() == 0:
        raise ValueError(
            f"{path}: activations must have shape (..., d) with N, d > 0, got {tuple(data.shape)}"
        )
    return data.reshape(-1, data.shape[-1]).float().contiguous()


def _read_npy(path: Path) -> torch.Tensor:
    import numpy as np

    # allow_pickle=False: an object array would otherwise run arbitrary code.
    return torch.from_numpy(np.load(path, allow_pickle=False))


def _read_pt(path: Path) -> torch.Tensor:
    return _pick_tensor(torch.load(path, map_location="cpu", weights_only=True), path)


def _read_safetensors(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return _pick_tensor(load_file(path), path)


_READERS = {".npy": _read_npy, ".pt": _read_pt, ".safetensors": _read_safetensors}


def _pick_tensor(obj: object, path: Path) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        if isinstance(obj.get("activations"), torch.Tensor):
            return obj["activations"]
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        raise ValueError(
            f"{path}: found {len(tensors)} tensors and none named 'activations'; "
            "save a single tensor or name it 'activations'"
        )
    raise ValueError(f"{path}: no tensor found (the file holds a {type(obj).__name__})")


def scale_to_unit_norm(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Scale ``x`` (N, d) so that E‖x‖² = d, the paper's preprocessing.

    Returns
    -------
    x_scaled : Tensor
        ``x * factor``.
    factor : float
        √(d / mean_n ‖x_n‖²); divide reconstructions by it to return to the
        original scale.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (N, d) with N > 0, got {tuple(x.shape)}")
    mean_sq = x.double().pow(2).sum(1).mean().item()
    if not (math.isfinite(mean_sq) and mean_sq > 0):
        raise ValueError(f"cannot scale x: its mean squared norm is {mean_sq}")
    factor = math.sqrt(x.shape[1] / mean_sq)
    return x * factor, factor
