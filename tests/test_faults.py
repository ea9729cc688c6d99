"""What a run survives, and errors that name their cause (the command line, checkpoints, the training loop).

Process faults use real processes and real signals; the full-disk cases a
real, small tmpfs (skipped, with the reason, where this machine cannot mount
one).  Every error a user sees is one line naming the file, flag or argument.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import spade_kernels as sk
from spade_kernels.sae import cli
from spade_kernels.sae.cli import STATE_NAME, main
from spade_kernels.sae.train import load_train_state

SEP = [
    "--dataset",
    "separability",
    "--n-samples",
    "2048",
    "--batch-size",
    "32",
    "--d-sae",
    "16",
    "--threads",
    "1",
]


def _one_error_line(err: str, *needles: str) -> None:
    """stderr ends with exactly one error line (after any warnings and progress lines), naming ``needles``."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith("spade-kernels: error:"), err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def _run(args, tmp_path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", "spade_kernels", *args], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=kw.pop("timeout", 300), **kw,
    )  # fmt: skip


def _keep_threads(fn):
    threads = torch.get_num_threads()
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


# -- 4. numbers out of range name their argument ------------------------------------------------


def test_fold_input_scale_names_its_range_and_leaves_the_layer_alone():
    layer = sk.SpaDE(4, 8)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"scale = 1e\+30 is outside \[.*\], the range this layer can fold"):
        layer.fold_input_scale(1e30)
    with pytest.raises(ValueError, match=r"scale = 1e-30 is outside"):
        layer.fold_input_scale(1e-30)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    layer.fold_input_scale(10.0)  # inside the range: folded
    torch.testing.assert_close(layer.prototypes, before["prototypes"] / 10)


def test_lambda_init_beyond_float32_names_the_flag(tmp_path, capsys):
    assert main(["train", *SEP, "--lambda-init", "1e300", "--out", str(tmp_path / "r")]) == 2
    _one_error_line(capsys.readouterr().err, "--lambda-init 1e+300", "overflows float32", "3.4e+38")
    with pytest.raises(ValueError, match="lambda_init = 1e\\+300 overflows float32"):
        sk.SpaDE(4, 8, lambda_init=1e300)


# -- 5. a foreign file is one line ----------------------------------------------------------------


class _Foreign:
    pass


def test_a_foreign_pt_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "foreign.pt"
    torch.save({"obj": _Foreign()}, path)
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "r")]) == 2
    _one_error_line(capsys.readouterr().err, str(path), "pickled Python objects", "_Foreign")
    (tmp_path / "r").mkdir(exist_ok=True)
    torch.save({"obj": _Foreign()}, tmp_path / "r" / STATE_NAME)
    assert main(["train", "--resume", str(tmp_path / "r")]) == 2
    _one_error_line(capsys.readouterr().err, STATE_NAME, "not a readable training state")


# -- 6, 7, 8. train and eval apply one rule to data; eval checks --out first ------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert _keep_threads(lambda: main(["train", *SEP, "--out", str(out)])) == 0
    return out


@pytest.mark.parametrize(
    "scale, fix", [(1e30, "divide them by"), (1e-20, "multiply them by")], ids=["huge", "tiny"]
)
def test_data_a_float32_checkpoint_cannot_take_is_refused_by_train_and_eval(
    scale, fix, tmp_path, checkpoint, capsys
):
    path = tmp_path / "x.pt"
    torch.save(torch.randn(3000, 2, dtype=torch.float64).mul(scale).float(), path)
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "r")]) == 2
    _one_error_line(capsys.readouterr().err, str(path), "float32 SpaDE checkpoint", fix)
    assert main(["eval", str(checkpoint), "--data", str(path), "--out", str(tmp_path / "e.json")]) == 2
    _one_error_line(capsys.readouterr().err, str(path), "float32 SpaDE checkpoint", fix)


