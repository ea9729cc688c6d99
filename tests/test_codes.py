import math

import pytest
import torch

import spade_kernels as sk
from spade_kernels.reference import sparsemax_reference


def _dense_codes(shape):
    return sparsemax_reference(torch.randn(shape) * 3)


def test_from_dense_to_dense_round_trip_and_padding():
    z = _dense_codes((9, 40))
    codes = sk.SparseCodes.from_dense(z)
    torch.testing.assert_close(codes.to_dense(), z)
    assert codes.indices.dtype == torch.int64
    assert codes.width == int((z > 0).sum(-1).max())
    torch.testing.assert_close(codes.support_size, (z > 0).sum(-1))
    slot = torch.arange(codes.width)
    pad = slot >= codes.support_size[:, None]
    # Padding convention: index 0 and value 0 after the support.
    assert (codes.indices[pad] == 0).all() and (codes.values[pad] == 0).all()
    assert (codes.values[~pad] > 0).all()
    # Support is sorted by value, descending.
    assert (codes.values[:, :-1] >= codes.values[:, 1:]).all()


def test_leading_dims():
    z = _dense_codes((2, 3, 17))
    codes = sk.SparseCodes.from_dense(z)
    assert codes.indices.shape[:2] == (2, 3) and codes.support_size.shape == (2, 3)
    assert codes.shape == (2, 3, 17)
    torch.testing.assert_close(codes.to_dense(), z)


def test_nan_rows():
    z = _dense_codes((3, 8))
    z[1] = math.nan
    codes = sk.SparseCodes.from_dense(z)
    assert codes.support_size[1] == 0
    dense = codes.to_dense()
    assert torch.isnan(dense[1]).all()
    torch.testing.assert_close(dense[[0, 2]], z[[0, 2]])


def test_to_dense_is_differentiable():
    z = _dense_codes((4, 10)).requires_grad_()
    codes = sk.SparseCodes.from_dense(z)
    w = torch.randn(4, 10)
    (codes.to_dense() * w).sum().backward()
    torch.testing.assert_close(z.grad, torch.where(z > 0, w, torch.zeros_like(w)))


def test_validation():
    idx = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="same shape"):
        sk.SparseCodes(idx, torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), 5)
    with pytest.raises(TypeError, match="int64"):
        sk.SparseCodes(idx.int(), torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="support_size"):
        sk.SparseCodes(idx, torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64), 5)
