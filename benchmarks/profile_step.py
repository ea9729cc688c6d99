"""Where a SpaDE training step's time goes on the CPU: each stage against its floor.

The forward and backward of one training step of the layer (``auto`` backend) run under
``torch.profiler`` and every op's self time is put in a stage by its name: the GEMMs (``aten::mm``/
``addmm``: the score GEMM, and the products that take the dense route at small K), candidate
selection, the exact stage, the sparse products (decode and the backward's gathers/scatters), the
support Jacobian, zeroing/filling, and the rest (elementwise ops, copies, autograd).  Without the
profiler, interleaved in this process, warm (medians of ``--repeats``): the floor
``torch.mm(x, A.T)`` (one GEMM at the encoder's shape), the whole step with Adam, the step without
Adam (their difference is Adam's), and one fill of a K×d tensor (its bandwidth prices what is
memory-bound: zeroing the two K×d gradients, Adam's ~7 passes over each).

    python benchmarks/profile_step.py                       # C1 and the paper's small shapes, 1 and 2 threads
    python benchmarks/profile_step.py --shape 1024,768,16384 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import spade_kernels as sk
from spade_kernels.bench.measure import cpu_model

#: (B, d, K): C1 and the paper's small shapes.
SHAPES = [(1024, 768, 16384), (512, 2, 128), (2048, 128, 512)]
#: Stage of an op, by the first pattern its name contains (profiler names: aten::…, spade_kernels::…).
STAGES = [
    ("GEMMs", ("aten::addmm", "aten::mm", "aten::matmul")),
    ("selection", ("select_candidates", "topk")),
    ("exact stage", ("exact_codes", "sparsemax")),
    ("sparse products", ("gather_matmul", "gather_dot", "scatter_matmul", "gather_sq_dist", "index_add", "scatter")),
    ("support Jacobian", ("support_jacobian",)),
    ("zero / fill", ("aten::zero_", "aten::zeros", "aten::fill_")),
]  # fmt: skip


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def _stage(name: str) -> str:
    low = name.lower()
    for stage, patterns in STAGES:
        if any(p.lower() in low for p in patterns):
            return stage
    return "rest"


def profile(B: int, d: int, K: int, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g)
    layer = sk.SpaDE(d, K)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    fused_opt = torch.optim.Adam(layer.parameters(), lr=1e-3, fused=True)  # what the package's trainer runs
    A_t = layer.prototypes.detach().t()

    def floor():
        return torch.mm(x, A_t)

    def step():
        opt.zero_grad(set_to_none=True)
        out = layer(x)
        out.loss.backward()
        opt.step()
        return out

    def fused_step():
        fused_opt.zero_grad(set_to_none=True)
        layer(x).loss.backward()
        fused_opt.step()

    def no_adam():
        layer.zero_grad(set_to_none=True)
        layer(x).loss.backward()

    big = torch.empty(K * d)
    for fn in (floor, step, fused_step, no_adam):
        fn()
    floor_ms, step_ms, fused_ms, no_adam_ms, fill_ms = [], [], [], [], []
    for _ in range(repeats):  # interleaved: the machine's drift hits all alike
        floor_ms.append(_ms(floor))
        step_ms.append(_ms(step))
        fused_ms.append(_ms(fused_step))
        no_adam_ms.append(_ms(no_adam))
        fill_ms.append(_ms(lambda: big.fill_(0.0)))
    floor_t, step_t = statistics.median(floor_ms), statistics.median(step_ms)
    fill_t = statistics.median(fill_ms)
    bandwidth = K * d * 4 / (fill_t * 1e-3)  # bytes/s written by one K×d fill
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            no_adam()
    stages: dict[str, float] = {}
    for ev in prof.key_averages():
        stages[_stage(ev.key)] = stages.get(_stage(ev.key), 0.0) + ev.self_cpu_time_total / 3e3  # ms per step
    total = sum(stages.values())
    l0 = float(layer(x).codes.support_size.float().mean())
    no_adam_t = statistics.median(no_adam_ms)
    floors = {
        "GEMMs": floor_t,
        "zero / fill": 2 * K * d * 4 / bandwidth * 1e3,  # two K×d gradients written once
        "adam": 2 * 7 * K * d * 4 / bandwidth * 1e3,  # ~7 K×d passes per parameter (read or write)
    }
    return {
        "shape": [B, d, K], "threads": threads, "repeats": repeats, "mean_l0": l0,
        "floor_ms": floor_t, "step_ms": step_t, "step_without_adam_ms": no_adam_t, "adam_ms": step_t - no_adam_t,
        "fused_adam_ms": statistics.median(fused_ms) - no_adam_t,
        "step_over_floor": step_t / floor_t, "gemm_gflops": 2 * B * d * K / (floor_t * 1e-3) / 1e9,
        "fill_gb_s": bandwidth / 1e9,
        "profiled_ms": total,
        "stages_ms": {k: stages.get(k, 0.0) for k in [s for s, _ in STAGES] + ["rest"]},
        "stage_floors_ms": floors,
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    """Timed columns in ms; each stage's cell: its share of the profiled forward + backward."""
    names = [s for s, _ in STAGES] + ["rest"]
    out = [
        "| B, d, K | threads | L0 | floor | step | × floor | fwd+bwd | Adam (floor) | fused Adam | "
        + " | ".join(names) + " | fill floor of the 2 K×d grads |",
        "|" + "---|" * (9 + len(names) + 1),
    ]  # fmt: skip
    for r in rows:
        cells = [f"{100 * r['stages_ms'][n] / r['profiled_ms']:.0f}%" for n in names]
        f = r["stage_floors_ms"]
        out.append(
            f"| {', '.join(map(str, r['shape']))} | {r['threads']} | {r['mean_l0']:.1f} | {r['floor_ms']:.2f} "
            f"| {r['step_ms']:.2f} | {r['step_over_floor']:.2f} | {r['step_without_adam_ms']:.2f} "
            f"| {r['adam_ms']:.2f} ({f['adam']:.2f}) | {r['fused_adam_ms']:.2f} | "
            + " | ".join(cells)
            + f" | {f['zero / fill']:.2f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shape", action="append", help="B,d,K (repeatable; default C1 and the paper's small shapes)"
    )
    p.add_argument("--threads", default="1,2", help="comma list of thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per configuration (default 7)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        p.error("--shape takes B,d,K and --threads a comma list of integers")
    if any(len(s) != 3 or min(s) < 1 for s in shapes) or min(threads) < 1 or args.repeats < 1:
        p.error("shapes need three positive sizes; threads and --repeats must be ≥ 1")
    rows = [profile(*s, t, args.repeats) for s in shapes for t in threads]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "cpu": cpu_model(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
