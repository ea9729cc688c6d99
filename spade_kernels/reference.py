"""Plain-PyTorch oracle for SpaDE (docs/design.md, "Mathematics").

Everything here is written for clarity, not speed: sort-based sparsemax, dense
B×K scores and the paper's naive B×K×d distance tensor.  Every fast backend is
tested against these functions run in float64.
"""

from __future__ import annotations

import torch

from .numerics import sorted_threshold

__all__ = [
    "spade_encode_reference",
    "spade_forward_reference",
    "spade_scores",
    "sparsemax_reference",
    "sparsemax_threshold",
    "squared_distances",
]


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _shift_to_row_max(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores − m, m) with m each row's finite maximum (0 where it is not finite).

    Sparsemax is shift-invariant (docs/design.md, fact 1); working relative to the maximum
    keeps cumulative sums and s − τ accurate for large |s|.
    """
    top = scores.amax(dim=-1, keepdim=True) if scores.shape[-1] else scores.sum(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return scores - top, top


def _shifted_threshold(rel: torch.Tensor) -> torch.Tensor:
    """Sort-based τ of rows already shifted by :func:`_shift_to_row_max`; NaN where undefined.

    The threshold itself is :func:`spade_kernels.numerics.sorted_threshold`
    (the one sort-based τ of the package); rows with a NaN or +inf entry, and
    rows that are all −inf, have no sparsemax.
    """
    tau = sorted_threshold(torch.sort(rel, dim=-1, descending=True).values).unsqueeze(-1)
    bad = torch.isnan(rel).any(dim=-1, keepdim=True) | (rel == float("inf")).any(dim=-1, keepdim=True)
    return torch.where(bad | torch.isinf(tau), torch.full_like(tau, float("nan")), tau)


def sparsemax_threshold(scores: torch.Tensor) -> torch.Tensor:
    """Exact sparsemax threshold τ of every row of ``scores`` (last dim).

    Sort-based (Martins & Astudillo, 2016): with s sorted descending and
    cumulative sums c_j, the support size is the largest j with
    ``1 + j·s_j > c_j`` and τ = (c_k − 1) / k.  −inf entries never enter the
    support.  Rows containing NaN or +inf, and rows that are all −inf, have no
    sparsemax: their τ is NaN.
    """
    rel, top = _shift_to_row_max(scores)
    return _shifted_threshold(rel) + top


def sparsemax_reference(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Exact sort-based sparsemax along ``dim`` (no custom backward).

    float16/bfloat16 inputs are computed in float32 and rounded back.  A row
    with a NaN or +inf entry (or only −inf entries) gives NaN for that row.
    """
    if not input.is_floating_point():
        raise TypeError(f"sparsemax_reference: input must be a floating tensor, got {input.dtype}")
    work = input.float() if _low_precision(input.dtype) else input
    work = work.movedim(dim, -1)
    if work.shape[-1] == 0:
        return input.clone()
    rel, _ = _shift_to_row_max(work)  # so that s − τ never subtracts two large numbers
    tau = _shifted_threshold(rel)
    out = torch.clamp(rel - tau, min=0)
    out = torch.where(torch.isnan(tau), torch.full_like(out, float("nan")), out)
    return out.movedim(-1, dim).to(input.dtype)


def squared_distances(x: torch.Tensor, prototypes: torch.Tensor, *, naive: bool = True) -> torch.Tensor:
    """D[b, k] = ‖x_b − a_k‖² for x (B, d) and prototypes (K, d).

    ``naive=True`` is the paper's formulation: it materialises the B×K×d
    difference tensor (only for small shapes).  ``naive=False`` expands the
    square (‖x‖² − 2x·a + ‖a‖², clamped at 0): B×K memory, exact enough in
    float64, and what the ``reference`` backend uses at real sizes.
    """
    if naive:
        return ((x[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)
    xx = (x * x).sum(-1, keepdim=True)
    aa = (prototypes * prototypes).sum(-1)
    return torch.addmm(xx + aa, x, prototypes.t(), alpha=-2).clamp_min_(0)


def spade_scores(x: torch.Tensor, prototypes: torch.Tensor, lam, *, naive: bool = True) -> torch.Tensor:
    """SpaDE encoder scores s = −λ·D (docs/design.md, "Mathematics")."""
    return -lam * squared_distances(x, prototypes, naive=naive)


def spade_encode_reference(
    x: torch.Tensor, prototypes: torch.Tensor, lam, *, naive: bool = True
) -> torch.Tensor:
    """Dense SpaDE codes z = sparsemax(−λ·‖x − a‖²) for x (B, d)."""
    return sparsemax_reference(spade_scores(x, prototypes, lam, naive=naive), dim=-1)


def spade_forward_reference(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    W_dec: torch.Tensor,
    lam,
    *,
    b_dec: torch.Tensor | None = None,
    gamma_reg: float = 0.1,
    reg_on: str = "encoder",
    naive: bool = True,
):
    """The paper's SpaDE forward and loss, written out densely.

    Returns ``(x_hat, z, loss, mse, reg)`` with
    ``mse = mean_b ‖x_b − x̂_b‖²``, ``reg = mean_b Σ_k z[b,k]·D[b,k]`` where D
    uses the encoder prototypes (``reg_on="encoder"``) or the decoder rows
    (``reg_on="decoder"``), and ``loss = mse + gamma_reg·reg``.
    """
    D = squared_distances(x, prototypes, naive=naive)
    z = sparsemax_reference(-lam * D, dim=-1)
    x_hat = z @ W_dec
    if b_dec is not None:
        x_hat = x_hat + b_dec
    mse = ((x - x_hat) ** 2).sum(-1).mean()
    D_reg = D if reg_on == "encoder" else squared_distances(x, W_dec, naive=naive)
    reg = (z * D_reg).sum(-1).mean()
    return x_hat, z, mse + gamma_reg * reg, mse, reg
