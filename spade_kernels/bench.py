"""Benchmark harness behind ``spade-kernels bench`` (DESIGN.md §5).

Every configuration (shape × dtype × mode × backend or baseline) is timed
with warm-up and repeats and reported as median with spread, effective
TFLOP/s, extra peak memory, speedup over ``reference`` and ratio to the floor
(one ``torch.mm`` at the encoder's shape and dtype).

* CPU: each configuration runs in a fresh subprocess, so its extra peak RSS
  (the kernel's high-water mark ``VmHWM``, reset once the inputs exist, minus
  the RSS at that point) belongs to that configuration alone; wall-clock time
  via ``time.perf_counter``.
* CUDA: in-process; CUDA events for time, the caching allocator's peak for
  memory (``max_memory_allocated`` minus the inputs' footprint).

Configurations whose estimated memory exceeds what the device has are reported
as ``skipped: needs N GiB`` rows instead of being run.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

MODES = ("encode", "forward", "train")
BACKEND_NAMES = ("reference", "torch", "triton", "native")
BASELINES = ("floor", "entmax")
GPU_SHAPES = {"S1": (4096, 768, 24576), "S2": (4096, 2304, 65536), "S3": (4096, 4096, 131072)}
CPU_SHAPES = {"C1": (1024, 768, 16384)}
QUICK_SHAPES = {"Q1": (256, 128, 1024), "Q2": (256, 128, 4096), "Q3": (256, 128, 16384)}

#: One colour per implementation across every plot.
_COLORS = {"reference": "C0", "torch": "C1", "triton": "C2", "native": "C3", "cuda": "C3", "floor": "C7", "entmax": "C4"}
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class Row:
    """One measured (or skipped) configuration."""

    name: str  # backend or baseline
    kind: str  # "backend" | "baseline"
    mode: str
    shape_name: str
    B: int
    d: int
    K: int
    dtype: str
    device: str
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    repeats: int = 0
    tflops: float | None = None
    peak_mem_mib: float | None = None
    mean_l0: float | None = None
    speedup_vs_reference: float | None = None
    ratio_to_floor: float | None = None
    status: str = "ok"
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------


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
        device_name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    from . import __version__

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


def _device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    available = _proc_field_bytes("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_bytes(name: str, mode: str, B: int, d: int, K: int, dtype: torch.dtype) -> int:
    """Rough peak memory of one configuration (inputs included), for skipping.

    Dense paths hold several B×K tensors (scores, sort values, int64 sort
    indices, cumulative sums; more with autograd); sparse paths hold a chunk
    of scores and B×C buffers.
    """
    e = torch.finfo(dtype).bits // 8
    inputs = (B * d + 2 * K * d) * max(e, 4)
    dense = name in ("reference", "entmax")
    if name == "floor":
        work = B * K * e
    elif dense:
        per = {"encode": 4 * 4 + 8, "forward": 5 * 4 + 8, "train": 9 * 4 + 16}[mode]
        work = B * K * per
    else:
        work = B * min(K, 8192) * 4 * 3 + B * 2048 * 12 + (3 * K * d * 4 if mode == "train" else 0)
    return inputs + work


# --------------------------------------------------------------------------
# one measurement
# --------------------------------------------------------------------------


def _make_case(name: str, mode: str, B: int, d: int, K: int, dtype: torch.dtype, device: torch.device):
    """Inputs plus a zero-argument callable that runs the configuration once."""
    from .encode import spade_encode
    from .layer import SpaDE

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, d, generator=g).to(device=device, dtype=dtype)
    lam = 1.0 / (2 * d)
    layer = SpaDE(d, K, device=device, dtype=dtype, backend=name if name in BACKEND_NAMES else "reference")
    A = layer.prototypes.detach()
    state = {}

    if name == "floor":
        At = A.t()
        return lambda: torch.mm(x, At), state
    if name == "entmax":
        from entmax import sparsemax as entmax_sparsemax

        from .reference import squared_distances

        def paper_step():
            with torch.set_grad_enabled(mode == "train"):
                D = squared_distances(x, layer.prototypes, naive=False)
                z = entmax_sparsemax((-layer.lam * D).float(), dim=-1)
                state["l0"] = z.detach()
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
            state["codes"] = codes
            return codes

        return encode, state
    if mode == "forward":

        def forward():
            with torch.no_grad():
                out = layer(x)
            state["codes"] = out.codes
            return out

        return forward, state

    def train_step():
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.loss.backward()
        state["codes"] = out.codes
        return out

    return train_step, state


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ≥ 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """VmHWM (peak RSS since the last reset), or ru_maxrss where /proc is missing."""
    peak = _proc_field_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
) -> dict:
    """Time one configuration in this process; returns times (ms), peak memory, mean L0."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    fn, state = _make_case(name, mode, B, d, K, dtype, device)
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # The peak must not include the imports' transient memory: reset it.
        _reset_peak_rss()
        base = _rss_bytes()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
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
        peak = _peak_rss_bytes() - base
    l0 = None
    if "codes" in state:
        l0 = float(state["codes"].support_size.float().mean())
    elif "l0" in state:
        l0 = float((state["l0"] > 0).sum(-1).float().mean())
    return {"times_ms": times, "peak_bytes": max(int(peak), 0), "mean_l0": l0}


