"""The ``torch`` backend's own promise (the contracts run it too: tests/test_contract_*.py): PyTorch ops only."""

import pytest
import torch

import spade_kernels as sk


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_torch_and_reference_backends_run_no_compiled_op(backend):
    # "torch" is PyTorch ops only: its forward and backward call no compiled or Triton kernel (the
    # package's one namespace holds them and the encode op, which composes PyTorch ops here).
    m = sk.SpaDE(16, 300, backend=backend)
    x = torch.randn(64, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        m(x).loss.backward()
    names = {e.name for e in prof.events()}
    kernels = [n for n in names if n.startswith("spade_kernels::") and n != "spade_kernels::encode"]
    assert not kernels, sorted(n for n in names if "spade" in n)
    assert "spade_kernels::encode" in names or backend == "reference"
