"""Edge cases found in review: large scores, empty batches, NaN rows in the
backward, mixed dtypes, reduced-precision matmul settings.  Every backend."""

import math

import pytest
import torch

import spade_kernels as sk
from spade_kernels.numerics import score_margin
from spade_kernels.reference import spade_encode_reference
from spade_kernels.testing import assert_codes_match_reference


def test_scores_beyond_float32_integers(backend):
    # |s| ≈ 2e7 > 2^24: thresholds must be taken relative to the row maximum.
    A, x = torch.randn(64, 16), torch.randn(3, 16)
    x[1] *= 1000
    codes = sk.spade_encode(x, A, 1.0, backend=backend)
    dense = codes.to_dense()
    assert torch.isfinite(dense).all()
    ref = spade_encode_reference(x.double(), A.double(), 1.0)
    torch.testing.assert_close(dense.double(), ref, atol=1e-5, rtol=0)


def test_row_far_from_a_tight_cluster_sums_to_one(backend):
    # All prototypes in a tiny cluster far from x: |s| ≈ 100 with differences ≈ 1e-2.
    A = 5e-3 * torch.randn(400, 2)
    x = torch.tensor([[10.0, 0.0], [3.0, 4.0]])
    for lam in (1.0, 30.0):
        assert_codes_match_reference(sk.spade_encode(x, A, lam, backend=backend), x, A, lam)


def test_sparsemax_of_large_scores():
    z = sk.sparsemax(torch.tensor([[-3e7, -3.1e7]]))
    torch.testing.assert_close(z, torch.tensor([[1.0, 0.0]]))
    z = sk.sparsemax(torch.tensor([[4e12, 4e12 - 0.5]], dtype=torch.float64))
    torch.testing.assert_close(z, torch.tensor([[0.75, 0.25]], dtype=torch.float64))


def test_empty_batch(backend):
    codes = sk.spade_encode(torch.randn(0, 4), torch.randn(20, 4), 0.1, backend=backend)
    assert codes.indices.shape[0] == 0 and codes.to_dense().shape == (0, 20)
    m = sk.SpaDE(4, 20, backend=backend)
    assert m.encode(torch.randn(0, 4)).shape == (0, 20)


def test_nan_row_does_not_poison_other_gradients(sparse_backend):
    backend = sparse_backend
    x = torch.randn(4, 6)
    x[1, 2] = math.nan
    A = torch.randn(30, 6, requires_grad=True)
    lam = torch.tensor(0.1, requires_grad=True)
    codes = sk.spade_encode(x, A, lam, backend=backend)
    keep = torch.tensor([0, 2, 3])
    (codes.values[keep] * torch.randn(3, codes.width)).sum().backward()
    assert torch.isfinite(A.grad).all() and torch.isfinite(lam.grad)


def test_mixed_dtype_layer(backend):
    m = sk.SpaDE(8, 37, backend=backend, dtype=torch.bfloat16)
    out = m(torch.randn(5, 8))  # float32 activations, bfloat16 parameters
    out.loss.backward()
    assert torch.isfinite(out.loss) and m.prototypes.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_reduced_matmul_precision_settings_are_ignored(precision):
    # Trainers often lower float32 matmul precision; candidate selection must
    # still run in IEEE float32 (its margin assumes it), and restore the setting.
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        x, A = torch.randn(64, 256), torch.randn(2048, 256)
        assert_codes_match_reference(sk.spade_encode(x, A, 1 / 512, backend="torch"), x, A, 1 / 512)
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)


def test_margin_is_a_worst_case_bound():
    # Adversarial: all-positive data, every rounding error of a long dot
    # product has the same sign.  The GEMM-form error must stay within half
    # the margin (the margin covers comparing two such scores).
    d = 4096
    x, A = torch.rand(8, d), torch.rand(64, d)
    lam = 1 / (2 * d)
    xx, aa = (x.double() ** 2).sum(1), (A.double() ** 2).sum(1)
    exact = lam * (2 * x.double() @ A.double().t() - aa)
    approx = torch.addmm(aa.float(), x, A.t(), beta=-lam, alpha=2 * lam).double()
    margin = score_margin(xx.float(), aa.float(), lam, d, 2.0**-23).double()
    assert ((approx - exact).abs() <= margin[:, None] / 2).all()


def test_numpy_scalar_lambda_is_a_number_on_every_backend(backend):
    import numpy as np

    x, A = torch.randn(6, 4), torch.randn(10, 4)
    ref = sk.spade_encode(x, A, 0.25, backend=backend).to_dense()
    for lam in (np.float32(0.25), np.float64(0.25)):
        torch.testing.assert_close(
            sk.spade_encode(x, A, lam, backend=backend).to_dense(), ref, rtol=0, atol=0
        )
    with pytest.raises(TypeError, match="lam"):
        sk.spade_encode(x, A, np.bool_(True), backend=backend)


def test_layer_settings_refuse_lambda_underflow_and_non_finite_gamma():
    import numpy as np

    with pytest.raises(ValueError, match="underflows float32"):
        sk.SpaDE(8, 16, lambda_init=1e-50)
    assert sk.SpaDE(8, 16, lambda_init=1e-30).lam.item() == pytest.approx(1e-30, rel=1e-5)
    for gamma in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="gamma_reg must be a finite float >= 0"):
            sk.SpaDE(8, 16, gamma_reg=gamma)
    layer = sk.SpaDE(8, 16, lambda_init=np.float32(0.5), gamma_reg=np.float64(0.2))
    assert isinstance(layer.lambda_init, float) and isinstance(layer.gamma_reg, float)
    assert layer.lam.item() == pytest.approx(0.5, rel=1e-6)


def test_one_nan_policy_for_a_non_finite_prototype(backend):
    x, A = torch.randn(6, 4), torch.randn(10, 4)
    for bad in (math.inf, -math.inf, math.nan):
        A2 = A.clone()
        A2[3, 1] = bad
        z = sk.spade_encode(x, A2, 0.25, backend=backend).to_dense()
        assert torch.isnan(z).all(), (backend, bad)


def test_float32_inputs_too_large_for_their_squares_are_refused_not_nan(backend):
    x, A = torch.randn(6, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="too large for SpaDE's squared distances"):
        sk.spade_encode(x * 1e20, A, 0.25, backend=backend)
    with pytest.raises(ValueError, match="prototypes holds finite values too large"):
        sk.spade_encode(x, A * 1e20, 0.25, backend=backend)
    layer = sk.SpaDE(4, 10, backend=backend)
    with pytest.raises(ValueError, match="too large"):
        layer(x * 1e20)
    # Large but representable magnitudes stay exact (scores are relative to each row).
    z = sk.spade_encode(x * 1e15, A * 1e15, 1e-30, backend=backend).to_dense()
    assert torch.isfinite(z).all() and torch.allclose(z.sum(1), torch.ones(6), atol=1e-5)
    # float64 has the range: no error there.
    assert torch.isfinite(
        sk.spade_encode((x * 1e20).double(), A.double(), 1e-40, backend="reference").to_dense()
    ).all()


def test_meta_tensors_get_one_error_on_every_backend(backend):
    # The codes' shape depends on the values: no backend can run on meta tensors, and all say so alike.
    x, A = torch.randn(4, 8, device="meta"), torch.randn(16, 8, device="meta")
    with pytest.raises(ValueError, match="need tensors with data, got tensors on the meta device"):
        sk.spade_encode(x, A, 0.1, backend=backend)
    layer = sk.SpaDE(8, 16, backend=backend, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        layer(x)
    assert sk.sparsemax(x).shape == (4, 8)  # a shape-only op still runs on meta
