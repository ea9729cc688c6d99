"""A minimal SpaDE trainer (the paper's recipe) and metrics for the synthetic sets.

Recipe (docs/design.md, "Mathematics"): Adam with lr 1e-2 decayed per step by a cosine to 1e-4,
gradient-norm clipping at 1.0, shuffled mini-batches, one pass over data that
was scaled so that E‖x‖² = d (:func:`spade_kernels.sae.data.scale_to_unit_norm`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TextIO

import torch

from spade_kernels import RangeError, SparseCodes
from spade_kernels.layer import SpaDE

from .data import ActivationShards, check_rows, row_blocks

__all__ = [
    "Checkpointer",
    "Diverged",
    "ShardedCheckpointer",
    "TrainHistory",
    "concept_metrics",
    "cosine_lr",
    "evaluate",
    "load_sharded_state",
    "load_train_state",
    "lr_schedule",
    "train_spade",
]

#: Seconds between redraws of the TTY progress line (redrawing every step of a
#: millisecond-sized step would cost more than the step).
_REDRAW_S = 0.1


@dataclass
class TrainHistory:
    """Per-step training record; all lists have one entry per optimiser step."""

    loss: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    lam: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    #: The step after which ``should_stop`` ended the run early (None: it ran to the end).
    stopped_at: int | None = None
    #: What ``should_stop`` returned then (agreed by every rank; the command line's signal number).
    stopped_by: int | None = None

    def __len__(self) -> int:
        return len(self.loss)


#: Version of the training-state files :class:`Checkpointer` writes.
STATE_VERSION = 1


@dataclass
class Checkpointer:
    """Where and how often :func:`train_spade` writes a resumable training state.

    ``path``: the state file (written atomically; see :mod:`spade_kernels.files`),
    with a CRC-32 of every tensor's bytes that :func:`load_train_state` checks.
    A state is written every ``every_steps`` optimizer steps and whenever
    ``every_s`` seconds have passed since the last one (either None or 0:
    not by that rule), always when the run is stopped early or ends, and
    before a step that diverged.  ``extra`` is stored alongside (the command
    line's settings, a data fingerprint).  ``saved_step`` is the step of the
    last state written (None before the first).
    """

    path: str
    every_steps: int | None = 1000
    every_s: float | None = 600.0
    extra: dict = field(default_factory=dict)
    saved_step: int | None = None
    _last: float = field(default_factory=time.monotonic, repr=False)

    def due(self, step: int) -> bool:
        """A state is due after ``step`` by the step rule."""
        return bool(self.every_steps) and step % self.every_steps == 0

    def due_by_time(self) -> bool:
        """A state is due by the time rule (a per-process clock: several ranks agree on it first)."""
        return bool(self.every_s) and time.monotonic() - self._last >= self.every_s

    def save(self, state: dict) -> None:
        """Write ``state`` atomically (an ``OSError`` — e.g. a full disk — leaves the previous state intact)."""
        from spade_kernels.files import (
            CHECKSUM_KEY,
            atomic_write,
            checksums,
            remove_stale_temporaries,
            save_torch,
        )

        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        full = {**state, "extra": self.extra}
        full[CHECKSUM_KEY] = checksums(full)
        atomic_write(self.path, lambda tmp: save_torch(full, tmp))
        self._last = time.monotonic()
        self.saved_step = state["step"]


def load_train_state(path: str) -> dict:
    """Read a state written by :class:`Checkpointer`; a one-line ``ValueError`` naming the file otherwise.

    Every tensor's CRC-32 is checked against the one recorded when the state
    was written: a damaged file is refused, never resumed from.
    """
    from spade_kernels.files import CHECKSUM_KEY, one_line, verify_checksums

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file fails in the unpickler's own way
        raise ValueError(f"{path} is not a readable training state ({one_line(exc)})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} is not a version-{STATE_VERSION} training state of spade_kernels")
    expected = state.pop(CHECKSUM_KEY, None)
    if expected is None:  # written before states carried checksums: loaded, unverified
        import warnings

        warnings.warn(
            f"{path} carries no checksums (an earlier version wrote it): it is loaded unverified",
            stacklevel=2,
        )
    elif not isinstance(expected, dict):
        raise ValueError(f"{path} is damaged: its checksums are unreadable")
    else:
        verify_checksums(state, expected, path)
    return state


@dataclass
class ShardedCheckpointer(Checkpointer):
    """:class:`Checkpointer` for a run over several processes (``torch.distributed``): each rank writes its part.

    ``path`` is a folder.  Every rank writes its own state — its slice of a
    latent-sharded layer or its data replica's copy, its optimizer moments,
    its place in the data order — with a CRC-32 of every tensor, through
    ``torch.distributed.checkpoint`` into ``path/step-NNNNNNNNN`` (one file
    per rank); then rank 0 points ``path/LATEST`` (JSON: the step, the
    process layout, ``extra``) at that folder, atomically, and removes the
    older ones.  A save killed midway leaves ``LATEST`` at the previous
    complete state.  ``layout`` (world size, latent shards) must match on resume.
    """

    layout: dict = field(default_factory=dict)
    #: Combines every rank's flags (element-wise maximum): a failed LATEST write stops every rank.
    agree: Callable[[list[int]], list[int]] | None = None

    def save(self, state: dict) -> None:
        """Collective: every rank calls it at the same step; a failure raises on every rank."""
        import json
        import shutil

        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        from spade_kernels.files import CHECKSUM_KEY, atomic_write, checksums, remove_stale_temporaries

        rank = dist.get_rank()
        name = f"step-{state['step']:09d}"
        full = {**state, CHECKSUM_KEY: json.dumps(checksums(state))}
        step_dir = os.path.join(self.path, name)
        try:
            dcp.save({f"rank{rank}": full}, checkpoint_id=step_dir)
        except checkpoint_errors() as exc:  # DCP gathers every rank's failure and raises it on all
            raise _unwrapped(exc, f"writing {step_dir}") from _first_failure(exc)
        failed = None
        if rank == 0:  # dcp.save returned: every rank's part and the metadata are written
            latest = {
                "version": STATE_VERSION, "step": state["step"], "dir": name, "layout": self.layout,
                "extra": self.extra,
            }  # fmt: skip
            text = json.dumps(latest, indent=1)

            def write(tmp):
                with open(tmp, "w") as f:
                    f.write(text)

            try:
                atomic_write(os.path.join(self.path, LATEST_NAME), write)
            except OSError as exc:
                failed = exc
            else:
                remove_stale_temporaries(self.path)
                for entry in os.scandir(self.path):
                    if entry.is_dir() and entry.name.startswith("step-") and entry.name != name:
                        shutil.rmtree(entry.path, ignore_errors=True)
        if self.agree is not None and self.agree([int(failed is not None)])[0] and failed is None:
            raise OSError(f"rank 0 could not write {os.path.join(self.path, LATEST_NAME)}")
        if failed is not None:
            raise failed
        self._last = time.monotonic()
        self.saved_step = state["step"]


#: The file of a :class:`ShardedCheckpointer` folder that names its last complete state.
LATEST_NAME = "LATEST"


def checkpoint_errors() -> tuple:
    """torch.distributed.checkpoint's ``CheckpointException`` (a BaseException gathering every rank's
    failure) once that package is loaded, else nothing: only it raises one, and importing it costs
    ~0.5 s that a process which never writes a sharded checkpoint (``--help``, ``info``) should not pay.
    Called in ``except`` clauses, which evaluate it when an exception arrives."""
    api = sys.modules.get("torch.distributed.checkpoint.api")
    return (api.CheckpointException,) if api is not None else ()


def _first_failure(exc: BaseException) -> BaseException | None:
    """The first rank's exception inside a DCP ``CheckpointException`` (None for any other error)."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict):
        return None
    for value in failures.values():
        inner = value[0] if isinstance(value, tuple) else value
        if isinstance(inner, BaseException):
            return inner
    return None


