"""Measurement of one benchmark configuration: its case, its time and its peak memory.

* ``make_case`` — the inputs and a zero-argument callable that runs one
  configuration (a backend in ``encode``/``forward``/``train`` mode, or a
  baseline: ``floor``, one ``torch.mm`` at the encoder's shape; ``entmax``, the
  paper-style dense path).  The pytest-benchmark suite (``benchmarks/``) times
  these same callables.
* ``measure`` — warm-up, repeats, median-ready times (CUDA events on a GPU,
  ``perf_counter`` on the CPU) and the extra peak memory (the allocator's peak
  above the inputs on a GPU; the RSS high-water mark above the RSS once the
  inputs exist on the CPU).
* ``measure_in_subprocess`` — the same in a fresh process (``python -m
  spade_kernels.bench.measure SPEC``), so a CPU configuration's peak memory is
  its own.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from ..backends import BACKENDS

__all__ = [
    "DTYPES",
    "environment",
    "estimate_bytes",
    "make_case",
    "measure",
    "measure_in_subprocess",
    "peak_rss_since",
    "start_peak_rss",
]

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode != 0:
            return "unknown"
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo) and architecture, e.g. "AMD EPYC (x86_64)".

    Two machines of one kind can have different CPUs (an AVX-512 Xeon's GEMM
    is about twice an AVX2 EPYC's at one thread), so every CPU result names it.
    """
    machine = platform.machine() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({machine})"
    except OSError:
        pass
    return platform.processor() or machine


