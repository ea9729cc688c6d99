"""The ``spade-kernels`` command: environment report and a small SpaDE trainer.

::

    spade-kernels info
    spade-kernels train --dataset separability
    spade-kernels train --data activations.pt --d-sae 16384 --out runs/my-sae
    spade-kernels bench --quick --out bench-results
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
from importlib import metadata
from pathlib import Path

import torch

from . import __version__
from .backends import BACKENDS, auto_backend, backend_status, resolve_backend

__all__ = ["main"]

PROG = "spade-kernels"
INFO_NAME = "train_info.json"

#: Defaults that depend on the data: (n_samples, d_sae, batch_size).  d_sae of
#: a file is 4·d; the synthetic sizes keep the separability run to seconds on
#: a laptop CPU while giving the cosine schedule ~500 steps.
_SYNTHETIC_DEFAULTS = {"separability": (65536, 128, 128), "heterogeneity": (131072, 512, 256)}
_FILE_BATCH_SIZE = 4096


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
#: Settings that describe the run (saved in the state; --resume takes them from there).
_RUN_SETTINGS = (
    "dataset", "data", "d_sae", "batch_size", "epochs", "lr", "lr_final", "clip", "gamma_reg", "lambda_init",
    "init", "backend", "device", "seed", "n_samples", "checkpoint_every", "checkpoint_every_s",
)  # fmt: skip

#: Fewer optimizer steps than this and ``train`` warns (a SpaDE needs hundreds of steps to fit).
FEW_STEPS = 200


def _build_parser() -> argparse.ArgumentParser:
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
        help="continue the interrupted run whose --out was DIR, with its saved settings",
    )
    train.add_argument(
        "--d-sae",
        type=_positive(int),
        help="latents K (default 128 separability, 512 heterogeneity, 4·d files)",
    )
    train.add_argument(
        "--batch-size", type=_positive(int), help="default 128 separability, 256 heterogeneity, 4096 files"
    )
    train.add_argument("--epochs", type=_positive(int), default=1, help="passes over the data (default 1)")
    train.add_argument("--lr", type=_positive(float), default=1e-2, help="initial Adam lr (default 1e-2)")
    train.add_argument(
        "--lr-final", type=_positive(float), default=1e-4, help="lr at the last step (default 1e-4)"
    )
    train.add_argument("--clip", type=_positive(float), default=1.0, help="max gradient norm (default 1.0)")
    train.add_argument(
        "--gamma-reg", type=_non_negative_float, default=0.1, help="regulariser weight γ (default 0.1)"
    )
    train.add_argument("--lambda-init", type=_positive(float), help="initial λ (default 1/(2d))")
    train.add_argument(
        "--init",
        choices=("paper", "data"),
        default="paper",
        help="paper: prototypes ~ N(0, 1); data: random training samples (default paper)",
    )
    train.add_argument("--backend", choices=("auto", *BACKENDS), default="auto", help="encoder backend")
    train.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    train.add_argument("--seed", type=int, default=0, help="seed for data, init and shuffling (default 0)")
    train.add_argument(
        "--threads",
        type=_positive(int),
        help="CPU threads for torch (default: torch's; one is fastest when other work shares the CPU)",
    )
    train.add_argument("--n-samples", type=_positive(int), help="synthetic set size (default 65536 / 131072)")
    train.add_argument(
        "--out", type=Path, help="checkpoint directory (default runs/spade-<dataset or file stem>)"
    )
    train.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=1000,
        help=f"steps between resumable states in --out/{STATE_NAME} (default 1000; 0: off)",
    )
    train.add_argument(
        "--checkpoint-every-s",
        type=_non_negative_float,
        default=600.0,
        help="seconds between resumable states as well (default 600; 0: off); SIGINT/SIGTERM always write one",
    )
    train.add_argument(
        "--latent-shards",
        type=_positive(int),
        default=1,
        help="under torchrun: split the latents over groups of this many ranks (data parallel over "
        "WORLD_SIZE / this many groups); default 1 (plain data parallel when WORLD_SIZE > 1)",
    )
    bench = sub.add_parser(
        "bench",
        help="benchmark backends against the floor (torch.mm) and the paper-style baseline",
        description="Time encode / layer forward / training step per backend, dtype and shape; "
        "report median and spread, TFLOP/s, extra peak memory, speedup and ratio to the floor.",
    )
    from .bench import add_arguments

    add_arguments(bench)
    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on activations: FVU, L0, dead latents, firing frequencies (JSON + PNG)",
        description="Evaluate a save_pretrained checkpoint on raw activations (the scale it takes).",
    )
    ev.add_argument("checkpoint", type=Path, help="checkpoint directory (or its cfg.json)")
    ev.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="PATH",
        help="activation file, shape (..., d), or a directory of them (shards read one at a time)",
    )
    ev.add_argument("--out", type=Path, help="JSON report (default CHECKPOINT/eval.json; the PNG beside it)")
    ev.add_argument("--batch-size", type=_positive(int), default=4096, help="rows per batch (default 4096)")
    ev.add_argument("--backend", choices=("auto", *BACKENDS), default="auto", help="encoder backend")
    ev.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    return parser


def _eval(args: argparse.Namespace) -> int:
    from .data import open_activations
    from .evaluation import evaluate_checkpoint, plot_evaluation
    from .layer import SpaDE

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available")
        layer = SpaDE.from_pretrained(args.checkpoint, device=device, backend=args.backend)
        x = open_activations(args.data)
        if x.shape[1] != layer.d_in:
            raise ValueError(f"{args.data} has d = {x.shape[1]} but the checkpoint takes d_in = {layer.d_in}")
        metrics = evaluate_checkpoint(layer, x, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        return _error(str(exc))
    folder = args.checkpoint.parent if args.checkpoint.name == "cfg.json" else args.checkpoint
    out = args.out or folder / "eval.json"
    metrics["checkpoint"], metrics["data"] = os.fspath(args.checkpoint), os.fspath(args.data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1) + "\n")
    png = out.with_suffix(".png")
    drawn = plot_evaluation(metrics, os.fspath(png))
    print(
        f"FVU {metrics['fvu']:.4g}  MSE {metrics['mse']:.4g}  L0 {metrics['l0_mean']:.2f}  "
        f"dead {metrics['dead_latents']}/{metrics['d_sae']}  λ {metrics['lambda']:.4g}"
    )
    print(f"wrote {os.fspath(out)}" + (f" and {os.fspath(png)}" if drawn else ""))
    return 0


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _extension_summary() -> str:
    from . import _ext

    if not _ext.available():
        return f"not loaded ({_ext.reason})"
    if _ext.cuda_kernels():
        return "spade_kernels._C: CPU ops + CUDA kernels (spade_kernels._C_cuda)"
    return f"spade_kernels._C: CPU ops only (the native backend runs on CPU tensors; no CUDA kernels: {_ext.cuda_reason})"


def _info() -> int:
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
        ("extension", _extension_summary()),
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


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot hold the checkpoint (None if it can): checked before the first step."""
    import tempfile

    if path.exists() and not path.is_dir():
        return "exists and is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        return f"not writable ({exc.strerror or exc})"
    return None


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _resumed_args(args: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """The settings of the run in ``args.resume`` (its own), with its state; ValueError if there is none."""
    from .train import load_train_state

    state = load_train_state(os.fspath(args.resume / STATE_NAME))
    saved = state["extra"].get("settings", {})
    missing = [k for k in _RUN_SETTINGS if k not in saved]
    if missing:
        raise ValueError(f"{args.resume / STATE_NAME} lacks the settings {missing}")
    run = argparse.Namespace(**vars(args))
    for key in _RUN_SETTINGS:
        setattr(run, key, saved[key])
    run.data = Path(saved["data"]) if saved["data"] is not None else None
    run.out = args.resume
    return run, state


METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "training_curves.png"


class _MetricsLog:
    """One JSON line per logged step in --out/metrics.jsonl: step, loss, MSE, normalised MSE, L0, λ, lr, throughput.

    About 500 lines per run (and the last step).  The data are scaled to
    E‖x‖² = d, so the normalised MSE is MSE/d.  A resumed run first drops
    the lines past its state's step (what a killed run logged after its last
    checkpoint), so the log reads as one run.
    """

    def __init__(self, path: Path, total: int, d: int, batch_size: int) -> None:
        self.path, self.total, self.d, self.batch = path, total, d, batch_size
        self.every = max(1, total // 500)
        self.enabled = False

    def start(self, step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        kept = [r for r in self.rows() if r["step"] <= step] if step > 0 else []
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.t0, self.step0 = time.perf_counter(), step

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
        if not self.enabled or (step % self.every and step != self.total):
            return
        rate = (step - self.step0) * self.batch / max(time.perf_counter() - self.t0, 1e-9)
        row = {
            "step": step, "loss": history.loss[-1], "mse": history.mse[-1], "nmse": history.mse[-1] / self.d,
            "l0": history.l0[-1], "lam": history.lam[-1], "lr": history.lr[-1], "samples_per_s": rate,
        }  # fmt: skip
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class _StopOnSignal:
    """SIGINT/SIGTERM set a flag that the training loop reads after its current step."""

    def __init__(self) -> None:
        self.signum = None
        self.previous = {}

    def __enter__(self):
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _fingerprint(x) -> list:
    if not isinstance(x, torch.Tensor):  # shards: their files' names, sizes and rows
        return x.fingerprint()
    return [
        list(x.shape),
        float(x.double().sum()),
        float(x[:: max(1, x.shape[0] // 64)].double().abs().sum()),
    ]


def _train(args: argparse.Namespace) -> int:
    from .data import (
        ActivationShards,
        make_heterogeneity,
        make_separability,
        open_activations,
        scale_to_unit_norm,
    )
    from .layer import SpaDE
    from .train import Checkpointer, concept_metrics, evaluate, train_spade

    state = None
    if args.resume is not None:
        try:
            args, state = _resumed_args(args)
        except (FileNotFoundError, ValueError) as exc:
            return _error(f"--resume {os.fspath(args.resume)}: {exc}")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dataset = None
    if args.dataset is not None:
        n_samples, d_sae, batch_size = _SYNTHETIC_DEFAULTS[args.dataset]
        make = make_separability if args.dataset == "separability" else make_heterogeneity
        try:
            dataset = make(args.n_samples or n_samples, seed=args.seed)
        except ValueError as exc:
            return _error(f"--n-samples {args.n_samples}: {exc}")
        x, name = dataset.x, args.dataset
    else:
        try:
            x = open_activations(args.data)
        except (FileNotFoundError, ValueError) as exc:
            return _error(str(exc))
        d_sae, batch_size, name = 4 * x.shape[1], _FILE_BATCH_SIZE, args.data.stem
    try:
        x, factor = scale_to_unit_norm(
            x, name=os.fspath(args.data) if args.data is not None else args.dataset
        )
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as exc:
            raise ValueError(f"--device {args.device}: not a torch device ({exc})") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"--device {args.device}: SpaDE trains on cpu or cuda devices, not {device.type}"
            )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available (torch {torch.__version__})")
        resolve_backend(args.backend, device)
        # Initialise on the CPU from a private RNG state, so the run depends only on --seed
        # (and is the same on every device); the backend is attached once the layer is there.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            layer = SpaDE(
                x.shape[1], args.d_sae or d_sae, lambda_init=args.lambda_init, gamma_reg=args.gamma_reg
            )
            if args.init == "data":
                gen = torch.Generator().manual_seed(args.seed)
                if isinstance(x, ActivationShards):  # a sample of rows, not the whole data in memory
                    layer.init_from_data(x.sample(layer.d_sae, gen), generator=gen)
                else:
                    layer.init_from_data(x, generator=gen)
    except (RuntimeError, ValueError) as exc:
        return _error(str(exc))
    layer.to(device)
    layer.backend = args.backend
    out_dir = args.out or Path("runs") / f"spade-{name}"
    problem = _unwritable(out_dir)
    if problem is not None:
        return _error(f"--out {os.fspath(out_dir)}: {problem}")
    try:
        run = _Distributed.start(args, device)
        part = run.part(x)  # this rank's rows (all of them in one process)
    except ValueError as exc:
        return _error(str(exc))
    bs = args.batch_size or batch_size
    total_steps = args.epochs * math.ceil(part.shape[0] / bs)
    if total_steps < FEW_STEPS and run.rank == 0:
        per = f"{part.shape[0]} samples" + (" per data replica" if run.replicas > 1 else "")
        print(
            f"{PROG}: warning: only {total_steps} optimizer steps ({per}, batch {bs}, "
            f"{args.epochs} epoch(s)); a SpaDE needs a few hundred to fit: raise --epochs or lower --batch-size",
            file=sys.stderr,
        )
    if run.rank == 0:
        print(
            f"training SpaDE d_in={layer.d_in} d_sae={layer.d_sae} (backend {args.backend}, {device}) "
            f"on {x.shape[0]} samples of {name}, scaled by {factor:.4g}{run.describe()}"
        )
    trained, module = run.wrap(layer)
    checkpoint = None
    state_path = out_dir / STATE_NAME
    if run.world == 1:  # (under torchrun the run is not checkpointed yet: the shards' states differ)
        settings = {k: getattr(args, k) for k in _RUN_SETTINGS}
        settings["data"] = None if args.data is None else os.fspath(Path(args.data).resolve())
        checkpoint = Checkpointer(
            os.fspath(state_path), args.checkpoint_every, args.checkpoint_every_s,
            extra={"settings": settings, "data_fingerprint": _fingerprint(x)},
        )  # fmt: skip
    if state is not None and state["extra"].get("data_fingerprint") != _fingerprint(x):
        return _error(f"--resume {os.fspath(out_dir)}: the data differ from the interrupted run's")
    log = _MetricsLog(out_dir / METRICS_NAME, total_steps, x.shape[1], bs * run.replicas)
    log.start(0 if state is None else state["step"], enabled=run.rank == 0)
    started = time.perf_counter()
    with _StopOnSignal() if run.world == 1 else contextlib.nullcontext() as stop:
        try:
            history = train_spade(
                trained,
                part,
                batch_size=bs,
                lr=args.lr,
                lr_final=args.lr_final,
                clip=args.clip,
                epochs=args.epochs,
                seed=args.seed,
                progress=run.rank == 0,
                module=module,
                checkpoint=checkpoint,
                resume=state,
                should_stop=stop if run.world == 1 else None,
                on_step=log,
            )
        except ValueError as exc:
            return _error(str(exc))
    if history.stopped_at is not None:
        import signal

        where = f"the state of step {history.stopped_at}/{total_steps} is in {os.fspath(state_path)}"
        print(
            f"\n{PROG}: stopped by {signal.Signals(stop.signum).name}; {where}; resume with: "
            f"{PROG} train --resume {os.fspath(out_dir)}",
            file=sys.stderr,
        )
        return 128 + stop.signum
    seconds = time.perf_counter() - started
    layer = run.finish(trained)
    if layer is None:  # ranks other than 0: the checkpoint and the report are rank 0's
        return 0
    final = evaluate(layer, x)
    concepts = concept_metrics(layer, x, dataset.labels, dataset.n_concepts) if dataset is not None else None
    # The checkpoint takes raw activations: the training scale is folded into the weights.
    layer.fold_input_scale(factor)
    layer.save_pretrained(out_dir)
    info = {
        "data": args.dataset or str(args.data),
        "seed": args.seed,
        "n_samples": x.shape[0],
        "scale_factor": factor,
        "steps": len(history),
        **final,
    }
    (out_dir / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    if state_path.exists():  # the run is complete: its checkpoint is the save_pretrained layout
        state_path.unlink()
    from .evaluation import training_curves

    curves = training_curves(log.rows(), os.fspath(out_dir / CURVES_NAME))
    if concepts is not None:
        _print_concepts(dataset, concepts)
    done = len(history) - (0 if state is None else state["step"])
    rate = done * bs * run.replicas / max(seconds, 1e-9)
    print(f"trained {done} steps in {seconds:.1f} s ({rate:,.0f} samples/s)")
    print(
        f"final over all samples: loss {final['loss']:.4g}  mse {final['mse']:.4g}  "
        f"L0 {final['l0']:.2f}  λ {final['lam']:.4g}"
    )
    print(f"saved to {os.fspath(out_dir)}")
    if curves:
        print(
            f"training curves: {os.fspath(out_dir / CURVES_NAME)} (log: {os.fspath(out_dir / METRICS_NAME)})"
        )
    return 0


class _Distributed:
    """The process layout of a ``train`` run: one process, or ``torchrun`` ranks (data × latent shards)."""

    def __init__(self, rank=0, world=1, shards=1, data_group=None, latent_group=None):
        self.rank, self.world, self.shards = rank, world, shards
        self.replicas = world // shards
        self.data_group, self.latent_group = data_group, latent_group

    @classmethod
    def start(cls, args, device: torch.device) -> _Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            if args.latent_shards != 1:
                raise ValueError(
                    "--latent-shards needs several processes: run under torchrun --nproc-per-node N"
                )
            return cls()
        if world % args.latent_shards:
            raise ValueError(f"--latent-shards {args.latent_shards} must divide WORLD_SIZE={world}")
        from . import distributed

        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        distributed.init()
        data_group, latent_group = distributed.mesh_groups(
            world // args.latent_shards, args.latent_shards, device.type
        )
        return cls(torch.distributed.get_rank(), world, args.latent_shards, data_group, latent_group)

    def describe(self) -> str:
        if self.world == 1:
            return ""
        return f" on {self.world} processes: {self.replicas} data replica(s) × {self.shards} latent shard(s)"

    def part(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of the data: its replica's rows (every rank of a latent group the same)."""
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
        if self.world == 1:
            return layer, None
        from . import distributed

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
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return layer if self.rank == 0 else None


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``spade-kernels`` / ``python -m spade_kernels``; returns the exit code."""
    args = _build_parser().parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "bench":
        from .bench import run_from_args

        return run_from_args(args)
    if args.command == "eval":
        return _eval(args)
    return _train(args)
