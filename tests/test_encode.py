import math

import pytest
import torch

import spade_kernels as sk
from spade_kernels import _ext, pipeline
from spade_kernels.backends import BACKENDS, auto_backend, backend_status, resolve_backend
from spade_kernels.backends import torch_ as T
from spade_kernels.reference import spade_encode_reference, squared_distances
from spade_kernels.testing import assert_codes_match_reference

# "native" runs its C++/OpenMP kernels on CPU tensors when the extension is built.
CPU_BACKENDS = ["reference", "torch"] + (["native"] if _ext.available() else [])
# Small chunk / top-k / buffer settings make every code path of the torch
# backend (k-doubling, buffer merges, overflow rows) run at test sizes.
SMALL = {"chunk": 16, "topk": 2, "max_candidates": 8}


def _torch_codes(x, A, lam, **options):
    return sk.spade_encode(x, A, lam, backend="torch", **options)


def _inputs(B, d, K, dtype=torch.float32, lam=None):
    x = torch.randn(B, d, dtype=dtype)
    A = torch.randn(K, d, dtype=dtype)
    return x, A, (1.0 / (2 * d) if lam is None else lam)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("search", ["pruned", "dense"])
@pytest.mark.parametrize("B,d,K", [(1, 1, 1), (7, 3, 5), (129, 16, 129), (33, 24, 1000), (5, 2, 128)])
def test_matches_reference_fp32(backend, search, B, d, K):
    x, A, lam = _inputs(B, d, K)
    options = {} if backend == "reference" else {"search": search}
    assert_codes_match_reference(sk.spade_encode(x, A, lam, backend=backend, **options), x, A, lam)


@pytest.mark.parametrize("B,d,K", [(7, 3, 5), (50, 8, 300), (20, 16, 1000)])
def test_torch_backend_every_path_float64_exact(B, d, K):
    x, A, lam = _inputs(B, d, K, torch.float64)
    codes = _torch_codes(x, A, lam, **SMALL)
    torch.testing.assert_close(codes.to_dense(), spade_encode_reference(x, A, lam), atol=1e-12, rtol=0)


