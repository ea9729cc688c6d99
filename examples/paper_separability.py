"""The paper's separability experiment in its own configuration: 6 Gaussians, four SAEs, sparsity sweeps, seeds.

Data as the authors' notebook builds it (facts from Sai-Sumedh/SaeConceptDuality-SpaDE,
``syntheticdatasets/2dgaussian_diffmag`` and ``experiments/expt_separability``):
six 2-D Gaussian clusters with centres at angles k·60° and radii alternating
1.5 and 0.5, variance 0.0221 per dimension, standardised to mean 0 and
E‖x‖² = d; 70% of the points train, the rest evaluate.  Width 128, batch 512,
one pass, Adam lr 1e-2 with a cosine to 1e-4, gradient clipping at 1.0;
decoder normalisation off for SpaDE and on for the others; F1 and L0 with a
firing threshold of 1e-6.

The paper uses 1e6 points per cluster (~8.2k steps); the default here is
50,000 per cluster (~410 steps, minutes on a CPU for the whole sweep) —
``--per-cluster 1000000`` runs the paper's size.  Each SAE is swept over its
own sparsity knob (SpaDE γ, ReLU's L1 α, JumpReLU's L0 β, TopK's k) so that
the runs cover L0 ≈ 2 … 30, each setting with several seeds.  Metric: for
every concept the best latent's F1 (firing on that concept's points).

    python examples/paper_separability.py            # writes examples/results/separability.{json,png}
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from authors_baselines import AuthorsJumpReLUSAE, AuthorsReLUSAE, AuthorsTopKSAE, config_of
from baselines import JumpReLUSAE, ReLUSAE, TopKSAE, train_sae

from spade_kernels import SpaDE
from spade_kernels.sae.train import train_spade

FIRING = 1e-6
#: The authors' sweeps (their plotted runs, width 128: mainfigures.ipynb, from their hyper-parameter
#: CSVs), each SAE over its own knob: SpaDE's γ (λ learned from 1/(2d)), the ReLU SAE's L1
#: coefficient, JumpReLU's L0 coefficient β, TopK's k (AuxK weight 1).  Sparse → dense.
SWEEPS = {
    "spade": ("gamma_reg", [0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0005, 0.0001, 5e-05, 1e-05]),
    "relu": ("l1_coeff", [1.0, 0.5, 0.005, 0.001, 0.0005, 0.0001, 5e-05, 1e-05, 5e-06, 1e-06]),
    "jumprelu": ("l0_coeff", [0.1, 0.05, 0.005, 0.00125, 0.001, 0.0005, 0.0001, 5e-05, 1e-05, 5e-06]),
    "topk": ("k", [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]),
}
#: This package's own variants (examples/baselines.py: data init, decoder-norm-weighted L1, AuxK
#: 1/32, …) and knobs, the second, labelled option (``--variant package``).  SpaDE is swept over
#: λ's initial value at γ = 0.1; JumpReLU over its initial threshold θ₀ (bandwidth θ₀/2, β = 0.1).
PACKAGE_SWEEPS = {
    "spade": ("lambda_init", [0.02, 0.25, 1.0, 5.0, 30.0]),
    "relu": ("l1_coeff", [0.01, 0.1, 0.3, 1.0, 3.0]),
    "jumprelu": ("threshold_init", [0.001, 0.003, 0.01, 0.03, 0.06]),
    "topk": ("k", [32, 16, 8, 4, 2]),
}
#: The two variants: ``authors`` (the paper's tables) and ``package``.
VARIANTS = ("authors", "package")
#: SpaDE's γ where γ is not the knob.
SPADE_GAMMA = 0.1
#: Training points per concept of the authors' metrics (their figure notebooks: 1,000, seed 0).
AUTHORS_POINTS = 1000
#: JumpReLU's settings other than its knob (package variant).
JUMP = {"l0_coeff": 0.1, "bandwidth": "half-threshold"}
#: One colour per SAE in every plot.
COLORS = {"spade": "C3", "relu": "C0", "jumprelu": "C2", "topk": "C1"}


def make_data(per_cluster: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The notebook's six clusters (shuffled), standardised to mean 0 and E‖x‖² = d."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(6) * (math.pi / 3)
    radii = torch.tensor([1.5, 0.5] * 3)
    centres = torch.stack([radii * angles.cos(), radii * angles.sin()], 1)
    labels = torch.arange(6).repeat_interleave(per_cluster)
    x = centres[labels] + math.sqrt(0.0221) * torch.randn(6 * per_cluster, 2, generator=g)
    order = torch.randperm(len(x), generator=g)
    x, labels = x[order], labels[order]
    x = x - x.mean(0)
    x = x * math.sqrt(x.shape[1] / x.pow(2).sum(1).mean())
    return x, labels


#: The group metric's size: F1 of the union of a concept's ``TOP_GROUP`` best latents.
TOP_GROUP = 5


@torch.no_grad()
def scores(codes: torch.Tensor, labels: torch.Tensor, n_concepts: int) -> dict:
    """Per concept F1s, mean and per-concept L0 and dead latents, at the firing threshold.

    ``f1``: the best single latent's F1 for the concept (the latent fires ⇔ the concept).
    ``f1_top5``: the F1 of "one latent of the concept's group fires", for a group of at most
    ``TOP_GROUP`` latents chosen greedily (:func:`_group_f1`) — a concept that an SAE tiles with
    several latents (SpaDE's prototypes split a wide concept between them) is detected by the
    group even where no single latent covers all of it.  It is never below ``f1``.
    """
    on = (codes > FIRING).float()
    fires = on.sum(0)
    f1, group = [], []
    for c in range(n_concepts):
        mine = labels == c
        tp = on[mine].sum(0)
        precision = tp / fires.clamp_min(1)
        recall = tp / mine.sum()
        f1.append(float((2 * precision * recall / (precision + recall).clamp_min(1e-12)).max()))
        group.append(_group_f1(on, mine.float()))
    per_row = on.sum(1)
    return {
        "l0": float(per_row.mean()),
        "concept_l0": [float(per_row[labels == c].mean()) for c in range(n_concepts)],
        "f1": f1,
        "mean_f1": statistics.fmean(f1),
        "f1_top5": group,
        "mean_f1_top5": statistics.fmean(group),
        "dead_pct": 100.0 * float((fires == 0).float().mean()),
    }


def _group_f1(on: torch.Tensor, mine: torch.Tensor) -> float:
    """F1 of the union of up to ``TOP_GROUP`` latents, grown greedily: each step adds the latent
    that raises the union's F1 most, and it stops when none does (the first pick is the best
    single latent).  ``on``: (N, K) 0/1 firing; ``mine``: (N,) 0/1 membership of the concept.
    The union's counts come from two matrix-vector products per step, never an (N, K) union.
    """
    positives = float(mine.sum())
    union = torch.zeros_like(mine)
    best = 0.0
    for _ in range(TOP_GROUP):
        outside = 1.0 - union  # rows the group does not fire on yet
        fired = float(union.sum()) + outside @ on  # (K,) rows fired by group ∪ {k}
        tp = float((union * mine).sum()) + (outside * mine) @ on
        f1 = 2 * tp / (fired + positives).clamp_min(1.0)
        k = int(f1.argmax())
        if float(f1[k]) <= best:
            break
        best = float(f1[k])
        union = torch.maximum(union, on[:, k])
    return best


def train_one(
    kind: str,
    knob: str,
    value,
    x: torch.Tensor,
    width: int,
    batch: int,
    seed: int,
    jump: dict = JUMP,
    variant: str = "package",
):
    """Train one SAE with its sparsity ``knob`` (a keyword of its class) at ``value``.

    Returns (encode, reconstruct): dense codes and x̂ of rows.  ``variant`` "authors": the
    authors' baselines (examples/authors_baselines.py) and SpaDE with the package's defaults
    (the authors' configuration), γ = ``SPADE_GAMMA`` unless γ is the knob; "package": this
    package's baselines (examples/baselines.py).  ``jump`` (package variant): JumpReLU's other
    settings (threshold_init, bandwidth, l0_coeff: whichever is not the knob); a ``bandwidth`` of
    "threshold" ("half-threshold") means ε equal to (half) the initial threshold.
    """
    recipe = {"batch_size": batch, "lr": 1e-2, "lr_final": 1e-4, "clip": 1.0, "epochs": 1, "seed": seed}
    if kind == "spade":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer = SpaDE(x.shape[1], width, **{"gamma_reg": SPADE_GAMMA, knob: value})
        train_spade(layer, x, progress=False, **recipe)
        return layer.encode, lambda rows: layer.decode(layer.encode_sparse(rows))
    value = int(value) if knob == "k" else value
    if variant == "authors":
        cls = {"relu": AuthorsReLUSAE, "jumprelu": AuthorsJumpReLUSAE, "topk": AuthorsTopKSAE}[kind]
        model = cls(x.shape[1], width, seed=seed, **{knob: value})
    elif kind == "jumprelu":
        kw = {**jump, knob: value}
        if kw.get("bandwidth") in ("threshold", "half-threshold"):
            kw["bandwidth"] = kw["threshold_init"] * (1.0 if kw["bandwidth"] == "threshold" else 0.5)
        model = JumpReLUSAE(x.shape[1], width, seed=seed, **kw)
    else:
        cls = {"relu": ReLUSAE, "topk": TopKSAE}[kind]
        model = cls(x.shape[1], width, seed=seed, **{knob: value})
    train_sae(model, x, **recipe)
    model.eval()
    return model.encode, lambda rows: model.decode(model.encode(rows))


def model_config(kind: str, knob: str, d: int, width: int, variant: str, jump: dict = JUMP) -> dict:
    """Everything that defines ``kind``'s SAE but its knob, for the results JSON."""
    if kind == "spade":
        return {"variant": variant, "class": "spade_kernels.SpaDE", "init": "prototypes ~ N(0,1), W_dec = prototypes",
                "lambda": f"learned (softplus), initial 1/(2d) = {1 / (2 * d):g} unless swept",
                "gamma_reg": "swept" if knob == "gamma_reg" else SPADE_GAMMA, "reg_on": "encoder", "biases": "none",
                "decoder": "not normalised", "mse": "sum over dims, mean over batch"}  # fmt: skip
    if variant == "authors":
        cls = {"relu": AuthorsReLUSAE, "jumprelu": AuthorsJumpReLUSAE, "topk": AuthorsTopKSAE}[kind]
        probe = cls(d, width, **{knob: 1 if knob == "k" else 0.0})
        return {**config_of(probe), knob: "swept"}
    cfg = {"variant": "package", "class": f"baselines.{ {'relu': 'ReLUSAE', 'jumprelu': 'JumpReLUSAE', 'topk': 'TopKSAE'}[kind]}",
           "init": "unit-norm random decoder, encoder its transpose, then init_from_data (b_dec = mean, encoder rescaled)",
           knob: "swept"}  # fmt: skip
    if kind == "jumprelu":
        cfg.update({k: v for k, v in jump.items() if k != knob})
    if kind == "topk":
        cfg.update(aux_coeff=1 / 32, aux_k="d/2", dead_steps=100)
    if kind == "relu":
        cfg.update(penalty="l1_coeff * sum z_k ||W_dec[k]||")
    return cfg


def authors_subset(labels: torch.Tensor, n_train: int, n_concepts: int) -> torch.Tensor:
    """Indices of ``AUTHORS_POINTS`` training rows per concept, drawn as the authors' notebooks draw them (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    picks = []
    for c in range(n_concepts):
        rows = (labels[:n_train] == c).nonzero().squeeze(1)
        picks.append(rows[torch.randperm(rows.numel(), generator=gen)[:AUTHORS_POINTS]])
    return torch.cat(picks)


@torch.no_grad()
def authors_scores(
    codes: torch.Tensor, x_hat: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, n: int
) -> dict:
    """The authors' metrics on their training subset: per concept the mean F1 of its 5 best latents
    (ranked by F1 for that concept), L0, NMSE = mean‖x̂ − x‖² over the concept / the trace of its
    covariance (unbiased), and the latents dead on the subset (≤ 1e-12 everywhere)."""
    on = (codes > FIRING).float()
    fires = on.sum(0)
    top5, nmse, concept_l0 = [], [], []
    per_row = on.sum(1)
    err = (x_hat - x).pow(2).sum(1)
    for c in range(n):
        mine = labels == c
        tp = on[mine].sum(0)
        precision = tp / (fires + 1e-12)
        recall = tp / float(mine.sum())
        f1 = 2 * precision * recall / (precision + recall + 1e-12)
        top5.append(float(f1.sort(descending=True).values[:5].mean()))
        nmse.append(float(err[mine].mean() / x[mine].var(0).sum()))
        concept_l0.append(float(per_row[mine].mean()))
    return {
        "top5_f1": top5,
        "mean_top5_f1": statistics.fmean(top5),
        "concept_nmse": nmse,
        "train_l0": float(per_row.mean()),
        "train_concept_l0": concept_l0,
        "train_dead_pct": 100.0 * float((codes <= 1e-12).all(0).float().mean()),
    }


def sweep(
    data_for_seed,
    n_concepts: int,
    seeds: list[int],
    width: int,
    batch: int,
    sweeps: dict,
    log=print,
    jump: dict = JUMP,
    variant: str = "package",
) -> dict:
    """Every SAE of ``sweeps`` at every value of its knob and seed; per-setting mean ± std.

    ``data_for_seed(seed)`` → (x, labels), shuffled, whose first 70% train and the rest evaluate,
    or (x, labels, n_train): the first ``n_train`` rows train.
    """
    models = {}
    for kind, (knob, values) in sweeps.items():
        points = []
        for value in values:
            runs = []
            for seed in seeds:
                x, labels, *n = data_for_seed(seed)
                n_train = n[0] if n else int(0.7 * len(x))
                t0 = time.perf_counter()
                encode, reconstruct = train_one(
                    kind, knob, value, x[:n_train], width, batch, seed, jump, variant
                )
                with torch.no_grad():
                    codes = torch.cat([encode(xb) for xb in x[n_train:].split(16384)])
                    sub = authors_subset(labels, n_train, n_concepts)
                    ours = authors_scores(
                        encode(x[sub]), reconstruct(x[sub]), x[sub], labels[sub], n_concepts
                    )
                runs.append({**scores(codes, labels[n_train:], n_concepts), **ours, "seed": seed,
                             "train_s": time.perf_counter() - t0})  # fmt: skip
            agg = {knob: value}
            for key in (
                "l0",
                "dead_pct",
                "mean_f1",
                "mean_f1_top5",
                "mean_top5_f1",
                "train_l0",
                "train_dead_pct",
            ):
                agg[key + "_mean"] = statistics.fmean(r[key] for r in runs)
                agg[key + "_std"] = statistics.pstdev(r[key] for r in runs)
            for key in ("f1", "f1_top5", "concept_l0", "top5_f1", "concept_nmse", "train_concept_l0"):
                agg[key + "_mean"] = [statistics.fmean(r[key][c] for r in runs) for c in range(n_concepts)]
                agg[key + "_std"] = [statistics.pstdev(r[key][c] for r in runs) for c in range(n_concepts)]
            agg["runs"] = runs
            points.append(agg)
            f1 = " ".join(f"{v:.2f}" for v in agg["f1_mean"])
            log(f"{kind:9s} {knob}={value:<8g} L0 {agg['l0_mean']:6.2f} ± {agg['l0_std']:.2f}  F1 per concept {f1}"
                f"  (top-{TOP_GROUP} group {agg['mean_f1_top5_mean']:.2f})  dead {agg['dead_pct_mean']:.1f}%")  # fmt: skip
        models[kind] = points
    return models


def run(
    per_cluster: int,
    seeds: list[int],
    width: int = 128,
    batch: int = 512,
    kinds=None,
    log=print,
    variant: str = "authors",
) -> dict:
    table = SWEEPS if variant == "authors" else PACKAGE_SWEEPS
    chosen = {k: table[k] for k in (kinds or table)}
    results = {
        "experiment": "separability (paper configuration)",
        "config": {
            "clusters": 6, "radii": [1.5, 0.5], "variance": 0.0221, "d": 2, "per_cluster": per_cluster,
            "paper_per_cluster": 1_000_000, "train_fraction": 0.7, "width": width, "batch_size": batch,
            "epochs": 1, "optimizer": "adam", "lr": 1e-2, "lr_final": 1e-4, "clip": 1.0,
            "firing_threshold": FIRING, "seeds": seeds,
            "sweeps": {k: {"knob": knob, "values": vals} for k, (knob, vals) in chosen.items()},
            "spade_gamma_reg": SPADE_GAMMA, "jumprelu": JUMP, "variant": variant,
            "model_configs": {k: model_config(k, knob, 2, width, variant) for k, (knob, _) in chosen.items()},
            "authors_metrics": f"on {AUTHORS_POINTS} training points per concept (seed 0)",
        },
        "models": {},
        "torch": torch.__version__,
    }  # fmt: skip
    results["models"] = sweep(
        lambda seed: make_data(per_cluster, seed), 6, seeds, width, batch, chosen, log, variant=variant
    )
    return results


def _plain_log_axis(axis) -> None:
    """A log axis labelled 1, 2, 5, 10, 20, … (matplotlib's default labels every minor tick with an exponent)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    axis.axes.set_xscale("log") if axis.axis_name == "x" else axis.axes.set_yscale("log")
    axis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 50, 100, 200, 500]))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True, sharey=True)
    radii = [1.5, 0.5] * 3
    f1_vs_l0(list(axes.flat), results, [f"concept {c} (radius {radii[c]})" for c in range(6)])
    for ax in axes[1]:
        ax.set_xlabel("L0 (mean active latents)")
    for ax in axes[:, 0]:
        ax.set_ylabel("best-latent F1")
    axes[0, 0].legend(fontsize=8)
    cfg = results["config"]
    title = f"separability, paper configuration ({cfg['per_cluster']} points per cluster, "
    finish_figure(fig, title + seeds_text(len(cfg["seeds"])) + ")", path)


