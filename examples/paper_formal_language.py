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

import math
import random
import sys
import time
from pathlib import Path

import paper_separability as common
import torch
from torch import nn

POS = ["DET", "ADJ", "NOUN", "VERB", "ADV", "PREP", "PRON", "CONJ"]
#: Words per POS; the six words listed under both NOUN and VERB are one token each.
AMBIGUOUS = ["run", "watch", "light", "play", "walk", "fly"]
WORDS = {
    "DET": ["the", "a", "this", "that", "every", "some", "no", "my"],
    "ADJ": ["red", "small", "old", "quiet", "bright", "heavy", "young", "cold", "happy", "green",
            "tall", "empty", "strange", "soft", "late", "wild"],
    "NOUN": ["dog", "cat", "river", "house", "child", "teacher", "garden", "letter", "song", "city",
             "window", "tree", "book", "road", "storm", "friend", "stone", "boat", "market", "horse",
             *AMBIGUOUS],
    "VERB": ["sees", "finds", "likes", "builds", "follows", "reads", "carries", "hears", "paints",
             "opens", "leaves", "keeps", "sings", "wants", *AMBIGUOUS],
    "ADV": ["quickly", "slowly", "often", "never", "quietly", "always", "badly", "gladly", "again"],
    "PREP": ["in", "on", "near", "under", "with", "behind", "over", "across"],
    "PRON": ["he", "she", "it", "they", "we", "you", "someone", "nobody"],
    "CONJ": ["and", "but", "or", "while"],
}  # fmt: skip
SPECIAL = ["<bos>", "<eos>", "<pad>"]
BOS, EOS, PAD = 0, 1, 2
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
MODEL = {"d_model": 128, "heads": 4, "layers": 2, "d_ff": 256, "max_len": 48}


def vocabulary() -> list[str]:
    """Token strings: the special tokens, then every word once (the ambiguous ones once)."""
    words = [w for pos in POS for w in WORDS[pos]]
    return SPECIAL + list(dict.fromkeys(words))


#: The PCFG's rules: symbol → ((probability, body), …); a body's symbols are rules or POS.
RULES = {
    "S": ((0.85, ("NP", "VP")), (0.15, ("S", "CONJ", "S"))),
    "NP": ((0.35, ("DET", "NOUN")), (0.25, ("DET", "ADJ", "NOUN")), (0.05, ("DET", "ADJ", "ADJ", "NOUN")),
           (0.2, ("PRON",)), (0.15, ("NP", "PP"))),
    "VP": ((0.35, ("VERB", "NP")), (0.15, ("VERB",)), (0.15, ("VERB", "NP", "PP")), (0.15, ("VERB", "ADV")),
           (0.1, ("ADV", "VERB", "NP")), (0.1, ("VERB", "PP"))),
    "PP": ((1.0, ("PREP", "NP")),),
}  # fmt: skip


class Grammar:
    """The PCFG: ``sentence()`` returns (word, POS) pairs.

    S → NP VP (0.85) | S CONJ S (0.15);
    NP → DET N (0.35) | DET ADJ N (0.25) | DET ADJ ADJ N (0.05) | PRON (0.2) | NP PP (0.15);
    VP → V NP (0.35) | V (0.15) | V NP PP (0.15) | V ADV (0.15) | ADV V NP (0.1) | V PP (0.1);
    PP → PREP NP.  Self-recursive rules (S → S CONJ S, NP → NP PP) are off below ``max_depth``; words are uniform within a POS.
    """

    def __init__(self, seed: int, max_depth: int = 3) -> None:
        self.rng, self.max_depth = random.Random(seed), max_depth

    def expand(self, symbol: str, depth: int) -> list[tuple[str, str]]:
        if symbol in WORDS:
            return [(self.rng.choice(WORDS[symbol]), symbol)]
        rules = RULES[symbol]
        if depth >= self.max_depth:  # no rule that rewrites the symbol into itself, renormalised
            rules = [r for r in rules if symbol not in r[1]]
        weights, bodies = zip(*rules)
        body = self.rng.choices(bodies, weights=weights)[0]
        return [pair for part in body for pair in self.expand(part, depth + 1)]

    def sentence(self) -> list[tuple[str, str]]:
        return self.expand("S", 0)


def corpus(n: int, seed: int, max_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` sentences as token ids (with <bos>/<eos>) and POS ids (−1 for the special tokens)."""
    index = {w: i for i, w in enumerate(vocabulary())}
    grammar = Grammar(seed)
    tokens, tags = [], []
    while len(tokens) < n:
        pairs = grammar.sentence()
        if len(pairs) + 2 > max_len:
            continue
        tokens.append([BOS, *(index[w] for w, _ in pairs), EOS])
        tags.append([-1, *(POS.index(p) for _, p in pairs), -1])
    return tokens, tags


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


class TinyLM(nn.Module):
    """A causal pre-norm transformer: token and position embeddings, ``layers`` blocks, a linear head."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, d_ff: int, max_len: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(max_len, d_model)
        block = nn.TransformerEncoderLayer(
            d_model, heads, d_ff, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.ModuleList([_clone(block) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Logits (B, T, vocab); with ``upto`` the residual stream after that many blocks instead."""
        T = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device)
        for i, block in enumerate(self.blocks):
            if upto is not None and i == upto:
                return h
            h = block(h, src_mask=mask, is_causal=True)
        return h if upto == len(self.blocks) else self.head(self.norm(h))


def _clone(module: nn.Module) -> nn.Module:
    import copy

    fresh = copy.deepcopy(module)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters") and m is not fresh:
            m.reset_parameters()
    return fresh


def train_lm(
    tokens: list[list[int]], steps: int, batch: int, seed: int, log=print
) -> tuple[TinyLM, list[float]]:
    """Next-token prediction with AdamW (lr 3e-3, cosine to 3e-5, clip 1.0); returns the model and its losses."""
    torch.manual_seed(seed)
    model = TinyLM(len(vocabulary()), **MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-5 + 0.5 * (3e-3 - 3e-5) * (1 + math.cos(math.pi * step / max(1, steps - 1)))
        pick = torch.randint(len(tokens), (batch,), generator=gen).tolist()
        ids = _pad([tokens[i] for i in pick], PAD)
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"transformer step {step + 1}/{steps}: next-token loss {statistics_mean(losses[-50:]):.3f}")
    return model.eval(), losses


def statistics_mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@torch.no_grad()
def activations(
    model: TinyLM, tokens, tags, layer: int, batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after ``layer`` blocks at every word token (not <bos>/<eos>), and its POS."""
    xs, ys = [], []
    for start in range(0, len(tokens), batch):
        ids = _pad(tokens[start : start + batch], PAD)
        pos = _pad(tags[start : start + batch], -1)
        h = model(ids, upto=layer)
        keep = pos >= 0
        xs.append(h[keep])
        ys.append(pos[keep])
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def next_token_loss(model: TinyLM, tokens, batch: int = 512) -> float:
    total = count = 0.0
    for start in range(0, len(tokens), batch):
        ids = _pad(tokens[start : start + batch], PAD)
        logits = model(ids[:, :-1])
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                   ignore_index=PAD, reduction="sum"))  # fmt: skip
        count += float((ids[:, 1:] != PAD).sum())
    return total / count


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
