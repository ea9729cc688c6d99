"""The paper's separability experiment (2-D): SpaDE vs TopK vs ReLU SAEs at matched L0.

Thirteen Gaussian concepts in the plane (``spade_kernels.sae.data.make_separability``):
one at the origin, six on an inner ring, six on an outer ring.  The centre and
inner concepts are not linearly separable from the rest, so a latent that is a
half-space (ReLU) or close to one (TopK) cannot fire on exactly one of them;
SpaDE's latents have local, distance-based receptive fields and can.

Run (about a minute or two on a laptop CPU)::

    python examples/synthetic_separability.py

It prints per-concept top-5 F1 and mean L0 of the three models and writes
``examples/results/own_separability.json`` and ``own_separability.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sae_compare import MODELS, Comparison, compare, parse_args, print_table, write_json

from spade_kernels.sae.data import make_separability

#: Concepts whose best latent's receptive field is drawn: the centre and one inner-ring concept.
SHOWN = (0, 1)


def run(
    n_samples: int = 65536, d_sae: int = 128, batch_size: int = 128, seed: int = 0, log=print
) -> Comparison:
    """Train and score the three SAEs on the separability set (the CLI's default sizes)."""
    ds = make_separability(n_samples, seed=seed)
    return compare(ds, d_sae=d_sae, batch_size=batch_size, seed=seed, log=log)


@torch.no_grad()
def best_latent(encode, x: torch.Tensor, labels: torch.Tensor, concept: int) -> tuple[int, float]:
    """The latent whose firing (code > 0) best detects ``concept`` by F1, and that F1."""
    active = (encode(x) > 0).double()
    is_c = (labels == concept).double()
    f1 = 2 * (active * is_c[:, None]).sum(0) / (active.sum(0) + is_c.sum()).clamp_min(1)
    k = int(f1.argmax())
    return k, float(f1[k])


def plot(comp: Comparison, path: Path) -> None:
    """Data, best-latent receptive fields for the centre and an inner concept, F1 and L0 bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, labels, res = comp.x, comp.dataset.labels, comp.results
    n_concepts = comp.dataset.n_concepts
    colours = plt.get_cmap("tab20")((torch.arange(n_concepts) % 20).numpy())
    show = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:4000]
    xs, ls = x[show].numpy(), labels[show].numpy()  # matplotlib gets NumPy arrays
    lim = float(x.abs().max()) * 1.05
    axis = torch.linspace(-lim, lim, 301)
    grid = torch.cartesian_prod(axis, axis).flip(1)  # rows: y, columns: x

    fig = plt.figure(figsize=(16, 12), layout="constrained")
    spec = fig.add_gridspec(3, 4, height_ratios=(1, 1, 0.9))
    ax = fig.add_subplot(spec[0:2, 0])
    ax.scatter(xs[:, 0], xs[:, 1], c=colours[ls], s=3)
    for c in range(n_concepts):
        centre = x[labels == c].mean(0)
        ax.annotate(str(c), centre.tolist(), ha="center", va="center", weight="bold", fontsize=11)
    ax.set(title="data (scaled), concepts numbered", aspect="equal", xlim=(-lim, lim), ylim=(-lim, lim))

    for row, concept in enumerate(SHOWN):
        for col, name in enumerate(MODELS, start=1):
            encode = comp.encoders[name]
            k, f1 = best_latent(encode, x, labels, concept)
            field = (encode(grid)[:, k] > 0).float().reshape(len(axis), len(axis)).numpy()
            ax = fig.add_subplot(spec[row, col])
            ax.imshow(field, extent=(-lim, lim, -lim, lim), origin="lower", cmap="Blues", vmin=0, vmax=1.6)
            mine = ls == concept
            ax.scatter(xs[~mine, 0], xs[~mine, 1], c="0.6", s=1)
            ax.scatter(xs[mine, 0], xs[mine, 1], c=[colours[concept]], s=3)
            ax.set(
                title=f"{name}, concept {concept}: best latent ({k}), F1 {f1:.2f}",
                aspect="equal",
                xlim=(-lim, lim),
                ylim=(-lim, lim),
            )

    width = 0.27
    pos = torch.arange(n_concepts).float().numpy()
    for col, (key, label) in enumerate((("top5_f1", "top-5 F1"), ("concept_l0", "mean L0"))):
        ax = fig.add_subplot(spec[2, 2 * col : 2 * col + 2])
        for i, name in enumerate(MODELS):
            m = res["models"][name]
            ax.bar(pos + (i - 1) * width, m[key], width, label=f"{name} (mean L0 {m['l0']:.2f})")
        top = 1.0 if key == "top5_f1" else max(max(res["models"][n][key]) for n in MODELS)
        ax.set(xticks=pos.tolist(), xlabel="concept", ylabel=label, title=f"per-concept {label}")
        ax.set_ylim(0, 1.25 * top)
        ax.legend(fontsize=9, ncols=3, loc="upper center")
    fig.suptitle(
        f"Separability (2-D, {n_concepts} concepts, K={res['d_sae']}): SpaDE vs TopK vs ReLU SAE at matched L0.  "
        "Blue: where the concept's best latent fires; coloured dots: the concept's samples"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__, n_samples=65536, d_sae=128, batch_size=128)
    comp = run(args.n_samples, args.d_sae, args.batch_size, args.seed)
    print_table(comp.results, with_dim=False)
    write_json(comp.results, args.out_dir / "own_separability.json")
    plot(comp, args.out_dir / "own_separability.png")
    print(f"wrote {args.out_dir / 'own_separability.json'} and {args.out_dir / 'own_separability.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