def _unwrapped(exc: BaseException, what: str) -> Exception:
    """A DCP failure as an ordinary error (an ``OSError`` when a rank's write failed), naming ``what``."""
    from spade_kernels.files import one_line

    inner = _first_failure(exc)
    if isinstance(inner, OSError):
        return OSError(inner.errno, f"{what} failed: {inner.strerror or one_line(inner)}")
    return RuntimeError(f"{what} failed ({one_line(inner or exc)})")


def read_sharded_latest(folder: str) -> dict:
    """The ``LATEST`` record of a :class:`ShardedCheckpointer` folder; a one-line ``ValueError`` otherwise."""
    from spade_kernels.files import read_json

    path = os.path.join(folder, LATEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training state at {folder}")
    latest = read_json(path, "a readable training state")
    if not isinstance(latest, dict) or latest.get("version") != STATE_VERSION or "dir" not in latest:
        raise ValueError(f"{path} is not a version-{STATE_VERSION} training state of spade_kernels")
    return latest


def load_sharded_state(folder: str, layer: torch.nn.Module) -> dict:
    """This rank's state from a :class:`ShardedCheckpointer` folder, shaped like :func:`load_train_state`'s.

    Collective.  ``layer`` is what this rank trains (its shard); the state is
    read into tensors shaped like its parameters and an Adam state over them.
    Every tensor's CRC-32 is checked.
    """
    import json

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from spade_kernels.files import CHECKSUM_KEY, one_line, verify_checksums

    latest = read_sharded_latest(folder)
    rank = dist.get_rank()
    step_dir = os.path.join(folder, latest["dir"])
    template = {
        "version": 0, "step": 0, "total": 0, "n": 0, "epoch": 0, "start": 0,
        "epoch_gen_state": torch.Generator().get_state(),
        "layer": {k: torch.empty_like(v) for k, v in layer.state_dict().items()},
        "optimizer": _adam_template(layer), "history": asdict(TrainHistory()), CHECKSUM_KEY: "",
    }  # fmt: skip
    try:
        dcp.load({f"rank{rank}": template}, checkpoint_id=step_dir)
    except (Exception, *checkpoint_errors()) as exc:  # a missing or damaged part fails in DCP's own way
        inner = _first_failure(exc) or exc
        reason = "a part of it ends early: truncated" if isinstance(inner, EOFError) else one_line(inner)
        raise ValueError(f"{step_dir} is not a readable training state ({reason})") from None
    expected = template.pop(CHECKSUM_KEY)
    try:
        expected = {k: int(v) for k, v in json.loads(expected).items()}
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{step_dir}: rank {rank}'s part has no readable checksums") from None
    verify_checksums(template, expected, f"{step_dir} (rank {rank}'s part)")
    template["extra"] = latest.get("extra", {})
    return template


def _adam(layer: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam over ``layer``'s parameters, its fused implementation where torch has one for them.

    The fused kernel makes one pass over each parameter instead of the single-tensor path's seven
    (at K×d = 16384×768 on one CPU thread: 28 ms against 147 ms a step); it computes the same
    update up to rounding.  Where it is not available (a device or dtype torch has no fused
    kernel for) the plain implementation runs.
    """
    params = list(layer.parameters())
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


def _adam_template(layer: torch.nn.Module) -> dict:
    """An Adam state over ``layer``'s parameters with every entry present (Adam creates them at its first step).

    A step with zero gradients at lr 0 creates them and leaves the
    parameters as they are; the gradients are restored.
    """
    params = list(layer.parameters())
    grads = [p.grad for p in params]
    optimizer = torch.optim.Adam(params, lr=0.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, g in zip(params, grads):
        p.grad = g
    return optimizer.state_dict()


#: What a diverged step reports, in the order one is named when several are not finite.
_DIVERGED = ("λ", "MSE", "regulariser", "loss", "gradient norm")


class Diverged(RuntimeError):
    """A training step produced a non-finite value (or parameters too large for the distances).

    ``step`` is the step that diverged (1-based); ``what`` names the
    quantity (``"loss"``, ``"regulariser"``, ``"λ"``, ``"gradient"``,
    ``"parameters"``); ``saved_step`` the step whose state the checkpoint
    holds (None without one, or when no finite state could be written).
    """

    def __init__(self, step: int, total: int, what: str, detail: str, saved_step: int | None) -> None:
        self.step, self.total, self.what, self.detail, self.saved_step = step, total, what, detail, saved_step
        super().__init__(f"training diverged at step {step}/{total}: {detail}")


def lr_schedule(
    step: int, total: int, lr: float, lr_final: float, *, warmup_steps: int = 0, decay_start: int = 0
) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up, constant, then a cosine to ``lr_final``.

    ``warmup_steps`` steps rise linearly to ``lr`` ((step + 1)/warmup_steps
    of it); from ``decay_start`` the rate follows a cosine from ``lr`` to
    ``lr_final`` at step ``total − 1``.  With no warm-up and ``decay_start``
    0 this is the paper's schedule (:func:`cosine_lr`).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step < decay_start:
        return lr
    span = total - 1 - decay_start
    progress = min(1.0, (step - decay_start) / span) if span > 0 else 0.0 if total <= 1 else 1.0
    return lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * progress))


def cosine_lr(step: int, total: int, lr: float, lr_final: float) -> float:
    """The paper's schedule: cosine decay from ``lr`` at step 0 to ``lr_final`` at step ``total − 1``."""
    return lr_schedule(step, total, lr, lr_final)


class _Progress:
    """A tqdm bar on a TTY (loss, MSE, L0, λ as its postfix); one line every ``log_every`` steps otherwise.

    Without tqdm installed, the TTY gets a ``\\r``-redrawn line with the same fields.
    """

    def __init__(self, stream: TextIO, total: int, log_every: int, start: int = 0) -> None:
        self.stream, self.total, self.log_every = stream, total, log_every
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.last_draw = -math.inf
        self.width = 0
        self.bar = None
        if self.tty:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=start, file=stream, unit="step", mininterval=_REDRAW_S)

    def update(self, step: int, history: TrainHistory) -> None:
        last = step == self.total
        fields = (
            f"loss {history.loss[-1]:.4g}  mse {history.mse[-1]:.4g}  "
            f"L0 {history.l0[-1]:.2f}  λ {history.lam[-1]:.4g}"
        )
        line = f"step {step}/{self.total}  {fields}"
        if self.bar is not None:
            now = time.monotonic()
            if last or now - self.last_draw >= _REDRAW_S:
                self.bar.set_postfix_str(fields, refresh=False)
                self.last_draw = now
            self.bar.update(step - self.bar.n)
            if last:
                self.bar.close()
        elif self.tty:
            now = time.monotonic()
            if last or now - self.last_draw >= _REDRAW_S:
                # Pad so a shorter line fully covers the previous one.
                self.stream.write("\r" + line.ljust(self.width) + ("\n" if last else ""))
                self.stream.flush()
                self.width, self.last_draw = len(line), now
        elif last or step % self.log_every == 0:
            self.stream.write(line + "\n")
            self.stream.flush()


def train_spade(
    layer: SpaDE,
    x: torch.Tensor,
    *,
    batch_size: int = 256,
    lr: float = 1e-2,
    lr_final: float = 1e-4,
    clip: float | None = 1.0,
    epochs: int = 1,
    seed: int = 0,
    progress: bool = True,
    log_every: int | None = None,
    stream: TextIO | None = None,
    module: torch.nn.Module | None = None,
    checkpoint: Checkpointer | None = None,
    resume: dict | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, TrainHistory], None] | None = None,
    agree: Callable[[list[int]], list[int]] | None = None,
) -> TrainHistory:
    """Train ``layer`` on ``x`` with the paper's recipe.

    Parameters
    ----------
    layer : SpaDE
        The layer to train, in place.
    x : Tensor, shape (N, d_in), or ActivationShards
        Training data, already scaled (see ``scale_to_unit_norm``).  It may
        live on the CPU while the layer is on a GPU; batches are moved.
        :class:`~spade_kernels.sae.data.ActivationShards` (a directory of files,
        data larger than RAM) are read a shard at a time, in a shuffled
        shard and row order per epoch.
    batch_size : int
        Samples per step; the last batch of an epoch may be smaller.
    lr, lr_final : float
        Adam learning rate at the first and at the last step; in between it
        follows a per-step cosine.
    clip : float or None
        Maximum global gradient norm (None: no clipping).
    epochs : int
        Passes over ``x``, each in a fresh random order.
    seed : int
        Seed of the shuffling generator (the global RNG is untouched).
    progress : bool
        Report progress on ``stream``.
    log_every : int, optional
        Steps between progress lines when ``stream`` is not a TTY; default
        about ten lines per run.
    stream : text stream, optional
        Where progress goes (default ``sys.stderr``).
    module : Module, optional
        What runs the forward pass, when it is not ``layer`` itself: a
        ``DistributedDataParallel`` wrapper of it (``layer`` may be a
        :class:`~spade_kernels.distributed.ShardedSpaDE`; its L0 and its
        gradient clipping are then taken over all shards).
    checkpoint : Checkpointer, optional
        Write a resumable state (layer, optimizer, position in the data
        order, the shuffling generator, the history) as it says.
    resume : dict, optional
        A state from :func:`load_train_state`: continue that run (same
        ``x``, ``batch_size`` and ``seed``); with the same settings the
        result equals the uninterrupted run's on the same machine.  More
        ``epochs`` extend it (the cosine schedule then runs to the new last
        step); ``lr``, ``lr_final`` and ``clip`` apply from the resumed step.
    should_stop : callable, optional
        Checked at every step; when it returns a true value (an int, e.g. a
        signal number) the step finishes, the state is written (with
        ``checkpoint``) and the history returned with ``stopped_at`` and
        ``stopped_by`` set (how the command line handles SIGINT/SIGTERM).
    on_step : callable, optional
        ``on_step(step, history)`` after every optimizer step (the command
        line's metrics log).
    agree : callable, optional
        Under several processes: ``agree(flags)`` returns the element-wise
        maximum of every rank's per-step flags (diverged, stop, checkpoint due
        by time), so that every rank diverges, stops and checkpoints at the
        same step (the command line's all-reduce).

    Returns
    -------
    TrainHistory
        Per-step loss, MSE, mean L0 (support size), λ and learning rate.

    Raises
    ------
    Diverged
        When a step's loss, MSE, regulariser, λ or gradient norm is not
        finite, or the parameters grew too large for the squared distances:
        the step is not applied, and with ``checkpoint`` the state before it
        (the last finite one) is written first.
    """
    check_rows(x, layer.d_in)
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1, got {batch_size} and {epochs}")
    n = x.shape[0]
    device = layer.prototypes.device
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    optimizer = _adam(layer, lr)
    gen = torch.Generator().manual_seed(seed)
    history = TrainHistory()
    step, first_epoch, first_start = 0, 0, 0
    if resume is not None:
        if resume.get("n") != n or resume.get("total", 0) % steps_per_epoch:
            raise ValueError(
                f"the training state is of a run over {resume.get('n')} samples in {resume.get('total')} steps; "
                f"this one has {n} samples in {steps_per_epoch} steps per epoch"
            )
        if resume["step"] > total:
            raise ValueError(
                f"the training state is at step {resume['step']}, past this run's {total} steps ({epochs} epoch(s))"
            )
        layer.load_state_dict(resume["layer"])
        saved = resume["optimizer"]  # it names the implementation that saved it: load it as this one's, so
        # that torch places its step counts where this implementation keeps them
        groups = [{**g, "fused": optimizer.defaults["fused"]} for g in saved["param_groups"]]
        optimizer.load_state_dict({**saved, "param_groups": groups})
        history = TrainHistory(
            **{k: list(v) for k, v in resume["history"].items() if k not in ("stopped_at", "stopped_by")}
        )
        step, first_epoch, first_start = resume["step"], resume["epoch"], resume["start"]
        gen.set_state(resume["epoch_gen_state"])
    bar = _Progress(stream or sys.stderr, total, log_every or max(1, total // 10), step) if progress else None
    layer.train()

    def state(epoch: int, start: int, epoch_gen_state: torch.Tensor) -> dict:
        return {
            "version": STATE_VERSION, "step": step, "total": total, "n": n, "epoch": epoch, "start": start,
            "epoch_gen_state": epoch_gen_state, "layer": layer.state_dict(),
            "optimizer": optimizer.state_dict(), "history": asdict(history),
        }  # fmt: skip

    def diverged(what: str, detail: str, epoch: int, start: int, epoch_gen_state) -> Diverged:
        """The error to raise, after saving the state before this step when it is the last finite one.

        A non-finite loss, λ or gradient is caught before its update: the
        parameters are still those of the last finite step, saved here (if
        any step was trained).  Parameters too large for the distances were
        made by the previous update: nothing new is saved (the last state
        written, if any, is older and usable).
        """
        saved = checkpoint.saved_step if checkpoint is not None else None
        trained = step > (resume["step"] if resume is not None else 0)
        if checkpoint is not None and trained and what != "parameters" and checkpoint.saved_step != step:
            checkpoint.save(state(epoch, start, epoch_gen_state))
            saved = step
        if bar is not None and bar.bar is not None:
            bar.bar.close()
        return Diverged(step + 1, total, what, detail, saved)

    for epoch in range(first_epoch, epochs):
        epoch_gen_state = gen.get_state()
        for start, batch in _epoch_batches(x, gen, batch_size, first_start if epoch == first_epoch else 0):
            step_lr = cosine_lr(step, total, lr, lr_final)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            try:
                out = (module or layer)(batch.to(device, non_blocking=True))
            except RangeError as exc:  # the data were checked: the parameters grew out of range
                detail = str(exc).split(":")[0].replace("prototypes holds", "the prototypes hold")
                raise diverged("parameters", detail, epoch, start, epoch_gen_state) from None
            # Logged values of this step (λ as used in its forward pass) and the gradient norm, read back
            # in one device sync before the optimizer step, so a non-finite step is never applied.
            stats = [out.loss, out.mse, out.reg, layer.mean_l0(out.codes).to(out.loss), layer.lam]
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if clip is not None:
                stats.append(layer.clip_grad_norm_(clip))
            values = torch.stack([v.detach().float().reshape(()) for v in stats]).tolist()
            names = ("loss", "MSE", "regulariser", "L0", "λ", "gradient norm")
            bad = {name: v for name, v in zip(names, values) if not math.isfinite(v)}
            what = next((w for w in _DIVERGED if w in bad), None)
            # This step's decisions, the same on every rank (``agree``): diverged (which), stop, checkpoint.
            flags = [_DIVERGED.index(what) + 1 if what else 0, int(should_stop() or 0) if should_stop else 0]
            flags.append(int(checkpoint is not None and checkpoint.due_by_time()))
            if agree is not None:
                flags = agree(flags)
            if flags[0]:
                if what is None:
                    what, found = (
                        _DIVERGED[flags[0] - 1],
                        f"non-finite {_DIVERGED[flags[0] - 1]} on another rank",
                    )
                else:
                    found = "non-finite " + ", ".join(f"{name} {v:g}" for name, v in bad.items())
                raise diverged(what, found, epoch, start, epoch_gen_state)
            optimizer.step()
            for name, value in zip(("loss", "mse", "l0", "lam"), values[:2] + values[3:5]):
                getattr(history, name).append(value)
            history.lr.append(step_lr)
            step += 1
            if bar is not None:
                bar.update(step, history)
            if on_step is not None:
                on_step(step, history)
            stop = bool(flags[1])
            if checkpoint is not None and (stop or flags[2] or step == total or checkpoint.due(step)):
                # The position of the next step: this epoch's next batch, or the next epoch's first
                # (whose order the generator, already past this epoch's permutation, will draw).
                if start + batch_size < n:
                    checkpoint.save(state(epoch, start + batch_size, epoch_gen_state))
                else:
                    checkpoint.save(state(epoch + 1, 0, gen.get_state()))
            if stop and step < total:
                history.stopped_at, history.stopped_by = step, flags[1]
                if bar is not None and bar.bar is not None:
                    bar.bar.close()
                return history
    return history


def _epoch_batches(x: torch.Tensor | ActivationShards, gen: torch.Generator, batch_size: int, start: int):
    """One epoch's (position, batch) pairs in a random order drawn from ``gen``, from ``start`` on."""
    if isinstance(x, ActivationShards):
        yield from x.epoch_batches(gen, batch_size, start)
        return
    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
    for s in range(start, x.shape[0], batch_size):
        yield s, x[order[s : s + batch_size]]


def _batches(x: torch.Tensor | ActivationShards, batch_size: int, device: torch.device):
    for start, block in row_blocks(x, batch_size):
        yield start, block.to(device)


@torch.no_grad()
def evaluate(layer: SpaDE, x: torch.Tensor, *, batch_size: int = 4096) -> dict[str, float]:
    """Mean loss, MSE, regulariser and L0 of ``layer`` over all of ``x``, and λ.

    Evaluated in batches of ``batch_size`` without autograd, so memory stays
    bounded for any N.
    """
    totals = torch.zeros(4, dtype=torch.float64)
    for _, xb in _batches(x, batch_size, layer.prototypes.device):
        out = layer(xb)
        stats = torch.stack([out.loss, out.mse, out.reg, out.codes.support_size.float().mean()])
        totals += stats.double().cpu() * xb.shape[0]
    loss, mse, reg, l0 = (totals / x.shape[0]).tolist()
    return {"loss": loss, "mse": mse, "reg": reg, "l0": l0, "lam": layer.lam.item()}


@torch.no_grad()
def concept_metrics(
    layer: SpaDE | Callable[[torch.Tensor], torch.Tensor | SparseCodes],
    x: torch.Tensor,
    labels: torch.Tensor,
    n_concepts: int,
    *,
    top_k: int = 5,
    batch_size: int = 4096,
) -> dict[str, torch.Tensor]:
    """How well single latents detect ground-truth concepts.

    For concept c and latent k, the detector "z[:, k] > 0" is scored against
    "labels == c" by F1 = 2·TP / (#active(k) + #(labels == c)).  The top-k F1
    of concept c is the mean F1 of its ``top_k`` best latents (the paper's
    top-5 F1: a concept split over a few latents still scores well, one
    nobody detects scores 0).

    Parameters
    ----------
    layer : SpaDE or callable
        A SpaDE layer (encoded with ``encode_sparse``, batches moved to its
        device), or any encoder: a function from a batch (B, d) to codes,
        dense (B, K) or :class:`SparseCodes`, called on batches of ``x`` as
        they are (same device).  Any SAE is scored by the same metric this
        way, e.g. ``concept_metrics(sae.encode, ...)``.
    x : Tensor, shape (N, d_in)
    labels : Tensor, int64, shape (N,)
        Concept ids in ``[0, n_concepts)``.
    n_concepts : int
    top_k : int
        Latents averaged per concept (capped at the number of latents K).
    batch_size : int
        Samples encoded at a time (memory is O(batch_size·C + n_concepts·K)).

    Returns
    -------
    dict
        ``"top_f1"`` (n_concepts,) float in [0, 1]; ``"mean_l0"``
        (n_concepts,) mean support size (number of codes > 0) of the
        concept's samples (NaN for an empty concept); ``"count"``
        (n_concepts,) int64 samples per concept.
    """
    if labels.shape != x.shape[:1]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < n_concepts):
        raise ValueError(
            f"labels must lie in [0, {n_concepts}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    if isinstance(layer, SpaDE):
        encode, device = layer.encode_sparse, layer.prototypes.device
    elif callable(layer):
        encode, device = layer, x.device
    else:
        raise TypeError(f"layer must be a SpaDE or a callable encoder, got {type(layer).__name__}")
    K = layer.d_sae if isinstance(layer, SpaDE) else None
    true_pos = active = None
    l0_sum = torch.zeros(n_concepts, dtype=torch.float64)
    for start, xb in _batches(x, batch_size, device):
        codes = encode(xb)
        if not isinstance(codes, SparseCodes):
            if not isinstance(codes, torch.Tensor) or codes.shape[:-1] != xb.shape[:1] or codes.dim() != 2:
                raise ValueError(
                    f"the encoder must return codes of shape ({xb.shape[0]}, K) or SparseCodes, got "
                    f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__}"
                )
            codes = SparseCodes.from_dense(codes)
        if K is None:
            K = codes.n_latents
        if true_pos is None:
            true_pos = torch.zeros(n_concepts * K, dtype=torch.int64)
            active = torch.zeros(K, dtype=torch.int64)
        lab = labels[start : start + xb.shape[0]].to(codes.indices.device)
        # Slots past support_size are padding (index 0, value 0): mask them out.
        on = torch.arange(codes.width, device=lab.device) < codes.support_size[:, None]
        idx = codes.indices[on]
        pair = (lab[:, None] * K + codes.indices)[on]
        true_pos += torch.bincount(pair, minlength=n_concepts * K).cpu()
        active += torch.bincount(idx, minlength=K).cpu()
        l0_sum.index_add_(0, lab.cpu(), codes.support_size.double().cpu())
    count = torch.bincount(labels.cpu(), minlength=n_concepts)
    if true_pos is None:  # no samples: nothing active, every concept empty
        K = K or 1
        true_pos, active = torch.zeros(n_concepts * K, dtype=torch.int64), torch.zeros(K, dtype=torch.int64)
    f1 = 2 * true_pos.view(n_concepts, K).double() / (active[None, :] + count[:, None]).clamp_min(1)
    top = f1.topk(min(top_k, K), dim=1).values.mean(1)
    return {"top_f1": top, "mean_l0": l0_sum / count, "count": count}
