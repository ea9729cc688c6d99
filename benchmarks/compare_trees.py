"""Encode and training-step times of two source trees, alternated (benchmarks/NOTES.md, "One forward").

    python benchmarks/compare_trees.py OLD_TREE NEW_TREE [--rounds 2] [--threads 1]

Each tree (a checkout with its extension built in place) runs in its own
process, the trees alternated ``--rounds`` times, so a change that makes no
difference shows as two interleaved spreads.  In each process, per shape:
the floor ``torch.mm(x, A.T)``, ``spade_encode`` without grad and one
forward + backward of the layer, warm; each the best of 3 medians.  Prints
one JSON line per process.

    python benchmarks/compare_trees.py OLD_TREE NEW_TREE --sweep OUT.jsonl [--threads 1]

``--sweep``: the scaling sweep's sparse rows instead (native backend; B ∈ {1024,
16384} × d ∈ {2, 128, 768} × K ∈ {128 … 16384}, and B = 300,000 at (d, K) =
(2, 128), (128, 128), (2, 512); or the ``--shape`` and ``--modes`` given),
each configuration measured by each tree's own harness
worker (``spade_kernels.bench.measure``: time and extra peak RSS, glibc's mmap
threshold fixed), the trees alternated twice per configuration in the order
A B B A.  Appends one JSON line per measurement to OUT.jsonl and prints the
table of both trees' mean medians and peaks, flagged by compare_results.py's
rule (``--table IN.jsonl`` prints it again from the records; a file of
several runs averages them).  Configurations past 2·10⁹ B·K·d or at B =
300,000 get 3 repeats and a 6 s budget, the others 7 and 4 s: the largest
stop after one timed run, so their "median" is one time.  So a claim "no row got slower or
hungrier" compares two trees on one machine, with one measuring method.
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


SWEEP_SHAPES = [(B, d, K) for B in (1024, 16384) for d in (2, 128, 768) for K in (128, 512, 4096, 16384)] + [
    (300000, 2, 128),
    (300000, 128, 128),
    (300000, 2, 512),
]


def sweep(
    trees: list[str], out_path: str, threads: int, shapes=None, modes=("encode", "train")
) -> list[dict]:
    """Each configuration measured by each tree's harness worker, alternated A B B A; the records.

    ``trees`` is (old, new); each record names its tree (``tree``, as given) and its ``role``
    ("old" or "new"), so a table of the records never depends on the trees' names.
    """
    from spade_kernels.bench.measure import measure_in_subprocess

    roles = dict(zip(trees, ("old", "new")))
    records = []
    with open(out_path, "a") as out:
        for B, d, K in SWEEP_SHAPES if shapes is None else shapes:
            big = B * K * d > 2e9 or B >= 300000
            spec = {"name": "native", "B": B, "d": d, "K": K, "dtype": "float32", "device": "cpu",
                    "repeats": 3 if big else 7, "warmup": 1, "budget_s": 6 if big else 4}  # fmt: skip
            for mode in modes:
                for order in (trees, trees[::-1]):
                    for tree in order:
                        try:
                            r = measure_in_subprocess(
                                {**spec, "mode": mode}, None, tree=tree, env={"OMP_NUM_THREADS": str(threads)}
                            )
                        except RuntimeError as exc:
                            detail = getattr(exc, "output", "")
                            raise RuntimeError(
                                f"{tree}: the worker failed at {(B, d, K, mode)}:\n{detail}"
                            ) from None
                        rec = {"tree": tree, "role": roles[tree], "B": B, "d": d, "K": K, "mode": mode,
                               "threads": threads, "median_ms": statistics.median(r["times_ms"]),
                               "n": len(r["times_ms"]), "peak_mib": r["peak_bytes"] / 2**20}  # fmt: skip
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                        records.append(rec)
    return records


def _compare_results():
    """benchmarks/compare_results.py (its flagging rule and table), loaded from beside this file."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_results.py")
    spec = importlib.util.spec_from_file_location("compare_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sweep_table(records: list[dict], tolerance: float = 0.10) -> tuple[str, int]:
    """Markdown: per configuration, the old and the new tree's mean median time and mean extra peak,
    flagged by compare_results.py's rule (more than ``tolerance`` slower; more than ``tolerance`` and
    1 MiB hungrier); then the count of flagged rows.  Returns (table, configurations compared)."""
    runs = {"old": {}, "new": {}}
    for r in records:
        runs[r["role"]].setdefault(("native", r["mode"], r["B"], r["d"], r["K"], "float32"), []).append(r)

    def rows(role):
        return {
            key: {
                "median_ms": statistics.mean(r["median_ms"] for r in rs),
                "peak_mem_mib": statistics.mean(r["peak_mib"] for r in rs),
            }
            for key, rs in runs[role].items()
        }

    cr = _compare_results()
    entries = cr.compare(rows("old"), rows("new"), tolerance)
    flagged = sum(e["slower"] or e["hungrier"] for e in entries)
    text = cr.table(entries) + f"\n\n{len(entries)} configurations measured by both trees; {flagged} flagged."
    return text, len(entries)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="*", help="source trees to compare (none: measure this process's import)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep", metavar="OUT.jsonl", help="sweep rows by each tree's harness worker (appended)")
    p.add_argument(
        "--shape", action="append", metavar="B,d,K", help="--sweep: this shape (repeatable; default: all)"
    )
    p.add_argument("--modes", default="encode,train", help="--sweep: comma list of encode,train")
    p.add_argument("--table", metavar="IN.jsonl", help="print the old/new table of --sweep records and stop")
    args = p.parse_args(argv)
    if args.table:
        if args.trees:
            p.error("--table takes no trees: each record names its role (old or new)")
        with open(args.table) as f:
            records = [json.loads(line) for line in f if line.strip()]
        text, compared = sweep_table(records)
        print(text)
        return 0 if compared else 1
    if args.sweep:
        if len(args.trees) != 2 or os.path.abspath(args.trees[0]) == os.path.abspath(args.trees[1]):
            p.error("--sweep compares two different trees: OLD_TREE NEW_TREE")
        shapes = None
        if args.shape:
            try:
                shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
            except ValueError:
                shapes = []
            if any(len(s) != 3 for s in shapes) or not shapes:
                p.error(f"--shape takes B,d,K, got {args.shape}")
        modes = tuple(m for m in args.modes.split(",") if m)
        if not modes or set(modes) - {"encode", "train"}:
            p.error(f"--modes takes encode and/or train, got {args.modes!r}")
        text, compared = sweep_table(sweep(args.trees, args.sweep, args.threads, shapes, modes))
        print(text)
        return 0 if compared else 1
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
