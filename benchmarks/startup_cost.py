"""What a CPU user pays before and around the kernels: start-up, and the trainer's own overhead.

    python benchmarks/startup_cost.py [--rounds 3] [--json benchmarks/results/startup_cpu.json]

Start-up, each measurement a fresh process (wall seconds, medians over
``--rounds``): ``import torch``; then ``import spade_kernels``; then the first
``spade_encode`` of CPU tensors at (B, d, K) = (1024, 64, 512), and whether
that process imported triton or ``torch._dynamo``; ``spade-kernels --help``
and ``spade-kernels info`` as whole commands.

The trainer's overhead, one thread, one process: ``train_spade`` (the
command line's loop: cosine learning rate, gradient clipping, the per-step
statistics read back in one sync, the divergence checks) against a bare loop
over the same layer, batches and optimizer (``zero_grad``, forward,
backward, ``step``), 128 steps at (batch, d, K) = (128, 64, 1024), the two
alternated ``--rounds`` times after a warm-up of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

SHAPE = (1024, 64, 512)
TRAIN = {"batch": 128, "d": 64, "K": 1024, "steps": 128}

_FIRST_CALL = f"""
import json, time, sys
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import spade_kernels as sk
t2 = time.perf_counter()
B, d, K = {SHAPE}
x, A = torch.randn(B, d), torch.randn(K, d)
t3 = time.perf_counter()
sk.spade_encode(x, A, 1.0 / (2 * d))
t4 = time.perf_counter()
print(json.dumps({{"import_torch": t1 - t0, "import_spade_kernels": t2 - t1, "first_encode": t4 - t3,
       "triton_imported": "triton" in sys.modules, "dynamo_imported": "torch._dynamo" in sys.modules}}))
"""


def _command_seconds(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t


def startup(rounds: int) -> dict:
    """Medians (and ranges) of each start-up cost over ``rounds`` fresh processes."""
    runs = []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", _FIRST_CALL], check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cli = shutil.which("spade-kernels") or os.path.join(os.path.dirname(sys.executable), "spade-kernels")
    commands = {name: [_command_seconds([cli, name]) for _ in range(rounds)] for name in ("--help", "info")}
    result = {}
    for key in ("import_torch", "import_spade_kernels", "first_encode"):
        values = [r[key] for r in runs]
        result[key] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
    for key in ("triton_imported", "dynamo_imported"):
        result[key] = any(r[key] for r in runs)
    for name, values in commands.items():
        result[f"cli {name}"] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
        }
    return result


def trainer_overhead(rounds: int) -> dict:
    """Seconds for ``TRAIN['steps']`` steps by ``train_spade`` and by a bare loop, alternated."""
    import torch

    import spade_kernels as sk
    from spade_kernels.sae import train as T

    torch.set_num_threads(1)
    n, d, K = TRAIN["batch"] * TRAIN["steps"], TRAIN["d"], TRAIN["K"]
    torch.manual_seed(0)
    x = torch.randn(n, d) / d**0.5

    def fresh():
        torch.manual_seed(1)
        layer = sk.SpaDE(d, K)
        layer.init_from_data(x[: 4 * K])
        return layer

    def trainer():
        T.train_spade(fresh(), x, batch_size=TRAIN["batch"], progress=False)

    def bare():
        layer = fresh()
        opt = T._adam(layer, 1e-2)
        for batch in x.split(TRAIN["batch"]):
            opt.zero_grad(set_to_none=True)
            layer(batch).loss.backward()
            opt.step()

    times = {"train_spade": [], "bare loop": []}
    for fn in (trainer, bare):  # warm: first-call imports, allocator
        fn()
    for _ in range(rounds):
        for name, fn in (("train_spade", trainer), ("bare loop", bare)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "shape": TRAIN,
        "seconds": times,
        "median_s": med,
        "ratio": med["train_spade"] / med["bare loop"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    from spade_kernels.bench.measure import cpu_model

    with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as f:
        load = f.read().split()[:1]
    result = {
        "cpu": cpu_model(),
        "load_average_at_start": float(load[0]) if load else None,
        "startup": startup(args.rounds),
        "trainer": trainer_overhead(args.rounds),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
