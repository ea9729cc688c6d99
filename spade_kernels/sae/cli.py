"""The ``spade-kernels`` command: environment report and a small SpaDE trainer.

::

    spade-kernels info
    spade-kernels train --dataset separability
    spade-kernels train --data activations.pt --d-sae 16384 --out runs/my-sae
    spade-kernels bench --quick --out bench-results
    spade-kernels cache --model DIR --hook blocks.0 --text corpus.txt --out acts
    spade-kernels eval runs/my-sae --model DIR --hook blocks.0 --text held_out.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from spade_kernels import BACKEND_NAMES, __version__

if TYPE_CHECKING:
    import torch

__all__ = ["main"]

PROG = "spade-kernels"
INFO_NAME = "train_info.json"

#: Defaults that depend on the data: (n_samples, d_sae, batch_size).  d_sae of
#: a file is 4·d; the synthetic sizes keep the separability run to seconds on
#: a laptop CPU while giving the cosine schedule ~500 steps.
_SYNTHETIC_DEFAULTS = {"separability": (65536, 128, 128), "heterogeneity": (131072, 512, 256)}
#: The batch size of a file is a power of two in this range giving about STEPS_TARGET steps per epoch.
_FILE_BATCH_RANGE = (16, 4096)
STEPS_TARGET = 500

#: Defaults of the train options that have a fixed one (the parser's defaults are None, so that a
#: resumed run can tell a flag given on its command line from one left out).
_TRAIN_DEFAULTS = {
    "epochs": 1, "lr": 1e-2, "lr_final": 1e-4, "clip": 1.0, "gamma_reg": 0.1, "init": "paper",
    "backend": "auto", "seed": 0, "checkpoint_every": 1000, "checkpoint_every_s": 600.0, "latent_shards": 1,
}  # fmt: skip


def _file_batch_size(rows: int) -> int:
    """A power of two in :data:`_FILE_BATCH_RANGE` giving about :data:`STEPS_TARGET` steps per epoch."""
    lo, hi = _FILE_BATCH_RANGE
    size = 1 << max(0, (max(1, rows // STEPS_TARGET)).bit_length() - 1)
    return max(lo, min(hi, size))


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return value


_non_negative_float.__name__ = "float"


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


_non_negative_int.__name__ = "int"

#: The resumable training state ``train`` keeps in its output directory until the run completes.
STATE_NAME = "train_state.pt"
#: Settings that define a run's model and data: a resumed run keeps them (a flag that differs is refused).
_RUN_FIXED = (
    "dataset", "data", "n_samples", "seed", "d_sae", "batch_size", "gamma_reg", "lambda_init", "init",
    "latent_shards",
)  # fmt: skip
#: Settings of how a run proceeds: a resumed run takes a flag that differs, and says so.
_RUN_CHANGEABLE = (
    "epochs",
    "lr",
    "lr_final",
    "clip",
    "backend",
    "device",
    "checkpoint_every",
    "checkpoint_every_s",
)
_RUN_SETTINGS = _RUN_FIXED + _RUN_CHANGEABLE

#: Fewer optimizer steps than this and ``train`` warns (a SpaDE needs hundreds of steps to fit).
FEW_STEPS = 200


def _build_parser(bench_arguments: bool = True) -> argparse.ArgumentParser:
    """The command line's parser.  ``bench_arguments=False`` leaves ``bench``'s own arguments out: the
    harness that defines them imports torch, which every other command's ``--help`` does without."""
    parser = argparse.ArgumentParser(prog=PROG, description="Fast, exact SpaDE sparse autoencoders.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("info", help="versions, device and which backends are usable (and why not)")

    train = sub.add_parser(
        "train",
        help="train a SpaDE layer with the paper's recipe",
        description="Train a SpaDE layer (Adam, cosine lr decay, grad clipping, one pass) on a synthetic "
        "set or an activation file (.pt/.npy/.safetensors), scaled so that E‖x‖² = d.",
    )
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=sorted(_SYNTHETIC_DEFAULTS), help="synthetic set of the paper")
    source.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="activation file, shape (..., d), or a directory of them (shards read one at a time)",
    )
    source.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the interrupted run whose --out was DIR with its saved settings: flags that would "
        "change its model or data are refused; --epochs, --lr, --lr-final, --clip, --backend, --device and the "
        "checkpoint intervals may change (printed)",
    )
    train.add_argument(
        "--d-sae",
        type=_positive(int),
        help="latents K (default 128 separability, 512 heterogeneity, 4·d files)",
    )
    train.add_argument(
        "--batch-size",
        type=_positive(int),
        help=f"default 128 separability, 256 heterogeneity; files: a power of two in {list(_FILE_BATCH_RANGE)} "
        f"giving ~{STEPS_TARGET} steps per epoch",
    )
    train.add_argument("--epochs", type=_positive(int), default=None, help="passes over the data (default 1)")
    train.add_argument("--lr", type=_positive(float), default=None, help="initial Adam lr (default 1e-2)")
    train.add_argument(
        "--lr-final", type=_positive(float), default=None, help="lr at the last step (default 1e-4)"
    )
    train.add_argument("--clip", type=_positive(float), default=None, help="max gradient norm (default 1.0)")
    train.add_argument(
        "--gamma-reg", type=_non_negative_float, default=None, help="regulariser weight γ (default 0.1)"
    )
    train.add_argument("--lambda-init", type=_positive(float), help="initial λ (default 1/(2d))")
    train.add_argument(
        "--init",
        choices=("paper", "data"),
        default=None,
        help="paper: prototypes ~ N(0, 1); data: random training samples (default paper)",
    )
    train.add_argument("--backend", choices=("auto", *BACKEND_NAMES), default=None, help="encoder backend")
    train.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    train.add_argument("--seed", type=int, default=None, help="seed for data, init and shuffling (default 0)")
    train.add_argument(
        "--threads",
        type=_positive(int),
        help="CPU threads for torch (default: torch's; one is fastest when other work shares the CPU)",
    )
    train.add_argument("--n-samples", type=_positive(int), help="synthetic set size (default 65536 / 131072)")
    train.add_argument(
        "--out",
        type=Path,
        help="checkpoint directory (default runs/spade-<dataset or file stem>); one run at a time (locked)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=None,
        help=f"steps between resumable states in --out/{STATE_NAME} (default 1000; 0: none by steps; a state is "
        "still written on SIGINT/SIGTERM and after the last step, before the weights)",
    )
    train.add_argument(
        "--checkpoint-every-s",
        type=_non_negative_float,
        default=None,
        help="seconds between resumable states as well (default 600; 0: off); SIGINT/SIGTERM always write one",
    )
    train.add_argument(
        "--latent-shards",
        type=_positive(int),
        default=None,
        help="under torchrun: split the latents over groups of this many ranks (data parallel over "
        "WORLD_SIZE / this many groups); default 1 (plain data parallel when WORLD_SIZE > 1)",
    )
    train.add_argument(
        "--nproc-per-node",
        type=_positive(int),
        help="run N processes on this machine, as torchrun does (torch's elastic launcher), reporting a failed "
        "or interrupted job in one line instead of torchrun's own report; with --latent-shards as under torchrun",
    )
    train.add_argument(
        "--dist-timeout-s",
        type=_positive(float),
        help="under torchrun: seconds a collective waits for a peer (default 120); a rank that dies or "
        "stalls ends the others within about this, each with one line naming it",
    )
    train.add_argument(
        "--wandb",
        metavar="PROJECT",
        help="also log the metrics to the Weights & Biases project PROJECT (needs the wandb package; "
        "WANDB_MODE=offline keeps the run in --out/wandb without a network)",
    )
    train.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="settings from a TOML or JSON file whose keys are this command's flags (lr = 0.01, "
        'lr_final or "lr-final" = 1e-4, dataset = "separability"); flags on the command line override it',
    )
    bench = sub.add_parser(
        "bench",
        help="benchmark backends against the floor (torch.mm) and the paper-style baseline",
        description="Time encode / layer forward / training step per backend, dtype and shape; "
        "report median and spread, TFLOP/s, extra peak memory, speedup and ratio to the floor.",
    )
    if bench_arguments:
        from spade_kernels.bench import add_arguments

        add_arguments(bench)
    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: FVU, L0, dead latents, firing frequencies; with --model, the LM's loss "
        "with the SAE spliced in (JSON + PNG)",
        description="Evaluate a save_pretrained checkpoint on raw activations (the scale it takes): from --data, "
        "or from a causal LM's --hook over --text, where the LM's next-token loss is also measured clean, with "
        "the SAE's reconstruction spliced in and zero-ablated (loss recovered, KL).",
    )
    ev.add_argument("checkpoint", type=Path, help="checkpoint directory (or its cfg.json)")
    ev_source = ev.add_mutually_exclusive_group(required=True)
    ev_source.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="activation file, shape (..., d), or a directory of them (shards read one at a time)",
    )
    ev_source.add_argument(
        "--model",
        metavar="MODEL",
        help="a causal LM: a Hugging Face name or directory, or a formal-language model directory "
        "(python -m spade_kernels.sae.formal_language); needs --hook and --text",
    )
    ev.add_argument(
        "--hook", metavar="MODULE", help="with --model: the module whose output the SAE reconstructs"
    )
    ev.add_argument("--text", type=Path, metavar="PATH", help="with --model: .txt/.jsonl file or directory")
    ev.add_argument(
        "--context",
        type=_positive(int),
        help="with --model: tokens per window (default 128 or the model's limit)",
    )
    ev.add_argument(
        "--max-tokens", type=_positive(int), default=32768, help="with --model: rows to score (default 32768)"
    )
    ev.add_argument("--out", type=Path, help="JSON report (default CHECKPOINT/eval.json; the PNG beside it)")
    ev.add_argument("--batch-size", type=_positive(int), default=4096, help="rows per batch (default 4096)")
    ev.add_argument("--backend", choices=("auto", *BACKEND_NAMES), default="auto", help="encoder backend")
    ev.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    cache = sub.add_parser(
        "cache",
        help="write a language model's activations at a hook over a corpus, as shards train --data reads",
        description="Run a model over a text corpus and write its activations at --hook (every token but special "
        "tokens and padding) to shard files in --out, a shard at a time; run the same command again to resume.",
    )
    cache.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="a Hugging Face name or directory, or a formal-language model directory",
    )
    cache.add_argument(
        "--hook", required=True, metavar="MODULE", help="module whose output is cached (dotted name)"
    )
    cache.add_argument(
        "--text",
        type=Path,
        required=True,
        metavar="PATH",
        help="one document per line (.txt), JSON lines with a text field (.jsonl), or a directory of them",
    )
    cache.add_argument("--out", type=Path, required=True, metavar="DIR", help="shard directory (resumable)")
    cache.add_argument(
        "--context",
        type=_positive(int),
        help="tokens per window (default 128, or the model's limit if smaller)",
    )
    cache.add_argument(
        "--batch-size", type=_positive(int), default=32, help="windows per forward (default 32)"
    )
    cache.add_argument(
        "--shard-rows", type=_positive(int), default=65536, help="rows per shard (default 65536)"
    )
    cache.add_argument("--max-tokens", type=_positive(int), help="stop after this many rows (default: all)")
    cache.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="stored dtype (float32)",
    )
    cache.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    return parser


