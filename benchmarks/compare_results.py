"""Row by row, two benchmark runs: which configurations got slower or hungrier (benchmarks/NOTES.md).

    python benchmarks/compare_results.py OLD/results.json NEW/results.json [--tolerance 0.10]

A configuration is (backend or baseline, mode, B, d, K, dtype); the rows both runs measured
(status ``ok``) are compared by median time and extra peak memory.  A row is flagged when its time
or its memory grew by more than ``--tolerance`` (relative), and its memory by more than 1 MiB too
(a fraction of a MiB is the allocator's, not the code's).  Times are only comparable when both runs
had the machine to themselves: the floor's ratio (also printed) tells how the GEMM itself moved
between the runs.  Prints a Markdown table; exits 0 (a report, not a gate).
"""

from __future__ import annotations

import argparse
import json
import sys

_KEY = ("name", "mode", "B", "d", "K", "dtype")


def _rows(path: str) -> dict[tuple, dict]:
    with open(path) as f:
        data = json.load(f)
    return {tuple(r[k] for k in _KEY): r for r in data["rows"] if r["status"] == "ok"}


def compare(old: dict[tuple, dict], new: dict[tuple, dict], tolerance: float) -> list[dict]:
    """One entry per configuration both runs measured: times, memories, their ratios, and the flags."""
    out = []
    for key in sorted(set(old) & set(new), key=lambda k: (k[2], k[3], k[4], k[1], k[0])):
        a, b = old[key], new[key]
        time_ratio = b["median_ms"] / a["median_ms"]
        mem_a, mem_b = a.get("peak_mem_mib"), b.get("peak_mem_mib")
        hungrier = (
            mem_a is not None
            and mem_b is not None
            and mem_b > mem_a * (1 + tolerance)
            and mem_b - mem_a > 1.0
        )
        out.append(
            {
                **dict(zip(_KEY, key)),
                "old_ms": a["median_ms"], "new_ms": b["median_ms"], "time_ratio": time_ratio,
                "old_mib": mem_a, "new_mib": mem_b,
                "slower": time_ratio > 1 + tolerance, "hungrier": hungrier,
            }
        )  # fmt: skip
    return out


def table(entries: list[dict]) -> str:
    def mib(v):
        return "—" if v is None else f"{v:.1f}"

    lines = [
        "| B, d, K | mode | backend | old ms | new ms | new/old | old MiB | new MiB | flag |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        flag = ", ".join(f for f in ("slower", "hungrier") if e[f]) or "—"
        lines.append(
            f"| {e['B']}, {e['d']}, {e['K']} | {e['mode']} | {e['name']} | {e['old_ms']:.1f} | {e['new_ms']:.1f} "
            f"| {e['time_ratio']:.2f} | {mib(e['old_mib'])} | {mib(e['new_mib'])} | {flag} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--tolerance", type=float, default=0.10, help="relative growth flagged (default 0.10)")
    args = p.parse_args(argv)
    entries = compare(_rows(args.old), _rows(args.new), args.tolerance)
    if not entries:
        print("compare_results: the two runs share no measured configuration", file=sys.stderr)
        return 1
    print(table(entries))
    flagged = [e for e in entries if e["slower"] or e["hungrier"]]
    print(
        f"\n{len(entries)} configurations in both runs; {len(flagged)} flagged (tolerance {args.tolerance:.0%})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