def f1_vs_l0(axes, results: dict, titles: list[str]) -> None:
    """One panel per concept: every model's best-latent F1 against its mean L0 (mean ± std over seeds)."""
    for c, (ax, title) in enumerate(zip(axes, titles)):
        for kind, points in results["models"].items():
            l0 = [p["l0_mean"] for p in points]
            f1 = [p["f1_mean"][c] for p in points]
            err = [p["f1_std"][c] for p in points]
            ax.errorbar(l0, f1, yerr=err, marker="o", label=kind, color=COLORS.get(kind), capsize=2)
        _plain_log_axis(ax.xaxis)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)


def seeds_text(n: int) -> str:
    """The figures' seed count: 1 seed, or n seeds with mean ± std."""
    return "1 seed" if n == 1 else f"{n} seeds, mean ± std"


def finish_figure(fig, title: str, path: Path) -> None:
    """Every experiment's figure ends alike: the title, a tight layout, a PNG at 110 dpi."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _command_line(args: list[str]) -> str:
    """The command that reproduces a run, without ``--out`` (where it was written is not what it ran)."""
    kept, skip = [], False
    for a in args:
        if skip or a == "--out" or a.startswith("--out="):
            skip = a == "--out"
            continue
        kept.append(a)
    return " ".join(["python", f"examples/{Path(sys.argv[0]).name}", *kept])


def cli(
    argv,
    doc: str,
    size_flag: str,
    size_default: int,
    paper_size: int,
    sweeps: dict,
    run_fn,
    plot_fn,
    stem: str,
):
    """The experiments' shared command line: size, seeds, model subset, variant, output folder; JSON and PNG out.

    ``sweeps``: {"authors": sweeps, "package": sweeps}, each {model: (knob, values)}.
    """
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument(
        size_flag,
        type=int,
        default=size_default,
        help="samples" + (f" per concept (paper: {paper_size})" if paper_size else ""),
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting")
    variants, names = sweeps, list(sweeps["authors"])
    p.add_argument("--models", default=",".join(names), help="comma-separated subset of " + ",".join(names))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument(
        "--setting",
        type=int,
        help="only the SETTING-th value (0-based) of each model's sweep, e.g. one setting at full size",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="MODEL:KNOB=V1,V2,…",
        help="sweep MODEL over KNOB (a keyword of its class, e.g. spade:gamma_reg=0.01,0.1,1) "
        "instead of its default sweep; repeatable",
    )
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default="authors",
        help="authors: the paper's baselines and knobs as the authors' code has them (default); package: this "
        "package's baselines and knobs",
    )
    p.add_argument("--name", default=stem, help=f"output file stem (default {stem})")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the models of an existing output JSON that this run does not train (e.g. one "
        "baseline re-run with new settings)",
    )
    args = p.parse_args(argv)
    sweeps = variants[args.variant]
    size = getattr(args, size_flag.lstrip("-").replace("-", "_"))
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(sweeps))
    if unknown:
        p.error(f"unknown models {unknown}; choose from {','.join(sweeps)}")
    if size < 10 or args.seeds < 1:
        p.error(f"{size_flag} must be ≥ 10 and --seeds ≥ 1")
    chosen = dict(sweeps)  # this run's sweeps: the module's, overridden by --sweep, narrowed by --setting
    for spec in args.sweep:
        kind, _, rest = spec.partition(":")
        knob, _, values = rest.partition("=")
        try:
            numbers = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            numbers = []
        if kind not in sweeps or not knob.isidentifier() or not numbers:
            p.error(f"--sweep {spec!r}: expected MODEL:KNOB=V1,V2,… with MODEL one of {','.join(sweeps)}")
        chosen[kind] = (knob, numbers)
    if args.setting is not None:
        if not all(0 <= args.setting < len(chosen[k][1]) for k in kinds):
            p.error(
                f"--setting must index every chosen sweep (0 … {min(len(chosen[k][1]) for k in kinds) - 1})"
            )
        for k in kinds:
            chosen[k] = (chosen[k][0], [chosen[k][1][args.setting]])
    saved = dict(sweeps)
    t0 = time.perf_counter()
    try:
        sweeps.update(chosen)  # the experiment reads the module's sweeps: changed for this run only
        results = run_fn(size, list(range(args.seeds)), kinds=kinds, variant=args.variant)
    except KeyboardInterrupt:
        print(f"stopped by Ctrl-C after {time.perf_counter() - t0:.0f} s: nothing written (the results "
              "are written once every run of the sweep has finished)", file=sys.stderr)  # fmt: skip
        return 130
    finally:
        sweeps.update(saved)
    results["cpu_s"] = time.perf_counter() - t0
    results["command"] = _command_line(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    if args.merge and path.exists():
        earlier = json.loads(path.read_text())
        kept = [k for k in earlier["models"] if k not in results["models"]]
        if earlier["config"].get("seeds") != results["config"]["seeds"]:
            p.error(
                f"--merge: {path} has seeds {earlier['config'].get('seeds')}, this run {results['config']['seeds']}"
            )
        results["models"] = {**{k: earlier["models"][k] for k in kept}, **results["models"]}
        results["config"]["sweeps"] = {**{k: earlier["config"]["sweeps"][k] for k in kept},
                                       **results["config"]["sweeps"]}  # fmt: skip
        for key in ("model_configs",):  # per-model records: the kept models' from the earlier run
            if key in earlier["config"] or key in results["config"]:
                results["config"][key] = {**{k: earlier["config"].get(key, {}).get(k) for k in kept},
                                          **results["config"].get(key, {})}  # fmt: skip
        results["merged"] = {"kept_models": kept, "their_cpu_s": earlier.get("cpu_s"),
                             "their_command": earlier.get("command"), "their_config": earlier["config"]}  # fmt: skip
    path.write_text(json.dumps(results, indent=1))
    plot_fn(results, args.out / f"{args.name}.png")
    print(f"wrote {args.out / args.name}.json and .png ({results['cpu_s']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    variants = {"authors": SWEEPS, "package": PACKAGE_SWEEPS}
    return cli(argv, __doc__, "--per-cluster", 50_000, 1_000_000, variants, run, plot, "separability")


if __name__ == "__main__":
    sys.exit(main())
