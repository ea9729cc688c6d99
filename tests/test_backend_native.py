"""The ``native`` backend's own knobs (the contracts run it too: tests/test_contract_*.py).

Its score chunking, and that it runs the compiled ops.  With SPADE_TEST_GPU=1
(and an extension built with CUDA) the chunking test runs the CUDA kernels too.
"""

import pytest
import torch
from conftest import plan_of, run_product

import spade_kernels as sk
from spade_kernels import _ext, pipeline
from spade_kernels.backends import native as N
from spade_kernels.backends import torch_ as T
from spade_kernels.testing import assert_codes_match_reference

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension unavailable: {_ext.reason}")


@pytest.mark.parametrize(
    "B,d,K,chunk", [(1, 1, 1, 4096), (7, 3, 5, 2), (129, 16, 1000, 64), (65, 40, 3000, 1000)]
)
def test_matches_reference_fp32_every_chunking(device, B, d, K, chunk):
    x, A = torch.randn(B, d, device=device), torch.randn(K, d, device=device)
    lam = 1.0 / (2 * d)
    z, idx, size, _ = pipeline.encode_forward(plan_of(N.PRIMITIVES, x, A, {"chunk": chunk}), x, A, lam)
    codes = sk.SparseCodes(idx, z, size, K)
    assert_codes_match_reference(codes, x.cpu(), A.cpu(), lam)


def test_half_precision_decoders_take_the_torch_products():
    # The kernels compute in float32/float64; the pipeline routes bfloat16 decoder weights to the
    # torch backend's products rather than failing.
    w = torch.rand(4, 3)
    idx = torch.randint(0, 9, (4, 3))
    W = torch.randn(9, 5).bfloat16()
    with pipeline.dense_products(False):
        got = run_product(N.PRIMITIVES, "gather_matmul", w, idx, W)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), T.gather_matmul(w, idx, W.float()), atol=2e-2, rtol=2e-2)


def test_the_native_backend_runs_the_compiled_ops():
    m = sk.SpaDE(16, 300, backend="native", backend_options={"search": "pruned"})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        m(torch.randn(64, 16)).loss.backward()
    names = {e.name for e in prof.events()}
    assert {
        "spade_kernels::select_candidates",
        "spade_kernels::exact_codes",
        "spade_kernels::support_jacobian",
    } <= names


@pytest.mark.skipif(not _ext.available(), reason="the extension is not built")
def test_a_stale_build_is_named_not_used(monkeypatch):
    # A library built from an older source registers other op names: the native backend must report it
    # as a stale build (and not be picked) instead of failing at its first call.
    monkeypatch.setattr(_ext, "reason", _ext.reason)
    monkeypatch.setattr(_ext, "cuda_reason", _ext.cuda_reason)
    monkeypatch.setattr(_ext, "_PROBE", "spade_kernels::an_op_no_build_registers")
    assert _ext._load() is False
    assert "stale build" in _ext.reason and "rebuild it" in _ext.reason
