"""What a CPU user pays before and around the kernels: start-up, and the trainer's own overhead.

    python benchmarks/startup_cost.py [--rounds 3] [--json benchmarks/results/startup_cpu.json]

Start-up, each measurement a fresh process (wall seconds, medians over
``--rounds``, the processes of a round run in turn): ``python -c "import
torch"`` as a whole command (what every command pays); in one process
``import torch``, then ``import spade_kernels``, then the first
``spade_encode`` of CPU tensors at (B, d, K) = (1024, 64, 512), and whether
that process imported triton or ``torch._dynamo``; ``spade-kernels --help``
and ``spade-kernels info`` as whole commands.

The trainer's overhead, one thread, one process: ``train_spade`` (the
command line's loop: cosine learning rate, gradient clipping, the per-step
statistics read back in one sync, the divergence checks) against a bare loop
doing the same math (the same shuffled batches, learning rate, clipping and
fused Adam: both end at the same weights), 128 steps at (batch, d, K) = (128,
64, 1024), the two alternated ``--rounds`` times after a warm-up of each.
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


def _spread(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}


def startup(rounds: int) -> dict:
    """Medians (and ranges) of each start-up cost over ``rounds`` rounds of fresh processes.

    Each round runs, in turn, ``python -c "import torch"`` (the interpreter and
    torch alone: what every command pays), the first-call process, ``--help``
    and ``info``, so a machine whose speed drifts moves all of them alike.
    """
    # The console script of this interpreter's environment (not another install's on PATH).
    beside = os.path.join(os.path.dirname(sys.executable), "spade-kernels")
    cli = beside if os.path.exists(beside) else shutil.which("spade-kernels")
    if cli is None:
        raise SystemExit("startup_cost: no spade-kernels command beside this Python or on PATH")
    runs, commands = [], {"python -c 'import torch'": [], "cli --help": [], "cli info": []}
    for _ in range(rounds):
        commands["python -c 'import torch'"].append(_command_seconds([sys.executable, "-c", "import torch"]))
        out = subprocess.run([sys.executable, "-c", _FIRST_CALL], check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        for name in ("--help", "info"):
            commands[f"cli {name}"].append(_command_seconds([cli, name]))
    result = {
        key: _spread([r[key] for r in runs])
        for key in ("import_torch", "import_spade_kernels", "first_encode")
    }
    for key in ("triton_imported", "dynamo_imported"):
        result[key] = any(r[key] for r in runs)
    result.update({name: _spread(values) for name, values in commands.items()})
    return result


def trainer_overhead(rounds: int) -> dict:
    """Seconds for ``TRAIN['steps']`` steps by ``train_spade`` and by a bare loop doing the same math, alternated.

    The bare loop runs what ``train_spade`` computes, nothing else: the same
    shuffled batches (``_epoch_batches`` with the trainer's seeded generator),
    the cosine learning rate, the fused Adam, gradient clipping at 1.0.  So
    both end at the same weights (checked: ``same_weights``), and the
    difference is the trainer's own work (its per-step statistics and their
    one host read-back, the divergence checks, the history).  The layers are
    built before the timer.
    """
    import torch

    import spade_kernels as sk
    from spade_kernels.sae import train as T

    torch.set_num_threads(1)
    batch, steps, d, K = TRAIN["batch"], TRAIN["steps"], TRAIN["d"], TRAIN["K"]
    n = batch * steps
    torch.manual_seed(0)
    x = torch.randn(n, d) / d**0.5
    lr, lr_final, clip = 1e-2, 1e-4, 1.0

    def fresh():
        torch.manual_seed(1)
        layer = sk.SpaDE(d, K)
        layer.init_from_data(x[: 4 * K])
        return layer

    def trainer(layer):
        T.train_spade(layer, x, batch_size=batch, lr=lr, lr_final=lr_final, clip=clip, seed=0, progress=False)

    def bare(layer):
        opt = T._adam(layer, lr)
        layer.train()
        gen = torch.Generator().manual_seed(0)
        for step, (_, xb) in enumerate(T._epoch_batches(x, gen, batch, 0)):
            for group in opt.param_groups:
                group["lr"] = T.cosine_lr(step, steps, lr, lr_final)
            out = layer(xb)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            layer.clip_grad_norm_(clip)
            opt.step()

    times = {"train_spade": [], "bare loop": []}
    loops = (("train_spade", trainer), ("bare loop", bare))
    finals = {}
    for name, fn in loops:  # warm: first-call imports, the allocator
        finals[name] = fresh()
        fn(finals[name])
    for _ in range(rounds):
        for name, fn in loops:
            layer = fresh()
            t = time.perf_counter()
            fn(layer)
            times[name].append(time.perf_counter() - t)
    a, b = (finals[name].state_dict() for name, _ in loops)
    same = all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "shape": TRAIN,
        "seconds": times,
        "median_s": med,
        "ratio": med["train_spade"] / med["bare loop"],
        "same_weights": same,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    from spade_kernels.bench.measure import cpu_model

    result = {
        "cpu": cpu_model(),
        "load_average_at_start": os.getloadavg()[0],  # as the harness's sweep records it
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
