"""Encode and training-step times of two source trees, alternated (benchmarks/NOTES.md, "One forward").

    python benchmarks/compare_trees.py OLD_TREE NEW_TREE [--rounds 2] [--threads 1]

Each tree (a checkout with its extension built in place) runs in its own
process, the trees alternated ``--rounds`` times, so a change that makes no
difference shows as two interleaved spreads.  In each process, per shape:
the floor ``torch.mm(x, A.T)``, ``spade_encode`` without grad and one
forward + backward of the layer, warm; each the best of 3 medians.  Prints
one JSON line per process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

#: (B, d, K, backend, calls per median)
SHAPES = [
    (1024, 768, 16384, "auto", 7),
    (2048, 128, 512, "auto", 15),
    (1024, 64, 2048, "reference", 7),
    (1024, 64, 2048, "torch", 7),
]


def _median_time(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(threads: int) -> dict:
    """This process's tree: {shape: {"floor", "encode", "step"}} in seconds."""
    import torch

    import spade_kernels as sk

    torch.set_num_threads(threads)
    out = {}
    for B, d, K, backend, calls in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(B, d)
        layer = sk.SpaDE(d, K, backend=backend)
        layer.init_from_data(torch.randn(4 * K, d))
        A, lam = layer.prototypes.detach(), layer.lam.detach()

        def floor(x=x, A=A):
            torch.mm(x, A.t())

        def encode(x=x, A=A, lam=lam, backend=backend):
            with torch.no_grad():
                sk.spade_encode(x, A, lam, backend=backend)

        def step(layer=layer, x=x):
            layer.zero_grad(set_to_none=True)
            layer(x).loss.backward()

        for fn in (floor, encode, step):  # warm
            fn()
        rounds = {name: [] for name in ("floor", "encode", "step")}
        for _ in range(3):  # interleaved with the floor
            for name, fn in (("floor", floor), ("encode", encode), ("step", step)):
                rounds[name].append(_median_time(fn, calls))
        out[f"{B},{d},{K},{backend}"] = {name: min(v) for name, v in rounds.items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="*", help="source trees to compare (none: measure this process's import)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not args.trees:
        print(json.dumps(measure(args.threads)))
        return 0
    for _ in range(args.rounds):
        for tree in args.trees:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
            cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads)]
            line = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip()
            print(f"{tree} {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
