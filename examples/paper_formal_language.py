"""The paper's formal-language experiment, offline on a CPU: a PCFG, a small transformer, four SAEs.

The authors' repository (Sai-Sumedh/SaeConceptDuality-SpaDE) holds only the
figure code and results of this experiment, so the grammar and the model are
built here from the paper's description: sentences from a probabilistic
context-free grammar whose every word carries its part of speech (POS); a
small causal transformer trained on them by next-token prediction; the
residual stream after its middle block as the activations (d = 128); and the
four SAEs (SpaDE, ReLU, JumpReLU, TopK) of width 256 trained on those
activations, each swept over its sparsity knob with several seeds.  The
metric: for each POS the F1 of its best latent (firing threshold 1e-6,
precision and recall of "latent fires" against "token has this POS"), and
the percentage of dead latents (never firing on held-out tokens).

The grammar (8 POS: determiner, adjective, noun, verb, adverb, preposition,
pronoun, conjunction) has recursion (prepositional phrases attach to noun
phrases, clauses join with conjunctions) and six words that are both a noun
and a verb ("run", "watch", …), so a token's POS is a property of its
context, which only the transformer's activations carry.

    python examples/paper_formal_language.py   # writes examples/results/formal_language.{json,png}

Authors' numbers (``experiments/makefigs_formallanguage/results/fidelity_dict.pkl``,
SAE width 256, d = 128, six sparsity levels): F1 SpaDE 0.69/0.87/0.89/0.89/0.95/0.98,
ReLU 0.56…0.97, JumpReLU 0.61…0.86, TopK 0.67…0.80 (k from 64 down to 2);
dead latents SpaDE 1.2–7.4%, TopK 0.8–89.5%, JumpReLU 31–82%.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import paper_separability as common
import torch
from torch import nn

from spade_kernels.sae.formal_language import (  # the grammar and the transformer live in the package
    AMBIGUOUS,
    MODEL,
    PAD,
    POS,
    TinyLM,
    corpus,
    next_token_loss,
    pad_rows,
    statistics_mean,
    train_lm,
    vocabulary,
)

#: Sparsity knobs at d = 128, width 256, six levels each so that every model spans L0 ≈ 2 … 30
#: (TopK's k as the paper's, 64 down to 2); chosen from calibration runs at 10,000 sentences.
#: JumpReLU is swept over its initial threshold θ₀ (bandwidth θ₀, β = 0.1): over β alone
#: (1e-3 … 100 at θ₀ = 0.5) its L0 spanned only 3–20 in one pass.
SWEEPS = {
    "spade": ("lambda_init", [0.0002, 0.0005, 0.002, 0.03, 0.1, 0.2]),
    "relu": ("l1_coeff", [0.3, 1.0, 2.0, 4.0, 8.0, 15.0]),
    "jumprelu": ("threshold_init", [0.05, 0.15, 0.4, 1.0, 2.0, 4.0]),
    "topk": ("k", [64, 32, 16, 8, 4, 2]),
}
#: JumpReLU's settings other than its knob, in the units of these activations (standardised,
#: E‖x‖² = d).  With the class defaults (θ₀ 0.1, ε 0.05) the straight-through window saw too
#: few pre-activations and L0 stayed ≈ 41–50 for every β from 0.1 to 10.
JUMP = {"l0_coeff": 0.1, "bandwidth": "threshold"}
PAPER = {
    "f1": {"spade": [0.69, 0.87, 0.89, 0.89, 0.95, 0.98], "relu": [0.56, 0.97], "jumprelu": [0.61, 0.86],
           "topk": [0.67, 0.80]},
    "dead_pct": {"spade": [1.2, 7.4], "topk": [0.8, 89.5], "jumprelu": [31.0, 82.0]},
}  # fmt: skip


@torch.no_grad()
def activations(
    model: TinyLM, tokens, tags, layer: int, batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after ``layer`` blocks at every word token (not <bos>/<eos>), and its POS."""
    xs, ys = [], []
    for start in range(0, len(tokens), batch):
        ids = pad_rows(tokens[start : start + batch], PAD)
        pos = pad_rows(tags[start : start + batch], -1)
        h = model(ids, upto=layer)
        keep = pos >= 0
        xs.append(h[keep])
        ys.append(pos[keep])
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def pos_probe_accuracy(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of a linear POS probe on the activations (is POS linearly there at all?)."""
    n = int(0.7 * len(x))
    torch.manual_seed(0)
    probe = nn.Linear(x.shape[1], len(POS))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = nn.functional.cross_entropy(probe(x[:n]), y[:n])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float((probe(x[n:]).argmax(1) == y[n:]).float().mean())


def run(
    sentences: int, seeds: list[int], kinds=None, lm_steps: int = 1200, lm_batch: int = 128, log=print
) -> dict:
    chosen = {k: SWEEPS[k] for k in (kinds or SWEEPS)}
    t0 = time.perf_counter()
    train_tokens, _ = corpus(20_000, seed=1, max_len=MODEL["max_len"])
    model, lm_losses = train_lm(train_tokens, lm_steps, lm_batch, seed=0, log=log)
    lm_s = time.perf_counter() - t0
    # The SAEs' data: activations of fresh sentences (not seen by the transformer).
    tokens, tags = corpus(sentences, seed=2, max_len=MODEL["max_len"])
    x, labels = activations(model, tokens, tags, layer=MODEL["layers"] // 2)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, labels = x[order], labels[order]
    x = x - x.mean(0)
    x = x * (x.shape[1] / x.pow(2).sum(1).mean()) ** 0.5
    held_out, _ = corpus(2_000, seed=3, max_len=MODEL["max_len"])
    lm = {
        "config": {**MODEL, "steps": lm_steps, "batch_size": lm_batch, "train_sentences": 20_000,
                   "optimizer": "adamw", "lr": 3e-3, "lr_final": 3e-5, "clip": 1.0},
        "final_train_loss": statistics_mean(lm_losses[-50:]),
        "held_out_next_token_loss": next_token_loss(model, held_out),
        "pos_probe_accuracy": pos_probe_accuracy(x, labels),
        "seconds": lm_s,
    }  # fmt: skip
    log(f"transformer: held-out next-token loss {lm['held_out_next_token_loss']:.3f}, "
        f"linear POS probe {lm['pos_probe_accuracy']:.3f} on the activations ({lm_s:.0f} s)")  # fmt: skip
    counts = torch.bincount(labels, minlength=len(POS)).tolist()
    results = {
        "experiment": "formal language (PCFG, small transformer; paper's SAE configuration)",
        "config": {
            "pos": POS, "pos_token_counts": counts, "sentences": sentences, "tokens": len(x),
            "vocabulary": len(vocabulary()), "ambiguous_noun_verb_words": AMBIGUOUS,
            "activations": f"residual stream after block {MODEL['layers'] // 2} of {MODEL['layers']}",
            "d": x.shape[1], "width": 256, "batch_size": 512, "train_fraction": 0.7, "epochs": 1,
            "optimizer": "adam", "lr": 1e-2, "lr_final": 1e-4, "clip": 1.0,
            "firing_threshold": common.FIRING, "seeds": seeds,
            "sweeps": {k: {"knob": knob, "values": vals} for k, (knob, vals) in chosen.items()},
            "spade_gamma_reg": common.SPADE_GAMMA, "jumprelu": JUMP,
        },
        "transformer": lm,
        "paper": PAPER,
        "torch": torch.__version__,
    }  # fmt: skip
    results["models"] = common.sweep(
        lambda seed: (x, labels), len(POS), seeds, 256, 512, chosen, log, jump=JUMP
    )
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = common.COLORS
    for kind, points in results["models"].items():
        l0 = [p["l0_mean"] for p in points]
        f1 = [statistics_mean(p["f1_mean"]) for p in points]
        err = [p["mean_f1_std"] for p in points]
        left.errorbar(l0, f1, yerr=err, marker="o", label=kind, color=colors.get(kind), capsize=2)
        right.errorbar(l0, [p["dead_pct_mean"] for p in points], yerr=[p["dead_pct_std"] for p in points],
                       marker="o", label=kind, color=colors.get(kind), capsize=2)  # fmt: skip
    for ax, label in ((left, "mean over POS of the best-latent F1"), (right, "dead latents (%)")):
        common._plain_log_axis(ax.xaxis)
        ax.set_xlabel("L0 (mean active latents)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    cfg = results["config"]
    title = f"formal language: {cfg['tokens']} tokens, width {cfg['width']}, d = {cfg['d']}, "
    common.finish_figure(fig, title + common.seeds_text(len(cfg["seeds"])), path)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import functools

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--lm-steps", type=int, default=1200, help="transformer training steps (default 1200)")
    known, rest = extra.parse_known_args(argv if argv is not None else sys.argv[1:])
    if known.lm_steps < 1:
        extra.error("--lm-steps must be ≥ 1")
    run_fn = functools.partial(run, lm_steps=known.lm_steps)
    return common.cli(rest, __doc__, "--sentences", 30_000, None, SWEEPS, run_fn, plot, "formal_language")


if __name__ == "__main__":
    sys.exit(main())
