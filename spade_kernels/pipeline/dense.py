"""The ``reference`` backend's computation: dense B×K distances and a sort-based sparsemax.

Differentiable by autograd through the distances and the closed-form
sparsemax backward; the oracle the fast backends are compared with.
"""

from __future__ import annotations

import torch

from ..reference import squared_distances
from ..sparsemax import sparsemax_sort

__all__ = ["dense_codes"]


def dense_codes(x: torch.Tensor, prototypes: torch.Tensor, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense codes z and distances D (B×K each) of x (B, d).

    Distances in the input dtype (the paper's low-precision path), the
    projection in float32 at least: codes of half inputs are float32.
    """
    D = squared_distances(x, prototypes, naive=False)
    return sparsemax_sort((-lam * D).to(torch.promote_types(D.dtype, torch.float32)), dim=-1), D