def environment(device: torch.device) -> dict:
    """Versions and device description recorded with every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{cpu_model()} CPU, {torch.get_num_threads()} threads"
    from .. import __version__

    return {
        "device_name": device_name,
        "commit": _git_commit(),
        "spade_kernels": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _proc_field_bytes(path: str, key: str) -> int | None:
    """A ``key: N kB`` field of a /proc file, in bytes (None where there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    available = _proc_field_bytes("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_bytes(name: str, mode: str, B: int, d: int, K: int, dtype: torch.dtype) -> int:
    """Rough peak memory of one configuration (inputs included), for skipping what cannot fit.

    Row-blocked work costs the memory budget; what grows with B is the
    output (B·C codes, C ≤ 256 assumed) and, for training, B·d activations.
    The dense paths keep B×K tensors where they are not row-blocked: the
    floor's output, every baseline's training step (z, D, the sort and
    autograd's copies), entmax's encode.
    """
    from ..pipeline.memory import DEFAULT_CPU_BUDGET

    e = torch.finfo(dtype).bits // 8
    inputs = (B * d + 2 * K * d) * max(e, 4)
    params = 3 * K * d * 4 if mode == "train" else 0
    rows = B * 256 * 16 + (4 * B * d * 4 if mode == "train" else 0)
    if name == "floor":
        work = B * K * e
    elif name == "entmax" or (name == "reference" and mode != "encode"):
        per = {"encode": 4 * 4 + 8, "forward": 5 * 4 + 8, "train": 9 * 4 + 16}[mode]
        work = B * K * per
    else:
        work = 3 * DEFAULT_CPU_BUDGET + rows
    return inputs + params + work


# --------------------------------------------------------------------------
# one measurement
# --------------------------------------------------------------------------


def make_case(name: str, mode: str, B: int, d: int, K: int, dtype: torch.dtype, device: torch.device):
    """Inputs plus a zero-argument callable that runs the configuration once."""
    from ..encode import spade_encode
    from ..layer import SpaDE

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, d, generator=g).to(device=device, dtype=dtype)
    lam = 1.0 / (2 * d)
    # "auto": what a user gets without choosing (the row records what it resolved to).
    layer = SpaDE(
        d, K, device=device, dtype=dtype, backend=name if name in BACKENDS or name == "auto" else "reference"
    )
    A = layer.prototypes.detach()
    state = {}

    if name == "floor":
        At = A.t()
        return lambda: torch.mm(x, At), state
    if name == "entmax":
        from entmax import sparsemax as entmax_sparsemax

        from ..reference import squared_distances

        def paper_step():
            with torch.set_grad_enabled(mode == "train"):
                D = squared_distances(x, layer.prototypes, naive=False)
                z = entmax_sparsemax((-layer.lam * D).float(), dim=-1)
                state["l0"] = float((z.detach() > 0).sum(-1).float().mean())
                if mode == "encode":
                    return z
                x_hat = z.to(dtype) @ layer.W_dec
                loss = ((x - x_hat) ** 2).sum(-1).mean() + layer.gamma_reg * (z * D).sum(-1).mean()
                if mode == "train":
                    layer.zero_grad(set_to_none=True)
                    loss.backward()
                return loss

        return paper_step, state
    if mode == "encode":

        def encode():
            with torch.no_grad():
                codes = spade_encode(x, A, lam, backend=name)
            # Not the codes themselves: one run's output at a time.
            state["l0"] = float(codes.support_size.float().mean())
            state["output_bytes"] = sum(
                t.numel() * t.element_size()
                for t in (codes.indices, codes.values, codes.support_size, codes.distances)
                if t is not None
            )
            return codes

        return encode, state
    if mode == "forward":

        def forward():
            with torch.no_grad():
                out = layer(x)
            state["l0"] = float(out.codes.support_size.float().mean())
            return out

        return forward, state

    def train_step():
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.loss.backward()
        state["l0"] = float(out.codes.support_size.float().mean())
        return out

    return train_step, state


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def start_peak_rss(*, required: bool = True) -> int:
    """Reset the kernel's RSS high-water mark to the resident set now and return that resident set (bytes).

    :func:`peak_rss_since` of the returned value is then the extra peak of what ran in between.  Resetting
    needs Linux ≥ 4.0 (``/proc/self/clear_refs``): RuntimeError where it cannot be done, unless
    ``required=False`` (the peak is then the process's, from its start).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        if required:
            raise RuntimeError(f"cannot reset the peak resident set (/proc/self/clear_refs): {exc}") from None
    return _rss_bytes()


def peak_rss_since(base: int) -> int:
    """The peak resident set (VmHWM; ru_maxrss where /proc is missing) above ``base`` (bytes)."""
    peak = _proc_field_bytes("/proc/self/status", "VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - base


def measure(
    name: str,
    mode: str,
    B: int,
    d: int,
    K: int,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    warmup: int,
    budget_s: float | None = None,
) -> dict:
    """Time one configuration in this process; returns times (ms), extra peak memory, mean L0.

    The extra peak is measured over the runs after the first warm-up: the
    peak above what was allocated once the inputs, the layer and the first
    call's lasting state (gradients of a training step) exist.

    ``budget_s``: stop repeating once the timed runs took that long (at least
    one run), and skip the remaining warm-ups once one took half of it — for
    configurations that take seconds each.
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    fn, state = make_case(name, mode, B, d, K, dtype, device)
    if warmup > 0:
        # One warm-up before the peak is reset: one-time costs of a first call
        # (lazy imports, BLAS workspaces, gradient buffers) are not the
        # configuration's working memory.
        warmup -= 1
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Outputs the CPU library kept from the warm-up (ops.release_cached_outputs) are not live
        # memory: freed, so the RSS below counts what the configuration holds.  The peak must not
        # include the imports' transient memory: reset it.
        from ..ops import release_cached_outputs

        release_cached_outputs()
        base = start_peak_rss(required=False)
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        if budget_s is not None and time.perf_counter() - t0 > budget_s / 2:
            break
    times = []
    for _ in range(repeats):
        if budget_s is not None and times and sum(times) / 1e3 >= budget_s:
            break
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = peak_rss_since(base)
    return {
        "times_ms": times,
        "peak_bytes": max(int(peak), 0),
        "mean_l0": state.get("l0"),
        "output_bytes": state.get("output_bytes"),
    }


def measure_in_subprocess(
    args: dict, timeout: float | None, *, tree: str | None = None, env: dict | None = None
) -> dict:
    """:func:`measure` of ``args`` in a fresh process (its peak memory its own); the result's dict.

    ``tree``: run the worker of the source tree at that path (its directory and ``PYTHONPATH``)
    instead of this installation's, as ``benchmarks/compare_trees.py`` does to measure two trees;
    ``env``: variables set for the worker on top of this process's.  A failed worker raises
    ``RuntimeError`` with its last line of output (its last 2000 characters in ``.output``).
    """
    cmd = [sys.executable, "-m", "spade_kernels.bench.measure", json.dumps(args)]
    env = {**os.environ, **(env or {})}
    # glibc: allocations from 128 KiB up are mmapped and unmapped when freed, so the RSS follows
    # what is live.  With its default (dynamic) threshold, memory freed after the warm-up stays in
    # the heap and the next run reuses it unseen: the same training step measured 69 or 150 MiB.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    if tree is not None:
        tree = os.path.abspath(tree)
        env["PYTHONPATH"] = tree
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tree)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        exc = RuntimeError(f"worker failed: {tail[0]}")
        exc.output = (proc.stderr or proc.stdout)[-2000:]
        raise exc
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(spec: str) -> None:
    a = json.loads(spec)
    result = measure(
        a["name"], a["mode"], a["B"], a["d"], a["K"], DTYPES[a["dtype"]], torch.device(a["device"]),
        a["repeats"], a["warmup"], a.get("budget_s"),
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1])