def _eval(args: argparse.Namespace) -> int:
    import torch

    from spade_kernels.layer import SpaDE, read_checkpoint

    from .data import check_raw_scale, open_activations, scan_rows
    from .evaluation import evaluate_checkpoint, plot_evaluation

    folder = args.checkpoint.parent if args.checkpoint.name == "cfg.json" else args.checkpoint
    out = args.out or folder / "eval.json"
    if args.model is not None and (args.hook is None or args.text is None):
        return _error("--model needs --hook and --text")
    if args.model is None and (args.hook is not None or args.text is not None):
        return _error("--hook and --text go with --model")
    try:
        read_checkpoint(args.checkpoint)  # cfg.json and the weights' header: nothing loaded yet
    except (FileNotFoundError, ValueError) as exc:
        return _error(str(exc))
    # Where the report goes is checked before anything is computed.
    problem = _unwritable(out.parent, create=args.out is not None) or (
        "exists and is a directory" if out.is_dir() else None
    )
    if problem is not None:
        return _error(f"--out {os.fspath(out)}: {problem}")
    try:
        device = _device(args)
        layer = SpaDE.from_pretrained(args.checkpoint, device=device, backend=args.backend)
        lm_metrics = None
        if args.model is not None:
            from .lm import load_language_model, spliced_losses

            lm = load_language_model(args.model, device=device, causal=True)
            lm_metrics, x = spliced_losses(
                lm,
                args.hook,
                lambda rows: layer.decode(layer.encode_sparse(rows.to(layer.prototypes.dtype))),
                args.text,
                context=args.context,
                max_rows=args.max_tokens,
                d_in=layer.d_in,
                log=lambda m: print(m, file=sys.stderr, flush=True),
            )
            source = f"{args.model} at {args.hook} over {os.fspath(args.text)}"
        else:
            x = open_activations(args.data)
            source = os.fspath(args.data)
        if x.shape[1] != layer.d_in:
            raise ValueError(f"{source} has d = {x.shape[1]} but the checkpoint takes d_in = {layer.d_in}")
        # The rule train applies to its data: finite rows, and (float32 layers) a scale they can encode.
        summary = scan_rows(x, name=source)
        if layer.prototypes.dtype != torch.float64:
            check_raw_scale(summary, source)
        metrics = evaluate_checkpoint(layer, x, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        return _error(str(exc))
    metrics["checkpoint"], metrics["data"] = os.fspath(args.checkpoint), source
    if lm_metrics is not None:
        metrics["language_model"] = {"model": args.model, "hook": args.hook, "text": os.fspath(args.text), **lm_metrics}  # fmt: skip
    png = out.with_suffix(".png")
    try:
        out.write_text(json.dumps(metrics, indent=1) + "\n")
        drawn = plot_evaluation(metrics, os.fspath(png))
    except OSError as exc:
        return _error(f"writing {os.fspath(out)} failed ({exc.strerror or exc})")
    print(
        f"on raw activations (the scale the checkpoint takes): FVU {metrics['fvu']:.4g}  MSE {metrics['mse']:.4g}  "
        f"L0 {metrics['l0_mean']:.2f}  dead {metrics['dead_latents']}/{metrics['d_sae']}  λ {metrics['lambda']:.4g}"
    )
    if lm_metrics is not None:
        m = lm_metrics
        print(
            f"next-token loss over {m['scored_tokens']} tokens: clean {m['ce_loss_clean']:.4f}  spliced "
            f"{m['ce_loss_spliced']:.4f}  zero-ablated {m['ce_loss_zero_ablated']:.4f}  loss recovered "
            + (
                "n/a (zero-ablation changes nothing)"
                if m["ce_loss_recovered"] is None
                else f"{m['ce_loss_recovered']:.4f}"
            )
            + f"  KL {m['kl_div_spliced']:.4g}"
        )
    print(f"wrote {os.fspath(out)}" + (f" and {os.fspath(png)}" if drawn else ""))
    return 0


def _cache(args: argparse.Namespace) -> int:
    import torch

    from .lm import cache_activations, load_language_model

    try:
        device = _device(args)
        if not args.text.exists():
            raise FileNotFoundError(f"--text {os.fspath(args.text)}: no such file or directory")
        problem = _unwritable(args.out)
        if problem is not None:
            raise ValueError(f"--out {os.fspath(args.out)}: {problem}")
        lm = load_language_model(args.model, device=device)
        cache_activations(
            lm,
            args.hook,
            args.text,
            args.out,
            context=args.context,
            batch_size=args.batch_size,
            shard_rows=args.shard_rows,
            max_rows=args.max_tokens,
            dtype=getattr(torch, args.dtype),
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        return _error(str(exc))
    print(f"train on it with: {PROG} train --data {os.fspath(args.out)}")
    return 0


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _info() -> int:
    import torch

    from spade_kernels.backends import auto_backend, backend_status, extension_summary

    if torch.cuda.is_available():
        device = (
            f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()}, CUDA {torch.version.cuda})"
        )
    else:
        device = f"cpu, {torch.get_num_threads()} threads"
    rows = [
        ("spade-kernels", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("numpy", _dist_version("numpy")),
        ("triton", _dist_version("triton")),
        ("device", device),
        ("extension", extension_summary()),
    ]
    for key, value in rows:
        print(f"{key:<14} {value}")
    print("backends")
    for name, reason in backend_status().items():
        print(f"  {name:<12} {'available' if reason is None else 'unavailable: ' + reason}")
    print("auto")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            name, why = auto_backend(dev, dtype)
            print(f"  {dev.type} {str(dtype).removeprefix('torch.'):<9} -> {name} ({why})")
    return 0


def _unwritable(path: Path, *, create: bool = True) -> str | None:
    """Why ``path`` cannot hold the run's files (None if it can): checked before anything is computed."""
    import tempfile

    if path.exists() and not path.is_dir():
        return "exists and is not a directory"
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        return f"not writable ({exc.strerror or exc})"
    return None


def _error(message: str, *, every_rank: bool = False) -> int:
    """Print one error line (under torchrun: rank 0's, unless ``every_rank``); returns exit code 2."""
    if every_rank or _rank() == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


#: The resumable state of a run over several processes: a folder (spade_kernels.sae.train.ShardedCheckpointer).
SHARDED_STATE_NAME = "train_state.dcp"


def _resumed_args(args: argparse.Namespace) -> tuple[argparse.Namespace, dict, list[str]]:
    """The settings of the run in ``args.resume`` with the changes its flags may make, its state, and those changes.

    One process: the state itself.  Several: the ``LATEST`` record of its
    state folder (each rank reads its part once its layer exists).  ValueError (one line) for a missing or damaged
    state, or a flag that would change the run's model or data.
    """
    from .train import load_train_state, read_sharded_latest

    single, sharded = args.resume / STATE_NAME, args.resume / SHARDED_STATE_NAME
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if single.exists() and not sharded.is_dir():
            raise ValueError("the run was in one process: resume it without --nproc-per-node (or torchrun)")
        state = read_sharded_latest(os.fspath(sharded))
    else:
        if sharded.is_dir() and not single.exists():
            world = read_sharded_latest(os.fspath(sharded)).get("layout", {}).get("world")
            raise ValueError(f"the run was on {world} processes: resume it with --nproc-per-node {world}")
        state = load_train_state(os.fspath(single))
    saved = state["extra"].get("settings", {})
    missing = [k for k in _RUN_SETTINGS if k not in saved]
    if missing:
        raise ValueError(f"{args.resume} holds a state without the settings {missing}")
    if args.out is not None and args.out.resolve() != args.resume.resolve():
        raise ValueError(f"--out {os.fspath(args.out)}: a resumed run writes into its own directory")
    run = argparse.Namespace(**vars(args))
    changes = []
    for key in _RUN_SETTINGS:
        given = getattr(args, key, None)
        if key in _RUN_FIXED and given is not None and given != saved[key]:
            raise ValueError(
                f"{_flag(key)} {_show(given)} would change the run's model or data (it has {key} = "
                f"{_show(saved[key])}); a resumed run keeps them: drop the flag, or start a new run with another --out"
            )
        if key in _RUN_CHANGEABLE and given is not None and given != saved[key]:
            changes.append(f"{_flag(key)} {_show(given)} (the run had {_show(saved[key])})")
        setattr(run, key, given if key in _RUN_CHANGEABLE and given is not None else saved[key])
    run.data = Path(saved["data"]) if saved["data"] is not None else None
    run.out = args.resume
    return run, state, changes


METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "training_curves.png"


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


class _MetricsLog:
    """One JSON line per logged step in --out/metrics.jsonl: step, loss, MSE, normalised MSE, L0, λ, lr, throughput.

    About 500 lines per run (and the last step).  The data are scaled to
    E‖x‖² = d, so the normalised MSE is MSE/d.  A resumed run first drops
    the lines past its state's step (what a killed run logged after its last
    checkpoint), so the log reads as one run.  The log is a convenience: a
    write that fails (a full disk) warns once and stops the log, never the run.
    """

    def __init__(self, path: Path, total: int, d: int, batch_size: int) -> None:
        self.path, self.total, self.d, self.batch = path, total, d, batch_size
        self.every = max(1, total // 500)
        self.enabled = False
        #: A Weights & Biases run that gets the same rows (``--wandb``), or None.
        self.wandb = None

    def _failed(self, exc: OSError) -> None:
        self.enabled = False
        _warn(
            f"writing {os.fspath(self.path)} failed ({exc.strerror or exc}); training goes on without the metrics log"
        )

    def start(self, step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.t0, self.step0 = time.perf_counter(), step
        try:
            kept = [r for r in self.rows() if r["step"] <= step] if step > 0 else []
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        except OSError as exc:
            self._failed(exc)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                break
        return rows

    def __call__(self, step: int, history) -> None:
        if not (self.enabled or self.wandb is not None) or (step % self.every and step != self.total):
            return
        rate = (step - self.step0) * self.batch / max(time.perf_counter() - self.t0, 1e-9)
        row = {
            "step": step, "loss": history.loss[-1], "mse": history.mse[-1], "nmse": history.mse[-1] / self.d,
            "l0": history.l0[-1], "lam": history.lam[-1], "lr": history.lr[-1], "samples_per_s": rate,
        }  # fmt: skip
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
            except Exception as exc:  # W&B's own failures (network, disk) end its log, never the run
                self.wandb = None
                _warn(f"logging to W&B failed ({type(exc).__name__}: {exc}); training goes on without it")
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as exc:
            self._failed(exc)

    def finish(self, summary: dict | None = None, exit_code: int = 0) -> None:
        """End the W&B run (if any) with ``summary`` as its summary."""
        if self.wandb is None:
            return
        try:
            if summary:
                self.wandb.summary.update(summary)
            self.wandb.finish(exit_code=exit_code)
        except Exception as exc:
            _warn(f"finishing the W&B run failed ({type(exc).__name__}: {exc})")
        self.wandb = None


def _start_wandb(project: str, settings: dict, out_dir: Path, resumed_from: int | None):
    """A Weights & Biases run for ``--wandb PROJECT`` (rank 0), or an error line's exit code.

    The run is named after ``--out`` and grouped by it, so a resumed run (a new
    W&B run, its ``resumed_from_step`` in the config) sits beside the first.
    """
    import wandb

    config = {**settings, "resumed_from_step": resumed_from}
    try:
        return wandb.init(
            project=project, config=config, dir=os.fspath(out_dir), name=out_dir.name, group=out_dir.name
        )
    except Exception as exc:
        return _error(
            f"--wandb {project}: W&B could not start ({type(exc).__name__}: {exc}); log in with `wandb login`, "
            "or set WANDB_MODE=offline"
        )


class _StopOnSignal:
    """SIGINT/SIGTERM set a flag that the training loop reads after its current step.

    In one process a second signal stops at once (``KeyboardInterrupt``).
    Under torchrun it does not: the agent forwards the terminal's Ctrl-C
    (a second SIGINT) and then SIGTERM while the ranks write their state.
    """

    def __init__(self, escalate: bool = True) -> None:
        self.signum = None
        self.previous = {}
        self.escalate = escalate

    def __enter__(self):
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if self.escalate:  # a second signal: stop now
                raise KeyboardInterrupt
            return
        self.signum = signum

    def __call__(self) -> int:
        """The signal received (0: none): the training loop stops after its step, all ranks agreeing on it."""
        return self.signum or 0

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _fingerprint(summary) -> list:
    """The data of a run: (N, d) and a CRC-32 of every row's bytes in order (content and order)."""
    return ["rows-crc32", summary.n, summary.d, summary.crc32]


def _likely_cause(exc, args, first_step: bool) -> tuple[str, str | None]:
    """(the flag that most likely made a run diverge, the flag to change on resume or None: a new run)."""
    lr = f"--lr {_show(args.lr)}"
    if first_step:
        lam = "its default 1/(2d)" if args.lambda_init is None else _show(args.lambda_init)
        return (
            f"the settings (--gamma-reg {_show(args.gamma_reg)}, --lambda-init {lam}) give a non-finite value "
            "on the first batch",
            None,
        )
    if exc.what == "loss":  # MSE and regulariser finite: γ·regulariser overflowed
        return f"likely --gamma-reg {_show(args.gamma_reg)} is too large", None
    if exc.what == "gradient norm":
        return f"likely {lr} is too large (or --clip {_show(args.clip)})", "--lr"
    if exc.what == "λ":
        return f"likely {lr} or --gamma-reg {_show(args.gamma_reg)} is too large", "--lr"
    return f"likely {lr} is too large", "--lr"


def _diverged(exc, args, state, state_path: Path, resume: str) -> int:
    """One line for a run that diverged: the step, what, the likely flag, what is kept and the way on."""
    first = exc.step == 1 + (0 if state is None else state["step"])
    cause, on_resume = _likely_cause(exc, args, first)
    if exc.saved_step is None or exc.saved_step == 0:
        kept = "nothing to resume from was written: start again"
        kept += " with other settings" if on_resume is None else f" with a smaller {on_resume}"
    else:
        which = "the last finite one" if exc.saved_step == exc.step - 1 else "the last one written"
        kept = f"the state of step {exc.saved_step} ({which}) is in {os.fspath(state_path)}"
        if on_resume is not None:
            kept += f": resume with {resume} {on_resume} <smaller>"
        else:
            kept += " (that flag cannot change on resume: start a new run with a smaller one)"
    return _error(f"{exc}; {cause}; {kept}")


def _write_failed(
    what: str, exc: BaseException, saved_step: int | None, total: int, state_path: Path, resume: str
) -> int:
    """One line for a write that failed (a full disk, a lost mount): what is intact and how to finish."""
    from spade_kernels.files import write_error

    if saved_step is None:
        return _error(f"{what} failed ({write_error(exc)}); no training state was written yet")
    return _error(
        f"{what} failed ({write_error(exc)}); the state of step {saved_step}/{total} in "
        f"{os.fspath(state_path)} is intact: free space and finish with {resume}"
    )


def _resume_command(run, out_dir: Path) -> str:
    """The command that resumes this run (with its process layout)."""
    if run.world == 1:
        return f"{PROG} train --resume {os.fspath(out_dir)}"
    return f"{PROG} train --nproc-per-node {run.world} --resume {os.fspath(out_dir)} (or torchrun, the same layout)"


def _faults() -> tuple:
    """What a failure can raise: torch.distributed.checkpoint's errors are BaseExceptions."""
    from .train import checkpoint_errors

    return (Exception, *checkpoint_errors())


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise), before the process group exists."""
    return int(os.environ.get("RANK", "0"))


@dataclass
class _Job:
    """A ``train`` run as it is set up: its settings, where it writes, its processes, its data and layer."""

    args: argparse.Namespace
    state: dict | None
    changes: list[str]
    out_dir: Path
    device: torch.device
    run: _Distributed
    x: object = None
    part: object = None
    dataset: object = None
    name: str = ""
    factor: float = 1.0
    summary: object = None
    layer: object = None
    batch_size: int | None = None
    #: The flags a resumed run's command line names: the resume hint repeats them.
    launch: str = ""


def _train(args: argparse.Namespace) -> int:
    """``spade-kernels train``: checks, then (locked) data, layer, training, the saved layer and the report."""
    import torch

    from spade_kernels.backends import resolve_backend
    from spade_kernels.files import DirectoryLock
    from spade_kernels.layer import SpaDE

    state, changes = None, []
    if args.wandb is not None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            return _error(f"--wandb {args.wandb}: needs the wandb package (pip install wandb)")
    if args.resume is not None:
        try:
            args, state, changes = _resumed_args(args)
        except (FileNotFoundError, ValueError) as exc:
            return _error(f"--resume {os.fspath(args.resume)}: {exc}")
    else:
        for key, value in _TRAIN_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    # The layer's settings, named by their flags, before any data is read.
    for key in ("lambda_init", "gamma_reg"):
        if getattr(args, key) is not None:
            try:
                SpaDE.validate_settings(1, **{key: getattr(args, key)})
            except ValueError as exc:
                return _error(f"{_flag(key)} {_show(getattr(args, key))}: {exc}")
    try:
        device = _device(args)
        resolve_backend(args.backend, device)
    except ValueError as exc:
        return _error(str(exc))
    name = args.dataset if args.dataset is not None else args.data.stem
    if args.data is not None and not args.data.exists():
        return _error(f"activation file not found: {args.data}")
    out_dir = args.out or Path("runs") / f"spade-{name}"
    created = not out_dir.exists()
    problem = _unwritable(out_dir)
    if problem is not None:
        return _error(f"--out {os.fspath(out_dir)}: {problem}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        run = _Distributed.start(args, device)
    except ValueError as exc:
        return _error(str(exc), every_rank=True)
    job = _Job(args, state, changes, out_dir, device, run, name=name)
    lock, problem = DirectoryLock(out_dir), None
    try:
        # The output directory is locked before the data are read: a second run refuses at once.
        if run.rank == 0:
            try:
                lock.acquire()
            except RuntimeError as exc:
                problem = f"--out {os.fspath(out_dir)}: {exc}"
            if not lock.held and problem is None:
                _warn(f"--out {os.fspath(out_dir)}: {lock.why_not}; two runs there would not be told apart")
        if run.agree([int(problem is not None)])[0]:
            code = _error(problem or "rank 0 could not lock the output directory")
        else:
            code = _prepare(job) or _train_locked(job)
        run.end()
        return code
    except _faults() as exc:
        if run.world == 1 or not _is_comm_error(exc):
            raise
        return _lost_contact(run, exc, out_dir)
    finally:
        lock.release()
        if created and run.rank == 0:  # a run refused before writing anything leaves no directory behind
            with contextlib.suppress(OSError):
                out_dir.rmdir()


def _device(args: argparse.Namespace) -> torch.device:
    import torch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device}: not a torch device ({exc})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device}: SpaDE trains on cpu or cuda devices, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available (torch {torch.__version__})")
    return device


def _prepare(job: _Job) -> int | None:
    """Read, check and scale the data and build the layer; an exit code on failure, None otherwise."""
    import torch

    from spade_kernels.layer import SpaDE

    from .data import (
        ActivationShards,
        check_raw_scale,
        make_heterogeneity,
        make_separability,
        open_activations,
        scale_to_unit_norm,
        scan_rows,
    )

    args = job.args
    if args.dataset is not None:
        n_samples, d_sae, job.batch_size = _SYNTHETIC_DEFAULTS[args.dataset]
        make = make_separability if args.dataset == "separability" else make_heterogeneity
        try:
            job.dataset = make(args.n_samples or n_samples, seed=args.seed)
        except ValueError as exc:
            return _error(f"--n-samples {args.n_samples}: {exc}")
        x = job.dataset.x
    else:
        try:
            x = open_activations(args.data)
        except (FileNotFoundError, ValueError) as exc:
            return _error(str(exc))
        d_sae = 4 * x.shape[1]
    source = os.fspath(args.data) if args.data is not None else args.dataset
    if job.dataset is None and job.run.rank == 0:
        print(
            f"checking {x.shape[0]} rows × {x.shape[1]} of {source} (values, scale, fingerprint)", flush=True
        )
    try:
        # Finite rows, their scale and the fingerprint, in one pass.
        job.summary = scan_rows(x, name=source, fingerprint=True)
        if job.dataset is None:
            check_raw_scale(job.summary, source)
        job.x, job.factor = scale_to_unit_norm(x, summary=job.summary)
        args.d_sae = args.d_sae or d_sae
        # Initialise on the CPU from a private RNG state, so the run depends only on --seed
        # (and is the same on every device); the backend is attached once the layer is there.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            layer = SpaDE(x.shape[1], args.d_sae, lambda_init=args.lambda_init, gamma_reg=args.gamma_reg)
            if args.init == "data":
                gen = torch.Generator().manual_seed(args.seed)
                if isinstance(job.x, ActivationShards):  # a sample of rows, not the whole data in memory
                    layer.init_from_data(job.x.sample(layer.d_sae, gen), generator=gen)
                else:
                    layer.init_from_data(job.x, generator=gen)
        job.part = job.run.part(job.x)  # this rank's rows (all of them in one process)
    except (RuntimeError, ValueError) as exc:
        return _error(str(exc))
    layer.to(job.device)
    layer.backend = args.backend
    job.layer = layer
    return None


def _lost_contact(run, exc: BaseException, out_dir: Path) -> int:
    """Under torchrun, a collective failed: one line naming the lost rank and what is kept, then exit 1.

    The process exits at once (``os._exit``): tearing the process group down
    would wait on the lost peer again.
    """
    import signal

    from .train import LATEST_NAME, read_sharded_latest

    for sig in (signal.SIGINT, signal.SIGTERM):  # the launcher's shutdown signal must not cut this line short
        signal.signal(sig, signal.SIG_IGN)
    folder = out_dir / SHARDED_STATE_NAME
    try:
        step = read_sharded_latest(os.fspath(folder))["step"]
        kept = f"the state of step {step} in {os.fspath(folder)} is intact: resume with {_resume_command(run, out_dir)}"
    except (OSError, ValueError, KeyError):
        kept = f"no training state was written yet ({os.fspath(folder / LATEST_NAME)})"
    _error(f"rank {run.rank}: lost {run.lost()} ({_comm_reason(exc)}); {kept}", every_rank=True)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def _train_locked(job: _Job) -> int:
    """The run once its output directory is locked and its data and layer are ready: train, save, report."""
    from .train import (
        Checkpointer,
        Diverged,
        ShardedCheckpointer,
        concept_metrics,
        evaluate,
        load_sharded_state,
        train_spade,
    )

    args, state, run, out_dir, layer = job.args, job.state, job.run, job.out_dir, job.layer
    x, part, dataset, factor, device = job.x, job.part, job.dataset, job.factor, job.device
    chosen = args.batch_size is None
    args.batch_size = bs = args.batch_size or job.batch_size or _file_batch_size(part.shape[0])
    total_steps = args.epochs * math.ceil(part.shape[0] / bs)
    if run.rank == 0:
        for change in job.changes:
            print(f"resuming with {change}")
        if total_steps < FEW_STEPS:
            per = f"{part.shape[0]} samples" + (" per data replica" if run.replicas > 1 else "")
            _warn(
                f"only {total_steps} optimizer steps ({per}, batch {bs}, {args.epochs} epoch(s)); a SpaDE needs "
                f"a few hundred to fit: raise --epochs (e.g. --epochs {math.ceil(FEW_STEPS / max(total_steps, 1)) * args.epochs}) "
                "or lower --batch-size"
            )
        how = " (from the data's size; --batch-size sets it)" if chosen and dataset is None else ""
        print(
            f"training SpaDE d_in={layer.d_in} d_sae={layer.d_sae} (backend {args.backend}, {device}) "
            f"on {x.shape[0]} samples of {job.name}, scaled by {factor:.4g}, batch {bs}{how}{run.describe()}"
        )
    trained, module = run.wrap(layer)
    settings = {k: getattr(args, k) for k in _RUN_SETTINGS}
    settings["data"] = None if args.data is None else os.fspath(Path(args.data).resolve())
    fingerprint = _fingerprint(job.summary)
    extra = {"settings": settings, "data_fingerprint": fingerprint}
    every = (args.checkpoint_every, args.checkpoint_every_s)
    if run.world == 1:
        state_path = out_dir / STATE_NAME
        checkpoint = Checkpointer(
            os.fspath(state_path), *every, extra=extra, saved_step=state and state["step"]
        )
    else:
        state_path = out_dir / SHARDED_STATE_NAME
        layout = {"world": run.world, "latent_shards": run.shards}
        if state is not None:
            if state.get("layout") != layout:
                return _error(
                    f"--resume {os.fspath(out_dir)}: the run was on {state.get('layout')} (world size, latent "
                    f"shards); this one is on {layout}: resume with the run's layout"
                )
            problem = None
            try:
                state = load_sharded_state(os.fspath(state_path), trained)
            except (FileNotFoundError, ValueError) as exc:
                problem = f"--resume {os.fspath(out_dir)}: {exc}"
            if run.agree([int(problem is not None)])[0]:  # every rank stops
                # A rank's own part failing its checksums is named by that rank; DCP's read errors reach
                # every rank alike and are named once.
                return _error(problem, every_rank="rank " in problem) if problem else 2
        checkpoint = ShardedCheckpointer(
            os.fspath(state_path), *every, extra=extra, saved_step=state and state["step"], layout=layout,
            agree=run.agree,
        )  # fmt: skip
    if state is not None and state["extra"].get("data_fingerprint") != fingerprint:
        return _error(
            f"--resume {os.fspath(out_dir)}: the data differ from the interrupted run's (their rows' CRC-32, "
            "which covers every value and the rows' order)"
        )
    log = _MetricsLog(out_dir / METRICS_NAME, total_steps, x.shape[1], bs * run.replicas)
    log.start(0 if state is None else state["step"], enabled=run.rank == 0)
    if args.wandb and run.rank == 0:
        log.wandb = _start_wandb(args.wandb, settings, out_dir, state and state["step"])
        if isinstance(log.wandb, int):
            return log.wandb
    started = time.perf_counter()
    with _StopOnSignal(escalate=run.world == 1) as stop:
        try:
            history = train_spade(
                trained, part, batch_size=bs, lr=args.lr, lr_final=args.lr_final, clip=args.clip,
                epochs=args.epochs, seed=args.seed, progress=run.rank == 0, module=module,
                checkpoint=checkpoint, resume=state, should_stop=stop, on_step=log,
                agree=run.agree if run.world > 1 else None,
            )  # fmt: skip
        except Diverged as exc:
            return _diverged(exc, args, state, state_path, _resume_command(run, out_dir))
        except ValueError as exc:
            return _error(str(exc))
        except _faults() as exc:  # the state write (torch.save, DCP) fails its own way on a full disk
            if not _is_write_error(exc) or _is_comm_error(exc):
                raise
            return _write_failed(
                f"writing {os.fspath(state_path)}", exc, checkpoint.saved_step, total_steps, state_path,
                _resume_command(run, out_dir),
            )  # fmt: skip
    if history.stopped_at is not None:
        import signal

        signum = history.stopped_by  # agreed by every rank: the signal some rank received
        where = f"the state of step {history.stopped_at}/{total_steps} is in {os.fspath(state_path)}"
        if run.rank == 0:
            print(
                f"\n{PROG}: stopped by {signal.Signals(signum).name}; {where}; resume with: "
                f"{_resume_command(run, out_dir)}",
                file=sys.stderr,
            )
        log.finish({"stopped_at": history.stopped_at}, exit_code=128 + signum)
        return 128 + signum
    seconds = time.perf_counter() - started
    layer = run.finish(trained)
    if layer is None:  # ranks other than 0: the checkpoint and the report are rank 0's
        return 0
    final = evaluate(layer, x)
    concepts = concept_metrics(layer, x, dataset.labels, dataset.n_concepts) if dataset is not None else None
    # The checkpoint takes raw activations: the training scale is folded into the weights.
    try:
        layer.fold_input_scale(factor)
    except ValueError as exc:
        return _error(f"the trained layer cannot take raw activations: {exc}")
    saved = checkpoint.saved_step
    info = {
        "data": args.dataset or str(args.data), "seed": args.seed, "n_samples": x.shape[0],
        "scale_factor": factor, "steps": len(history), **final,
    }  # fmt: skip
    try:
        layer.save_pretrained(out_dir)
        (out_dir / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    except Exception as exc:
        if not _is_write_error(exc):
            raise
        return _write_failed(
            f"saving the weights to {os.fspath(out_dir)}", exc, saved, total_steps, state_path,
            _resume_command(run, out_dir),
        )  # fmt: skip
    # The run is complete: its checkpoint is the save_pretrained layout.
    if state_path.is_dir():
        import shutil

        shutil.rmtree(state_path, ignore_errors=True)
    elif state_path.exists():
        state_path.unlink()
    from .evaluation import training_curves

    try:
        curves = training_curves(log.rows(), os.fspath(out_dir / CURVES_NAME))
    except OSError as exc:
        curves = False
        _warn(f"writing {os.fspath(out_dir / CURVES_NAME)} failed ({exc.strerror or exc})")
    if concepts is not None:
        _print_concepts(dataset, concepts)
    done = len(history) - (0 if state is None else state["step"])
    rate = done * bs * run.replicas / max(seconds, 1e-9)
    print(f"trained {done} steps in {seconds:.1f} s ({rate:,.0f} samples/s)")
    print(
        f"final, on the training scale (data × {factor:.4g}, so E‖x‖² = d): loss {final['loss']:.4g}  "
        f"mse {final['mse']:.4g}  L0 {final['l0']:.2f}  λ {final['lam']:.4g}"
    )
    print(
        f"on raw activations (the scale the checkpoint takes, what eval reports): mse {final['mse'] / factor**2:.4g}  "
        f"λ {layer.lam.item():.4g}"
    )
    print(f"saved to {os.fspath(out_dir)}")
    log.finish(info)
    if curves:
        print(
            f"training curves: {os.fspath(out_dir / CURVES_NAME)} (log: {os.fspath(out_dir / METRICS_NAME)})"
        )
    return 0


def _is_write_error(exc: BaseException) -> bool:
    """An error of writing a file: an OSError, or torch's/safetensors' wrappers of one."""
    from spade_kernels.files import exception_chain

    return any(isinstance(e, OSError) or type(e).__name__ == "SafetensorError" for e in exception_chain(exc))


class _Distributed:
    """The process layout of a ``train`` run: one process, or ``torchrun`` ranks (data × latent shards)."""

    def __init__(
        self, rank=0, world=1, shards=1, data_group=None, latent_group=None, peers=None, device=None
    ):
        self.rank, self.world, self.shards = rank, world, shards
        self.replicas = world // shards
        self.data_group, self.latent_group = data_group, latent_group
        #: (host, PID) of every rank, gathered at start: what names a lost rank.
        self.peers = peers or []
        self.device = device

    @classmethod
    def start(cls, args, device: torch.device) -> _Distributed:
        import torch

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            if args.latent_shards != 1:
                raise ValueError(
                    "--latent-shards needs several processes: run under torchrun --nproc-per-node N"
                )
            return cls()
        if world % args.latent_shards:
            raise ValueError(f"--latent-shards {args.latent_shards} must divide WORLD_SIZE={world}")
        import socket

        from spade_kernels import distributed

        rank = int(os.environ.get("RANK", "0"))
        if device.type == "cuda":
            local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= count:
                raise ValueError(
                    f"rank {rank}: its local rank {local} has no GPU of its own (this machine has {count}); run "
                    f"at most {count} processes per machine, or --device cpu"
                )
            torch.cuda.set_device(local)
        timeout = args.dist_timeout_s or distributed.DEFAULT_TIMEOUT_S
        try:
            # NCCL for CUDA tensors, gloo for CPU ones (whatever the machine has).
            distributed.init("nccl" if device.type == "cuda" else "gloo", timeout_s=timeout)
            peers = [None] * world
            torch.distributed.all_gather_object(peers, (socket.gethostname(), os.getpid()))
            data_group, latent_group = distributed.mesh_groups(
                world // args.latent_shards, args.latent_shards, device.type
            )
        except _faults() as exc:
            if not _is_comm_error(exc):
                raise
            raise ValueError(
                f"rank {rank}: the {world} processes did not meet within {timeout:g} s (--dist-timeout-s): a "
                f"rank did not start or cannot reach the others ({_comm_reason(exc)})"
            ) from None
        return cls(
            torch.distributed.get_rank(), world, args.latent_shards, data_group, latent_group, peers, device
        )

    def describe(self) -> str:
        if self.world == 1:
            return ""
        return f" on {self.world} processes: {self.replicas} data replica(s) × {self.shards} latent shard(s)"

    def agree(self, flags: list[int]) -> list[int]:
        """Every rank's ``flags`` combined (element-wise maximum); the flags themselves in one process."""
        import torch

        if self.world == 1:
            return flags
        t = torch.tensor(
            flags, dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu"
        )
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.tolist()

    def lost(self, wait_s: float = 2.0) -> str:
        """Which rank was lost, as far as this host can tell: ranks on it whose process ended or stopped.

        A peer's socket closes while its process is still exiting: its state
        is polled for up to ``wait_s`` seconds before none is named.
        """
        import socket

        host = socket.gethostname()
        deadline = time.monotonic() + wait_s
        while True:
            found = []
            for r, (h, pid) in enumerate(self.peers):
                if r == self.rank or h != host:
                    continue
                state = _process_state(pid)
                if state != "running":
                    found.append(f"rank {r} (PID {pid}, {state})")
            if found or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if found:
            return ", ".join(found)
        elsewhere = sorted({h for h, _ in self.peers} - {host})
        return "another rank (none on this host ended or stopped" + (
            f"; the others run on {', '.join(elsewhere)})" if elsewhere else "; one may have stalled)"
        )

    def part(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of the data: its replica's rows (every rank of a latent group the same)."""
        import torch

        if self.world == 1:
            return x
        # Rows r, r + R, … of the whole data, the last N mod R dropped: every replica the same number
        # of rows, so the same number of steps (DDP's collectives and the lr schedule agree).
        if not isinstance(x, torch.Tensor):
            return x.part(self.rank // self.shards, self.replicas)
        used = x.shape[0] - x.shape[0] % self.replicas
        if used == 0:
            raise ValueError(f"{x.shape[0]} samples cannot be split over {self.replicas} data replicas")
        return x[:used][self.rank // self.shards :: self.replicas]

    def wrap(self, layer):
        """(the layer to train, the module to run): sharded and/or data parallel under torchrun."""
        import torch

        if self.world == 1:
            return layer, None
        from spade_kernels import distributed

        trained = distributed.ShardedSpaDE.from_dense(layer, self.latent_group) if self.shards > 1 else layer
        module = (
            torch.nn.parallel.DistributedDataParallel(trained, process_group=self.data_group)
            if self.replicas > 1
            else None
        )
        return trained, module

    def finish(self, trained):
        """The trained layer, whole, on rank 0 (None elsewhere); ends the process group."""
        if self.world == 1:
            return trained
        layer = trained.to_dense() if self.shards > 1 else trained
        self.end()
        return layer if self.rank == 0 else None

    def end(self) -> None:
        """Every rank done, then the process group torn down (a group left to the interpreter's exit aborts in gloo)."""
        import torch

        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _process_state(pid: int) -> str:
    """ "running", "exited" or "stopped" for a PID on this host (Linux's /proc; a signal 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "exited"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "exited"
        return "running"
    return {"Z": "exited", "X": "exited", "T": "stopped", "t": "stopped"}.get(state, "running")


def _is_comm_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective or rendezvous that failed (a lost peer, a timeout)."""
    import torch

    from spade_kernels.files import exception_chain

    dist_error = getattr(torch.distributed, "DistError", ())
    signs = ("gloo", "NCCL", "Connection", "connection", "Timed out", "timed out", "Socket", "peer")
    return any(
        (dist_error and isinstance(e, dist_error))
        or (isinstance(e, RuntimeError) and any(x in str(e) for x in signs))
        for e in exception_chain(exc)
    )


def _comm_reason(exc: BaseException) -> str:
    """A communication error in a few words (gloo's messages start with a source location)."""
    import re

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ", 1)[0].rstrip(".")[:200]


def _print_concepts(dataset, metrics: dict[str, torch.Tensor]) -> None:
    with_dim = dataset.name == "heterogeneity"

    def row(concept: str, samples: str, dim: str, f1: str, l0: str) -> str:
        return f"{concept:>7} {samples:>8}" + (f" {dim:>4}" if with_dim else "") + f" {f1:>9} {l0:>8}"

    print(row("concept", "samples", "dim", "top-5 F1", "mean L0"))
    for c in range(dataset.n_concepts):
        f1, l0 = metrics["top_f1"][c].item(), metrics["mean_l0"][c].item()
        count, dim = int(metrics["count"][c]), int(dataset.intrinsic_dim[c])
        print(row(str(c), str(count), str(dim), f"{f1:.3f}", f"{l0:.2f}"))
    f1, l0 = metrics["top_f1"].mean().item(), metrics["mean_l0"].mean().item()
    print(row("mean", "", "", f"{f1:.3f}", f"{l0:.2f}"))


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """``train --nproc-per-node N``: the N ranks under torch's elastic launcher (torchrun's), on this machine.

    Each rank runs ``python -m spade_kernels train`` with the other flags
    and prints its own line on a fault; the launcher's logging and its
    ``ChildFailedError``/``SignalException`` reports are replaced by at most
    one line naming the ranks that failed and how.
    """
    import logging
    import signal
    import socket
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.Logger.manager.loggerDict):  # its own reports are replaced by ours
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N ranks share the cores
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=args.nproc_per_node, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0, monitor_interval=0.1,
    )  # fmt: skip
    # The ranks see WORLD_SIZE and ignore --nproc-per-node.
    try:
        elastic_launch(config, sys.executable)("-m", "spade_kernels", *argv)
    except SignalException as exc:  # the ranks were stopped by it and said so
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in sorted(exc.failures.items())}
        handled = {2, 130, 143}
        if all(code in handled for code in codes.values()):
            return max(codes.values())  # each rank printed its own line
        reported = [code for code in codes.values() if code in handled]
        if reported and all(code in handled or code == -signal.SIGTERM for code in codes.values()):
            # A rank that stopped on a signal exits only after every rank agreed on the stop and the state
            # was written, and a rank that refused its input (2) said why in its line; the launcher then
            # tears the slower ranks down with SIGTERM (their handlers are gone by then). The run was
            # stopped (rank 0 printed where its state is) or refused, not failed.
            return max(reported)
        how = [
            f"rank {rank} "
            + (f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}")
            for rank, code in codes.items()
        ]
        _error(f"the run on {args.nproc_per_node} processes failed: {', '.join(how)}")
        return 1
    return 0


class ConfigError(ValueError):
    """A ``--config`` file that cannot be read, or a setting in it that ``train`` does not take."""


#: The flags of one source of the data: given on the command line, they replace the config's source.
_SOURCE_FLAGS = ("dataset", "data", "resume")


def _read_config(path: Path) -> dict:
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"--config {os.fspath(path)}: expected a .toml or .json file")
    try:
        if path.suffix == ".json":
            with open(path) as f:
                table = json.load(f)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise ConfigError(
                        f"--config {os.fspath(path)}: TOML needs Python 3.11 or the tomli package; or use JSON"
                    ) from None
            with open(path, "rb") as f:
                table = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config {os.fspath(path)}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # json.JSONDecodeError, tomllib.TOMLDecodeError
        raise ConfigError(
            f"--config {os.fspath(path)}: not valid {path.suffix[1:].upper()} ({exc})"
        ) from None
    if not isinstance(table, dict):
        raise ConfigError(
            f"--config {os.fspath(path)}: must hold a table of settings, got {type(table).__name__}"
        )
    return table


def _config_flags(path: Path, train: argparse.ArgumentParser) -> dict[str, str]:
    """``{dest: value as the command line would give it}`` for each setting of a ``--config`` file, checked.

    Keys are the flags' names without ``--`` (``lr_final`` or ``lr-final``);
    each value is converted and checked as its flag's would be, and an error
    names the file and the key.
    """
    actions = {a.dest: a for a in train._actions if a.dest not in ("help", "config") and a.option_strings}
    out = {}
    for key, value in _read_config(path).items():
        dest = str(key).replace("-", "_")
        where = f"--config {os.fspath(path)}: {key}"
        if dest not in actions:
            allowed = ", ".join(sorted(actions))
            raise ConfigError(f"{where}: train has no such flag (its settings: {allowed})")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number or a string")
        action, text = actions[dest], str(value)
        try:
            converted = action.type(text) if action.type is not None else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where} = {value!r}: {exc}") from None
        if action.choices is not None and converted not in action.choices:
            raise ConfigError(f"{where} = {value!r}: expected one of {sorted(action.choices)}")
        out[dest] = text
    return out


