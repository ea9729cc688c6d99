"""The C++ extension's CPU ops (spade_kernels._C), when built."""

import math

import pytest
import torch

from spade_kernels import _ext
from spade_kernels.backends import backend_status
from spade_kernels.reference import sparsemax_reference

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension unavailable: {_ext.reason}")


@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (3, 70000), (5, 131072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.01, 1.0, 40.0])
def test_sparsemax_rows_matches_reference(shape, dtype, scale):
    s = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    out, tau = torch.ops.spade.sparsemax_rows(s)
    ref = sparsemax_reference(s.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-5 + 4e-7 * float(s.abs().max())
    assert (out.double() - ref).abs().max() <= tol
    torch.testing.assert_close(
        out.double().sum(-1), torch.ones(shape[0], dtype=torch.float64), atol=tol, rtol=0
    )
    torch.testing.assert_close(
        torch.clamp(s.double() - tau.double()[:, None], min=0), out.double(), atol=tol, rtol=0
    )


def test_sparsemax_rows_special_values():
    inf, nan = math.inf, math.nan
    s = torch.tensor(
        [[1.0, -inf, 0.5], [nan, 1.0, 2.0], [-inf, -inf, -inf], [inf, 0.0, 0.0], [-3e7, -3.1e7, -3e7]]
    )
    out, tau = torch.ops.spade.sparsemax_rows(s)
    torch.testing.assert_close(out[0], torch.tensor([0.75, 0.0, 0.25]))
    assert torch.isnan(out[1:4]).all() and torch.isnan(tau[1:4]).all()
    torch.testing.assert_close(out[4], torch.tensor([0.5, 0.0, 0.5]))


def test_sparsemax_rows_errors_and_registration():
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.spade.sparsemax_rows(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.spade.sparsemax_rows(torch.randn(2, 3).half())
    torch.library.opcheck(torch.ops.spade.sparsemax_rows.default, (torch.randn(4, 9),))
    noncontig = torch.randn(9, 4).t()
    torch.testing.assert_close(torch.ops.spade.sparsemax_rows(noncontig)[0], sparsemax_reference(noncontig))


def test_cuda_backend_reason_names_the_missing_ops():
    reason = backend_status()["cuda"]
    assert reason is not None and "CUDA" in reason
