"""pytest-benchmark: ``sparsemax`` forward + backward against entmax's."""

import pytest
import torch
from conftest import pedantic
from entmax import sparsemax as entmax_sparsemax

import spade_kernels as sk


@pytest.mark.parametrize("impl", ["spade_kernels", "entmax"])
def test_sparsemax_fwd_bwd(benchmark, impl):
    s = torch.randn(256, 16384, requires_grad=True)
    g = torch.randn(256, 16384)
    fn = sk.sparsemax if impl == "spade_kernels" else (lambda t: entmax_sparsemax(t, dim=-1))
    benchmark.group = "sparsemax (256, 16384) fwd+bwd"

    def step():
        s.grad = None
        fn(s).backward(g)

    pedantic(benchmark, step)
    assert torch.isfinite(s.grad).all()
