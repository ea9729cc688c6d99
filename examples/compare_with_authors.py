"""This package's SpaDE and examples/authors_baselines.py beside the authors' own code, step by step, float64.

The authors' repository (Sai-Sumedh/SaeConceptDuality-SpaDE) is not part of
this one: fetch it and point ``--authors`` at its root folder (the one
holding ``models.py`` and ``functions/``).  Their ``sparsemax`` dependency (a
PyPI package) is stood in for by this package's ``spade_kernels.sparsemax``.
For each model both sides start from the same weights and take the same 60
SGD steps (lr 0.05, batch 64, d = 8, width 32) through the authors'
``functions.train_test.train`` and through this side's loss; the script
prints the largest difference of every parameter after them (and of SpaDE's
codes along the way).  λ is set equal on both sides: theirs is
softplus(softplus⁻¹(1/(2d))) computed in float32, 1/(2d) + 3.4e-8 at d = 8.

    python examples/compare_with_authors.py --authors /path/to/SaeConceptDuality-SpaDE
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

import spade_kernels as sk

D, WIDTH, BATCH, STEPS, LR = 8, 32, 64, 60, 0.05
#: The shapes (B, d, K) that --time measures: the paper's toy sizes and an LLM-like one.
SHAPES = [(2048, 128, 512), (1024, 768, 1024)]


def _stand_in_sparsemax() -> None:
    class Sparsemax(torch.nn.Module):
        def __init__(self, dim: int = -1) -> None:
            super().__init__()
            self.dim = dim

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return sk.sparsemax(z.movedim(self.dim, -1)).movedim(-1, self.dim)

    sys.modules["sparsemax"] = types.SimpleNamespace(Sparsemax=Sparsemax)


def compare(src: Path) -> dict[str, float]:
    _stand_in_sparsemax()
    sys.path.insert(0, str(src))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import authors_baselines as ours
    from functions.train_test import train
    from models import SAE
    from torch.utils.data import DataLoader, TensorDataset

    def their_step(model, optimizer, x, regularizer, gamma, **kw):
        loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=len(x))
        train(loader, model, optimizer, update_status_fn=lambda s: None, regularizer=regularizer,
              gamma_reg=gamma, num_concepts=1, **kw)  # fmt: skip

    results = {}
    torch.manual_seed(0)
    baselines = (
        ("relu", "relu", "l1", 0.01, ours.AuthorsReLUSAE(D, WIDTH, l1_coeff=0.01), {}),
        ("topk", "topk_relu", "auxloss", 1.0, ours.AuthorsTopKSAE(D, WIDTH, k=4), {"kval_topk": 4}),
        ("jumprelu", "jumprelu", "l0", 0.05, ours.AuthorsJumpReLUSAE(D, WIDTH, l0_coeff=0.05), {}),
    )
    for name, sae_type, reg, gamma, mine, kw in baselines:
        theirs = SAE(dimin=D, width=WIDTH, sae_type=sae_type, normalize_decoder=True, **kw).double()
        mine = mine.double()
        with torch.no_grad():
            mine.W_enc.copy_(theirs.Ae)
            mine.W_dec.copy_(theirs.Ad.T)
            mine.b_dec.copy_(theirs.bd[0])
            if mine.b_enc is not None:
                mine.b_enc.copy_(theirs.be[0])
            if hasattr(mine, "log_threshold"):
                mine.log_threshold.copy_(theirs.logthreshold[0])
            mine.lam.copy_(theirs.lambda_val.detach().reshape(()))
        opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=LR)
        opt_o = torch.optim.SGD(mine.parameters(), lr=LR)
        gen = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            x = 0.5 * torch.randn(BATCH, D, generator=gen, dtype=torch.float64)
            if name == "topk":
                x = x.abs() + 1.0  # latents that never fire, so the dead counter and AuxK run
            their_step(theirs, opt_t, x, reg, gamma)
            mine.train()
            opt_o.zero_grad()
            mine(x)[1].backward()
            opt_o.step()
        pairs = [(mine.W_enc, theirs.Ae), (mine.W_dec, theirs.Ad.T), (mine.b_dec, theirs.bd[0])]
        if mine.b_enc is not None:
            pairs.append((mine.b_enc, theirs.be[0]))
        if hasattr(mine, "log_threshold"):
            pairs.append((mine.log_threshold, theirs.logthreshold[0]))
        results[name] = max(float((a - b).detach().abs().max()) for a, b in pairs)
        if name == "topk":
            same = torch.equal(mine.batches_silent.double(), theirs.deadcounts.double().flatten())
            results["topk dead counters equal"] = float(same)
            results["topk longest silence (batches)"] = float(mine.batches_silent.max())
    for backend in ("reference", "torch", "native"):
        if sk.backends.backend_status().get(backend) is not None:
            continue
        theirs = SAE(dimin=D, width=WIDTH, sae_type="sparsemax_dist").double()
        layer = sk.SpaDE(D, WIDTH, gamma_reg=0.1, backend=backend, dtype=torch.float64)
        with torch.no_grad():
            layer.prototypes.copy_(theirs.Ae)
            layer.W_dec.copy_(theirs.Ad.T)
            layer.lambda_raw.copy_(theirs.lambda_pre.reshape(()))
        opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=LR)
        opt_o = torch.optim.SGD(layer.parameters(), lr=LR)
        gen = torch.Generator().manual_seed(1)
        codes = 0.0
        for _ in range(STEPS):
            x = torch.randn(BATCH, D, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                codes = max(codes, float((layer.encode(x) - theirs(x, return_hidden=True)[1]).abs().max()))
            their_step(theirs, opt_t, x, "dist_weighted_l1", 0.1, encoder_reg=True)
            opt_o.zero_grad()
            layer(x).loss.backward()
            opt_o.step()
        pairs = [(layer.prototypes, theirs.Ae), (layer.W_dec, theirs.Ad.T),
                 (layer.lambda_raw, theirs.lambda_pre.reshape(()))]  # fmt: skip
        results[f"spade ({backend}) codes"] = codes
        results[f"spade ({backend})"] = max(float((a - b).detach().abs().max()) for a, b in pairs)
    return results


def _load_theirs(src: Path):
    _stand_in_sparsemax()
    sys.path.insert(0, str(src))
    from functions.train_test import train
    from models import SAE

    return train, SAE


def _steps(src: Path, shape) -> dict:
    """One SpaDE training step (forward, loss, backward, clip, Adam) at ``shape`` = (B, d, K), float32:
    theirs through their ``train`` on one batch, and this package's (``auto`` backend)."""
    from torch.utils.data import DataLoader, TensorDataset

    train, SAE = _load_theirs(src)
    B, d, K = shape
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, torch.zeros(B, dtype=torch.long)), batch_size=B)
    theirs = SAE(dimin=d, width=K, sae_type="sparsemax_dist")
    layer = sk.SpaDE(d, K, gamma_reg=0.1)
    opt_t = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=1e-3)
    opt_o = torch.optim.Adam(layer.parameters(), lr=1e-3)

    def step_theirs():
        train(loader, theirs, opt_t, update_status_fn=lambda s: None, regularizer="dist_weighted_l1",
              encoder_reg=True, gamma_reg=0.1, num_concepts=1, clip_grad=True)  # fmt: skip

    def step_ours():
        opt_o.zero_grad()
        layer(x).loss.backward()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        opt_o.step()

    return {"theirs": step_theirs, "ours": step_ours}


