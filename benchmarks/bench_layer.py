"""pytest-benchmark: one SpaDE training step (forward + loss + backward)."""

import pytest
import torch
from conftest import pedantic

import spade_kernels as sk
from spade_kernels import _ext


@pytest.mark.parametrize("backend", ["reference", "torch"] + (["cuda"] if _ext.available() else []))
def test_layer_train_step(benchmark, backend):
    B, d, K = 256, 128, 4096
    layer = sk.SpaDE(d, K, backend=backend)
    x = torch.randn(B, d)
    benchmark.group = f"train step B={B} d={d} K={K}"

    def step():
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.loss.backward()
        return out

    out = pedantic(benchmark, step)
    assert torch.isfinite(out.loss)