def _with_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``train`` arguments with a ``--config`` file's settings in front, so the command line's override them."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=Path)
    known, rest = pre.parse_known_args(argv[1:])
    if known.config is None:
        return argv
    train = parser._subparsers._group_actions[0].choices["train"]
    settings = _config_flags(known.config, train)
    given = {a.dest for a in train._actions for flag in rest if flag.split("=")[0] in a.option_strings}
    if given & set(_SOURCE_FLAGS):  # one source of data: the command line's
        settings = {k: v for k, v in settings.items() if k not in _SOURCE_FLAGS}
    front = [arg for dest, value in settings.items() for arg in (_flag(dest), value)]
    return ["train", *front, *rest]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``spade-kernels`` / ``python -m spade_kernels``; returns the exit code.

    Ctrl-C at any moment (outside a training loop, which stops after its
    step and writes its state) ends the command with one line and exit 130.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = _build_parser(bench_arguments=argv[:1] == ["bench"])
        try:
            expanded = _with_config(parser, argv) if argv[:1] == ["train"] else argv
        except ConfigError as exc:
            return _error(str(exc))
        args = parser.parse_args(expanded)
        if args.command == "info":
            return _info()
        if args.command == "bench":
            from spade_kernels.bench import run_from_args

            return run_from_args(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "cache":
            return _cache(args)
        if args.nproc_per_node and args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
            return _launch(args, argv)
        return _train(args)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted (Ctrl-C); files already written are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m spade_kernels.sae.cli (or the former path spade_kernels.cli)
    raise SystemExit(main())