def _measure_in_subprocess(args: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "spade_kernels.bench", "--worker", json.dumps(args)]
    env = dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"worker failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------


def _parse_shape(text: str) -> tuple[str, tuple[int, int, int]]:
    named = {**GPU_SHAPES, **CPU_SHAPES, **QUICK_SHAPES}
    if text in named:
        return text, named[text]
    try:
        B, d, K = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shape expects B,d,K or one of {sorted(named)}, got {text!r}"
        ) from None
    if min(B, d, K) < 1:
        raise argparse.ArgumentTypeError(f"--shape values must be positive, got {text!r}")
    return f"{B}x{d}x{K}", (B, d, K)


def _flops(B: int, d: int, K: int) -> float:
    return 2.0 * B * d * K


def run_sweep(
    shapes,
    backends,
    baselines,
    dtypes,
    modes,
    device: torch.device,
    repeats: int,
    warmup: int,
    progress=None,
    timeout: float = 600.0,
    deadline: float | None = None,
    on_row=None,
) -> tuple[list[Row], dict]:
    """Measure every configuration; returns (rows, environment).

    ``deadline``: seconds after the start past which no further configuration
    is started (the rest are recorded as ``skipped: deadline``; the first
    always runs).  ``on_row(rows,
    env)`` is called after every configuration, so a caller can save partial
    results (an interrupted run keeps what it finished).
    """
    progress = progress or sys.stderr
    from .backends import BACKENDS, backend_status

    env = environment(device)
    status = backend_status()
    if device.type == "cpu" and os.getloadavg()[0] > 0.5:
        print(
            f"warning: load average {os.getloadavg()[0]:.2f}: another process is using the CPU, "
            "timings will be inflated",
            file=progress,
        )
    configs = []
    for shape_name, (B, d, K) in shapes:
        for dtype_name in dtypes:
            for mode in modes:
                for name in baselines:
                    if name == "floor" or mode != "forward":
                        configs.append((name, "baseline", mode, shape_name, B, d, K, dtype_name))
                for name in backends:
                    configs.append((name, "backend", mode, shape_name, B, d, K, dtype_name))
    rows: list[Row] = []
    floor_cache: dict = {}
    mem_avail = _device_memory_bytes(device)
    t_start = time.perf_counter()
    for i, (name, kind, mode, shape_name, B, d, K, dtype_name) in enumerate(configs, 1):
        dtype = _DTYPES[dtype_name]
        row = Row(name, kind, mode, shape_name, B, d, K, dtype_name, env["device_name"], meta=env)
        reason = status.get(name) if kind == "backend" else None
        need = estimate_bytes(name, mode, B, d, K, dtype)
        floor_key = (shape_name, dtype_name)
        if name == "floor" and floor_key in floor_cache:
            row = floor_cache[floor_key]
            rows.append(Row(**{**asdict(row), "mode": mode}))
            continue
        if name == "entmax" and importlib.util.find_spec("entmax") is None:
            reason = "the entmax package is not installed"
        if reason is not None:
            row.status = f"skipped: unavailable ({reason})"
        elif kind == "backend" and BACKENDS[name].device_reason(device) is not None:
            row.status = f"skipped: {BACKENDS[name].device_reason(device)}"
        elif name == "triton" and device.type != "cuda":
            row.status = "skipped: the Triton interpreter (TRITON_INTERPRET=1) is not timed"
        elif need > 0.9 * mem_avail:
            row.status = f"skipped: needs {need / 2**30:.1f} GiB"
        elif deadline is not None and rows and time.perf_counter() - t_start > deadline:
            row.status = f"skipped: deadline ({deadline:.0f} s) passed"
        else:
            args = {"name": name, "mode": mode, "B": B, "d": d, "K": K, "dtype": dtype_name}
            args.update(device=str(device), repeats=repeats, warmup=warmup)
            try:
                if device.type == "cuda":
                    result = measure(name, mode, B, d, K, dtype, device, repeats, warmup)
                else:
                    result = _measure_in_subprocess(args, timeout)
            except (RuntimeError, subprocess.TimeoutExpired, torch.cuda.OutOfMemoryError) as exc:
                row.status = f"failed: {exc}"[:200]
                result = None
            if result is not None:
                t = sorted(result["times_ms"])
                row.median_ms = statistics.median(t)
                row.p10_ms = t[int(0.1 * (len(t) - 1))]
                row.p90_ms = t[math.ceil(0.9 * (len(t) - 1))]
                row.repeats = len(t)
                row.tflops = _flops(B, d, K) / (row.median_ms * 1e-3) / 1e12
                row.peak_mem_mib = result["peak_bytes"] / 2**20
                row.mean_l0 = result["mean_l0"]
        if name == "floor":
            floor_cache[floor_key] = row
        rows.append(row)
        elapsed = time.perf_counter() - t_start
        shown = f"{row.median_ms:9.2f} ms" if row.median_ms is not None else row.status
        print(
            f"[{i:3d}/{len(configs)} {elapsed:6.0f}s] {shape_name:>8} {dtype_name:8} {mode:7} {name:9} {shown}",
            file=progress,
            flush=True,
        )
        if on_row is not None:
            _fill_ratios(rows)
            on_row(rows, env)
    _fill_ratios(rows)
    return rows, env


