"""pytest-benchmark: ``spade_encode`` per backend, with the floor — the harness's own cases."""

import pytest
import torch
from conftest import BACKENDS, DEVICE, DTYPE, pedantic, skip_unless_timed

from spade_kernels.bench import make_case

SHAPES = [(256, 128, 4096), (512, 256, 8192)] if DEVICE.type == "cpu" else [(4096, 768, 24576)]


@pytest.mark.parametrize("B,d,K", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", ["floor", *BACKENDS])
def test_encode(benchmark, name, B, d, K):
    skip_unless_timed(name)
    fn, _ = make_case(name, "encode", B, d, K, DTYPE, DEVICE)
    benchmark.group = f"encode B={B} d={d} K={K}"
    codes = pedantic(benchmark, fn)
    if name != "floor":
        assert codes.n_latents == K
        torch.testing.assert_close(
            codes.values.float().sum(-1), torch.ones(B, device=DEVICE), atol=1e-3, rtol=0
        )
