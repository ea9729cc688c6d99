"""Static dispatch: what a call runs is decided where it enters (docs/design.md, "Dispatch").

``make_plan`` picks the search, the exact stage and the products from the
backend, the dtype and the shape; the options cross the encode op typed; the
ops live in one namespace.  And one forward: ``SpaDE`` and ``ShardedSpaDE``
share the encoder and the loss, a latent group of one process changes nothing.
"""

import functools
import os
import socket

import pytest
import torch

import spade_kernels as sk
from spade_kernels import encode, ops, pipeline  # noqa: F401  (encode, ops: register torch.ops.spade_kernels.*)
from spade_kernels.backends import BACKENDS
from spade_kernels.backends import torch_ as T
from spade_kernels.pipeline import search as S


def _plan(name, dtype=torch.float32, K=1000, d=8, **options):
    prims = BACKENDS[name].primitives()
    return pipeline.make_plan(
        prims, torch.device("cpu"), dtype, K, d, pipeline.resolve_options(prims, options)
    )


def test_the_plan_names_the_search_that_runs():
    # auto: the measured crossover (dense scores for the torch backend up to K = 128 on CPU).
    assert _plan("torch", K=128).select is S.dense_search
    assert _plan("torch", K=128).options.search == "dense"
    grown = _plan("torch", K=4096).select
    assert isinstance(grown, functools.partial) and grown.func is S.grown_search
    assert grown.args[0] is T.select_candidates
    assert _plan("torch", K=4096, search="dense").select is S.dense_search


@pytest.mark.skipif("native" not in sk.available_backends(), reason="the extension is not built")
def test_the_plan_takes_the_backends_kernels_or_the_torch_fallbacks():
    from spade_kernels.backends import native as N

    plan = _plan("native")
    assert plan.select.args[0] is N.select_candidates and plan.exact is N.exact_codes
    assert plan.products.name == "native"
    # float64 is a native kernel dtype; bfloat16 products are not: the torch backend's ops.
    assert _plan("native", torch.float64).products.name == "native"
    assert pipeline.products_for(N.PRIMITIVES, torch.bfloat16).name == "torch"
    assert pipeline.products_for(N.PRIMITIVES, torch.bfloat16).support_jacobian is T.support_jacobian


def test_an_exact_stage_of_none_is_the_pipelines_on_the_backends_distances():
    prims = BACKENDS["torch"].primitives()._replace(name="spy", exact_codes=None)
    plan = pipeline.make_plan(
        prims, torch.device("cpu"), torch.float32, 50, 4, pipeline.resolve_options(prims, {})
    )
    assert plan.exact is plan.exact_unbounded and plan.exact.func is T.exact_codes


def test_row_bytes_are_those_of_the_search_that_runs():
    dense, pruned = _plan("torch", K=4096, search="dense"), _plan("torch", K=4096, search="pruned")
    assert dense.row_bytes == S.dense_row_bytes(4096, 4) + 8 * 4
    assert pruned.row_bytes == T.row_bytes(4096, 8, 4, dict(T.OPTIONS)) + 8 * 4


def test_options_are_typed_and_checked_at_the_entry():
    prims = BACKENDS["torch"].primitives()
    opts = pipeline.resolve_options(prims, {"chunk": 64})
    assert (
        isinstance(opts, pipeline.Options)
        and opts.chunk == 64
        and opts.max_candidates == T.OPTIONS["max_candidates"]
    )
    assert opts.block_n is None  # a triton option: not the torch backend's
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['cap'\]"):
        pipeline.resolve_options(prims, {"cap": 4})
    with pytest.raises(ValueError, match="positive int"):
        pipeline.resolve_options(prims, {"chunk": 0})
    for name, backend in BACKENDS.items():  # every registered backend's options have typed fields
        if not backend.dense and backend.unavailable_reason() is None:
            assert set(backend.primitives().options) <= set(pipeline.Options._fields), name
    # The encode op takes them one typed argument each, not a string.
    schema = torch.ops.spade_kernels.encode.default._schema
    types = {a.name: str(a.type) for a in schema.arguments}
    assert types["search"] == "str" and types["max_candidates"] in (
        "Optional[int]",
        "int?",
        "Optional[SymInt]",
    )
    assert list(types)[4:] == list(pipeline.Options._fields)


def test_one_op_namespace():
    names = torch._C._dispatch_get_all_op_names()
    assert not [n for n in names if n.startswith(("spade::", "spade_triton::"))]
    assert "spade_kernels::encode" in names
    if "native" in sk.available_backends():
        assert "spade_kernels::select_candidates" in names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_latent_group_of_one_process_is_the_layer_itself():
    # ShardedSpaDE differs from SpaDE only by its group's collectives: over a group of one rank they
    # are identities, and the loss and every gradient are the layer's.
    import torch.distributed as dist

    from spade_kernels.distributed import ShardedSpaDE

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        layer = sk.SpaDE(6, 40, backend="torch", dtype=torch.float64, reg_on="decoder", use_bias=True)
        sharded = ShardedSpaDE.from_dense(layer)
        x = torch.randn(32, 6, dtype=torch.float64)
        a, b = layer(x), sharded(x)
        a.loss.backward()
        b.loss.backward()
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-13, atol=0)
        torch.testing.assert_close(b.codes.to_dense(), a.codes.to_dense(), rtol=0, atol=1e-14)
        for name in ("prototypes", "W_dec", "lambda_raw", "b_dec"):
            torch.testing.assert_close(
                getattr(sharded, name).grad, getattr(layer, name).grad, rtol=1e-12, atol=1e-14
            )
    finally:
        dist.destroy_process_group()