@pytest.mark.parametrize("lam", [1e-4, 1e-2, 3.0])
def test_overflow_and_dense_rows_exact(lam):
    # Tiny λ makes supports dense (K-wide): far past max_candidates, so these
    # rows take the exact dense path.  Large λ makes them one-hot.
    x, A, _ = _inputs(40, 6, 200, torch.float64)
    codes = _torch_codes(x, A, lam, **SMALL)
    ref = spade_encode_reference(x, A, lam)
    torch.testing.assert_close(codes.to_dense(), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(codes.support_size, (ref > 0).sum(-1))


def test_mixed_overflow_rows():
    # Half the rows far from every prototype (dense support), half on top of one.
    x, A, lam = _inputs(30, 4, 150, torch.float64, lam=0.05)
    x[::2] = A[torch.arange(15)] + 1e-3 * torch.randn(15, 4, dtype=torch.float64)
    x[1::2] *= 0.01
    codes = _torch_codes(x, A, lam, chunk=32, topk=2, max_candidates=4)
    torch.testing.assert_close(codes.to_dense(), spade_encode_reference(x, A, lam), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    x, A, lam = _inputs(37, 16, 300, dtype)
    codes = sk.spade_encode(x, A, lam, backend="torch")
    assert codes.dtype == torch.float32  # documented: half inputs give float32 codes
    baseline = sk.spade_encode(x, A, lam, backend="reference").to_dense()
    assert_codes_match_reference(codes, x, A, lam, low_precision_baseline=baseline)
    # Stronger than the contract: distances are recomputed in float32 from the
    # half-precision values, so the codes meet the float32 tolerance as well.
    assert_codes_match_reference(codes, x.float(), A.float(), lam)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_backend_low_precision_is_a_projection(dtype):
    # The reference backend defines the low-precision baseline itself; what it
    # must still satisfy is being a point of the simplex, close to exact.
    x, A, lam = _inputs(20, 16, 100, dtype)
    z = sk.spade_encode(x, A, lam, backend="reference").to_dense()
    assert (z >= 0).all() and ((z.sum(-1) - 1).abs() <= 1e-3).all()
    exact = spade_encode_reference(x.double(), A.double(), lam)
    assert (z.double() - exact).abs().max() < 0.05


def test_float64_close_to_exact():
    x, A, lam = _inputs(17, 9, 77, torch.float64)
    codes = sk.spade_encode(x, A, lam, backend="torch")
    assert codes.dtype == torch.float64
    torch.testing.assert_close(codes.to_dense(), spade_encode_reference(x, A, lam), atol=1e-12, rtol=0)


def test_x_on_top_of_prototypes_large_lambda():
    # GEMM-form distances cancel catastrophically here; the exact stage
    # recomputes D directly (DESIGN §4).
    A = torch.randn(64, 32) * 10
    x = A[:8] + 1e-3 * torch.randn(8, 32)
    lam = 50.0
    assert_codes_match_reference(sk.spade_encode(x, A, lam, backend="torch"), x, A, lam)


def test_non_contiguous_and_leading_dims():
    x = torch.randn(3, 5, 20)[:, :, ::2]  # (3, 5, 10), strided
    A = torch.randn(10, 40).t()  # (40, 10), transposed
    assert not x.is_contiguous() and not A.is_contiguous()
    codes = sk.spade_encode(x, A, 0.05, backend="torch")
    assert codes.indices.shape[:2] == (3, 5) and codes.support_size.shape == (3, 5)
    assert codes.to_dense().shape == (3, 5, 40)
    assert_codes_match_reference(codes, x, A, 0.05)


def test_codes_layout():
    x, A, lam = _inputs(25, 8, 90)
    codes = sk.spade_encode(x, A, lam, backend="torch")
    assert codes.n_latents == 90 and codes.indices.dtype == torch.int64
    assert codes.width == int(codes.support_size.max())
    pad = torch.arange(codes.width) >= codes.support_size[:, None]
    assert (codes.values[pad] == 0).all() and (codes.indices[pad] == 0).all()
    assert (codes.values[~pad] > 0).all()


def test_nan_rows_are_isolated():
    x, A, lam = _inputs(6, 5, 40)
    x[2, 1] = math.nan
    x[4, 0] = math.inf
    for backend in CPU_BACKENDS:
        dense = sk.spade_encode(x, A, lam, backend=backend).to_dense()
        assert torch.isnan(dense[[2, 4]]).all(), backend
        assert torch.isfinite(dense[[0, 1, 3, 5]]).all(), backend
    assert_codes_match_reference(sk.spade_encode(x, A, lam, backend="torch"), x, A, lam)


def test_nan_prototype_poisons_every_row():
    x, A, lam = _inputs(4, 3, 10)
    A[7, 1] = math.nan
    assert torch.isnan(sk.spade_encode(x, A, lam, backend="torch").to_dense()).all()


# ---------------------------------------------------------------- gradients


def test_gradcheck_torch_backend():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 30, dtype=torch.float64)

    def f(x, A, lam):
        return (_torch_codes(x, A, lam, **SMALL).to_dense() * w).sum()

    assert torch.autograd.gradcheck(f, (x, A, lam))


def test_torch_backend_gradients_match_reference_autograd():
    x0, A0 = torch.randn(12, 6, dtype=torch.float64), torch.randn(70, 6, dtype=torch.float64)
    w = torch.randn(12, 70, dtype=torch.float64)
    grads = []
    for backend in CPU_BACKENDS:
        x, A = x0.clone().requires_grad_(), A0.clone().requires_grad_()
        lam = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        (sk.spade_encode(x, A, lam, backend=backend).to_dense() * w).sum().backward()
        grads.append((x.grad, A.grad, lam.grad))
    # And plain autograd through the naive formula, no custom backward at all.
    x, A = x0.clone().requires_grad_(), A0.clone().requires_grad_()
    lam = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    (spade_encode_reference(x, A, lam) * w).sum().backward()
    grads.append((x.grad, A.grad, lam.grad))
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            torch.testing.assert_close(a, b)


def test_gather_sq_dist_and_sparse_decode_gradcheck(product_route):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    M = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    v = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 9, (4, 5))
    P = T.PRIMITIVES
    assert torch.autograd.gradcheck(lambda x, M: pipeline.gather_sq_dist(P, x, M, idx), (x, M))
    codes = lambda v: sk.SparseCodes(idx, v, torch.full((4,), 5), 9)  # noqa: E731
    assert torch.autograd.gradcheck(lambda v, M, b: pipeline.sparse_decode(P, codes(v), M, b), (v, M, b))
    D = squared_distances(x.detach(), M.detach())
    torch.testing.assert_close(pipeline.gather_sq_dist(P, x, M, idx), D.gather(1, idx))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.randn(3, 4), torch.randn(5, 6), 0.1), ValueError, "d=4"),
        ((torch.randn(3, 4).long(), torch.randn(5, 4), 0.1), TypeError, "x must have a floating dtype"),
        ((torch.randn(3, 4), torch.randn(5, 4).int(), 0.1), TypeError, "prototypes must have a floating"),
        (([1.0], torch.randn(5, 4), 0.1), TypeError, "x must be a torch.Tensor"),
        ((torch.randn(3, 4), torch.randn(5, 4, 1), 0.1), ValueError, "prototypes must be 2-d"),
        ((torch.randn(3, 4), torch.randn(0, 4), 0.1), ValueError, "K >= 1"),
        ((torch.randn(3, 4), torch.randn(5, 4), 0.0), ValueError, "lam must be a finite number > 0"),
        ((torch.randn(3, 4), torch.randn(5, 4), -1.0), ValueError, "lam must be"),
        ((torch.randn(3, 4), torch.randn(5, 4), math.nan), ValueError, "lam must be"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0.1, 0.2])), ValueError, "scalar"),
        ((torch.randn(3, 4), torch.randn(5, 4), "0.1"), TypeError, "lam must be"),
        ((torch.randn(3, 4), torch.randn(5, 4, device="meta"), 0.1), ValueError, "meta"),
    ],
)
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        sk.spade_encode(*args, backend="torch")


