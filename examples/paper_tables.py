"""The tables "paper vs this package" of docs/paper.md (and docs/language_models.md's), from the JSON results.

Reads ``examples/results/separability.json``, ``heterogeneity.json``,
``formal_language.json`` (and the runs at larger sizes when present:
``separability_full.json``, ``heterogeneity_1m.json``, ``heterogeneity_full.json``; and
SpaDE's γ sweeps ``*_gamma.json``; ``formal_language_ce.json`` goes to
docs/language_models.md) and rewrites the pages between the markers
``<!-- paper-table:NAME -->`` and ``<!-- /paper-table:NAME -->``.  ``--check``
only compares (CI: the tables are never stale).

    python examples/paper_tables.py            # rewrite docs/paper.md
    python examples/paper_tables.py --check    # exit 1 if docs/paper.md differs
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "examples" / "results"
ORDER = ["spade", "relu", "jumprelu", "topk"]
NAMES = {"spade": "SpaDE", "relu": "ReLU", "jumprelu": "JumpReLU", "topk": "TopK"}


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _knob(result: dict, kind: str) -> str:
    return result["config"]["sweeps"][kind]["knob"]


def _span(values, fmt="{:.2f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def _command(result: dict) -> str:
    """The command that made ``result``, and the one merged into it after (``--merge``)."""
    merged = result.get("merged")
    if merged and merged.get("their_command"):
        return f"`{merged['their_command']}`, then `{result.get('command', '')}`"
    return f"`{result.get('command', '')}`"


def _minutes(result: dict) -> str:
    seconds = result["cpu_s"] + ((result.get("merged") or {}).get("their_cpu_s") or 0)
    return f"{seconds / 60:.0f} min"


def _models(result: dict):
    return [(k, result["models"][k]) for k in ORDER if k in result["models"]]


INNER = [1, 3, 5]  # radius 0.5: not linearly separable from the rest
OUTER = [0, 2, 4]  # radius 1.5


def _separability_rows(result: dict) -> list[str]:
    rows = [
        "| model | knob (values) | L0 swept | inner F1, best | at L0 | outer F1, best | dead % |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, points in _models(result):
        knob = _knob(result, kind)
        inner_f1 = [statistics.fmean(p["f1_mean"][c] for c in INNER) for p in points]
        outer_f1 = [statistics.fmean(p["f1_mean"][c] for c in OUTER) for p in points]
        best = max(range(len(points)), key=inner_f1.__getitem__)
        values = ", ".join(f"{p[knob]:g}" for p in points)
        rows.append(
            f"| {NAMES[kind]} | {knob} ({values}) | {_span([p['l0_mean'] for p in points], '{:.1f}')} "
            f"| {inner_f1[best]:.2f} | {points[best]['l0_mean']:.1f} | {max(outer_f1):.2f} "
            f"| {_span([p['dead_pct_mean'] for p in points], '{:.1f}')} |"
        )
    return rows


def _block(intro: str, rows, result: dict, larger: list[dict], larger_intro, paper: str) -> str:
    """An experiment's table, the same table for each run at a larger size, and the paper's claim."""
    lines = [intro, "", *rows(result)]
    for run in larger:
        lines += ["", larger_intro(run), "", *rows(run)]
    return "\n".join([*lines, "", paper])


def separability(result: dict, larger: list[dict]) -> str:
    cfg = result["config"]
    intro = (
        f"{cfg['per_cluster']:,} points per cluster (paper: {cfg['paper_per_cluster']:,}), "
        f"{len(cfg['seeds'])} seeds; best-latent F1 averaged over the three inner (radius 0.5) or "
        "outer (radius 1.5) clusters, seed means, at the sweep setting where it is highest."
    )

    def full_intro(fr: dict) -> str:
        seeds = len(fr["config"]["seeds"])
        return (
            f"At the paper's size ({fr['config']['per_cluster']:,} points per cluster, ~8.2k steps, "
            f"{seeds} seed{'s' if seeds > 1 else ''}, {_command(fr)}, {_minutes(fr)} on one thread):"
        )

    paper = ("Paper: only SpaDE, whose receptive fields are not half-spaces, gets latents for the "
             "inner clusters; ReLU, JumpReLU and TopK cannot (half-space receptive fields).")  # fmt: skip
    return _block(intro, _separability_rows, result, larger, full_intro, paper)


def _slope(dims, l0) -> float:
    """Least-squares slope of L0 against log2(dimension): latents gained per doubling."""
    xs = [math.log2(k) for k in dims]
    mx, my = statistics.fmean(xs), statistics.fmean(l0)
    return sum((x - mx) * (y - my) for x, y in zip(xs, l0)) / sum((x - mx) ** 2 for x in xs)


def _heterogeneity_rows(result: dict) -> list[str]:
    dims = result["config"]["intrinsic_dims"]
    head = " | ".join(f"L0 at dim {k}" for k in dims)
    rows = [
        f"| model | setting | mean L0 | {head} | L0 gained per doubling of dim | mean F1, best latent "
        "| mean F1, group of ≤ 5 |",
        "|---|---|---|" + "---|" * len(dims) + "---|---|---|",
    ]
    for kind, points in _models(result):
        knob = _knob(result, kind)
        for p in points:
            per = " | ".join(f"{v:.1f}" for v in p["concept_l0_mean"])
            rows.append(
                f"| {NAMES[kind]} | {knob} = {p[knob]:g} | {p['l0_mean']:.1f} | {per} "
                f"| {_slope(dims, p['concept_l0_mean']):+.2f} | {statistics.fmean(p['f1_mean']):.2f} "
                f"| {statistics.fmean(p['f1_top5_mean']):.2f} |"
            )
    return rows


def heterogeneity(result: dict, larger: list[dict]) -> str:
    cfg = result["config"]
    intro = (
        f"{cfg['per_concept']:,} points per concept (paper: {cfg['paper_per_concept']:,}), "
        f"{len(cfg['seeds'])} seeds, seed means; every setting of each sweep. F1 per concept, "
        "averaged over the concepts: of its best latent, and of its best group of at most five "
        "latents (one of them fires), grown greedily."
    )

    def full_intro(fr: dict) -> str:
        fc = fr["config"]
        steps = math.ceil(0.7 * 5 * fc["per_concept"] / fc["batch_size"])
        size = "the paper's size, " if fc["per_concept"] == fc["paper_per_concept"] else ""
        return (
            f"One setting at {fc['per_concept']:,} points per concept ({size}{steps:,} steps, "
            f"{len(fc['seeds'])} seed, {_command(fr)}, {_minutes(fr)} on one thread):"
        )

    paper = ("Paper: SpaDE's per-concept L0 grows with the concept's intrinsic dimension; TopK's "
             "is k for every concept (slope 0).")  # fmt: skip
    return _block(intro, _heterogeneity_rows, result, larger, full_intro, paper)


def formal_language(result: dict) -> str:
    cfg, lm, paper = result["config"], result["transformer"], result["paper"]
    lines = [
        f"{cfg['tokens']:,} tokens of {cfg['sentences']:,} sentences, {len(cfg['pos'])} POS, width "
        f"{cfg['width']}, d = {cfg['d']}, {len(cfg['seeds'])} seeds; the transformer's held-out "
        f"next-token loss {lm['held_out_next_token_loss']:.3f} nats, a linear POS probe on its "
        f"activations {lm['pos_probe_accuracy']:.3f} accurate. F1: mean over POS of the best latent's "
        "F1, seed means, one value per sweep setting (sparse → dense).",
        "",
        "| model | F1 (paper) | F1 (this package) | L0 swept | dead % (paper) | dead % (this package) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, points in _models(result):
        by_l0 = sorted(points, key=lambda p: p["l0_mean"])
        f1 = "/".join(f"{p['mean_f1_mean']:.2f}" for p in by_l0)
        pf = paper["f1"].get(kind)
        pf = "/".join(f"{v:.2f}" for v in pf) if pf and len(pf) > 2 else (_span(pf) if pf else "—")
        pd = paper["dead_pct"].get(kind)
        lines.append(
            f"| {NAMES[kind]} | {pf} | {f1} | {_span([p['l0_mean'] for p in by_l0], '{:.1f}')} "
            f"| {_span(pd, '{:.1f}') if pd else '—'} | {_span([p['dead_pct_mean'] for p in by_l0], '{:.1f}')} |"
        )
    return "\n".join(lines)


def _setting(result: dict, kind: str, p: dict) -> str:
    knob = _knob(result, kind)
    return f"{knob} = {p[knob]:g}"


def _by_l0(result: dict):
    """(kind, point) of every model's settings, each model's sparse → dense."""
    for kind, points in _models(result):
        for p in sorted(points, key=lambda p: p["l0_mean"]):
            yield kind, p


def _authors_separability_rows(result: dict) -> list[str]:
    rows = [
        "| model | setting | L0 | top-5 F1, inner | top-5 F1, outer | best-latent F1, inner | best-latent F1, outer "
        "| dead % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, p in _by_l0(result):
        top5, best = p["top5_f1_mean"], p["f1_mean"]
        rows.append(
            f"| {NAMES[kind]} | {_setting(result, kind, p)} | {p['train_l0_mean']:.1f} "
            f"| {statistics.fmean(top5[c] for c in INNER):.2f} | {statistics.fmean(top5[c] for c in OUTER):.2f} "
            f"| {statistics.fmean(best[c] for c in INNER):.2f} | {statistics.fmean(best[c] for c in OUTER):.2f} "
            f"| {p['train_dead_pct_mean']:.1f} |"
        )
    return rows


def _sizes_intro(result: dict, key: str, paper_key: str, unit: str) -> str:
    cfg = result["config"]
    seeds = len(cfg["seeds"])
    return (
        f"{cfg[key]:,} points per {unit} (paper: {cfg[paper_key]:,}), {seeds} seed{'s' if seeds > 1 else ''}"
        + (", seed means" if seeds > 1 else "")
        + f", {_command(result)}, {_minutes(result)} on a 2-core CPU"
    )


def separability_authors(result: dict, larger: list[dict]) -> str:
    intro = (
        _sizes_intro(result, "per_cluster", "paper_per_cluster", "cluster")
        + ". The authors' SAEs, knobs and values. Each model's settings sparse → dense. Top-5 F1 is the "
        "authors' metric: per cluster, the mean F1 of its five best latents on 1,000 training points per "
        "cluster (seed 0), averaged over the three inner (radius 0.5) or outer (radius 1.5) clusters; L0 and "
        "dead latents on the same points. Best-latent F1: this package's metric, on the held-out 30%."
    )
    paper = (
        "Paper: only SpaDE, whose receptive fields are not half-spaces, gets latents for the inner clusters; "
        "ReLU, JumpReLU and TopK cannot (half-space receptive fields)."
    )
    return _block(
        intro,
        _authors_separability_rows,
        result,
        larger,
        lambda r: _sizes_intro(r, "per_cluster", "paper_per_cluster", "cluster") + ":",
        paper,
    )


def _authors_heterogeneity_rows(result: dict) -> list[str]:
    dims = result["config"]["intrinsic_dims"]
    slash = "/".join(str(k) for k in dims)
    rows = [
        f"| model | setting | L0 | L0 per concept (dims {slash}) | L0 gained per doubling | NMSE per concept "
        "| mean top-5 F1 | mean best-latent F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, p in _by_l0(result):
        per = "/".join(f"{v:.1f}" for v in p["train_concept_l0_mean"])
        nmse = "/".join(f"{v:.3f}" for v in p["concept_nmse_mean"])
        rows.append(
            f"| {NAMES[kind]} | {_setting(result, kind, p)} | {p['train_l0_mean']:.1f} | {per} "
            f"| {_slope(dims, p['train_concept_l0_mean']):+.2f} | {nmse} | {p['mean_top5_f1_mean']:.2f} "
            f"| {p['mean_f1_mean']:.2f} |"
        )
    return rows


def heterogeneity_authors(result: dict, larger: list[dict]) -> str:
    intro = (
        _sizes_intro(result, "per_concept", "paper_per_concept", "concept")
        + ". The authors' SAEs, knobs and values, each model's settings sparse → dense. Per concept, on "
        "1,000 training points per concept (seed 0), as the authors' figure: L0, and NMSE = mean‖x̂ − x‖² / the "
        "trace of the concept's covariance. F1 (mean over concepts): the authors' top-5 and this package's "
        "best latent on held-out rows."
    )
    paper = (
        "Paper: SpaDE's per-concept L0 grows with the concept's intrinsic dimension; TopK's is k for every "
        "concept (slope 0)."
    )
    return _block(
        intro,
        _authors_heterogeneity_rows,
        result,
        larger,
        lambda r: _sizes_intro(r, "per_concept", "paper_per_concept", "concept") + ":",
        paper,
    )


#: The parts of speech of the authors' formal-language figure (noun, pronoun, verb, adverb, adjective,
#: conjunction): this grammar has two more, determiners and prepositions.
PAPER_POS = ["NOUN", "PRON", "VERB", "ADV", "ADJ", "CONJ"]


def formal_language_matched(result: dict) -> str:
    """The paper's (L0, F1, dead) per setting beside this package's, one model at a time, sparse → dense."""
    cfg, lm, paper = result["config"], result["transformer"], result["paper"]
    lines = [
        f"{cfg['tokens']:,} tokens of {cfg['sentences']:,} sentences, {len(cfg['pos'])} POS, width {cfg['width']}, "
        f"d = {cfg['d']}, {len(cfg['seeds'])} seeds (seed means); the transformer's held-out next-token loss "
        f"{lm['held_out_next_token_loss']:.3f} nats, a linear POS probe {lm['pos_probe_accuracy']:.3f} accurate; "
        f"{_command(result)}, {_minutes(result)}. Paper: L0 = (1 − sparsity/100)·256 from its results file, "
        "F1 as recorded there (its definition is not in the authors' code; their figure names six POS). This "
        "package: F1 = mean over its 8 POS of the best latent's F1 on held-out tokens (and over the paper's six "
        "only; and each POS's), top-5 F1 = the authors' separability metric on 1,000 training tokens per POS.",
        "",
        f"| model | source | setting | L0 | F1 | F1, the paper's 6 POS | F1 per POS ({'/'.join(cfg['pos'])}) "
        "| top-5 F1 | dead % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    six = [cfg["pos"].index(p) for p in PAPER_POS]
    for kind, points in _models(result):
        rows = []
        their = paper["models"].get(kind)
        if their:
            for l0, f1, dead in zip(their["l0"], their["f1"], their["dead_pct"]):
                rows.append(
                    (l0, f"| {NAMES[kind]} | paper | — | {l0:.1f} | {f1:.2f} | — | — | — | {dead:.1f} |")
                )
        for p in points:
            f1_six = statistics.fmean(p["f1_mean"][i] for i in six)
            rows.append((p["l0_mean"], f"| {NAMES[kind]} | this package | {_setting(result, kind, p)} "
                         f"| {p['l0_mean']:.1f} | {p['mean_f1_mean']:.2f} | {f1_six:.2f} "
                         f"| {'/'.join(f'{v:.2f}' for v in p['f1_mean'])} "
                         f"| {p['mean_top5_f1_mean']:.2f} | {p['dead_pct_mean']:.1f} |"))  # fmt: skip
        lines += [row for _, row in sorted(rows, key=lambda r: r[0])]
    return "\n".join(lines)


#: SpaDE swept over γ (the paper's knob) with λ at its default, one result per experiment.
GAMMA_RUNS = {
    "separability_full": "separability",  # the authors' variant at the paper's size: SpaDE over γ
    "separability_gamma": "separability",
    "heterogeneity_full_gamma": "heterogeneity",  # the authors' variant at the paper's size: SpaDE over γ
    "heterogeneity_full_gamma2": "heterogeneity",  # two more γ, between the first run's
    "heterogeneity_gamma": "heterogeneity",
    "formal_language_gamma": "formal language",
    "formal_language_5x": "formal language",  # 5× the sentences: does longer training revive latents?
}


def spade_gamma(results: dict[str, dict]) -> str:
    """SpaDE's L0, dead latents and F1 against γ, λ starting at its default, for each experiment run."""
    lines = [
        "SpaDE swept over γ as the paper sweeps it, λ starting at its default 1/(2d) (and, where the setting "
        "says so, over λ's initial value at γ = 0.1), each run sparse → dense, seed means (± std over seeds "
        "for L0); L0 and dead on held-out rows:",
        "",
        "| experiment | size | seeds | setting | L0 | dead % | mean F1, best latent | mean top-5 F1 (authors') |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in GAMMA_RUNS.items():
        r = results.get(name)
        if r is None:
            continue
        cfg = r["config"]
        size = next(
            f"{cfg[k]:,} {k.replace('_', ' ')}"
            for k in ("per_cluster", "per_concept", "sentences")
            if k in cfg
        )
        if "spade" not in r["models"]:
            continue
        for p in sorted(r["models"]["spade"], key=lambda p: p["l0_mean"]):
            top5 = f"{p['mean_top5_f1_mean']:.2f}" if "mean_top5_f1_mean" in p else "—"
            lines.append(
                f"| {label} | {size} | {len(cfg['seeds'])} | {_setting(r, 'spade', p)} "
                f"| {p['l0_mean']:.1f} ± {p['l0_std']:.1f} | {p['dead_pct_mean']:.1f} | {p['mean_f1_mean']:.2f} "
                f"| {top5} |"
            )
    commands = "; ".join(f"{_command(r)} ({_minutes(r)})" for n in GAMMA_RUNS if (r := results.get(n)))
    return "\n".join([*lines, "", f"Commands: {commands}."])


def formal_language_gap(result: dict) -> str:
    """SpaDE at the sparse end under one change at a time (examples/formal_language_gap.py)."""
    cfg, paper = result["config"], result["paper_sparse_end"]
    lines = [
        f"{cfg['tokens']:,} tokens of {cfg['sentences']:,} sentences, width {cfg['width']}, "
        f"{len(cfg['seeds'])} seeds (seed means), γ = {' and '.join(f'{g:g}' for g in cfg['gammas'])}; "
        f"`{result['command']}`, {result['seconds'] / 60:.0f} min on a 2-core CPU. POS share: the share of the "
        "variance the POS means explain; PR: the participation ratio (Σλ)²/Σλ² of the covariance's eigenvalues "
        f"(of 128). Paper, at its L0 {paper['l0']:.1f}: F1 {paper['f1']:.2f}, {paper['dead_pct']:.1f}% dead.",
        "",
        "| change | POS share | PR | γ | L0 | F1 | F1, the paper's 6 POS | dead % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["conditions"].values():
        for s in c["settings"]:
            lines.append(
                f"| {c['what']} | {c['pos_variance_share']:.2f} | {c['participation_ratio']:.1f} "
                f"| {s['gamma_reg']:g} | {s['l0_mean']:.1f} | {s['mean_f1_mean']:.2f} "
                f"| {s['mean_f1_six_mean']:.2f} | {s['dead_pct_mean']:.1f} |"
            )
    return "\n".join(lines)


def authors_speed(result: dict) -> str:
    """One SpaDE training step, the authors' code and this package's, time and peak memory."""
    m, (before, after) = result["machine"], result["load_average_before_after"]
    lines = [
        f"{result['what']}; theirs: {result['theirs']}; ours: {result['ours']}. {result['timing']}. "
        f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}; load average "
        f"{before[0]:.2f} before, {after[0]:.2f} after. `{result['command']}`.",
        "",
        "| B | d | K | theirs, ms | this package, ms | speed-up | theirs, peak MiB | this package, peak MiB "
        "| one B×K×d float32 tensor, MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        B, d, K = r["shape"]
        lines.append(
            f"| {B} | {d} | {K} | {r['theirs_s'] * 1e3:.1f} | {r['ours_s'] * 1e3:.2f} | {r['speedup']:.0f}× "
            f"| {r['theirs_peak_bytes'] / 2**20:.0f} | {r['ours_peak_bytes'] / 2**20:.0f} "
            f"| {r['b_k_d_float32_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def _larger(*names: str) -> list[dict]:
    """The runs at larger sizes that exist, in the order given."""
    return [r for r in map(_load, names) if r is not None]


def tables() -> dict[str, str]:
    out = {}
    sep, het, fl = _load("separability"), _load("heterogeneity"), _load("formal_language")
    if sep is not None:
        out["separability"] = separability_authors(sep, _larger("separability_full"))
    if het is not None:
        out["heterogeneity"] = heterogeneity_authors(
            het, _larger("heterogeneity_full_gamma", "heterogeneity_full_gamma2")
        )
    if fl is not None:
        out["formal_language"] = formal_language_matched(fl)
    # This package's own baselines and knobs (``--variant package``), the second, labelled option.
    sep, het, fl = (
        _load("separability_package"),
        _load("heterogeneity_package"),
        _load("formal_language_package"),
    )
    if sep is not None:
        out["separability_package"] = separability(sep, _larger("separability_full_package"))
    if het is not None:
        out["heterogeneity_package"] = heterogeneity(
            het, _larger("heterogeneity_1m_package", "heterogeneity_full_package")
        )
    if fl is not None:
        out["formal_language_package"] = formal_language(fl)
    gamma = {n: r for n in GAMMA_RUNS if (r := _load(n)) is not None}
    if gamma:
        out["spade_gamma"] = spade_gamma(gamma)
    gap = _load("formal_language_gap")
    if gap is not None:
        out["formal_language_gap"] = formal_language_gap(gap)
    speed = _load("authors_speed")
    if speed is not None:
        out["authors_speed"] = authors_speed(speed)
    ce = _load("formal_language_ce")
    if ce is not None:
        out["formal_language_ce"] = formal_language_ce(ce)
    return out


#: The page of each table that is not on docs/paper.md.
PAGES = {"formal_language_ce": "language_models.md"}


def formal_language_ce(result: dict) -> str:
    """SpaDE and TopK at matched L0 spliced into the formal-language transformer (sparse → dense)."""
    cfg = result["config"]
    lines = [
        f"Hook `{cfg['hook']}`, width {cfg['width']}, {cfg['train_rows']:,} training rows from "
        f"{cfg['corpus_sentences']:,} sentences, batch {cfg['batch_size']}; losses on {cfg['held_out']} "
        f"(clean next-token loss {result['rows'][0]['spade']['ce_loss_clean']:.4f} nats; the transformer trained "
        f"{cfg['lm_steps']} steps). {_command(result)}, {_minutes(result)} on a 2-core CPU.",
        "",
        "| SAE | setting | L0 | FVU | dead latents | loss spliced | loss zero-ablated | loss recovered | KL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(result["rows"], key=lambda r: r["spade"]["l0_mean"]):
        for kind, setting in (("spade", f"λ₀ = {row['lambda_init']:g}"), ("topk", f"k = {row['topk']['k']}")):
            m = row[kind]
            lines.append(
                f"| {NAMES[kind]} | {setting} | {m['l0_mean']:.2f} | {m['fvu']:.4f} | {m['dead_latents']} | "
                f"{m['ce_loss_spliced']:.4f} | {m['ce_loss_zero_ablated']:.4f} | {m['ce_loss_recovered']:.4f} | "
                f"{m['kl_div_spliced']:.4f} |"
            )
    return "\n".join(lines)


def render(page: str, names=None) -> str:
    for name, body in tables().items():
        if names is not None and name not in names:
            continue
        pattern = re.compile(rf"(<!-- paper-table:{name} -->\n).*?(<!-- /paper-table:{name} -->)", re.S)
        if not pattern.search(page):
            raise SystemExit(
                f"the page has no <!-- paper-table:{name} --> … <!-- /paper-table:{name} --> block"
            )
        page = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), page)
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the page is not up to date")
    p.add_argument(
        "--doc", type=Path, help="one page to fill with every table (default: each table's own page)"
    )
    args = p.parse_args(argv)
    if args.doc is not None:
        pages = {args.doc: None}
    else:
        docs, names = ROOT / "docs", set(tables())
        pages = {docs / "paper.md": names - set(PAGES)}
        for name, page in PAGES.items():
            pages.setdefault(docs / page, set()).add(name)
    stale = 0
    for doc, names in pages.items():
        text = doc.read_text()
        new = render(text, names)
        if args.check:
            if new != text:
                print(f"{doc}: the paper tables are stale; run python examples/paper_tables.py")
                stale = 1
            else:
                print(f"{doc}: paper tables up to date")
        else:
            doc.write_text(new)
            print(f"wrote the paper tables into {doc}")
    return stale


if __name__ == "__main__":
    sys.exit(main())
