"""SpaDE against a TopK and a ReLU SAE at matched L0 on a labelled synthetic set.

Shared by ``synthetic_separability.py`` and ``synthetic_heterogeneity.py``:
train SpaDE with the paper's recipe, measure its mean L0 over the data, tune
TopK's k and the ReLU SAE's L1 coefficient until their mean L0 matches it,
then score all three with the same per-concept metrics
(:func:`spade_kernels.sae.train.concept_metrics`: top-5 F1 and mean L0 per
concept).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from baselines import match_relu_l0, match_topk_l0

from spade_kernels import SpaDE
from spade_kernels.sae.data import SyntheticDataset, scale_to_unit_norm
from spade_kernels.sae.train import concept_metrics, evaluate, train_spade

__all__ = ["MODELS", "Comparison", "compare", "print_table", "write_json"]

MODELS = ("SpaDE", "TopK", "ReLU")


@dataclass
class Comparison:
    """Trained models, the scaled data and the JSON-ready numbers."""

    dataset: SyntheticDataset
    x: torch.Tensor  # scaled so that E‖x‖² = d
    encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]]  # dense codes (B, K)
    results: dict


@torch.no_grad()
def _reconstruction_mse(reconstruct, x: torch.Tensor, batch_size: int = 4096) -> float:
    total = sum(
        float((xb - reconstruct(xb)).pow(2).sum())
        for xb in (x[i : i + batch_size] for i in range(0, x.shape[0], batch_size))
    )
    return total / x.shape[0]


def _scores(encode, reconstruct, ds: SyntheticDataset, x: torch.Tensor) -> dict:
    m = concept_metrics(encode, x, ds.labels, ds.n_concepts)
    with torch.no_grad():
        fired = torch.stack([(encode(x[i : i + 4096]) > 0).any(0) for i in range(0, x.shape[0], 4096)]).any(0)
    mse = _reconstruction_mse(reconstruct, x)
    return {
        "l0": float((m["mean_l0"] * m["count"]).sum() / m["count"].sum()),
        "mse": mse,
        "nmse": mse / float(x.pow(2).sum(1).mean()),
        "dead_latents": int((~fired).sum()),
        "top5_f1": m["top_f1"].tolist(),
        "concept_l0": m["mean_l0"].tolist(),
    }


def compare(
    ds: SyntheticDataset,
    *,
    d_sae: int,
    batch_size: int,
    epochs: int = 1,
    seed: int = 0,
    log=print,
) -> Comparison:
    """Train the three SAEs on ``ds`` and score them (see the module docstring)."""
    x, factor = scale_to_unit_norm(ds.x)
    recipe = {"batch_size": batch_size, "epochs": epochs, "seed": seed}
    encoders, recon, extra = {}, {}, {}

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = SpaDE(x.shape[1], d_sae)
    train_spade(layer, x, progress=False, **recipe)
    target = evaluate(layer, x)["l0"]
    encoders["SpaDE"] = layer.encode
    recon["SpaDE"] = lambda xb: layer(xb).x_hat
    extra["SpaDE"] = {"lambda": layer.lam.item(), "train_s": time.perf_counter() - t0}
    log(f"SpaDE: mean L0 {target:.2f}, λ {layer.lam.item():.4g} ({extra['SpaDE']['train_s']:.0f} s)")

    t0 = time.perf_counter()
    topk, trace = match_topk_l0(x, target, d_sae, log=log, **recipe)
    encoders["TopK"], extra["TopK"] = topk.encode, {"k": topk.k, "tuning": trace}
    recon["TopK"] = lambda xb: topk.decode(topk.encode(xb))
    extra["TopK"]["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    relu, trace = match_relu_l0(x, target, d_sae, log=log, **recipe)
    encoders["ReLU"], extra["ReLU"] = relu.encode, {"l1_coeff": relu.l1_coeff, "tuning": trace}
    recon["ReLU"] = lambda xb: relu.decode(relu.encode(xb))
    extra["ReLU"]["train_s"] = time.perf_counter() - t0

    results = {
        "dataset": ds.name,
        "n_samples": x.shape[0],
        "d": x.shape[1],
        "d_sae": d_sae,
        "scale_factor": factor,
        "recipe": {**recipe, "lr": 1e-2, "lr_final": 1e-4, "clip": 1.0, "optimizer": "adam"},
        "intrinsic_dim": ds.intrinsic_dim.tolist(),
        "concept_count": torch.bincount(ds.labels, minlength=ds.n_concepts).tolist(),
        "target_l0": target,
        "models": {name: {**_scores(encoders[name], recon[name], ds, x), **extra[name]} for name in MODELS},
        "torch": torch.__version__,
    }
    return Comparison(ds, x, encoders, results)


def print_table(results: dict, *, with_dim: bool, log=print) -> None:
    """Per-concept top-5 F1 and mean L0 of the three models, then their overall numbers."""
    models = results["models"]
    head = f"{'concept':>7}" + (f" {'dim':>4}" if with_dim else "")
    head += "".join(f" {name + ' F1':>9}" for name in MODELS) + "".join(
        f" {name + ' L0':>9}" for name in MODELS
    )
    log(head)
    for c, dim in enumerate(results["intrinsic_dim"]):
        row = f"{c:>7}" + (f" {dim:>4}" if with_dim else "")
        row += "".join(f" {models[n]['top5_f1'][c]:>9.3f}" for n in MODELS)
        row += "".join(f" {models[n]['concept_l0'][c]:>9.2f}" for n in MODELS)
        log(row)
    mean = f"{'mean':>7}" + (f" {'':>4}" if with_dim else "")
    mean += "".join(f" {sum(models[n]['top5_f1']) / len(models[n]['top5_f1']):>9.3f}" for n in MODELS)
    mean += "".join(f" {models[n]['l0']:>9.2f}" for n in MODELS)
    log(mean)
    for name in MODELS:
        m = models[name]
        knob = {"SpaDE": f"λ={m.get('lambda', 0):.4g}", "TopK": f"k={m.get('k')}"}.get(
            name, f"α={m.get('l1_coeff', 0):.4g}"
        )
        log(
            f"{name:>5}: mean L0 {m['l0']:.2f}  normalised MSE {m['nmse']:.4f}  "
            f"dead latents {m['dead_latents']}/{results['d_sae']}  {knob}  ({m['train_s']:.0f} s)"
        )


RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv, doc: str, *, n_samples: int, d_sae: int, batch_size: int) -> argparse.Namespace:
    """The experiment scripts' shared flags (defaults per experiment); sets torch's thread count."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--n-samples", type=int, default=n_samples)
    parser.add_argument("--d-sae", type=int, default=d_sae)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the shapes are small)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
