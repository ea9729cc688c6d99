"""Long runs: a train run stopped by a real SIGINT/SIGTERM or killed by SIGKILL resumes to the uninterrupted run's weights.

Each interrupted run is a real ``python -m spade_kernels train`` process; the
signal is sent once its first resumable state exists, and ``--resume``
finishes it.  Every run uses one thread, so the runs are bit-for-bit
comparable on this machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from spade_kernels.files import TMP_PREFIX
from spade_kernels.sae.cli import STATE_NAME, main

RUN = ["--dataset", "separability", "--n-samples", "20000", "--batch-size", "16", "--d-sae", "32"]
RUN += ["--epochs", "2", "--threads", "1", "--checkpoint-every", "25"]


def _weights(folder):
    return load_file(os.path.join(folder, "sae_weights.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", *RUN, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert not (out / STATE_NAME).exists()  # a complete run keeps only the save_pretrained layout
    return _weights(out)


def _start_and_signal(out, sig) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spade_kernels", "train", *RUN, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / STATE_NAME).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no training state appeared"
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize(
    "sig",
    # In the slow set (CI runs it; 30 s with the uninterrupted run): Ctrl-C in the default run is
    # tests/test_faults.py's exit-130 case.
    [
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
        pytest.param(signal.SIGKILL, marks=pytest.mark.slow),
    ],
)
def test_a_signalled_run_resumes_to_the_uninterrupted_weights(sig, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    done = _start_and_signal(out, sig)
    if sig == signal.SIGKILL:
        assert done.returncode == -signal.SIGKILL
    else:
        # The current step finishes, a state is written, the way back is printed, exit 128 + signal.
        assert done.returncode == 128 + sig, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert f"stopped by {signal.Signals(sig).name}" in done.stderr
        assert f"spade-kernels train --resume {out}" in done.stderr
    assert (out / STATE_NAME).exists() and not (out / "sae_weights.safetensors").exists()
    # What a write killed midway would leave: removed by the next checkpoint write.
    (out / f"{TMP_PREFIX}{STATE_NAME}-999").write_bytes(b"partial")
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--resume", str(out), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed = _weights(out)
    for name, t in uninterrupted.items():
        torch.testing.assert_close(resumed[name], t, rtol=0, atol=1e-6, msg=name)
    assert not (out / STATE_NAME).exists()
    assert not [p for p in os.listdir(out) if p.startswith(TMP_PREFIX)]
    # The metrics log reads as one run: a killed run's lines past its state were dropped.
    import json

    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * 1250


def test_resume_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spade-kernels: error: --resume") and "no training state" in err and "\n" not in err
    (tmp_path / STATE_NAME).write_bytes(b"garbage")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a readable training state" in capsys.readouterr().err


@pytest.mark.slow  # 5 s, two command-line runs: in the slow set (CI runs it), so the README's test command stays under 5 minutes
def test_resume_refuses_other_data(tmp_path, capsys):
    out = tmp_path / "run"
    done = _start_and_signal(out, signal.SIGINT)
    assert done.returncode == 128 + signal.SIGINT
    from spade_kernels.sae.train import Checkpointer, load_train_state

    state = load_train_state(str(out / STATE_NAME))
    extra = state.pop("extra")
    extra["settings"]["seed"] = 1  # another seed: other synthetic data
    Checkpointer(str(out / STATE_NAME), extra=extra).save(state)
    assert main(["train", "--resume", str(out)]) == 2
    assert "the data differ" in capsys.readouterr().err


def test_save_pretrained_removes_what_a_killed_write_left(tmp_path):
    import spade_kernels as sk

    stale = tmp_path / f"{TMP_PREFIX}sae_weights.safetensors-123"
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"x" * 100)
    sk.SpaDE(4, 8).save_pretrained(tmp_path)
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae_weights.safetensors"]
