"""The cost of sharding the latents: measured step time over 1, 2, 4 gloo processes, and bytes into collectives.

    python benchmarks/distributed_cost.py --out benchmarks/results/cpu-distributed

For each shard count P at one shape (B, d, K), P processes (gloo, loopback)
run the same :class:`spade_kernels.distributed.ShardedSpaDE` (``native``
backend) and time forward + backward; every collective of a step is counted
(the bytes each rank passes into it) by wrapping ``torch.distributed``'s
functions.  docs/design.md ("Sharding the latents") gives the model these
counts check:

    forward   all-gather of the local support scores   4·B·C_max·P  (C_max: the widest local support)
              sum of the decoder's partial outputs     4·B·d
              the NaN-row flags and the width          8·B + 8
              the regulariser's per-row partial sums   4·B
    backward  Σ ∂L/∂z and |S| per row                  8·B
              ∂λ                                       4
              (∂x, 4·B·d, only when x needs a gradient)

Writes ``results.json``.  On a 2-core CPU machine, 4 processes share 2 cores:
the times show the communication and process overhead, not a speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count(calls: list) -> None:
    """Wrap the collectives the layer uses: record (name, bytes of the tensor this rank passes in)."""
    for name in ("all_gather", "all_reduce"):
        real = getattr(dist, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            tensor = args[1] if _name == "all_gather" else args[0]
            calls.append((_name, tensor.numel() * tensor.element_size(), tuple(tensor.shape)))
            return _real(*args, **kwargs)

        setattr(dist, name, wrapped)


def _worker(rank, world, port, B, d, K, steps, out):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from spade_kernels import distributed as D
    from spade_kernels.layer import SpaDE

    D.init("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    sharded = D.ShardedSpaDE.from_dense(SpaDE(d, K, backend="native"))
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(1))
    calls: list = []
    times = []
    for step in range(steps + 1):  # step 0 warms up
        sharded.zero_grad(set_to_none=True)
        dist.barrier()
        if step == steps:
            _count(calls)  # the last step's collectives
        t0 = time.perf_counter()
        res = sharded(x)
        res.loss.backward()
        dist.barrier()
        if step:
            times.append(time.perf_counter() - t0)
    l0 = float(sharded.mean_l0(res.codes))  # (collective: every rank)
    if rank == 0:
        result = {
            "processes": world, "B": B, "d": d, "K": K,
            "median_step_ms": statistics.median(times) * 1e3,
            "collectives": [{"op": op, "bytes": b, "shape": list(s)} for op, b, s in calls],
            "bytes_per_step": sum(b for _, b, _ in calls),
            "mean_l0": l0,
        }  # fmt: skip
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="2048,256,16384", help="B,d,K")
    p.add_argument("--shards", default="1,2,4")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None, help="directory for results.json")
    args = p.parse_args(argv)
    B, d, K = (int(v) for v in args.shape.split(","))
    rows = []
    for world in (int(v) for v in args.shards.split(",")):
        path = f"/tmp/spade_distributed_cost_{world}.json"
        ctx = mp.get_context("spawn")
        port = _port()
        procs = [
            ctx.Process(target=_worker, args=(r, world, port, B, d, K, args.steps, path))
            for r in range(world)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        with open(path) as f:
            row = json.load(f)
        rows.append(row)
        print(
            f"P={world}: {row['median_step_ms']:.1f} ms per step, {row['bytes_per_step'] / 2**20:.3f} MiB "
            f"into collectives per rank per step, L0 {row['mean_l0']:.1f}",
            flush=True,
        )
    if args.out:
        from spade_kernels.bench import environment

        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"environment": environment(torch.device("cpu")), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
