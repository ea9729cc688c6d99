"""Reports of a benchmark run: results.json / results.csv, the plots, and the Markdown table."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import asdict

from .sweep import BASELINES, Row

__all__ = ["format_table", "plot_results", "write_results"]

#: One colour per implementation across every plot ("cuda": runs before the backend was renamed native).
_COLORS = {
    "reference": "C0",
    "torch": "C1",
    "triton": "C2",
    "native": "C3",
    "cuda": "C3",
    "floor": "C7",
    "entmax": "C4",
}

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
