"""pytest-benchmark: one SpaDE training step (forward + loss + backward) — the harness's own cases."""

import pytest
import torch
from conftest import BACKENDS, DEVICE, DTYPE, pedantic, skip_unless_timed

from spade_kernels.bench import make_case

B, D, K = (256, 128, 4096) if DEVICE.type == "cpu" else (4096, 768, 24576)


@pytest.mark.parametrize("name", BACKENDS)
def test_layer_train_step(benchmark, name):
    skip_unless_timed(name)
    fn, _ = make_case(name, "train", B, D, K, DTYPE, DEVICE)
    benchmark.group = f"train step B={B} d={D} K={K}"
    out = pedantic(benchmark, fn)
    assert torch.isfinite(out.loss)
