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


@pytest.fixture(params=["dense-route", "sparse-route"])
def product_route(request):
    """Both routes of the pipeline's support products (the shipped one at test sizes is mostly dense)."""
    from spade_kernels.pipeline import dense_products

    with dense_products(request.param == "dense-route"):
        yield request.param


@pytest.fixture(params=["pruned", "dense"])
def search(request):
    """Both candidate searches of the pipeline (``auto`` takes the dense one at test-sized K on the CPU)."""
    return request.param


@pytest.fixture(params=["cpu"] + (["cuda"] if os.environ.get("SPADE_TEST_GPU") == "1" else []))
def device(request):
    """Device of the native-op tests: the CPU always, CUDA too with SPADE_TEST_GPU=1."""
    from spade_kernels import _ext

    if request.param == "cuda" and not (torch.cuda.is_available() and _ext.cuda_kernels()):
        pytest.skip(f"SPADE_TEST_GPU=1 but no CUDA device or no CUDA kernels ({_ext.cuda_reason})")
    return request.param
