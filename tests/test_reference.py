import math

import pytest
import torch
from entmax import sparsemax as entmax_sparsemax

from spade_kernels import reference as R


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 129), (2, 1000)])
def test_sparsemax_matches_entmax(shape):
    s = torch.randn(shape, dtype=torch.float64) * 3
    torch.testing.assert_close(R.sparsemax_reference(s), entmax_sparsemax(s, dim=-1), atol=1e-12, rtol=0)


def test_sparsemax_is_the_simplex_projection():
    # Check the KKT conditions directly: z = max(s − τ, 0) with Σz = 1.
    s = torch.randn(20, 50, dtype=torch.float64)
    z = R.sparsemax_reference(s)
    tau = R.sparsemax_threshold(s)
    torch.testing.assert_close(z, (s - tau).clamp_min(0))
    torch.testing.assert_close(z.sum(-1), torch.ones(20, dtype=torch.float64))
    assert (z >= 0).all()


def test_threshold_bounds():
    # DESIGN §2 fact 2: max s − 1 ≤ τ ≤ max s − 1/K.
    s = torch.randn(30, 17, dtype=torch.float64) * 5
    tau = R.sparsemax_threshold(s).squeeze(-1)
    m = s.max(-1).values
    assert (tau >= m - 1 - 1e-12).all() and (tau <= m - 1 / 17 + 1e-12).all()


def test_any_dim():
    s = torch.randn(4, 6, 5, dtype=torch.float64)
    z = R.sparsemax_reference(s, dim=1)
    torch.testing.assert_close(z, R.sparsemax_reference(s.transpose(1, 2), dim=-1).transpose(1, 2))


def test_neg_inf_and_ties():
    s = torch.tensor([[1.0, -math.inf, 1.0, 0.0], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    z = R.sparsemax_reference(s)
    torch.testing.assert_close(z[0], torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(z[1], torch.full((4,), 0.25, dtype=torch.float64))


def test_nan_rows_only():
    s = torch.randn(3, 8)
    s[1, 2] = math.nan
    s[2, :] = -math.inf
    z = R.sparsemax_reference(s)
    assert torch.isnan(z[1]).all() and torch.isnan(z[2]).all()
    assert torch.isfinite(z[0]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computed_in_fp32(dtype):
    s = torch.randn(5, 40).to(dtype)
    z = R.sparsemax_reference(s)
    assert z.dtype == dtype
    torch.testing.assert_close(z, R.sparsemax_reference(s.float()).to(dtype))


def test_naive_and_expanded_distances_agree():
    x, A = torch.randn(9, 13, dtype=torch.float64), torch.randn(31, 13, dtype=torch.float64)
    torch.testing.assert_close(
        R.squared_distances(x, A, naive=True), R.squared_distances(x, A, naive=False), atol=1e-10, rtol=0
    )


def test_forward_reference_loss_terms():
    x, A = torch.randn(6, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    W = torch.randn(10, 4, dtype=torch.float64)
    x_hat, z, loss, mse, reg = R.spade_forward_reference(x, A, W, 0.3, gamma_reg=0.5)
    D = ((x[:, None] - A[None]) ** 2).sum(-1)
    torch.testing.assert_close(x_hat, z @ W)
    torch.testing.assert_close(mse, ((x - z @ W) ** 2).sum(-1).mean())
    torch.testing.assert_close(reg, (z * D).sum(-1).mean())
    torch.testing.assert_close(loss, mse + 0.5 * reg)
    _, _, _, _, reg_dec = R.spade_forward_reference(x, A, W, 0.3, reg_on="decoder")
    torch.testing.assert_close(reg_dec, (z * ((x[:, None] - W[None]) ** 2).sum(-1)).sum(-1).mean())
