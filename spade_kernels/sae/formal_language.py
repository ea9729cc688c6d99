"""The formal-language transformer: a PCFG whose words carry their part of speech, and a small causal LM.

The paper's formal-language experiment (examples/paper_formal_language.py)
trains SAEs on this transformer's residual stream.  Its grammar and model live
here so that the package's language-model commands can use it as a real
causal LM that needs no download: ``spade-kernels cache`` and ``spade-kernels
eval --model`` read the directory :func:`save_model` writes, where a Hugging
Face model directory would go.

    python -m spade_kernels.sae.formal_language --out runs/formal-lm

trains it (about two minutes on a 2-core CPU with the defaults, the paper
example's settings) and writes the model (``config.json``,
``model.safetensors``) and two corpora, one sentence per line: ``corpus.txt``
(fresh sentences for the SAE's activations, seed 2 as the example) and
``held_out.txt`` (seed 3).  Its tokenizer splits a line on white space and
adds ``<bos>``/``<eos>``; the hook names are the module's own (``blocks.0``
is the residual stream after the first of its two blocks, the example's
activations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "MODEL",
    "MODEL_TYPE",
    "POS",
    "Grammar",
    "TinyLM",
    "WordTokenizer",
    "corpus",
    "is_model_dir",
    "load_model",
    "save_model",
    "train_lm",
    "vocabulary",
]

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


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


class TinyLM(nn.Module):
    """A causal pre-norm transformer: token and position embeddings, ``layers`` blocks, a linear head."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, d_ff: int, max_len: int) -> None:
        super().__init__()
        self.sizes = {"d_model": d_model, "heads": heads, "layers": layers, "d_ff": d_ff, "max_len": max_len}
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
        ids = pad_rows([tokens[i] for i in pick], PAD)
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


#: ``config.json``'s ``model_type`` of a directory :func:`save_model` wrote.
MODEL_TYPE = "spade-kernels-formal-language"
WEIGHTS = "model.safetensors"


class WordTokenizer:
    """Words to ids: a line split on white space, framed by ``<bos>`` and ``<eos>``."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.bos, self.eos, self.pad = (self.index[t] for t in SPECIAL)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with ``<bos>`` first and ``<eos>`` last; an unknown word is a ValueError."""
        ids = [self.bos]
        for word in text.split():
            if word not in self.index:
                raise ValueError(f"word {word!r} is not in the formal language's vocabulary")
            ids.append(self.index[word])
        return [*ids, self.eos]

    def decode(self, ids) -> list[str]:
        return [self.vocab[int(i)] for i in ids]


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory :func:`save_model` wrote (its ``config.json`` names :data:`MODEL_TYPE`)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def save_model(model: TinyLM, folder: str | os.PathLike, **record) -> None:
    """Write ``model`` to ``folder`` as ``config.json`` (its sizes, vocabulary, ``record``) and the weights."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, **model.sizes, "vocab": vocabulary(), **record}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS)
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def load_model(folder: str | os.PathLike) -> tuple[TinyLM, WordTokenizer]:
    """The model and tokenizer :func:`save_model` wrote to ``folder``, in eval mode on the CPU."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_model_dir(folder):
        raise ValueError(
            f"{folder}: not a formal-language model directory (config.json model_type {MODEL_TYPE!r})"
        )
    config = json.loads((folder / "config.json").read_text())
    model = TinyLM(len(config["vocab"]), **{k: config[k] for k in MODEL})
    model.load_state_dict(load_file(folder / WEIGHTS))
    return model.eval(), WordTokenizer(config["vocab"])


def write_sentences(path: Path, tokens: list[list[int]]) -> None:
    vocab = vocabulary()
    path.write_text("".join(" ".join(vocab[i] for i in ids[1:-1]) + "\n" for ids in tokens))


@torch.no_grad()
def next_token_loss(model: TinyLM, tokens, batch: int = 512) -> float:
    """Mean next-token cross-entropy over ``tokens`` (lists of ids), padding not scored."""
    total = count = 0.0
    for start in range(0, len(tokens), batch):
        ids = pad_rows(tokens[start : start + batch], PAD)
        logits = model(ids[:, :-1])
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                   ignore_index=PAD, reduction="sum"))  # fmt: skip
        count += float((ids[:, 1:] != PAD).sum())
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spade_kernels.sae.formal_language",
        description="Train the formal-language transformer (the paper example's) and save it with two corpora.",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the model and corpora")
    parser.add_argument("--steps", type=int, default=1200, help="training steps (default 1200)")
    parser.add_argument("--batch-size", type=int, default=128, help="sentences per step (default 128)")
    parser.add_argument(
        "--sentences", type=int, default=30_000, help="sentences in corpus.txt (default 30000)"
    )
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "sentences"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
    t0 = time.perf_counter()
    train_tokens, _ = corpus(20_000, seed=1, max_len=MODEL["max_len"])
    model, _ = train_lm(train_tokens, args.steps, args.batch_size, seed=0)
    held_out, _ = corpus(2_000, seed=3, max_len=MODEL["max_len"])
    loss = next_token_loss(model, held_out)
    save_model(model, args.out, steps=args.steps, batch_size=args.batch_size, held_out_next_token_loss=loss)
    write_sentences(args.out / "corpus.txt", corpus(args.sentences, seed=2, max_len=MODEL["max_len"])[0])
    write_sentences(args.out / "held_out.txt", held_out)
    print(
        f"held-out next-token loss {loss:.3f}; wrote {os.fspath(args.out)} ({time.perf_counter() - t0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