def test_eval_refuses_a_nan_row_as_train_does(tmp_path, checkpoint, capsys):
    x = torch.randn(3000, 2)
    x[7, 1] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(x, path)
    for argv in (["train", "--data", str(path), "--out", str(tmp_path / "r")],
                 ["eval", str(checkpoint), "--data", str(path), "--out", str(tmp_path / "e.json")]):  # fmt: skip
        assert main(argv) == 2
        _one_error_line(capsys.readouterr().err, f"{path}: row 7 holds NaN")


def test_eval_checks_its_output_before_computing(tmp_path, checkpoint, capsys, monkeypatch):
    from spade_kernels.sae import evaluation

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", lambda *a, **k: pytest.fail("computed first"))
    data = tmp_path / "x.pt"
    torch.save(torch.randn(100, 2), data)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["eval", str(checkpoint), "--data", str(data), "--out", str(blocker / "e.json")]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "is not a directory")
    with _tmpfs(tmp_path / "ro", "ro") as ro:
        assert main(["eval", str(checkpoint), "--data", str(data), "--out", str(ro / "e.json")]) == 2
        _one_error_line(capsys.readouterr().err, "--out", "Read-only file system")


# -- 9. checkpoint fields --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("lambda_init", "abc", r"cfg.json: lambda_init must be a float, got 'abc'"),
        ("dtype", "int32", r"cfg.json: 'dtype' must be a floating torch dtype"),
        ("gamma_reg", -1, r"cfg.json: gamma_reg must be a finite float >= 0"),
        ("use_bias", "yes", r"cfg.json: 'use_bias' must be true or false"),
        ("reg_on", "middle", r"cfg.json: reg_on must be 'encoder' or 'decoder'"),
    ],
)
def test_a_bad_cfg_field_is_named_with_its_file(field, value, match, tmp_path, capsys):
    sk.SpaDE(4, 8).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=match):
        sk.SpaDE.from_pretrained(tmp_path)
    torch.save(torch.randn(50, 4), tmp_path / "x.pt")
    assert main(["eval", str(tmp_path), "--data", str(tmp_path / "x.pt")]) == 2
    _one_error_line(capsys.readouterr().err, "cfg.json", field)