def test_backend_errors_and_registry():
    x, A = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        sk.spade_encode(x, A, 0.1, backend="nope")
    status = backend_status()
    assert set(status) == set(BACKENDS) == {"reference", "torch", "native", "triton"}
    assert sk.available_backends() == [n for n, r in status.items() if r is None]
    assert {"reference", "torch"} <= set(sk.available_backends())
    for name, reason in status.items():
        if reason is not None:
            assert isinstance(reason, str) and reason
            with pytest.raises(ValueError, match=f"backend '{name}' is not available"):
                sk.spade_encode(x, A, 0.1, backend=name)
    want = "native" if _ext.available() else "torch"
    assert resolve_backend("auto", torch.device("cpu")).name == auto_backend(torch.device("cpu"))[0] == want
    with pytest.raises(
        TypeError, match=r"backend 'torch' takes the options \['chunk', 'max_candidates', 'search', 'topk'\]"
    ):
        sk.spade_encode(x, A, 0.1, backend="torch", cap=4)
    with pytest.raises(TypeError, match="takes no options"):
        sk.spade_encode(x, A, 0.1, backend="reference", chunk=4)


def test_the_former_name_cuda_is_an_unknown_backend():
    x, A = torch.randn(5, 3), torch.randn(9, 3)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; expected one of \['auto', 'reference'"):
        sk.spade_encode(x, A, 0.1, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        sk.SpaDE(3, 9, backend="cuda")


def test_mixed_dtypes_promote():
    x, A = torch.randn(4, 5, dtype=torch.bfloat16), torch.randn(9, 5)
    codes = sk.spade_encode(x, A, 0.1, backend="torch")
    assert codes.dtype == torch.float32
    assert_codes_match_reference(codes, x.float(), A, 0.1)


def test_dense_route_matches_sparse_route():
    B, C, d, K = 9, 12, 10, 40
    idx = torch.randint(0, K, (B, C))
    w, G, M, X = torch.randn(B, C), torch.randn(B, d), torch.randn(K, d), torch.randn(B, d)
    P = T.PRIMITIVES
    results = []
    for dense in (False, True):
        with pipeline.dense_products(dense):
            results.append(
                (
                    pipeline.product(P, "gather_matmul", w, idx, M),
                    pipeline.product(P, "gather_dot", G, idx, M),
                    pipeline.product(P, "scatter_matmul", w, idx, X, K),
                )
            )
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # C/K = 0.3 takes the dense route on the CPU by default, none below the measured crossover.
    assert pipeline.sparse._dense_route(C, K, torch.device("cpu"))
    assert not pipeline.sparse._dense_route(1, K, torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_torch_and_reference_backends_run_no_compiled_op(backend):
    # "torch" is PyTorch ops only: its forward and backward call no spade:: kernel.
    m = sk.SpaDE(16, 300, backend=backend)
    x = torch.randn(64, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        m(x).loss.backward()
    names = {e.name for e in prof.events()}
    assert not [n for n in names if n.startswith("spade::")], sorted(n for n in names if "spade" in n)
    assert "spade_kernels::encode" in names or backend == "reference"


@pytest.mark.skipif(not _ext.available(), reason="C++ extension unavailable")
def test_native_backend_runs_the_compiled_ops():
    m = sk.SpaDE(16, 300, backend="native", backend_options={"search": "pruned"})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        m(torch.randn(64, 16)).loss.backward()
    names = {e.name for e in prof.events()}
    assert {"spade::select_candidates", "spade::exact_codes", "spade::support_jacobian"} <= names
