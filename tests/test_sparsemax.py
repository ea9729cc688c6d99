import math

import pytest
import torch
from entmax import sparsemax as entmax_sparsemax

import spade_kernels as sk
from spade_kernels.reference import sparsemax_reference


@pytest.mark.parametrize("shape,dim", [((3, 7), -1), ((4, 5, 6), 1), ((129,), 0), ((2, 1), -1)])
def test_gradcheck(shape, dim):
    s = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sk.sparsemax(t, dim), (s,))


def test_backward_is_support_mean_formula():
    s = torch.randn(8, 30, dtype=torch.float64, requires_grad=True)
    g = torch.randn(8, 30, dtype=torch.float64)
    z = sk.sparsemax(s)
    (grad,) = torch.autograd.grad(z, s, g)
    S = z > 0
    mean = (g * S).sum(-1, keepdim=True) / S.sum(-1, keepdim=True)
    torch.testing.assert_close(grad, torch.where(S, g - mean, torch.zeros_like(g)))
    # Its row sums vanish (DESIGN §2 fact 5).
    torch.testing.assert_close(grad.sum(-1), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)


def test_matches_entmax_forward_and_backward():
    s = torch.randn(5, 64, dtype=torch.float64) * 2
    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    g = torch.randn(5, 64, dtype=torch.float64)
    za, zb = sk.sparsemax(a), entmax_sparsemax(b, dim=-1)
    torch.testing.assert_close(za, zb)
    za.backward(g)
    zb.backward(g)
    torch.testing.assert_close(a.grad, b.grad)


def test_wide_rows():
    s = torch.randn(3, 70000, dtype=torch.float64) * 4
    z = sk.sparsemax(s)
    torch.testing.assert_close(z, entmax_sparsemax(s, dim=-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.sum(-1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    s = torch.randn(6, 33)
    z = sk.sparsemax(s.to(dtype))
    assert z.dtype == dtype
    # sparsemax returns the input dtype (like torch.softmax), so half-precision
    # outputs carry their own rounding: half an ulp of values up to 1, and Σz
    # drifts by about √n of those.  (SpaDE codes of half inputs are float32
    # and meet the 1e-3 of DESIGN §4: tests/test_encode.py.)
    tol = {torch.float16: 2**-11, torch.bfloat16: 2**-8}.get(dtype, 1e-6)
    torch.testing.assert_close(z.double(), sparsemax_reference(s.to(dtype).double()), atol=tol, rtol=0)
    assert abs(z.double().sum(-1) - 1).max() <= tol * s.shape[1] ** 0.5


def test_non_contiguous_input():
    base = torch.randn(40, 12, dtype=torch.float64)
    s = base.t()  # (12, 40), non-contiguous
    assert not s.is_contiguous()
    torch.testing.assert_close(sk.sparsemax(s), sparsemax_reference(s.contiguous()))


def test_neg_inf_is_valid_and_nan_is_isolated():
    s = torch.tensor([[0.0, -math.inf, 2.0], [math.nan, 0.0, 1.0], [1.0, 1.0, -math.inf]])
    z = sk.sparsemax(s)
    torch.testing.assert_close(z[0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.isnan(z[1]).all()
    torch.testing.assert_close(z[2], torch.tensor([0.5, 0.5, 0.0]))


def test_nan_row_gradient_is_nan_only_there():
    s = torch.randn(3, 5, dtype=torch.float64)
    s[1, 0] = math.nan
    s.requires_grad_()
    sk.sparsemax(s).backward(torch.ones(3, 5, dtype=torch.float64))
    assert torch.isnan(s.grad[1]).all()
    assert torch.isfinite(s.grad[[0, 2]]).all()


def test_errors():
    with pytest.raises(TypeError, match="floating"):
        sk.sparsemax(torch.arange(4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        sk.sparsemax([1.0, 2.0])
    with pytest.raises(ValueError, match="out of range"):
        sk.sparsemax(torch.randn(3, 4), dim=2)
    with pytest.raises(ValueError, match="0-d"):
        sk.sparsemax(torch.tensor(1.0))
