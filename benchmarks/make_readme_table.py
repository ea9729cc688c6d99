"""Regenerate the README performance tables and plots from committed results.

Reads every ``benchmarks/results/<run>/results.json``, redraws that run's
plots next to it, and replaces the text between
``<!-- bench:<run>:start -->`` and ``<!-- bench:<run>:end -->`` in README.md
with a table generated from the rows.  Numbers are never typed by hand.

Usage: ``python benchmarks/make_readme_table.py [--check]`` (``--check``
exits 1 when README.md is out of date, without writing).
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


def run_block(run: str, data: dict) -> str:
    env = data["environment"]
    rows = [r for r in data["rows"] if r["status"] == "ok" or r["kind"] == "backend"]
    header = (
        f"Run `{run}`: {env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
        f"commit `{env['commit']}`, {env['date']}. "
        f"Source: [`benchmarks/results/{run}/results.json`](benchmarks/results/{run}/results.json)."
    )
    if env.get("sweep") == "scaling":
        budget = env.get("memory_budget_mib", DEFAULT_CPU_BUDGET / 2**20)
        return header + "\n\n" + format_scaling_table(data["rows"], budget) + "\n"
    return header + "\n\n" + format_table(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = p.parse_args(argv)
    readme_path = os.path.join(ROOT, "README.md")
    with open(readme_path) as f:
        readme = f.read()
    new = readme
    for path in sorted(glob.glob(os.path.join(RESULTS, "*", "results.json"))):
        run = os.path.basename(os.path.dirname(path))
        with open(path) as f:
            data = json.load(f)
        harness_run = all("median_ms" in r for r in data.get("rows", []))  # other scripts write other rows
        if not args.check and harness_run:
            plot_results(data["rows"], os.path.dirname(path))
        pattern = re.compile(
            rf"(<!-- bench:{re.escape(run)}:start -->\n).*?(<!-- bench:{re.escape(run)}:end -->)", re.S
        )
        if not pattern.search(new):
            print(f"README.md has no markers for run {run!r}; skipped", file=sys.stderr)
            continue
        new = pattern.sub(lambda m, run=run, data=data: m.group(1) + run_block(run, data) + m.group(2), new)
    if args.check:
        if new != readme:
            print("README.md performance tables are out of date: run python benchmarks/make_readme_table.py")
            return 1
        return 0
    with open(readme_path, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