def time_steps(src: Path, shapes, repeats: int = 5) -> list[dict]:
    """Seconds per SpaDE training step, theirs and this package's, alternated in one process after a
    warm-up step each (medians of ``repeats``), and each side's peak memory for one step, measured in a
    fresh process (:func:`peak_step_bytes`)."""
    import statistics
    import time

    rows = []
    for shape in shapes:
        steps = _steps(src, shape)
        times = {"theirs": [], "ours": []}
        for fn in steps.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        t, o = statistics.median(times["theirs"]), statistics.median(times["ours"])
        B, d, K = shape
        rows.append({"shape": list(shape), "theirs_s": t, "ours_s": o, "speedup": t / o,
                     "theirs_times_s": times["theirs"], "ours_times_s": times["ours"],
                     "theirs_peak_bytes": peak_step_bytes(src, shape, "theirs"),
                     "ours_peak_bytes": peak_step_bytes(src, shape, "ours"),
                     "b_k_d_float32_bytes": B * K * d * 4})  # fmt: skip
    return rows


def peak_step_bytes(src: Path, shape, side: str) -> int:
    """How far one training step raises a fresh process's peak resident memory above what its
    set-up holds: the kernel's high-water mark (VmHWM), reset just before the step, minus the
    resident set (VmRSS) then.  (ru_maxrss would not do: Linux carries it over fork and exec, so a
    child of this process would start at this process's own peak.)"""
    import subprocess

    args = [sys.executable, __file__, "--authors", str(src), "--peak-step", side, *map(str, shape)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def _peak_step(src: Path, side: str, shape) -> int:
    from spade_kernels.bench.measure import peak_rss_since, start_peak_rss

    step = _steps(src, shape)[side]
    before = start_peak_rss()  # VmHWM back to the current resident set
    step()
    return peak_rss_since(before)


def _machine() -> dict:
    import os
    import platform

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--authors", type=Path, required=True, help="the authors' repository root (models.py, functions/)"
    )
    parser.add_argument(
        "--time",
        action="store_true",
        help="time a SpaDE training step and measure its peak memory, theirs and ours, at (B, d, K) = "
        + ", ".join(map(str, SHAPES)),
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="with --time: also write the measurements (and the machine, its load) as JSON",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="with --time: timed steps per side (default 5)"
    )
    parser.add_argument("--peak-step", nargs=4, metavar=("SIDE", "B", "D", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.authors / "models.py").is_file():
        parser.error(f"--authors {args.authors}: no models.py there")
    if args.peak_step:  # one side's step in this fresh process (see peak_step_bytes)
        side, *shape = args.peak_step
        print(_peak_step(args.authors, side, tuple(map(int, shape))))
        return 0
    if args.time:
        import json
        import os

        if args.repeats < 1:
            parser.error("--repeats must be ≥ 1")
        machine, load = _machine(), [os.getloadavg()]
        print(f"torch {machine['torch']}, {machine['threads']} threads, {machine['cpu']}")
        rows = time_steps(args.authors, SHAPES, args.repeats)
        load.append(os.getloadavg())
        for row in rows:
            print(f"step at (B, d, K) = {tuple(row['shape'])}: theirs {row['theirs_s'] * 1e3:.1f} ms "
                  f"(peak +{row['theirs_peak_bytes'] / 2**20:.0f} MiB), this package {row['ours_s'] * 1e3:.2f} ms "
                  f"(peak +{row['ours_peak_bytes'] / 2**20:.0f} MiB), {row['speedup']:.0f}× faster")  # fmt: skip
        print(f"load average (1, 5, 15 min) before {load[0]}, after {load[1]}")
        if args.out:
            args.out.write_text(json.dumps({
                "what": "One SpaDE training step (forward, loss, backward, clip, Adam), float32, batch = B",
                "theirs": "the authors' models.SAE(sae_type='sparsemax_dist') through functions.train_test.train "
                          "(dist_weighted_l1, encoder_reg, clip_grad), their sparsemax package stood in for by "
                          "spade_kernels.sparsemax",
                "ours": "spade_kernels.SpaDE (backend auto), loss.backward, clip_grad_norm_ 1.0, Adam",
                "timing": f"Medians of {args.repeats} steps per side, alternated in one process after a warm-up "
                          "step each; peak memory: how far one step (the first) raises a fresh process's "
                          "peak resident set (VmHWM reset before it)",
                "machine": machine, "load_average_before_after": load, "repeats": args.repeats,
                "command": "python examples/compare_with_authors.py --authors DIR --time --out FILE",
                "rows": rows}, indent=1))  # fmt: skip
            print(f"wrote {args.out}")
        return 0
    for name, value in compare(args.authors).items():
        print(
            f"{name:32s} {value:.3g}"
            + ("" if "dead" in name or "silence" in name else "  (max |difference|)")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
