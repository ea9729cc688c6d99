import os

# Triton kernels run on CPU tensors through Triton's interpreter unless a GPU
# run asks for real kernels (SPADE_TEST_GPU=1).  The variable must be set
# before triton is first imported.
if os.environ.get("SPADE_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _sparse_path(monkeypatch):
    # Test shapes are tiny, so supports are a large fraction of K and the
    # torch primitives would take their dense-GEMM path everywhere; the sparse
    # path is the one under test unless a test enables the dense one.
    from spade_kernels.backends import torch_

    monkeypatch.setattr(torch_, "DENSE_FRACTION", {})
    # The torch backend's own PyTorch-op path is the one under test; the
    # extension's CPU ops it switches to by default are tested as the ``cuda``
    # backend (and by test_torch_backend_uses_the_extension_on_cpu).
    monkeypatch.setattr(torch_, "NATIVE_CPU", False)


@pytest.fixture(params=["cpu"] + (["cuda"] if os.environ.get("SPADE_TEST_GPU") == "1" else []))
def device(request):
    """Device of the extension-op tests: the CPU always, CUDA too with SPADE_TEST_GPU=1."""
    from spade_kernels import _ext

    if request.param == "cuda" and not (torch.cuda.is_available() and _ext.cuda_kernels()):
        pytest.skip("SPADE_TEST_GPU=1 but no CUDA device or no CUDA kernels in spade_kernels._C")
    return request.param
