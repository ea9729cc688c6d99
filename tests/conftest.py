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
    """The device of a test: the CPU always, CUDA too with SPADE_TEST_GPU=1 (backends skip where they cannot run)."""
    from spade_kernels import _ext

    if request.param == "cuda" and not (torch.cuda.is_available() and _ext.cuda_kernels()):
        pytest.skip(f"SPADE_TEST_GPU=1 but no CUDA device or no CUDA kernels ({_ext.cuda_reason})")
    return request.param


# -- backends, from the registry ---------------------------------------------------------------
# Every contract test takes its backend from these fixtures: registering a backend in
# spade_kernels.backends (and, for its small-buffer knobs, SMALL_OPTIONS below) puts it under every
# contract; per-backend test files hold only the knobs one backend has.

#: Options that shrink a backend's tiles and buffers so that every path (chunk merges, k-doubling, slot
#: and max_candidates overflow, the exact resolution of overflow rows) runs at test sizes.
SMALL_OPTIONS = {
    "torch": {"chunk": 16, "topk": 2, "max_candidates": 8},
    "native": {"chunk": 64, "max_candidates": 256},
    "triton": {"block_n": 16, "slots": 4, "max_candidates": 32, "prepass": 16},
}


def registered_backends(*, sparse_only: bool = False) -> list:
    """The registry's backends as pytest params; unavailable ones are skipped with their reason."""
    from spade_kernels.backends import BACKENDS

    params = []
    for name, backend in BACKENDS.items():
        if sparse_only and backend.dense:
            continue
        reason = backend.unavailable_reason()
        marks = [pytest.mark.skip(reason=f"backend {name!r} is not available: {reason}")] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def runs_on(name: str, device: str) -> str:
    from spade_kernels.backends import BACKENDS

    reason = BACKENDS[name].device_reason(torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {name!r} on {device}: {reason}")
    return name


@pytest.fixture(params=registered_backends())
def backend(request, device):
    """Every registered backend that runs on ``device`` (the reference included)."""
    return runs_on(request.param, device)


@pytest.fixture(params=registered_backends(sparse_only=True))
def sparse_backend(request, device):
    """Every registered sparse backend (the pipeline's) that runs on ``device``."""
    return runs_on(request.param, device)


@pytest.fixture
def small_options(backend):
    """The backend's small-buffer options (see SMALL_OPTIONS); none for the reference."""
    return dict(SMALL_OPTIONS.get(backend, {}))


def backends_on(device: str = "cpu", *, sparse_only: bool = False) -> list[str]:
    """Names of the registered backends available here that run on ``device`` (for loops across backends)."""
    from spade_kernels.backends import BACKENDS

    return [
        name
        for name, b in BACKENDS.items()
        if not (sparse_only and b.dense) and b.supports(torch.device(device))
    ]


def run_product(prims, name: str, first, indices, second, *rest):
    """The product ``name`` of ``prims`` as the pipeline runs it for the matrix ``second``'s dtype."""
    from spade_kernels.pipeline import products_for

    return getattr(products_for(prims, second.dtype), name)(first, indices, second, *rest)


def plan_of(prims, x, A, options=None):
    """The pipeline's plan for an encode of ``x`` against ``A`` through ``prims`` (options resolved)."""
    from spade_kernels.pipeline import make_plan, resolve_options

    return make_plan(prims, x.device, x.dtype, A.shape[0], A.shape[1], resolve_options(prims, options or {}))
