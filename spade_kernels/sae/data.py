"""Data for training SpaDE: the paper's two synthetic settings, activation files and shard folders.

The synthetic sets follow the experiments of Hindupur et al. (arXiv 2503.01822)
in spirit: concepts that are not linearly separable (``make_separability``) and
concepts of different intrinsic dimension (``make_heterogeneity``).  Both are
deterministic given ``seed`` and never touch the global RNG.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "RAW_SCALE",
    "ActivationShards",
    "RowSummary",
    "SyntheticDataset",
    "check_raw_scale",
    "check_rows",
    "load_activations",
    "make_heterogeneity",
    "make_separability",
    "open_activations",
    "row_blocks",
    "scale_to_unit_norm",
    "scan_rows",
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
    with _reading(path):
        data = _READERS[suffix](path)
    if not data.is_floating_point():
        raise ValueError(f"{path}: activations must be floating point, got {data.dtype}")
    if data.dim() < 2 or data.shape[-1] == 0 or data.numel() == 0:
        raise ValueError(
            f"{path}: activations must have shape (..., d) with N, d > 0, got {tuple(data.shape)}"
        )
    return data.reshape(-1, data.shape[-1]).float().contiguous()


@contextlib.contextmanager
def _reading(path: Path):
    """Any failure while reading ``path`` as one ValueError that names it.

    Each reader fails its own way on an empty, truncated or foreign file:
    EOFError, pickle and zip errors, SafetensorError, RuntimeError from
    torch's stream reader, NumPy's ValueError, …
    """
    from spade_kernels.files import one_line

    suffix = path.suffix.lower()
    try:
        yield
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"{path}: not a readable {suffix} file ({one_line(exc)})") from None
    except Exception as exc:
        raise ValueError(f"{path}: not a readable {suffix} file ({one_line(exc)})") from None


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
    # Detached: activations saved with requires_grad would otherwise tie every batch to the file's tensor.
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        if isinstance(obj.get("activations"), torch.Tensor):
            return obj["activations"].detach()
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0].detach()
        raise ValueError(
            f"{path}: found {len(tensors)} tensors and none named 'activations'; "
            "save a single tensor or name it 'activations'"
        )
    raise ValueError(f"{path}: no tensor found (the file holds a {type(obj).__name__})")


@dataclass(frozen=True)
class RowSummary:
    """What one streaming pass over (N, d) activations found (:func:`scan_rows`).

    ``mean_sq`` and ``max_sq``: the mean and largest squared row norm (in
    float64); ``crc32``: a CRC-32 of every row's float32 bytes in order, so
    it changes with any value and with the rows' order (the data fingerprint
    of a resumable run).
    """

    n: int
    d: int
    mean_sq: float
    max_sq: float
    crc32: int


#: The raw activations a float32 SpaDE checkpoint can take (the checkpoint holds the training scale
#: folded into its weights, docs/training.md): every row's ‖x‖² ≤ float32's largest number / 4
#: (squared distances stay finite), and a mean ‖x‖² in [1e-30, 1e30] (λ·scale² and the prototypes/scale
#: of the fold stay in float32's normal range, with room for λ to move in training).
RAW_SCALE = (1e-30, 1e30)
RAW_MAX_SQ = float(torch.finfo(torch.float32).max) / 4


def scan_rows(
    x: torch.Tensor | ActivationShards, *, name: str = "x", fingerprint: bool = False
) -> RowSummary:
    """One pass over ``x`` (N, d) or shards, block by block: the :class:`RowSummary`, refusing bad rows.

    A non-finite value (or one beyond float32's range) is a ``ValueError``
    naming the first such row and ``name`` or, for shards, the file.  The
    CRC-32 is computed only with ``fingerprint`` (on the CPU: a GPU tensor's
    blocks are copied back for it); otherwise ``crc32`` is 0.
    """
    import zlib

    if isinstance(x, ActivationShards):
        blocks = x.blocks(with_source=True)
    else:
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"x must have shape (N, d) with N > 0, got {tuple(x.shape)}")
        blocks = (((name, s), b) for s, b in row_blocks(x))
    total, largest, crc = 0.0, 0.0, 0
    for where, block in blocks:
        sq = _row_norms_checked(block, where)
        total += float(sq.sum())
        largest = max(largest, float(sq.max()))
        if fingerprint:
            rows = block.detach().float().contiguous().cpu().numpy()
            crc = zlib.crc32(memoryview(rows).cast("B"), crc)
    return RowSummary(x.shape[0], x.shape[1], total / x.shape[0], largest, crc)


def check_raw_scale(summary: RowSummary, name: str) -> None:
    """Refuse activations a float32 checkpoint cannot encode (:data:`RAW_SCALE`, :data:`RAW_MAX_SQ`), naming ``name``."""
    lo, hi = RAW_SCALE
    if lo <= summary.mean_sq <= hi and summary.max_sq <= RAW_MAX_SQ:
        return
    size = math.sqrt(summary.mean_sq)
    fix = (
        f"divide them by ~{size:.0e}"
        if summary.mean_sq > hi or summary.max_sq > RAW_MAX_SQ
        else (f"multiply them by ~{1 / size:.0e}")
    )
    raise ValueError(
        f"{name}: activations of mean ‖x‖² = {summary.mean_sq:.3g} (largest {summary.max_sq:.3g}) are outside "
        f"what a float32 SpaDE checkpoint takes (mean ‖x‖² in [{lo:g}, {hi:g}], every ‖x‖² ≤ {RAW_MAX_SQ:.3g}): "
        f"its squared distances or its folded λ would leave float32's range; {fix} first"
    )


def scale_to_unit_norm(
    x: torch.Tensor | ActivationShards, *, name: str = "x", summary: RowSummary | None = None
) -> tuple[torch.Tensor | ActivationShards, float]:
    """Scale ``x`` (N, d) so that E‖x‖² = d, the paper's preprocessing.

    Also the data's sanity check (:func:`scan_rows`, unless its ``summary``
    is passed): values must be finite (the message names the first row, and
    ``name`` or, for shards, the file) and not all zero.  Shards are read
    once, block by block, and scaled as their batches are read.

    Returns
    -------
    x_scaled : Tensor or ActivationShards
        ``x * factor``.
    factor : float
        √(d / mean_n ‖x_n‖²); divide reconstructions by it to return to the
        original scale.
    """
    summary = summary or scan_rows(x, name=name)
    mean_sq = summary.mean_sq
    if not mean_sq > 0:
        raise ValueError("cannot scale the data: every value is 0")
    if not math.isfinite(mean_sq):
        raise ValueError(
            f"cannot scale the data: its mean squared norm {mean_sq} overflows float64 (values up to "
            f"{math.sqrt(mean_sq):.3g} in norm); rescale it before training"
        )
    factor = math.sqrt(x.shape[1] / mean_sq)
    return (x.scaled(factor) if isinstance(x, ActivationShards) else x * factor), factor


def _row_norms_checked(block: torch.Tensor, where: tuple) -> torch.Tensor:
    """‖row‖² of ``block`` in float64; ValueError naming the first non-finite row.

    ``where``: (source, the block's first row[, row stride]).
    """
    finite = torch.isfinite(block).all(1)
    if not bool(finite.all()):
        name, first, stride = (*where, 1)[:3]
        bad = int((~finite).nonzero()[0, 0])
        last = first + (block.shape[0] - 1) * stride
        raise ValueError(
            f"{name}: row {first + bad * stride} holds NaN or inf values (or values beyond float32's "
            f"range) ({int((~finite).sum())} such rows in rows {first}–{last}); SpaDE needs finite activations"
        )
    return block.double().pow(2).sum(1)


#: float32 bytes read at a time by the streaming passes (scaling, evaluation).
BLOCK_BYTES = 8 << 20


def row_blocks(x: torch.Tensor | ActivationShards, rows: int | None = None):
    """(first row, block) pairs covering ``x`` in order, ``rows`` at a time: bounded memory.

    ``rows`` defaults to :data:`BLOCK_BYTES` of float32 rows.  A tensor's
    blocks are views in its dtype; shards' are float32 (scaled).
    """
    rows = rows or max(1, BLOCK_BYTES // (4 * x.shape[1]))
    if isinstance(x, ActivationShards):
        start = 0
        for _, block in x.blocks(rows):
            yield start, block
            start += block.shape[0]
        return
    for start in range(0, x.shape[0], rows):
        yield start, x[start : start + rows]


def check_rows(x: torch.Tensor | ActivationShards, d_in: int) -> None:
    """``x`` must be (N, d_in) with N > 0: a tensor or shards (whose N > 0 their opening checked)."""
    if isinstance(x, ActivationShards):
        if x.d != d_in:
            raise ValueError(f"the shards in {x.folder} have d = {x.d}, expected d_in = {d_in}")
    elif x.dim() != 2 or x.shape[1] != d_in or x.shape[0] == 0:
        raise ValueError(f"x must have shape (N, {d_in}) with N > 0, got {tuple(x.shape)}")


def open_activations(path: str | os.PathLike) -> torch.Tensor | ActivationShards:
    """A file as a tensor (:func:`load_activations`), a directory as :class:`ActivationShards`."""
    return ActivationShards(path) if Path(path).is_dir() else load_activations(path)


class _Shard:
    """One shard file: its path, the name of its tensor (.pt/.safetensors) and its (rows, d)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key = None
        with _reading(path):
            if path.suffix.lower() == ".safetensors":
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    keys = list(f.keys())
                    self.key = "activations" if "activations" in keys else keys[0] if len(keys) == 1 else None
                    if self.key is None:
                        raise ValueError(
                            f"{path}: found {len(keys)} tensors and none named 'activations'; "
                            "save a single tensor or name it 'activations'"
                        )
                    shape = tuple(f.get_slice(self.key).get_shape())
                    dtype = f.get_slice(self.key).get_dtype()
                    readable = dtype in ("F16", "BF16", "F32", "F64")
                    contiguous = True
            else:
                data = self.open_raw()
                shape, dtype, readable, contiguous = tuple(data.shape), data.dtype, *_layout(data)
        if not readable:
            raise ValueError(
                f"{path}: activations must be float16, bfloat16, float32 or float64 in the machine's "
                f"byte order, got {dtype}"
            )
        if len(shape) < 2 or shape[-1] == 0 or math.prod(shape) == 0:
            raise ValueError(f"{path}: activations must have shape (..., d) with N, d > 0, got {shape}")
        if not contiguous:
            # Flattening the leading dimensions would copy the whole shard into memory.
            raise ValueError(
                f"{path}: a {len(shape)}-d shard must be stored C-contiguous (it would be copied whole "
                "to flatten it); save np.ascontiguousarray(a) or t.contiguous(), or a 2-d (N, d) array"
            )
        self.rows, self.d = math.prod(shape[:-1]), shape[-1]

    def open_raw(self):
        """The shard's data without reading it: a NumPy memmap (.npy) or a memory-mapped tensor."""
        suffix = self.path.suffix.lower()
        if suffix == ".npy":
            import numpy as np

            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        if suffix == ".pt":
            return _pick_tensor(
                torch.load(self.path, map_location="cpu", weights_only=True, mmap=True), self.path
            )
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(self.key)


def _layout(data) -> tuple[bool, bool]:
    """(a dtype the readers convert exactly to float32 arithmetic, rows reachable without a copy)."""
    if isinstance(data, torch.Tensor):
        readable = data.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        return readable, data.dim() <= 2 or data.is_contiguous()
    readable = data.dtype.kind == "f" and data.dtype.itemsize in (2, 4, 8) and data.dtype.isnative
    return readable, data.ndim <= 2 or data.flags.c_contiguous


class _OpenShard:
    """A shard opened for reading: rows by local index (this part's rows, in file order), as float32."""

    def __init__(self, shard: _Shard, span: tuple[int, int, int]) -> None:
        raw = shard.open_raw()
        self.data = raw.reshape(-1, shard.d)
        self.offset, self.stride, _ = span
        self.numpy = not isinstance(raw, torch.Tensor)

    def take(self, local: torch.Tensor) -> torch.Tensor:
        rows = local * self.stride + self.offset
        if self.numpy:
            import numpy as np

            return torch.from_numpy(np.ascontiguousarray(self.data[rows.numpy()])).float()
        return self.data[rows].float()

    def span(self, start: int, stop: int) -> torch.Tensor:
        a, b = start * self.stride + self.offset, (stop - 1) * self.stride + self.offset + 1
        block = self.data[a : b : self.stride]
        if self.numpy:
            import numpy as np

            return torch.from_numpy(np.array(block)).float()
        return block.to(torch.float32, copy=True)  # never the mapped memory itself (scaled in place)


def _spans(files: list[_Shard], index: int, count: int) -> list[tuple[int, int, int]]:
    """Each file's (first row, stride, rows) in part ``index`` of ``count`` of the files' (N, d) matrix.

    The part holds the global rows g ≡ index (mod count) with g < N − N mod count.
    """
    total = sum(f.rows for f in files)
    used, g, spans = total - total % count, 0, []
    for f in files:
        first = (index - g) % count
        spans.append((first, count, len(range(first, min(f.rows, max(0, used - g)), count))))
        g += f.rows
    return spans


class ActivationShards:
    """A directory of activation files, read one file at a time: training data larger than RAM.

    Every ``.npy``, ``.pt`` and ``.safetensors`` file of the directory (in
    name order) is a shard of shape (..., d), one ``d`` for all.  Opening
    reads only headers; data are read as batches are drawn: ``.npy`` and
    ``.pt`` memory-mapped, ``.safetensors`` one file at a time.  An epoch
    (:meth:`epoch_batches`) visits the shards in a random order and the rows
    of each in a random order, so memory holds one shard's mapping, its row
    permutation (8 bytes a row) and one batch, whatever the total.

    ``len(shards)`` and ``shards.shape`` are those of the (N, d) matrix the
    files make together; :meth:`scaled` and :meth:`part` give lazily scaled
    and strided views: under ``torchrun`` each of R data replicas trains on
    the rows r, r + R, … of that matrix (the last N mod R rows dropped, so
    every replica has the same number of rows and so of steps).
    """

    def __init__(self, folder: str | os.PathLike, *, scale: float = 1.0) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"activation directory not found: {folder}")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _READERS)
        if not files:
            raise ValueError(f"{folder}: no .npy, .pt or .safetensors files in the directory")
        self.folder = folder
        self.files = [_Shard(p) for p in files]
        d = self.files[0].d
        for shard in self.files[1:]:
            if shard.d != d:
                raise ValueError(f"{shard.path}: d = {shard.d}, but {self.files[0].path} has d = {d}")
        self.d, self.factor, self.part_of = d, float(scale), (0, 1)
        self.spans = _spans(self.files, 0, 1)

    @property
    def rows(self) -> list[int]:
        """Rows of each file in this view."""
        return [n for _, _, n in self.spans]

    def __len__(self) -> int:
        return sum(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.d)

    def __repr__(self) -> str:
        return f"ActivationShards({os.fspath(self.folder)!r}, files={len(self.files)}, shape={self.shape})"

    def scaled(self, factor: float) -> ActivationShards:
        """These shards with every row multiplied by ``factor`` (on top of any earlier scale)."""
        return self._view(self.factor * factor, self.part_of)

    def part(self, index: int, count: int) -> ActivationShards:
        """Rows ``index, index + count, …`` of the whole (N, d) matrix, the last N mod count dropped.

        One data-parallel replica's part: every part has ⌊N / count⌋ rows.
        """
        if self.part_of != (0, 1):
            raise ValueError("part() of a part is not supported")
        if not 0 <= index < count:
            raise ValueError(f"part index must be in [0, {count}), got {index}")
        if len(self) < count:
            raise ValueError(f"{self.folder}: {len(self)} rows cannot be split over {count} data replicas")
        return self._view(self.factor, (index, count))

    def _view(self, factor, part) -> ActivationShards:
        view = object.__new__(ActivationShards)
        view.folder, view.files, view.d = self.folder, self.files, self.d
        view.factor, view.part_of = factor, part
        view.spans = _spans(self.files, *part)
        return view

    def _scale(self, block: torch.Tensor) -> torch.Tensor:
        return block if self.factor == 1.0 else block.mul_(self.factor)

    def _read_error(self, shard: _Shard, exc: Exception) -> ValueError:
        from spade_kernels.files import one_line

        return ValueError(f"{shard.path}: reading failed ({one_line(exc)})")

    def blocks(self, rows: int | None = None, *, with_source: bool = False):
        """float32 blocks of up to ``rows`` rows, shard by shard in file order (scaled; this part's rows).

        With ``with_source``, (file, the block's first row in the file, the row stride) come first.
        ``rows`` defaults to :data:`BLOCK_BYTES` of float32 rows.
        """
        rows = rows or max(1, BLOCK_BYTES // (4 * self.d))
        for shard, span in zip(self.files, self.spans):
            first, stride, n = span
            if n == 0:
                continue
            opened = None
            try:
                opened = _OpenShard(shard, span)
                for a in range(0, n, rows):
                    block = self._scale(opened.span(a, min(n, a + rows)))
                    where = (os.fspath(shard.path), first + a * stride, stride)
                    yield (where, block) if with_source else (shard, block)
            except Exception as exc:  # each reader fails its own way: one error naming the file
                raise self._read_error(shard, exc) from None
            finally:
                del opened

    def epoch_batches(self, gen: torch.Generator, batch_size: int, start: int = 0):
        """One epoch's (position, batch) pairs from ``start`` (a multiple of ``batch_size``) on.

        The shards come in the order ``torch.randperm(#shards, generator=gen)``
        and the rows of each in ``torch.randperm(rows, generator=gen)``, drawn
        as the epoch reaches them (skipped shards' too, so that resuming at
        ``start`` draws the same batches).  A batch may span two shards; the
        last one of the epoch may be smaller.
        """
        nonempty = [i for i, n in enumerate(self.rows) if n]
        pieces, have, position, batch_start = [], 0, 0, start
        for i in (nonempty[j] for j in torch.randperm(len(nonempty), generator=gen).tolist()):
            n = self.rows[i]
            perm = torch.randperm(n, generator=gen)
            if position + n <= start:
                position += n
                continue
            offset = max(0, start - position)
            opened = None
            try:
                opened = _OpenShard(self.files[i], self.spans[i])
                while offset < n:
                    take = min(batch_size - have, n - offset)
                    pieces.append(opened.take(perm[offset : offset + take]))
                    have, offset = have + take, offset + take
                    if have == batch_size:
                        yield batch_start, self._scale(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
                        pieces, have, batch_start = [], 0, batch_start + batch_size
            except Exception as exc:  # each reader fails its own way: one error naming the file
                raise self._read_error(self.files[i], exc) from None
            finally:
                del opened
            position += n
        if pieces:
            yield batch_start, self._scale(torch.cat(pieces))

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` distinct random rows (all rows when there are fewer), float32, scaled, in file order."""
        if count < 1:
            raise ValueError(f"sample() needs count >= 1, got {count}")
        n = len(self)
        if n <= 4 * count or n <= 1 << 22:
            pick = torch.randperm(n, generator=generator)[:count]
        else:  # without an N-long permutation: draw until ``count`` distinct rows
            pick = torch.empty(0, dtype=torch.int64)
            while pick.numel() < count:
                pick = torch.cat([pick, torch.randint(n, (2 * count,), generator=generator)]).unique()
            pick = pick[torch.randperm(pick.numel(), generator=generator)[:count]]
        pick, _ = pick.sort()
        out, first = [], 0
        for shard, span in zip(self.files, self.spans):
            rows = span[2]
            local = pick[(pick >= first) & (pick < first + rows)] - first
            if local.numel():
                out.append(self._scale(_OpenShard(shard, span).take(local)))
            first += rows
        return torch.cat(out)

    def fingerprint(self) -> list:
        """Identifies the data across runs: (N, d, each file's name, size and rows, the scale)."""
        files = [[f.path.name, f.path.stat().st_size, f.rows] for f in self.files]
        return [list(self.shape), files, list(self.part_of), self.factor]
