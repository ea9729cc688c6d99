"""``spade-kernels eval``: what SAE researchers read first about a trained layer, as JSON and a PNG.

Over activations x (raw, the scale the checkpoint takes): the fraction of
variance unexplained FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (the normalised MSE),
the mean squared error per row, L0 (mean and histogram), dead latents
(never active on x) and the histogram of log10 firing frequencies of the
live latents.  Rows are encoded in batches, so memory is bounded for any N
(the per-latent counts are K integers).
"""

from __future__ import annotations

import math
import sys

import torch

from spade_kernels.layer import SpaDE

from .data import ActivationShards, check_rows, row_blocks

__all__ = ["evaluate_checkpoint", "plot_evaluation", "training_curves"]


@torch.no_grad()
def evaluate_checkpoint(layer: SpaDE, x: torch.Tensor | ActivationShards, *, batch_size: int = 4096) -> dict:
    """The metrics of the module docstring for ``layer`` on ``x`` (N, d_in) or shards; JSON-ready.

    Two passes over ``x`` in blocks (the mean, then the rest), so neither a
    tensor nor shards are ever copied whole.
    """
    check_rows(x, layer.d_in)
    device = layer.prototypes.device
    n = x.shape[0]
    mean = sum(block.double().sum(0) for _, block in row_blocks(x)) / n
    mean = mean.to(device)
    sq_err = total_var = 0.0
    fires = torch.zeros(layer.d_sae, dtype=torch.int64, device=device)
    hist_l0 = torch.zeros(1, dtype=torch.int64)
    l0_sum = 0
    for _, xb in row_blocks(x, batch_size):
        xb = xb.to(device)
        codes = layer.encode_sparse(xb)
        x_hat = layer.decode(codes)
        sq_err += float(((xb.double() - x_hat.double()) ** 2).sum())
        total_var += float(((xb.double() - mean) ** 2).sum())
        on = codes.values > 0
        fires.index_add_(0, codes.indices[on], torch.ones_like(codes.indices[on]))
        l0 = on.sum(1).cpu()
        l0_sum += int(l0.sum())
        counts = torch.bincount(l0)
        if counts.numel() > hist_l0.numel():
            hist_l0 = torch.cat([hist_l0, hist_l0.new_zeros(counts.numel() - hist_l0.numel())])
        hist_l0[: counts.numel()] += counts
    freq = fires.cpu().double() / n
    live = freq[freq > 0]
    log_freq = live.log10()
    lo = math.floor(float(log_freq.min())) if live.numel() else -1
    edges = [lo + 0.25 * i for i in range(int((0 - lo) / 0.25) + 1)] if live.numel() else []
    counts = (
        torch.histc(log_freq, bins=len(edges) - 1, min=edges[0], max=edges[-1]).long().tolist()
        if len(edges) > 1
        else []
    )
    return {
        "n_samples": n,
        "d_in": layer.d_in,
        "d_sae": layer.d_sae,
        "fvu": sq_err / total_var if total_var > 0 else math.nan,
        "mse": sq_err / n,
        "l0_mean": l0_sum / n,
        "l0_histogram": {"l0": list(range(len(hist_l0))), "count": hist_l0.tolist()},
        "dead_latents": int((fires == 0).sum()),
        "dead_fraction": float((fires == 0).double().mean()),
        "firing_frequency_log10_histogram": {"edges": edges, "count": counts},
        "lambda": layer.lam.item(),
    }


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    return plt


def plot_evaluation(metrics: dict, path: str) -> bool:
    """L0 histogram and the log10 firing-frequency density of the live latents; False without matplotlib."""
    plt = _plt()
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    h = metrics["l0_histogram"]
    a.bar(h["l0"], h["count"], width=1.0, color="C3")
    a.set_xlabel("L0 (active latents per row)")
    a.set_ylabel("rows")
    a.set_title(f"L0: mean {metrics['l0_mean']:.2f}", fontsize=10)
    f = metrics["firing_frequency_log10_histogram"]
    if f["count"]:
        total = sum(f["count"])
        widths = [hi - lo for lo, hi in zip(f["edges"], f["edges"][1:])]
        density = [c / total / w for c, w in zip(f["count"], widths)]
        b.bar(f["edges"][:-1], density, width=widths, align="edge", color="C0")
    b.set_xlabel("log10 firing frequency (live latents)")
    b.set_ylabel("density")
    b.set_title(
        f"{metrics['dead_latents']} of {metrics['d_sae']} latents dead; FVU {metrics['fvu']:.3g}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def training_curves(rows: list[dict], path: str) -> bool:
    """Loss, normalised MSE, L0 and λ against the step, from the metrics log's rows; False without matplotlib."""
    plt = _plt()
    if plt is None or not rows:
        return False
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for ax, key, label in zip(axes, ("loss", "nmse", "l0", "lam"), ("loss", "normalised MSE", "L0", "λ")):
        ax.plot(steps, [r[key] for r in rows], color="C3")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
        if key in ("loss", "nmse"):
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
