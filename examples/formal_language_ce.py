"""SpaDE and TopK spliced into the formal-language transformer: the LM's loss recovered at matched L0.

The package's own commands, one after another, on the transformer the paper
example trains (spade_kernels.sae.formal_language):

1. ``python -m spade_kernels.sae.formal_language --out DIR/lm`` — the
   transformer (1200 steps, the paper example's settings) and its corpora;
2. ``spade-kernels cache --model DIR/lm --hook blocks.0 --text corpus.txt``
   — the residual stream after the first block at every word;
3. ``spade-kernels train --data DIR/acts --d-sae 256 --lambda-init λ`` for
   each λ of :data:`LAMBDAS` (the paper example's SpaDE knob, sparse to
   dense), and a TopK SAE of the same width at SpaDE's L0
   (examples/baselines.py: ``match_topk_l0``, on the activations scaled as
   ``train`` scales them, E‖x‖² = d);
4. for each SAE, the next-token loss of the LM on ``held_out.txt`` clean,
   with the SAE's reconstruction spliced in at the hook, and zero-ablated
   there (``spade-kernels eval --model`` computes SpaDE's; TopK's goes
   through the same :func:`spade_kernels.sae.lm.spliced_losses`), beside
   FVU, L0 and dead latents on the same held-out rows.

    python examples/formal_language_ce.py     # writes examples/results/formal_language_ce.json

docs/language_models.md shows the table (examples/paper_tables.py renders it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import baselines
import torch

from spade_kernels import SpaDE
from spade_kernels.sae import formal_language as fl
from spade_kernels.sae.cli import main as cli
from spade_kernels.sae.data import ActivationShards, scale_to_unit_norm
from spade_kernels.sae.evaluation import evaluate_checkpoint
from spade_kernels.sae.lm import cache_activations, load_language_model, spliced_losses

RESULTS = Path(__file__).resolve().parent / "results"
#: SpaDE's initial λ, sparse to dense (three of the paper example's six).
LAMBDAS = [0.2, 0.03, 0.002]
WIDTH, HOOK, BATCH = 256, "blocks.0", 512


def _topk_metrics(model: baselines.TopKSAE, x: torch.Tensor, scale: float) -> dict:
    """FVU, L0 and dead latents of the TopK SAE on raw rows ``x`` (it was trained on x·scale)."""
    with torch.no_grad():
        z = model.encode(x * scale)
        x_hat = model.decode(z) / scale
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return {
        "fvu": fvu,
        "l0_mean": float((z > 0).sum(1).float().mean()),
        "dead_latents": int(((z > 0).sum(0) == 0).sum()),
    }


def run(work: Path, lm_steps: int, sentences: int, log=print) -> dict:
    t0 = time.perf_counter()
    lm_dir, acts = work / "lm", work / "acts"
    if not fl.is_model_dir(lm_dir):
        fl.main(["--out", str(lm_dir), "--steps", str(lm_steps), "--sentences", str(sentences)])
    lm = load_language_model(lm_dir, device=torch.device("cpu"), causal=True)
    cache_activations(lm, HOOK, lm_dir / "corpus.txt", acts, log=log)
    x_train = torch.cat([b for _, b in ActivationShards(acts).blocks()])
    _, scale = scale_to_unit_norm(x_train)
    held_out = lm_dir / "held_out.txt"
    rows = []
    for lam in LAMBDAS:
        out = work / f"spade-{lam:g}"
        if not (out / "cfg.json").exists():
            cli(
                [
                    "train",
                    "--data",
                    str(acts),
                    "--d-sae",
                    str(WIDTH),
                    "--lambda-init",
                    f"{lam:g}",
                    "--batch-size",
                    str(BATCH),
                    "--out",
                    str(out),
                ]
            )
        layer = SpaDE.from_pretrained(out)
        spade_lm, x_held = spliced_losses(
            lm, HOOK, lambda r, layer=layer: layer.decode(layer.encode_sparse(r)), held_out, log=log
        )
        spade = evaluate_checkpoint(layer, x_held)
        log(
            f"SpaDE λ₀ {lam:g}: L0 {spade['l0_mean']:.2f}, loss recovered {spade_lm['ce_loss_recovered']:.4f}"
        )
        topk, trace = baselines.match_topk_l0(
            x_train * scale, spade["l0_mean"], WIDTH, log=log, batch_size=BATCH, seed=0
        )
        topk.eval()
        topk_lm, _ = spliced_losses(
            lm, HOOK, lambda r, m=topk: m.decode(m.encode(r * scale)) / scale, held_out, log=log
        )
        rows.append({
            "lambda_init": lam,
            "spade": {"l0_mean": spade["l0_mean"], "fvu": spade["fvu"], "dead_latents": spade["dead_latents"],
                      **spade_lm},
            "topk": {"k": topk.k, "k_tried": trace, **_topk_metrics(topk, x_held, scale), **topk_lm},
        })  # fmt: skip
    info = json.loads((lm_dir / "config.json").read_text())
    return {
        "experiment": "SpaDE and TopK spliced into the formal-language transformer, matched L0",
        "config": {
            "hook": HOOK,
            "width": WIDTH,
            "lm_steps": info["steps"],
            "lm_held_out_loss": info["held_out_next_token_loss"],
            "corpus_sentences": sentences,
            "batch_size": BATCH,
            "train_rows": x_train.shape[0],
            "held_out": "held_out.txt (2,000 sentences, seed 3)",
            "spade": "spade-kernels train defaults (γ 0.1, Adam 1e-2 → 1e-4, clip 1, one epoch), --lambda-init",
            "topk": "examples/baselines.TopKSAE (AuxK 1/32, data init), same recipe and batch size, k matched to SpaDE's L0",
        },
        "rows": rows,
        "torch": torch.__version__,
        "cpu_s": time.perf_counter() - t0,
        "command": "python examples/formal_language_ce.py",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", type=Path, default=Path("runs/formal-language-ce"), help="working directory"
    )
    parser.add_argument(
        "--lm-steps", type=int, default=1200, help="transformer training steps (default 1200)"
    )
    parser.add_argument(
        "--sentences", type=int, default=30_000, help="sentences whose activations train the SAEs"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "formal_language_ce.json", help="results JSON")
    args = parser.parse_args(argv)
    result = run(args.work, args.lm_steps, args.sentences)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
