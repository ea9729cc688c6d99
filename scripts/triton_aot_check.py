"""Compile every Triton kernel ahead of time for sm_80 and sm_90, without a GPU.

For each kernel and configuration this runs Triton's compiler down to a
cubin for the given target (its bundled ptxas), then reads the cubin's
resource usage with the bundled cuobjdump, so a CPU-only machine (CI) proves
that the kernels compile for Ampere and Hopper and records their register,
spill and shared-memory use and how long each compile takes (what a GPU run
pays once per configuration before its first launch).  It says nothing
about speed or numerical results: those need a GPU.

Usage: ``python scripts/triton_aot_check.py [--arch 90 --arch 80]``; exits 1
if any kernel fails to compile.  Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spade_kernels.triton_ import encode as E
from spade_kernels.triton_ import sparse as S

# What Triton's JIT specialises at a real call on contiguous inputs whose sizes
# are multiples of 16 (as at S1–S3): unit strides become constants and pointers
# and sizes carry a divisibility-by-16 hint.  Without these the compiled code
# (and its register count) is not the code a GPU would run.
_UNIT_STRIDES = ("stride_xd", "stride_ad", "stride_ic")
_DIVISIBLE = (
    "B",
    "K",
    "D",
    "W",
    "N_TILES",
    "MAX_CANDIDATES",
    "stride_xb",
    "stride_ak",
    "stride_ib",
    "stride_mk",
    "stride_ok",
)


def _kernels():
    """(name, jit function, argument types, constexprs, options) per configuration."""
    common = {"aa_ptr": "*fp32", "margin_ptr": "*fp32", "bound_ptr": "*fp32", "slot_val_ptr": "*fp32"}
    common |= {"slot_idx_ptr": "*i32", "count_ptr": "*i32", "lam": "fp32"}
    select = E._select_tiles_kernel
    for cfg in select.configs:
        for dt in ("bf16", "fp32"):  # fp16 compiles like bf16
            types = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", **common, "stride_xb": "i64", "stride_ak": "i64"}
            consts = {"BLOCK_N": E.OPTIONS["block_n"], "SLOTS": E.OPTIONS["slots"], "PRECISION": "ieee"}
            consts |= {"MICHELOT_ITERS": E._MICHELOT_TILE_ITERS, "DOT_UPCAST": False, **cfg.kwargs}
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            yield (
                f"select[{dt},{cfg.kwargs},w{cfg.num_warps},s{cfg.num_stages}]",
                select.fn,
                types,
                consts,
                opts,
            )
    merge_types = {"slot_val_ptr": "*fp32", "slot_idx_ptr": "*i32", "count_ptr": "*i32", "bound_ptr": "*fp32"}
    merge_types |= {"margin_ptr": "*fp32", "cand_ptr": "*i64", "cand_count_ptr": "*i32"}
    consts = {"SLOTS": E.OPTIONS["slots"], "BLOCK_T": 1024, "MAX_ITERS": 256}
    yield "merge", E._select_merge_kernel, merge_types, consts, {"num_warps": 4}
    for dt in ("bf16", "fp32"):
        types = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "idx_ptr": "*i64", "out_ptr": "*fp32"}
        types |= {"stride_xb": "i64", "stride_ak": "i64", "stride_ib": "i64"}
        yield f"gather_sq_dist[{dt}]", E._gather_sq_dist_kernel, types, {"BLOCK_C": 32, "BLOCK_D": 128}, {}
    # Products over a support (decoder, regulariser, backward): weights fp32, matrices bf16/fp32.
    strides = {"stride_wb": "i64", "stride_ib": "i64", "stride_mk": "i64", "stride_ob": "i64"}
    strides |= {"stride_gb": "i64", "stride_xb": "i64", "stride_ok": "i64"}
    blocks = {"BLOCK_C": 32, "BLOCK_D": 128}
    for dt in ("bf16", "fp32"):
        base = {"w_ptr": "*fp32", "idx_ptr": "*i64", "out_ptr": "*fp32", **strides}
        yield f"gather_matmul[{dt}]", S._gather_matmul_kernel, {**base, "m_ptr": f"*{dt}"}, blocks, {}
        yield (
            f"gather_dot[{dt}]",
            S._gather_dot_kernel,
            {**base, "g_ptr": "*fp32", "m_ptr": f"*{dt}"},
            blocks,
            {},
        )
        yield f"scatter_matmul[{dt}]", S._scatter_matmul_kernel, {**base, "x_ptr": f"*{dt}"}, blocks, {}
    jac_types = {
        n: "*fp32" for n in ("z_ptr", "gz_ptr", "d_ptr", "gd_ptr", "lam_ptr", "g_out_ptr", "lam_rows_ptr")
    }
    jac_consts = {"HAS_GRAD_Z": True, "HAS_GRAD_D": True, "BLOCK_C": 128}
    yield "support_jacobian", S._support_jacobian_kernel, jac_types, jac_consts, {"num_warps": 4}


def _source(fn, types, consts):
    consts = {**{n: 1 for n in _UNIT_STRIDES if n in fn.arg_names}, **consts}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    hints = [
        i for i, n in enumerate(fn.arg_names) if n not in consts and (n.endswith("_ptr") or n in _DIVISIBLE)
    ]
    return ASTSource(fn, signature, consts, {(i,): [["tt.divisibility", 16]] for i in hints})


def _resource_usage(cubin: bytes) -> str:
    """REG/STACK/SHARED/LOCAL of a cubin, from the cuobjdump bundled with triton.

    LOCAL or STACK above 0 means register spills.
    """
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        )
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out.stdout)
    if usage is None:
        return "resource usage not reported"
    reg, stack, shared, local = usage.groups()
    return f"{reg} registers, stack {stack} B, local (spills) {local} B, static shared {shared} B"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability ×10 (default 80 and 90)")
    args = p.parse_args(argv)
    failures = 0
    cache_dir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".triton", "cache"
    )
    warm = os.path.isdir(cache_dir) and any(os.scandir(cache_dir))
    cache = f"Triton cache {'warm' if warm else 'cold'} at the start: {cache_dir}"
    for arch in args.arch or [90, 80]:
        total = 0.0
        for name, fn, types, consts, opts in _kernels():
            try:
                src = _source(fn, types, consts)
                t0 = time.perf_counter()
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
                seconds = time.perf_counter() - t0
                total += seconds
                shared = compiled.metadata.shared
                usage = _resource_usage(compiled.asm["cubin"])
                print(
                    f"sm_{arch} {name}: compiled in {seconds:.1f} s; dynamic shared {shared} B; {usage}",
                    flush=True,
                )
            except Exception as exc:  # report every failure, not just the first
                failures += 1
                print(f"sm_{arch} {name}: FAILED: {type(exc).__name__}: {exc}".splitlines()[0], flush=True)
        # A GPU run pays these compiles once per configuration it autotunes or launches.
        print(f"sm_{arch}: {total:.1f} s of compilation for all configurations ({cache})", flush=True)
    print(f"{failures} kernel configuration(s) failed to compile" if failures else "all kernels compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
