"""Reports of a benchmark run: results.json / results.csv, the plots, and the Markdown table."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import asdict

from .sweep import BASELINES, Row

__all__ = ["format_scaling_table", "format_table", "plot_results", "write_results"]

#: One colour per implementation across every plot.
_COLORS = {
    "reference": "C0",
    "torch": "C1",
    "triton": "C2",
    "native": "C3",
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
    figures = [
        (groups, "K", "K (latents)", "median_ms", "median time (ms)", "time_vs_K.png"),
        (groups, "K", "K (latents)", "peak_mem_mib", "extra peak memory (MiB)", "memory_vs_K.png"),
    ]
    if len({r["B"] for r in rows}) > 1:  # a scaling sweep: the same against B
        by_B: dict = {}
        for r in rows:
            if r["median_ms"] is not None:
                by_B.setdefault((r["mode"], r["dtype"], r["d"], r["K"]), []).append(r)
        figures += [
            (by_B, "B", "B (rows)", "median_ms", "median time (ms)", "time_vs_B.png"),
            (by_B, "B", "B (rows)", "peak_mem_mib", "extra peak memory (MiB)", "memory_vs_B.png"),
        ]
    for groups, axis, axis_label, metric, label, fname in figures:
        n = len(groups)
        cols = min(3, n)
        nrows = math.ceil(n / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
        for ax, (key, rs) in zip(axes.flat, sorted(groups.items())):
            for name in sorted({r["name"] for r in rs}):
                pts = sorted((r[axis], r[metric]) for r in rs if r["name"] == name and r[metric])
                if pts:
                    style = "--" if name in BASELINES else "-"
                    ax.plot(*zip(*pts), style, marker="o", label=name, color=_COLORS.get(name))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis_label)
            ax.set_ylabel(label)
            fixed = "B" if axis == "K" else "K"
            ax.set_title(
                f"{key[0]}, {key[1]}, {fixed}={key[2 if axis == 'K' else 3]}, d={rs[0]['d']}", fontsize=9
            )
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
    """A Markdown table of result rows (used by benchmarks/make_tables.py and the CLI)."""
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


def format_scaling_table(rows: list[dict], budget_mib: float) -> str:
    """The scaling sweep's targets, one line per (shape, mode): ``auto`` against ``reference``.

    Targets (docs/design.md, "Performance targets"): auto's time ≤ the
    reference's, its extra peak memory ≤ half the reference's, and at the
    largest B the encode's extra memory ≤ 1.5 × its output + the budget
    (``budget_mib``).  Memory ratios are shown only where the reference needs
    at least 1 MiB (below that RSS cannot tell them apart).
    """
    by = {(r["shape_name"], r["mode"], r["name"]): r for r in rows}
    big_B = max(r["B"] for r in rows)
    cols = ["B", "d", "K", "mode", "auto runs", "reference ms", "auto ms", "time auto/ref"]
    cols += ["reference MiB", "auto MiB", "memory auto/ref", "auto output MiB", "targets"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    shapes = sorted({(r["B"], r["d"], r["K"], r["shape_name"]) for r in rows})
    for B, d, K, shape in shapes:
        for mode in ("encode", "train"):
            ref, auto = by.get((shape, mode, "reference")), by.get((shape, mode, "auto"))
            if ref is None or auto is None:
                continue
            runs = auto["meta"].get("resolves_to", "—")
            if auto["median_ms"] is None or ref["median_ms"] is None:
                why = auto["status"] if auto["median_ms"] is None else f"reference {ref['status']}"
                cells = [str(B), str(d), str(K), mode, runs, _ms(ref), _ms(auto), "—", "", "", "", "", why]
                lines.append("| " + " | ".join(cells) + " |")
                continue
            t_ratio = auto["median_ms"] / ref["median_ms"]
            marks = ["time ✓" if t_ratio <= 1.0 else "time ✗"]
            m_ratio = None
            if ref["peak_mem_mib"] is not None and ref["peak_mem_mib"] >= 1:
                m_ratio = auto["peak_mem_mib"] / ref["peak_mem_mib"]
                marks.append("memory ✓" if m_ratio <= 0.5 else "memory ✗")
            out = auto.get("output_mib")
            if B == big_B and mode == "encode" and out is not None:
                bound = 1.5 * out + budget_mib
                marks.append(f"≤ 1.5·out + budget {'✓' if auto['peak_mem_mib'] <= bound else '✗'}")
            cells = [
                str(B), str(d), str(K), mode, runs, _ms(ref), _ms(auto), f"{t_ratio:.2f}",
                f"{ref['peak_mem_mib']:.0f}", f"{auto['peak_mem_mib']:.0f}",
                "—" if m_ratio is None else f"{m_ratio:.2f}", "—" if out is None else f"{out:.1f}",
                ", ".join(marks),
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(r: dict) -> str:
    return "—" if r["median_ms"] is None else f"{r['median_ms']:.1f}"