def _fill_ratios(rows: list[Row]) -> None:
    def key(r):
        return (r.shape_name, r.dtype, r.mode)

    ref = {key(r): r.median_ms for r in rows if r.name == "reference" and r.median_ms}
    floor = {key(r): r.median_ms for r in rows if r.name == "floor" and r.median_ms}
    for r in rows:
        if r.median_ms is None:
            continue
        if key(r) in ref:
            r.speedup_vs_reference = ref[key(r)] / r.median_ms
        if key(r) in floor:
            r.ratio_to_floor = r.median_ms / floor[key(r)]


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

CSV_FIELDS = [f for f in Row.__dataclass_fields__ if f != "meta"] + ["commit", "torch", "triton"]


def write_results(
    rows: list[Row], env: dict, out_dir: str, plots: bool = True, csv_file: bool = True
) -> list[str]:
    """Write results.json, results.csv and (unless ``plots=False``) the plots; returns the paths.

    results.json is written to a temporary name and renamed, so a reader (or
    an interrupted run) never sees half a file.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json")]
    tmp = paths[0] + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    os.replace(tmp, paths[0])
    if not csv_file:
        return paths
    paths.append(os.path.join(out_dir, "results.csv"))
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            d = asdict(r)
            meta = d.pop("meta")
            writer.writerow(
                {**d, "commit": meta.get("commit"), "torch": meta.get("torch"), "triton": meta.get("triton")}
            )
    if plots:
        paths += plot_results([asdict(r) for r in rows], out_dir)
    return paths


def plot_results(rows: list[dict], out_dir: str) -> list[str]:
    """PNG plots: time vs K and peak memory vs K, one line per backend/baseline.

    One figure per metric with a panel per (mode, dtype, B, d) group.  Returns
    the written paths ([] when matplotlib is missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots written", file=sys.stderr)
        return []
    groups: dict = {}
    for r in rows:
        if r["median_ms"] is None:
            continue
        groups.setdefault((r["mode"], r["dtype"], r["B"], r["d"]), []).append(r)
    if not groups:
        return []
    paths = []
    for metric, label, fname in (
        ("median_ms", "median time (ms)", "time_vs_K.png"),
        ("peak_mem_mib", "extra peak memory (MiB)", "memory_vs_K.png"),
    ):
        n = len(groups)
        cols = min(3, n)
        nrows = math.ceil(n / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
        for ax, ((mode, dtype, B, d), rs) in zip(axes.flat, sorted(groups.items())):
            for name in sorted({r["name"] for r in rs}):
                pts = sorted((r["K"], r[metric]) for r in rs if r["name"] == name and r[metric])
                if pts:
                    style = "--" if name in BASELINES else "-"
                    ax.plot(*zip(*pts), style, marker="o", label=name, color=_COLORS.get(name))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("K (latents)")
            ax.set_ylabel(label)
            ax.set_title(f"{mode}, {dtype}, B={B}, d={d}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        device = rows[0].get("device", "")
        fig.suptitle(f"spade_kernels — {device}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def format_table(rows: list[dict]) -> str:
    """A Markdown table of result rows (used by the README generator and the CLI)."""
    cols = ["shape (B, d, K)", "dtype", "mode", "implementation", "median ms (p10–p90)", "TFLOP/s"]
    cols += ["extra peak MiB", "mean L0", "× vs reference", "× floor"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    for r in rows:
        shape = f"{r['shape_name']} ({r['B']}, {r['d']}, {r['K']})"
        if r["median_ms"] is None:
            lines.append(f"| {shape} | {r['dtype']} | {r['mode']} | {r['name']} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {shape} | {r['dtype']} | {r['mode']} | {r['name']} | "
            f"{r['median_ms']:.1f} ({r['p10_ms']:.1f}–{r['p90_ms']:.1f}) | {r['tflops']:.3f} | "
            f"{f(r['peak_mem_mib'], '.0f')} | {f(r['mean_l0'], '.1f')} | "
            f"{f(r['speedup_vs_reference'], '.2f')} | {f(r['ratio_to_floor'], '.2f')} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``spade-kernels bench``."""
    p.add_argument(
        "--shape", action="append", type=_parse_shape, help="B,d,K or a named shape (S1–S3, C1); repeatable"
    )
    p.add_argument("--backends", default=None, help="comma list; default: every backend available here")
    p.add_argument("--baselines", default="floor,entmax", help="comma list of floor,entmax (or 'none')")
    p.add_argument("--dtypes", default=None, help="comma list; default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--modes", default="encode,forward,train", help="comma list of encode,forward,train")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="small CPU sweep (under 2 minutes)")
    p.add_argument("--out", default=None, help="directory for results.json, results.csv and plots")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per CPU configuration")
    p.add_argument("--no-plots", action="store_true", help="write results.json and results.csv only")
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds after which no new configuration starts (the rest are recorded as skipped); "
        "with --out, results.json is rewritten after every configuration",
    )


def _split(text: str | None, allowed, what: str) -> list[str]:
    if text is None or text == "none":
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"spade-kernels bench: unknown {what} {bad}; expected some of {list(allowed)}")
    return items


def run_from_args(args: argparse.Namespace, stream=None) -> int:
    """Entry point of ``spade-kernels bench``."""
    stream = stream or sys.stdout
    from .backends import available_backends

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("spade-kernels bench: --device cuda but no CUDA device is available")
    if args.quick:
        shapes = list(QUICK_SHAPES.items())
        repeats, warmup = args.repeats or 3, args.warmup or 1
    else:
        shapes = args.shape or list((GPU_SHAPES if device.type == "cuda" else CPU_SHAPES).items())
        repeats, warmup = args.repeats or (20 if device.type == "cuda" else 5), args.warmup or 2
    if args.quick and args.shape:
        shapes = args.shape
    backends = _split(args.backends, BACKEND_NAMES, "backends") if args.backends else available_backends()
    baselines = _split(args.baselines, BASELINES, "baselines")
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtypes = _split(args.dtypes or default_dtype, _DTYPES, "dtypes")
    modes = _split(args.modes, MODES, "modes")

    def save_partial(rows, env):
        if args.out:
            write_results(rows, env, args.out, plots=False, csv_file=False)

    rows, env = run_sweep(
        shapes, backends, baselines, dtypes, modes, device, repeats, warmup,
        timeout=args.timeout, deadline=args.deadline, on_row=save_partial,
    )  # fmt: skip
    print(format_table([asdict(r) for r in rows]), file=stream)
    print(
        f"\n{env['device_name']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}",
        file=stream,
    )
    if args.out:
        for path in write_results(rows, env, args.out, plots=not args.no_plots):
            print(f"wrote {path}", file=stream)
    return 0


def _worker(spec: str) -> None:
    a = json.loads(spec)
    result = measure(
        a["name"], a["mode"], a["B"], a["d"], a["K"], _DTYPES[a["dtype"]], torch.device(a["device"]),
        a["repeats"], a["warmup"],
    )  # fmt: skip
    print(json.dumps(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="spade-kernels bench", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