def test_a_lambda_that_underflows_float32_is_named(tmp_path):
    from safetensors.torch import save_file

    layer = sk.SpaDE(4, 8)
    layer.save_pretrained(tmp_path)
    state = {k: v.detach().contiguous() for k, v in layer.state_dict().items()}
    state["lambda_raw"] = torch.tensor(-200.0)  # λ = softplus(−200) ≈ 1e−87: 0 in float32
    save_file(state, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(
        ValueError, match=r"sae_weights.safetensors: 'lambda_raw' = -200 gives λ .* below float32"
    ):
        sk.SpaDE.from_pretrained(tmp_path)


# -- 10. divergence ----------------------------------------------------------------------------------


def test_parameters_that_outgrow_the_distances_stop_the_run_at_that_step(tmp_path, capsys):
    out = tmp_path / "r"
    assert _keep_threads(lambda: main(["train", *SEP, "--lr", "1e30", "--out", str(out)])) == 2
    # The first update made the prototypes ~1e30: the next step's distances overflow.
    _one_error_line(
        capsys.readouterr().err, "diverged at step 2/64", "the prototypes hold finite values too large",
        "likely --lr 1e+30", "nothing to resume from", "smaller --lr",
    )  # fmt: skip
    assert not (out / STATE_NAME).exists()


def test_a_non_finite_step_is_not_applied_and_the_last_finite_state_resumes(tmp_path, capsys, monkeypatch):
    from spade_kernels.sae import train

    # λ's gradient turns NaN at step 30 (as --gamma-reg 1e38 makes it later in a run): caught before the update.
    real, calls = sk.SpaDE.clip_grad_norm_, []

    def clip(self, max_norm):
        calls.append(1)
        if len(calls) == 30:
            self.lambda_raw.grad.fill_(float("nan"))
        return real(self, max_norm)

    monkeypatch.setattr(sk.SpaDE, "clip_grad_norm_", clip)
    out = tmp_path / "r"
    assert _keep_threads(lambda: main(["train", *SEP, "--out", str(out)])) == 2
    _one_error_line(
        capsys.readouterr().err, "diverged at step 30/64: non-finite gradient norm nan", "likely --lr 0.01",
        "state of step 29 (the last finite one)", "--resume", "--lr <smaller>",
    )  # fmt: skip
    state = train.load_train_state(str(out / STATE_NAME))
    assert state["step"] == 29 and all(bool(torch.isfinite(t).all()) for t in state["layer"].values())
    monkeypatch.setattr(sk.SpaDE, "clip_grad_norm_", real)
    assert _keep_threads(lambda: main(["train", "--resume", str(out), "--lr", "0.005"])) == 0
    assert "resuming with --lr 0.005 (the run had 0.01)" in capsys.readouterr().out
    assert (out / "sae_weights.safetensors").exists() and not (out / STATE_NAME).exists()


def test_divergence_on_the_first_batch_names_the_settings(tmp_path, capsys):
    out = tmp_path / "r"
    assert _keep_threads(lambda: main(["train", *SEP, "--gamma-reg", "1e38", "--out", str(out)])) == 2
    _one_error_line(
        capsys.readouterr().err, "diverged at step 1/64", "--gamma-reg 1e+38", "nothing to resume"
    )
    assert not (out / STATE_NAME).exists()


# -- 11. a full disk -------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path, *options, size="4m"):
    """A real tmpfs at ``path`` (skips the test where mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder):
    """Fill the filesystem of ``folder``; returns the filler to delete."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


LONG = [*SEP, "--n-samples", "4096", "--checkpoint-every", "20"]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert _keep_threads(lambda: main(["train", *LONG, "--out", str(out)])) == 0
    return load_file(out / "sae_weights.safetensors")


def _same_weights(out, expected):
    got = load_file(out / "sae_weights.safetensors")
    for name, t in expected.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=1e-6, msg=name)


def test_a_full_disk_at_a_checkpoint_keeps_the_last_state_and_resumes(
    tmp_path, whole_run, capsys, monkeypatch
):
    from spade_kernels.sae import train

    with _tmpfs(tmp_path / "disk") as disk:
        out, filler = disk / "run", []
        real = train.Checkpointer.save

        def save(self, state):
            if self.saved_step is not None and not filler:
                filler.append(_fill(disk))  # the disk fills up after the first state
            return real(self, state)

        monkeypatch.setattr(train.Checkpointer, "save", save)
        assert _keep_threads(lambda: main(["train", *LONG, "--out", str(out)])) == 2
        _one_error_line(
            capsys.readouterr().err, "no space left on device", "state of step 20/128", "--resume"
        )
        assert load_train_state(str(out / STATE_NAME))["step"] == 20
        filler[0].unlink()
        assert _keep_threads(lambda: main(["train", "--resume", str(out)])) == 0
        _same_weights(out, whole_run)


def test_a_full_disk_at_the_final_save_loses_nothing(tmp_path, whole_run, capsys, monkeypatch):
    with _tmpfs(tmp_path / "disk") as disk:
        out, filler = disk / "run", []
        real = sk.SpaDE.save_pretrained

        def save_pretrained(self, path):
            filler.append(_fill(disk))
            return real(self, path)

        monkeypatch.setattr(sk.SpaDE, "save_pretrained", save_pretrained)
        assert _keep_threads(lambda: main(["train", *LONG, "--out", str(out)])) == 2
        _one_error_line(
            capsys.readouterr().err, "saving the weights", "no space left", "state of step 128/128"
        )
        monkeypatch.setattr(sk.SpaDE, "save_pretrained", real)
        filler[0].unlink()
        assert _keep_threads(lambda: main(["train", "--resume", str(out)])) == 0
        _same_weights(out, whole_run)
        assert not (out / STATE_NAME).exists()


