"""The paper's heterogeneity experiment (128-D): does an SAE's L0 adapt to a concept's dimension?

Six concepts on random affine subspaces of intrinsic dimension 1, 2, 4, 8, 16
and 32 in R^128 (``spade_kernels.sae.data.make_heterogeneity``).  A TopK SAE gives
every sample the same number of latents; SpaDE's sparsemax threshold adapts
per input, so its per-concept L0 should grow with the concept's dimension.
SpaDE, TopK and ReLU SAEs are trained at matched mean L0 and compared by
per-concept top-5 F1 and per-concept mean L0.

Run (one to a few minutes on a laptop CPU)::

    python examples/synthetic_heterogeneity.py

It prints the per-concept table and how L0 follows the intrinsic dimension
(Spearman rank correlation, and the L0 added per doubling of the dimension),
and writes ``examples/results/own_heterogeneity.json`` and ``own_heterogeneity.png``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from sae_compare import MODELS, Comparison, compare, parse_args, print_table, write_json

from spade_kernels.sae.data import make_heterogeneity


def run(
    n_samples: int = 131072,
    d_sae: int = 512,
    batch_size: int = 256,
    seed: int = 0,
    d: int = 128,
    dims: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
    log=print,
) -> Comparison:
    """Train and score the three SAEs on the heterogeneity set (the CLI's default sizes).

    Adds ``"l0_vs_dim"`` to each model's results: the Spearman rank
    correlation of per-concept mean L0 with the intrinsic dimension, and the
    least-squares slope of per-concept mean L0 against log2(dimension) (L0
    added per doubling of the dimension).
    """
    ds = make_heterogeneity(n_samples, d, dims=dims, seed=seed)
    comp = compare(ds, d_sae=d_sae, batch_size=batch_size, seed=seed, log=log)
    for m in comp.results["models"].values():
        m["l0_vs_dim"] = l0_vs_dim(m["concept_l0"], comp.results["intrinsic_dim"])
    return comp


def _ranks(values: list[float]) -> torch.Tensor:
    # Average ranks, so ties (e.g. TopK's constant L0) get equal ranks.
    t = torch.tensor(values, dtype=torch.float64)
    return torch.tensor([((t < v).sum() + ((t == v).sum() + 1) / 2).item() for v in t], dtype=torch.float64)


def l0_vs_dim(concept_l0: list[float], dims: list[int]) -> dict[str, float]:
    """Spearman correlation of L0 with dimension and L0 slope per doubling of the dimension."""
    r_l0, r_dim = _ranks(concept_l0), _ranks(dims)
    a, b = r_l0 - r_l0.mean(), r_dim - r_dim.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    spearman = float((a * b).sum()) / denom if denom > 0 else float("nan")
    log_dim = torch.tensor(dims, dtype=torch.float64).log2()
    l0 = torch.tensor(concept_l0, dtype=torch.float64)
    centred = log_dim - log_dim.mean()
    slope = float((centred * (l0 - l0.mean())).sum() / (centred * centred).sum())
    return {"spearman": spearman, "slope_per_doubling": slope}


@torch.no_grad()
def _per_sample_l0(encode, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    return torch.cat([(encode(x[i : i + batch_size]) > 0).sum(1) for i in range(0, x.shape[0], batch_size)])


def plot(comp: Comparison, path: Path) -> None:
    """Per-concept top-5 F1 bars, and per-concept L0 (mean and quartiles) against intrinsic dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, labels = comp.results, comp.dataset.labels
    dims = res["intrinsic_dim"]
    fig, (ax_f1, ax_l0) = plt.subplots(1, 2, figsize=(14, 5.5), layout="constrained")
    pos = torch.arange(len(dims)).float().numpy()  # matplotlib gets NumPy arrays
    width = 0.27
    for i, name in enumerate(MODELS):
        m = res["models"][name]
        ax_f1.bar(pos + (i - 1) * width, m["top5_f1"], width, label=f"{name} (mean L0 {m['l0']:.2f})")
    ax_f1.set(
        xticks=pos.tolist(),
        xticklabels=[f"{c}\n(dim {k})" for c, k in enumerate(dims)],
        xlabel="concept",
        ylabel="top-5 F1",
        ylim=(0, 1.25),
        title="per-concept top-5 F1",
    )
    ax_f1.legend(ncols=3, loc="upper center", fontsize=9)

    for name in MODELS:
        m = res["models"][name]
        l0 = _per_sample_l0(comp.encoders[name], comp.x).double()
        quartiles = torch.tensor([0.25, 0.75], dtype=torch.float64)
        q = torch.stack([l0[labels == c].quantile(quartiles) for c in range(len(dims))]).numpy()
        fit = m["l0_vs_dim"]
        line = ax_l0.plot(
            dims,
            m["concept_l0"],
            marker="o",
            label=f"{name}: Spearman {fit['spearman']:.2f}, {fit['slope_per_doubling']:+.2f} L0 per doubling",
        )[0]
        ax_l0.fill_between(dims, q[:, 0], q[:, 1], color=line.get_color(), alpha=0.15)
    ax_l0.set_xscale("log", base=2)
    ax_l0.set_ylim(bottom=0)
    ax_l0.set(
        xticks=dims,
        xticklabels=[str(k) for k in dims],
        xlabel="intrinsic dimension of the concept",
        ylabel="L0 of the concept's samples (mean; band: quartiles)",
        title="per-concept L0 vs intrinsic dimension",
    )
    ax_l0.legend(fontsize=9)
    fig.suptitle(
        f"Heterogeneity ({res['d']}-D, K={res['d_sae']}): SpaDE vs TopK vs ReLU SAE at matched mean L0"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__, n_samples=131072, d_sae=512, batch_size=256)
    comp = run(args.n_samples, args.d_sae, args.batch_size, args.seed)
    print_table(comp.results, with_dim=True)
    for name in MODELS:
        fit = comp.results["models"][name]["l0_vs_dim"]
        print(
            f"{name:>5}: L0 vs dimension Spearman {fit['spearman']:.2f}, "
            f"{fit['slope_per_doubling']:+.2f} L0 per doubling of the dimension"
        )
    write_json(comp.results, args.out_dir / "own_heterogeneity.json")
    plot(comp, args.out_dir / "own_heterogeneity.png")
    print(f"wrote {args.out_dir / 'own_heterogeneity.json'} and {args.out_dir / 'own_heterogeneity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
