"""Sweeps: the configurations of a benchmark run, measured one by one, with ratios.

Every configuration (shape × dtype × mode × backend or baseline) is measured
by :mod:`.measure` — in its own subprocess on the CPU, in process on a GPU —
unless it is unavailable here, estimated not to fit in memory (``skipped:
needs N GiB``) or past the run's deadline.  Rows record median and p10–p90,
effective TFLOP/s (2·B·d·K over the median: the encoder GEMM's work), extra
peak memory, mean L0, the speedup over ``reference`` and the ratio to the
floor, with the device, commit and versions.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from ..backends import auto_backend
from .measure import DTYPES, device_memory_bytes, environment, estimate_bytes, measure, measure_in_subprocess

__all__ = [
    "BASELINES",
    "CPU_SHAPES",
    "GPU_SHAPES",
    "MODES",
    "QUICK_SHAPES",
    "Row",
    "parse_shape",
    "run_sweep",
]

MODES = ("encode", "forward", "train")
BASELINES = ("floor", "entmax")
GPU_SHAPES = {"S1": (4096, 768, 24576), "S2": (4096, 2304, 65536), "S3": (4096, 4096, 131072)}
CPU_SHAPES = {"C1": (1024, 768, 16384)}
QUICK_SHAPES = {"Q1": (256, 128, 1024), "Q2": (256, 128, 4096), "Q3": (256, 128, 16384)}
#: ``--sweep scaling``: how time and memory grow with B, K and d.
SCALING = {"B": (1024, 16384, 300000), "K": (128, 512, 4096, 16384, 65536), "d": (2, 128, 768)}


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
    output_mib: float | None = (
        None  # encode: the size of the returned codes (indices, values, sizes, distances)
    )
    mean_l0: float | None = None
    speedup_vs_reference: float | None = None
    ratio_to_floor: float | None = None
    status: str = "ok"
    meta: dict = field(default_factory=dict)


def parse_shape(text: str) -> tuple[str, tuple[int, int, int]]:
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
    budget_s: float | None = None,
    max_config_s: float | None = None,
    previous: list[dict] | None = None,
    sweep: str | None = None,
) -> tuple[list[Row], dict]:
    """Measure every configuration; returns (rows, environment).

    ``deadline``: seconds after the start past which no further configuration
    is started (the rest are recorded as ``skipped: deadline``; the first
    always runs).  ``on_row(rows, env)`` is called after every configuration,
    so a caller can save partial results (an interrupted run keeps what it
    finished).  ``budget_s``: timed seconds per configuration after which it
    stops repeating (:func:`~.measure.measure`).  ``max_config_s``: skip a
    configuration whose one encoder GEMM alone, at the rate measured here,
    would take longer (``skipped: estimated ≥ N s``).  The backend name
    ``"auto"`` measures what ``backend="auto"`` runs; its row records the
    backend it resolved to in ``meta["resolves_to"]``.  ``previous``: the rows of an earlier run's
    results.json to resume (rows skipped by the deadline or failed are measured again; the rest are kept).  ``sweep``: the named sweep
    these rows belong to, recorded in the environment (``env["sweep"]``) from the first partial save on.
    """
    progress = progress or sys.stderr
    from ..backends import BACKENDS, backend_status

    env = environment(device)
    if sweep:
        env["sweep"] = sweep
    status = backend_status()
    if device.type == "cpu":
        load = os.getloadavg()[0]
        env["load_average_at_start"] = load  # the results record what the warning said
        if load > 0.5:
            print(
                f"warning: load average {load:.2f}: another process is using the CPU, timings will be inflated",
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
    rates = _rates(device) if max_config_s is not None else None
    rows: list[Row] = []
    floor_cache: dict = {}
    mem_avail = device_memory_bytes(device)
    t_start = time.perf_counter()
    # Resuming: the earlier run's rows that were measured (or skipped for a reason other than time) are kept;
    # a resume that names fewer shapes or backends keeps the earlier run's other rows as they were, in its
    # order (new configurations after them): nothing measured is dropped.
    earlier = [_as_row(r) for r in previous or []]
    order = {_row_key(r): i for i, r in enumerate(earlier)}
    done = {_row_key(r): r for r in earlier if not r.status.startswith(("skipped: deadline", "failed"))}
    wanted = {(name, mode, shape_name, dtype) for name, _, mode, shape_name, *_, dtype in configs}
    carried = [r for r in earlier if _row_key(r) not in wanted]

    def with_carried(rows: list[Row]) -> list[Row]:
        if not carried:
            return rows
        return sorted([*rows, *carried], key=lambda r: order.get(_row_key(r), len(order)))

    for i, (name, kind, mode, shape_name, B, d, K, dtype_name) in enumerate(configs, 1):
        dtype = DTYPES[dtype_name]
        if (name, mode, shape_name, dtype_name) in done:
            rows.append(done[(name, mode, shape_name, dtype_name)])
            if name == "floor":
                floor_cache[(shape_name, dtype_name)] = rows[-1]
            continue
        row = Row(name, kind, mode, shape_name, B, d, K, dtype_name, env["device_name"], meta=env)
        backend = name
        if name == "auto":
            backend = auto_backend(device, dtype)[0]
            row.meta = {**env, "resolves_to": backend}
        reason = status.get(backend) if kind == "backend" else None
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
        elif kind == "backend" and BACKENDS[backend].device_reason(device) is not None:
            row.status = f"skipped: {BACKENDS[backend].device_reason(device)}"
        elif backend == "triton" and device.type != "cuda":
            row.status = "skipped: the Triton interpreter (TRITON_INTERPRET=1) is not timed"
        elif need > 0.9 * mem_avail:
            row.status = f"skipped: needs {need / 2**30:.1f} GiB"
        elif rates is not None and _estimate_s(name, mode, B, d, K, rates) > max_config_s:
            row.status = f"skipped: estimated ≥ {_estimate_s(name, mode, B, d, K, rates):.0f} s (its GEMMs, score pass and sorts alone)"
        elif name == "auto" and _measured(rows, backend, mode, shape_name, dtype_name) is not None:
            same = _measured(rows, backend, mode, shape_name, dtype_name)
            row = Row(
                **{**asdict(same), "name": "auto", "meta": {**same.meta, **row.meta, "measured_as": backend}}
            )
        elif deadline is not None and rows and time.perf_counter() - t_start > deadline:
            row.status = f"skipped: deadline ({deadline:.0f} s) passed"
        else:
            args = {"name": name, "mode": mode, "B": B, "d": d, "K": K, "dtype": dtype_name}
            args.update(device=str(device), repeats=repeats, warmup=warmup, budget_s=budget_s)
            try:
                if device.type == "cuda":
                    result = measure(name, mode, B, d, K, dtype, device, repeats, warmup, budget_s)
                else:
                    result = measure_in_subprocess(args, timeout)
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
                if result.get("output_bytes") is not None:
                    row.output_mib = result["output_bytes"] / 2**20
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
            merged = with_carried(rows)
            _fill_ratios(merged)
            on_row(merged, env)
    rows = with_carried(rows)
    _fill_ratios(rows)
    return rows, env


def _row_key(row: Row) -> tuple[str, str, str, str]:
    """What a row measures: (backend or baseline, mode, shape name, dtype)."""
    return (row.name, row.mode, row.shape_name, row.dtype)


def _as_row(saved: dict) -> Row:
    """A row read back from results.json (keys a newer or older version added are ignored)."""
    return Row(**{k: v for k, v in saved.items() if k in Row.__dataclass_fields__})


def _measured(rows: list[Row], name: str, mode: str, shape_name: str, dtype_name: str) -> Row | None:
    for r in rows:
        if _row_key(r) == (name, mode, shape_name, dtype_name) and r.median_ms:
            return r
    return None


def _estimate_s(name: str, mode: str, B: int, d: int, K: int, rates: tuple[float, float, float]) -> float:
    """Seconds of a configuration's unavoidable work: GEMMs at the measured rate, one pass over the B×K
    scores (every backend forms them, a chunk at a time), plus the reference's sort."""
    gemm_rate, sort_rate, pass_rate = rates
    seconds = _flops(B, d, K) * (3 if mode == "train" else 1) / gemm_rate
    if name != "floor":
        seconds += B * K / pass_rate
    if name == "reference":
        seconds += B * K * math.log2(max(K, 2)) / sort_rate
    return seconds


def _rates(device: torch.device) -> tuple[float, float]:
    """Here: FLOP/s of a float32 GEMM at (1024, 768, 4096), element·log2(K)/s of a row sort at K = 4096,
    and elements/s of one elementwise pass over a (1024, 4096) float32 tensor."""

    def timed(fn) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / 3

    x = torch.randn(1024, 768, device=device)
    A = torch.randn(4096, 768, device=device)
    s = torch.randn(1024, 4096, device=device)
    gemm = _flops(1024, 768, 4096) / timed(lambda: torch.mm(x, A.t()))
    sort = 1024 * 4096 * 12 / timed(lambda: torch.sort(s, dim=1, descending=True))
    elementwise = 1024 * 4096 / timed(lambda: s.clamp(min=0))
    return gemm, sort, elementwise


def scaling_shapes() -> list[tuple[str, tuple[int, int, int]]]:
    """The scaling sweep (docs/design.md, "Performance targets"): B × K × d."""
    return [(f"{B}x{d}x{K}", (B, d, K)) for B in SCALING["B"] for d in SCALING["d"] for K in SCALING["K"]]


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