def test_a_full_disk_under_the_metrics_log_warns_once_and_training_goes_on(tmp_path, capsys, monkeypatch):
    with _tmpfs(tmp_path / "disk") as disk:
        out, filler = disk / "run", []
        real = cli._MetricsLog.__call__

        def log(self, step, history):
            if step == 10:
                filler.append(_fill(disk))
            if step == 40:
                filler.pop().unlink()  # space again before the final save
            return real(self, step, history)

        monkeypatch.setattr(cli._MetricsLog, "__call__", log)
        argv = ["train", *LONG, "--checkpoint-every", "0", "--checkpoint-every-s", "0", "--out", str(out)]
        assert _keep_threads(lambda: main(argv)) == 0
        err = capsys.readouterr().err
        assert err.count("metrics.jsonl failed (No space left on device); training goes on") == 1
        assert (out / "sae_weights.safetensors").exists()


# -- 12. Ctrl-C at any moment ----------------------------------------------------------------------


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    data = tmp_path / "x.npy"
    # 600,000 rows: the data pass takes ~0.8 s after the first line, the signal lands inside it; drawn
    # in float32 (1.5M rows drawn in float64 and cast took 13-20 s of the test command's time).
    np.save(data, np.random.default_rng(0).standard_normal((600_000, 64), dtype=np.float32))
    # A terminal's Ctrl-C reaches a process whose SIGINT has its default disposition; a test run started
    # as a background job inherits SIGINT ignored (POSIX), so the child first restores Python's handler.
    as_from_a_terminal = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('spade_kernels', run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", as_from_a_terminal, "train", "--data", str(data), "--out", str(tmp_path / "r")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    first = proc.stdout.readline()  # "checking N rows …": start-up has begun, the data pass is running
    assert first.startswith("checking 600000 rows"), first
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest
    lines = [line for line in rest.splitlines() if line.strip()]
    assert len(lines) == 1 and ("interrupted (Ctrl-C)" in lines[0] or "stopped by SIGINT" in lines[0]), rest


# -- 13. resume takes only what may change ----------------------------------------------------------


@pytest.fixture(scope="module")
def _stopped_once(tmp_path_factory):
    """One run stopped by a real SIGINT once its first state exists (copied for each test that uses it)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "spade_kernels", "train", *LONG, "--n-samples", "30000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / STATE_NAME).exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    return out


@pytest.fixture()
def stopped_run(_stopped_once, tmp_path):
    import shutil

    return Path(shutil.copytree(_stopped_once, tmp_path / "run"))


@pytest.mark.slow  # 17 s, a stopped run and six resumes: in the slow set (CI runs it), so the README's test command stays under 5 minutes
def test_resume_refuses_flags_that_change_the_model_and_applies_the_rest(stopped_run, capsys):
    for flag, value in (("--d-sae", "99"), ("--gamma-reg", "0.5"), ("--batch-size", "7"), ("--seed", "3")):
        assert main(["train", "--resume", str(stopped_run), flag, value]) == 2
        _one_error_line(capsys.readouterr().err, f"{flag} {value} would change the run's model or data")
    assert main(["train", "--resume", str(stopped_run), "--out", "elsewhere"]) == 2
    _one_error_line(capsys.readouterr().err, "writes into its own directory")
    argv = ["train", "--resume", str(stopped_run), "--d-sae", "16", "--epochs", "2", "--lr", "0.005"]
    assert _keep_threads(lambda: main(argv)) == 0
    out = capsys.readouterr().out
    assert (
        "resuming with --epochs 2 (the run had 1)" in out
        and "resuming with --lr 0.005 (the run had 0.01)" in out
    )
    steps = [json.loads(line)["step"] for line in (stopped_run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2 * 938


# -- 14, 15. damaged files and other data are refused ---------------------------------------------


def _zero_inside(path, needle: bytes, length=4096):
    data = path.read_bytes()
    at = data.index(needle)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\0" * min(length, len(needle)))


def test_a_damaged_training_state_is_refused(stopped_run, capsys):
    state = load_train_state(str(stopped_run / STATE_NAME))
    protos = state["layer"]["prototypes"].contiguous().numpy().tobytes()
    _zero_inside(stopped_run / STATE_NAME, protos)
    assert main(["train", "--resume", str(stopped_run)]) == 2
    _one_error_line(capsys.readouterr().err, STATE_NAME, "damaged", "CRC-32", "layer/prototypes")


def test_damaged_weights_are_refused(tmp_path):
    layer = sk.SpaDE(16, 64)
    layer.save_pretrained(tmp_path)
    _zero_inside(tmp_path / "sae_weights.safetensors", layer.W_dec.detach().numpy().tobytes(), length=256)
    with pytest.raises(
        ValueError, match=r"sae_weights.safetensors is damaged: tensor 'W_dec' fails its CRC-32"
    ):
        sk.SpaDE.from_pretrained(tmp_path)


def test_resume_refuses_data_with_two_rows_swapped(tmp_path, capsys):
    data = tmp_path / "x.npy"
    x = np.random.default_rng(1).normal(size=(60000, 2)).astype(np.float32)
    np.save(data, x)
    out = tmp_path / "run"
    args = ["--data", str(data), "--batch-size", "16", "--d-sae", "16", "--checkpoint-every", "20"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "spade_kernels", "train", *args, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    while not (out / STATE_NAME).exists():
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    x[[100, 50000]] = x[[50000, 100]]  # the same values, two rows swapped
    np.save(data, x)
    assert main(["train", "--resume", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "the data differ", "order")


# -- 16. one run per output directory --------------------------------------------------------------


@pytest.mark.slow  # 10 s, three command-line processes: in the slow set (CI runs it), so the README's test command stays under 5 minutes
def test_a_second_run_into_one_directory_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "spade_kernels", "train", *LONG, "--n-samples", "600000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        while not (out / "metrics.jsonl").exists():  # it holds the lock from before its log exists
            assert first.poll() is None
            time.sleep(0.05)
        second = _run(["train", *SEP, "--out", str(out)], tmp_path, timeout=120)
        assert second.returncode == 2
        _one_error_line(second.stderr, "in use by another run", f"PID {first.pid}")
    finally:
        first.kill()
        first.communicate()
    third = _run(["train", *SEP, "--out", str(out)], tmp_path, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]


# -- 17. memory before checks ------------------------------------------------------------------------

_PEAK = r"""
import os, sys, time, torch, spade_kernels as sk
from spade_kernels.bench.measure import peak_rss_since, start_peak_rss
import torch.fx.experimental.symbolic_shapes  # torch's meta-tensor refs import it (and sympy, ~50 MB) lazily
sk.SpaDE.from_pretrained(sys.argv[2])  # a small checkpoint first: lazy imports and first-call set-up are not the weights
base = start_peak_rss()  # the peak from here
t = time.perf_counter()
try:
    sk.SpaDE.from_pretrained(sys.argv[1])
    outcome = "loaded"
except ValueError as exc:
    outcome = str(exc)
print(peak_rss_since(base), time.perf_counter() - t, outcome)
"""


@pytest.mark.slow  # 7 s, a measuring subprocess: in the slow set (CI runs it), so the README's test command stays under 5 minutes
def test_from_pretrained_peaks_at_the_weights_once_and_checks_shapes_first(tmp_path):
    layer = sk.SpaDE(256, 65536, device="meta")  # 2 × 64 MiB of weights
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    layer.save_pretrained(tmp_path)
    size = (tmp_path / "sae_weights.safetensors").stat().st_size
    del layer
    small = tmp_path / "small"
    sk.SpaDE(256, 16).save_pretrained(small)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    argv = [sys.executable, "-c", _PEAK, str(tmp_path), str(small)]
    run = subprocess.run(argv, capture_output=True, text=True, env=env)
    peak, _, outcome = run.stdout.split(maxsplit=2)
    assert outcome.strip() == "loaded", run.stderr
    assert int(peak) <= 1.2 * size, int(peak) / size
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 50_000_000}))
    run = subprocess.run(argv, capture_output=True, text=True, env=env)
    peak, seconds, outcome = run.stdout.split(maxsplit=2)
    assert "'prototypes' has shape (65536, 256) but" in outcome and "d_sae=50000000" in outcome
    assert int(peak) < 64 << 20 and float(seconds) < 5


# -- 19, 20. file modes, defaults and scales that say what they are -----------------------------------


@pytest.mark.slow  # 6 s, a run and a resume: in the slow set (CI runs it), so the README's test command stays under 5 minutes
def test_every_file_a_run_writes_has_the_umask_mode(tmp_path):
    out = tmp_path / "run"
    done = _run(["train", *SEP, "--out", str(out)], tmp_path, preexec_fn=lambda: os.umask(0o027))
    assert done.returncode == 0, done.stderr[-2000:]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o640}, modes
    assert {"sae_weights.safetensors", "cfg.json", "train_info.json", "metrics.jsonl"} <= set(modes)


def test_a_files_batch_size_comes_from_its_size_and_scales_are_labelled(tmp_path, capsys):
    path = tmp_path / "x.pt"
    torch.save(torch.randn(50000, 4), path)
    out = tmp_path / "run"
    argv = ["train", "--data", str(path), "--d-sae", "16", "--epochs", "1", "--out", str(out)]
    assert _keep_threads(lambda: main([*argv, "--threads", "1"])) == 0
    captured = capsys.readouterr()
    assert "batch 64 (from the data's size; --batch-size sets it)" in captured.out
    assert "warning" not in captured.err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 782
    assert "final, on the training scale" in captured.out and "on raw activations" in captured.out
    assert main(["eval", str(out), "--data", str(path)]) == 0
    assert capsys.readouterr().out.startswith("on raw activations")
    from spade_kernels.files import read_safetensors_header

    assert read_safetensors_header(out / "sae_weights.safetensors")[0]["__metadata__"]


# -- review follow-ups: old states, odd headers, float64 checkpoints ------------------------------


def test_a_state_written_before_checksums_still_resumes_with_a_warning(stopped_run, capsys):
    from spade_kernels.files import CHECKSUM_KEY

    raw = torch.load(stopped_run / STATE_NAME, weights_only=True)
    raw.pop(CHECKSUM_KEY)
    torch.save(raw, stopped_run / STATE_NAME)
    with pytest.warns(UserWarning, match="carries no checksums"):
        state = load_train_state(str(stopped_run / STATE_NAME))
    assert state["step"] == raw["step"]


def test_a_safetensors_header_with_odd_metadata_or_shapes_is_refused(tmp_path):
    import struct

    from spade_kernels.files import read_safetensors_header

    def write(header: dict, data: bytes = b"") -> str:
        text = json.dumps(header).encode()
        path = tmp_path / f"{uuid.uuid4().hex}.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)
        return str(path)

    with pytest.raises(ValueError, match="__metadata__ is not a map of strings"):
        read_safetensors_header(write({"__metadata__": ["x"]}))
    with pytest.raises(ValueError, match="malformed header entry"):
        read_safetensors_header(write({"t": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 0]}}))
    with pytest.raises(ValueError, match="truncated or damaged"):
        read_safetensors_header(
            write({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
        )


def test_eval_takes_data_of_any_finite_scale_for_a_float64_checkpoint(tmp_path, capsys):
    layer = sk.SpaDE(2, 8, dtype=torch.float64)
    layer.fold_input_scale(1e-25)  # a layer for data of scale ~1e25
    layer.save_pretrained(tmp_path / "ck")
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(size=(500, 2)) * 1e25)  # float64 rows, mean ‖x‖² ~ 2e50
    assert main(["eval", str(tmp_path / "ck"), "--data", str(data)]) == 0, capsys.readouterr().err
