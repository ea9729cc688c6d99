"""Helpers that check codes against the float64 oracle (docs/design.md, "Precision contract").

Used by this package's tests and usable by anyone adding a backend.
"""

from __future__ import annotations

import torch

from .codes import SparseCodes
from .reference import spade_encode_reference, spade_scores

__all__ = ["assert_codes_match_reference", "codes_tolerance"]

_LOW = (torch.float16, torch.bfloat16)


def codes_tolerance(x: torch.Tensor, prototypes: torch.Tensor, lam: float) -> float:
    """The precision contract's float32 tolerance: 1e-5 + 4e-7·max|s| (s in float64)."""
    s = spade_scores(x.double().reshape(-1, x.shape[-1]), prototypes.double(), float(lam), naive=False)
    return 1e-5 + 4e-7 * float(s.abs().max())


def assert_codes_match_reference(
    codes: SparseCodes | torch.Tensor,
    x: torch.Tensor,
    prototypes: torch.Tensor,
    lam: float,
    *,
    low_precision_baseline: torch.Tensor | None = None,
    atol_low: float = 2e-3,
) -> None:
    """Assert ``codes`` obey the precision contract for inputs (x, prototypes, λ).

    float32/float64 inputs: |z − z₆₄| ≤ 1e-5 + 4e-7·max|s|, Σz = 1 ± 1e-5, z ≥ 0.
    float16/bfloat16 inputs: error ≤ 2× the error of ``low_precision_baseline``
    (the reference backend run in the same dtype) + ``atol_low``, Σz = 1 ± 1e-3.
    Rows whose input has a non-finite entry must be NaN.
    """
    dense = codes.to_dense() if isinstance(codes, SparseCodes) else codes
    dense = dense.reshape(-1, prototypes.shape[0]).double()
    x64 = x.double().reshape(-1, x.shape[-1])
    A64 = prototypes.double()
    bad = ~torch.isfinite(x64).all(-1)
    if not torch.isfinite(A64).all():
        bad[:] = True
    assert torch.isnan(dense[bad]).all(), "rows with non-finite input must be NaN"
    good = ~bad
    if not good.any():
        return
    dense, x64 = dense[good], x64[good]
    ref = spade_encode_reference(x64, A64, float(lam), naive=x64.shape[0] * A64.numel() <= 1 << 24)
    err = (dense - ref).abs().max().item()
    low = x.dtype in _LOW or prototypes.dtype in _LOW
    sum_tol = 1e-3 if low else 1e-5
    assert torch.isfinite(dense).all(), "codes of finite inputs must be finite"
    assert (dense >= 0).all(), "codes must be non-negative"
    sum_err = (dense.sum(-1) - 1).abs().max().item()
    assert sum_err <= sum_tol, f"rows must sum to 1: max |Σz − 1| = {sum_err:.3g} > {sum_tol}"
    if low:
        base = low_precision_baseline.reshape(-1, prototypes.shape[0]).double()[good]
        base_err = (base - ref).abs().max().item()
        tol = 2 * base_err + atol_low
    else:
        tol = codes_tolerance(x64, A64, lam)
    assert err <= tol, f"max |z − z_ref| = {err:.3g} exceeds the tolerance {tol:.3g}"
