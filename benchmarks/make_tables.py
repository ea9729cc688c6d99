"""Regenerate the performance tables (README.md and docs/) and plots from committed results.

Reads every ``benchmarks/results/<run>/results.json``, redraws that run's
plots next to it, and replaces, in README.md and every page of docs/, the
text between ``<!-- bench:<run>:start -->`` and ``<!-- bench:<run>:end -->``
with the run's table, and between ``<!-- bench:<run>:headline:start -->`` and
``<!-- bench:<run>:headline:end -->`` with its headline (what ``auto`` runs
against the floor and the reference, per mode).  Numbers are never typed by
hand; links are relative to the page they are written into.

Usage: ``python benchmarks/make_tables.py [--check]`` (``--check`` exits 1
when a page is out of date, without writing).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

from spade_kernels.bench import format_scaling_table, format_table, plot_results
from spade_kernels.pipeline.memory import DEFAULT_CPU_BUDGET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _source(run: str, data: dict, prefix: str) -> str:
    env = data["environment"]
    return (
        f"Run `{run}`: {env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
        f"commit `{env['commit']}`, {env['date']}. "
        f"Source: [`benchmarks/results/{run}/results.json`]({prefix}benchmarks/results/{run}/results.json)."
    )


def run_block(run: str, data: dict, prefix: str = "") -> str:
    """The run's whole table (or the scaling sweep's target table), under its source line."""
    header = _source(run, data, prefix)
    # The scaling table holds the targets against the reference; a run without reference rows
    # (a re-measured subset, e.g. results/cpu-scaling-300k) gets the plain table.
    has_reference = any(r["name"] == "reference" and r["status"] == "ok" for r in data["rows"])
    if data["environment"].get("sweep") == "scaling" and has_reference:
        budget = data["environment"].get("memory_budget_mib", DEFAULT_CPU_BUDGET / 2**20)
        return header + "\n\n" + format_scaling_table(data["rows"], budget) + "\n"
    rows = [r for r in data["rows"] if r["status"] == "ok" or r["kind"] == "backend"]
    return header + "\n\n" + format_table(rows) + "\n"


def headline_block(run: str, data: dict, prefix: str = "") -> str:
    """Per shape and mode: the backend ``auto`` runs on that device against the floor and the reference."""
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    device = data["environment"]["device_name"]
    auto = "native" if "CPU" in device else "triton"
    lines = [
        "| shape (B, d, K) | mode | backend (`auto`) | median ms | × floor | × faster than reference "
        "| extra peak MiB (reference) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["name"] != auto:
            continue
        ref = next((q for q in rows if q["name"] == "reference" and q["mode"] == r["mode"] and q["K"] == r["K"]
                    and q["B"] == r["B"] and q["d"] == r["d"]), None)  # fmt: skip
        shape = f"{r['shape_name'] + ' ' if r.get('shape_name') else ''}({r['B']}, {r['d']}, {r['K']})"
        speedup = r.get("speedup_vs_reference")
        faster = "—" if speedup is None else f"{speedup:.1f}"
        ref_mib = "—" if ref is None else f"{ref['peak_mem_mib']:.0f}"
        lines.append(
            f"| {shape} | {r['mode']} | {r['name']} | {r['median_ms']:.1f} | {r['ratio_to_floor']:.2f} | "
            f"{faster} | {r['peak_mem_mib']:.0f} ({ref_mib}) |"
        )
    return _source(run, data, prefix) + "\n\n" + "\n".join(lines) + "\n"


def _prefix(page: str) -> str:
    """The relative path from a page to the repository root."""
    rel = os.path.relpath(ROOT, os.path.dirname(page))
    return "" if rel == "." else rel + "/"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that the pages are up to date")
    args = p.parse_args(argv)
    runs = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "*", "results.json"))):
        run = os.path.basename(os.path.dirname(path))
        with open(path) as f:
            runs[run] = json.load(f)
        harness_run = all(
            "median_ms" in r for r in runs[run].get("rows", [])
        )  # other scripts write other rows
        if not args.check and harness_run:
            plot_results(runs[run]["rows"], os.path.dirname(path))
    stale, placed = [], set()
    for page in PAGES:
        with open(page) as f:
            text = f.read()
        new = text
        for run, data in runs.items():
            for kind, make in (("", run_block), (":headline", headline_block)):
                pattern = re.compile(
                    rf"(<!-- bench:{re.escape(run)}{kind}:start -->\n).*?(<!-- bench:{re.escape(run)}{kind}:end -->)",
                    re.S,
                )
                if pattern.search(new):
                    placed.add(run)
                    block = make(run, data, _prefix(page))
                    new = pattern.sub(lambda m, block=block: m.group(1) + block + m.group(2), new)
        if new != text:
            stale.append(os.path.relpath(page, ROOT))
            if not args.check:
                with open(page, "w") as f:
                    f.write(new)
    for run in sorted(set(runs) - placed):
        print(f"no page has markers for run {run!r}; skipped", file=sys.stderr)
    if args.check and stale:
        print(f"performance tables out of date in {', '.join(stale)}: run python benchmarks/make_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
