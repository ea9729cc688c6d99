"""``spade-kernels bench``: the command line of the benchmark harness."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

from ..backends import BACKENDS
from .measure import DTYPES
from .report import format_table, write_results
from .sweep import (
    BASELINES,
    CPU_SHAPES,
    GPU_SHAPES,
    MODES,
    QUICK_SHAPES,
    parse_shape,
    run_sweep,
    scaling_shapes,
)

__all__ = ["add_arguments", "main", "run_from_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``spade-kernels bench``."""
    p.add_argument(
        "--shape", action="append", type=parse_shape, help="B,d,K or a named shape (S1–S3, C1); repeatable"
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
        "--sweep",
        choices=["scaling"],
        default=None,
        help="scaling: B ∈ {1024, 16384, 300000} × K ∈ {128 … 65536} × d ∈ {2, 128, 768}, encode and train, "
        "every backend and auto against the reference, each configuration in its own process",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="timed seconds per configuration before it stops repeating",
    )
    p.add_argument(
        "--max-config-s",
        type=float,
        default=None,
        help="skip configurations whose encoder GEMM alone would take longer (estimated from a GEMM timed here)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds after which no new configuration starts (the rest are recorded as skipped); "
        "with --out, results.json is rewritten after every configuration",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --out: keep the configurations its results.json already holds (measured, or skipped "
        "other than for the deadline) and measure only the rest; rows of shapes or backends this run does not "
        "name are kept as they were",
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
    from ..backends import available_backends

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
    if args.sweep == "scaling":
        shapes = args.shape or scaling_shapes()
        repeats, warmup = args.repeats or 3, args.warmup or 1
        args.modes = args.modes if args.modes != "encode,forward,train" else "encode,train"
        args.baselines = args.baselines if args.baselines != "floor,entmax" else "floor"
        args.budget_s = 20.0 if args.budget_s is None else args.budget_s
        args.max_config_s = 120.0 if args.max_config_s is None else args.max_config_s
    if args.backends:
        backends = _split(args.backends, (*BACKENDS, "auto"), "backends")
    else:
        backends = [*available_backends(), "auto"] if args.sweep else available_backends()
    baselines = _split(args.baselines, BASELINES, "baselines")
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtypes = _split(args.dtypes or default_dtype, DTYPES, "dtypes")
    modes = _split(args.modes, MODES, "modes")

    def save_partial(rows, env):
        if args.out:
            write_results(rows, env, args.out, plots=False, csv_file=False)

    previous = None
    if args.resume:
        if not args.out:
            raise SystemExit("--resume needs --out (the run directory whose results.json to resume)")
        path = os.path.join(args.out, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)["rows"]
    rows, env = run_sweep(
        shapes, backends, baselines, dtypes, modes, device, repeats, warmup,
        timeout=args.timeout, deadline=args.deadline, on_row=save_partial,
        budget_s=args.budget_s, max_config_s=args.max_config_s, previous=previous, sweep=args.sweep,
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="spade-kernels bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
