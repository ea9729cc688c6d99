"""spade_kernels.distributed with real processes: gloo on the CPU, torch.multiprocessing.

Every check compares the sharded layer with the single-process layer on the
same weights and batches: the codes, the loss, every gradient shard, 5 Adam
steps; DDP alone; checkpoints both ways; a rank that dies; settings that
differ across ranks.
"""

import contextlib
import itertools
import json
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import backends_on

import spade_kernels as sk
from spade_kernels import distributed as D

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# The Triton kernels on the interpreter (the spawned ranks inherit TRITON_INTERPRET=1) get one layout of
# their own below; every other registered sparse backend that runs on CPU tensors gets them all.
BACKENDS = [b for b in backends_on("cpu", sparse_only=True) if b != "triton"]
TRITON = ["triton"] if "triton" in backends_on("cpu", sparse_only=True) else []


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, out_dir, args):
    torch.set_num_threads(1)
    D.init(
        "gloo",
        timeout_s=args.get("timeout_s", 30),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    try:
        result = fn(rank, world, **args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done before any leaves. A peer that died on purpose (test_a_dead_rank_…) fails the
        # barrier: the result stands.
        with contextlib.suppress(RuntimeError):
            dist.barrier()
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    # The result is written: leave without tearing the gloo pairs down. A rank that destroyed the group
    # while a peer was still finishing the barrier aborted in gloo now and then ("terminate called without
    # an active exception", exit −6; seen once in about ten runs even after the barrier).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn, world, tmp_path, timeout=240, **args):
    """Run ``fn(rank, world, **args)`` in ``world`` fresh processes; returns their exit codes."""
    ctx = mp.get_context("spawn")
    port = _port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, fn, str(tmp_path), args)) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _run(fn, world, tmp_path, **args):
    """Run ``fn(rank, world, **args)`` in ``world`` processes; returns each rank's result."""
    codes = _spawn(fn, world, tmp_path, **args)
    assert codes == [0] * world, f"exit codes {codes}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _layer(K, backend, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    layer = sk.SpaDE(6, K, backend=backend, dtype=dtype, **kw)
    with torch.no_grad():
        layer.W_dec.add_(0.1 * torch.randn_like(layer.W_dec))  # decoder ≠ encoder
        if layer.b_dec is not None:
            layer.b_dec.normal_()
    return layer


def _batches(n=5, B=24, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, 6, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


# -- what each rank runs -------------------------------------------------------------------


def _forward_and_steps(rank, world, K, backend, layer_kw, data=1, steps=5):
    """One latent group per data replica: codes, loss and gradient shards of the first batch, then Adam steps."""
    if data > 1:
        data_group, latent_group = D.mesh_groups(data, world // data)
        replica = rank // (world // data)
    else:
        data_group, latent_group, replica = None, None, 0
    sharded = D.ShardedSpaDE.from_dense(_layer(K, backend, **layer_kw), latent_group)
    module = (
        torch.nn.parallel.DistributedDataParallel(sharded, process_group=data_group) if data > 1 else sharded
    )
    batches = [b[replica::data] for b in _batches(dtype=layer_kw.get("dtype", torch.float64))]
    out = module(batches[0])
    out.loss.backward()
    first = {
        "range": sharded.latent_range,
        "loss": out.loss.detach(), "mse": out.mse.detach(), "reg": out.reg.detach(), "x_hat": out.x_hat.detach(),
        "codes": out.codes.detach(), "grads": _grads(sharded), "l0": float(sharded.mean_l0(out.codes)),
    }  # fmt: skip
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    opt.step()
    for batch in batches[1:steps]:
        opt.zero_grad()
        module(batch).loss.backward()
        opt.step()
    first["params"] = {n: p.detach().clone() for n, p in sharded.named_parameters()}
    first["dense"] = sharded.to_dense().state_dict()
    return first


def _single_process(K, backend, layer_kw, data=1, steps=5):
    """The same on one process: DDP averages the replicas' gradients, so the loss is their mean."""
    layer = _layer(K, backend, **layer_kw)
    batches = _batches(dtype=layer_kw.get("dtype", torch.float64))

    def loss_of(batch):
        return sum(layer(batch[r::data]).loss for r in range(data)) / data

    out = layer(batches[0][0::data])
    loss_of(batches[0]).backward()
    first = {"out": out, "grads": _grads(layer)}
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    opt.step()
    for batch in batches[1:steps]:
        opt.zero_grad()
        loss_of(batch).backward()
        opt.step()
    first["params"] = {n: p.detach().clone() for n, p in layer.named_parameters()}
    return first


def _check(results, ref, K, data=1, **tol):
    latent = len(results) // data
    ranges = [r["range"] for r in results[:latent]]
    assert (
        ranges[0][0] == 0 and ranges[-1][1] == K and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    )
    out = ref["out"]
    for r in results[:latent]:  # replica 0: every rank has the global loss and the full x_hat
        torch.testing.assert_close(r["loss"], out.loss, **tol)
        torch.testing.assert_close(r["mse"], out.mse, **tol)
        torch.testing.assert_close(r["reg"], out.reg, **tol)
        torch.testing.assert_close(r["x_hat"], out.x_hat, **tol)
        assert r["l0"] == pytest.approx(float(out.codes.support_size.double().mean()))
    dense = sum(r["codes"].to_dense() for r in results[:latent])  # the shards' codes tile the row
    torch.testing.assert_close(dense, out.codes.to_dense(), **tol)
    for r in results:
        lo, hi = r["range"]
        for name, grad in r["grads"].items():
            want = ref["grads"][name][lo:hi] if name in ("prototypes", "W_dec") else ref["grads"][name]
            torch.testing.assert_close(grad, want, msg=lambda m, name=name: f"{name}: {m}", **tol)
        for name, value in r["params"].items():
            want = ref["params"][name][lo:hi] if name in ("prototypes", "W_dec") else ref["params"][name]
            torch.testing.assert_close(
                value, want, msg=lambda m, name=name: f"{name} after the steps: {m}", **tol
            )
    for name, value in results[0]["dense"].items():
        torch.testing.assert_close(value, ref["params"][name], **tol)


# Three ranks (15 s over the two backends) in the slow set (CI runs it): the default run keeps one and two.
@pytest.mark.parametrize("world,K", [(1, 13), (2, 13), pytest.param(3, 20, marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_layer_equals_one_process(tmp_path, world, K, backend):
    kw = {"use_bias": True, "reg_on": "decoder"} if world == 3 else {}
    results = _run(_forward_and_steps, world, tmp_path, K=K, backend=backend, layer_kw=kw)
    _check(results, _single_process(K, backend, kw), K)


@pytest.mark.slow  # 9 s, the Triton interpreter in two ranks: in the slow set (CI runs it), so the README's test command stays under 5 minutes
@pytest.mark.parametrize("backend", TRITON)
def test_sharded_layer_on_triton_equals_one_process(tmp_path, backend):
    # float32: the Triton kernels themselves (float64 would go to the torch backend's ops).
    kw = {"dtype": torch.float32}
    results = _run(_forward_and_steps, 2, tmp_path, K=13, backend=backend, layer_kw=kw, steps=2)
    _check(results, _single_process(13, backend, kw, steps=2), 13, atol=2e-5, rtol=1e-4)


@pytest.mark.slow  # 10 s, four ranks: in the slow set (CI runs it), so the README's test command stays under 5 minutes
def test_data_parallel_times_latent_shards(tmp_path):
    # 2 × 2: two replicas (half the batch each) of a layer split over two ranks.
    results = _run(
        _forward_and_steps, 4, tmp_path, K=15, backend="torch", layer_kw={"use_bias": True}, data=2
    )
    ref = _single_process(15, "torch", {"use_bias": True}, data=2)
    _check(results, ref, 15, data=2)


def _ddp_only(rank, world):
    layer = _layer(12, "torch")
    module = torch.nn.parallel.DistributedDataParallel(layer)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for batch in _batches():
        opt.zero_grad()
        module(batch[rank::world]).loss.backward()
        opt.step()
    return {n: p.detach() for n, p in layer.named_parameters()}


def test_ddp_alone_equals_one_process(tmp_path):
    results = _run(_ddp_only, 2, tmp_path)
    ref = _single_process(12, "torch", {}, data=2)
    for r in results:
        for name, value in r.items():
            torch.testing.assert_close(value, ref["params"][name])


def _checkpoints(rank, world, path):
    layer = _layer(11, "torch", use_bias=True)
    sharded = D.ShardedSpaDE.from_dense(layer)
    sharded.save_pretrained(path / "from-sharded")
    if rank == 0:
        layer.save_pretrained(path / "dense-0")
    dist.barrier()
    loaded = D.ShardedSpaDE.from_pretrained(path / "dense-0", dtype=torch.float64, backend="torch")
    x = _batches(1)[0]
    return {"range": loaded.latent_range, "loss": loaded(x).loss.detach(), "want": layer(x).loss.detach()}


def test_checkpoints_round_trip_between_sharded_and_single(tmp_path):
    results = _run(_checkpoints, 3, tmp_path, path=tmp_path)
    for r in results:
        torch.testing.assert_close(r["loss"], r["want"])
    back = sk.SpaDE.from_pretrained(tmp_path / "from-sharded", backend="torch")
    for name, value in _layer(11, "torch", use_bias=True).state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value)


def _mismatched(rank, world):
    try:
        D.ShardedSpaDE.from_dense(sk.SpaDE(6, 10, gamma_reg=0.1 if rank == 0 else 0.2))
    except ValueError as exc:
        return str(exc)
    return None


def test_mismatched_settings_are_named_at_construction(tmp_path):
    for message in _run(_mismatched, 2, tmp_path):
        assert message is not None and "'gamma_reg' differs across ranks" in message


def _different_weights(rank, world):
    torch.manual_seed(rank)  # each rank a different layer
    try:
        D.ShardedSpaDE.from_dense(sk.SpaDE(6, 10))
    except ValueError as exc:
        return str(exc)
    return None


def test_different_weights_are_caught_at_construction(tmp_path):
    for message in _run(_different_weights, 2, tmp_path):
        assert message is not None and "checksums disagree" in message


def _second_derivative(rank, world):
    sharded = D.ShardedSpaDE.from_dense(_layer(10, "torch"))
    loss = sharded(_batches(1)[0]).loss
    try:  # refused at the backward that autograd would record
        torch.autograd.grad(loss, sharded.prototypes, create_graph=True)
    except RuntimeError as exc:
        return str(exc)
    return None


def test_double_backward_is_refused_not_wrong(tmp_path):
    # The backward's collectives have no derivative: a clear error, never a second derivative
    # that silently misses the other shards' terms.
    for message in _run(_second_derivative, 2, tmp_path):
        assert message is not None and "ShardedSpaDE has no double backward" in message


def _dies(rank, world, timeout_s):
    sharded = D.ShardedSpaDE.from_dense(_layer(10, "torch"))
    if rank == 1:
        os._exit(3)  # a rank that dies mid-run
    start = time.monotonic()
    try:
        sharded(_batches(1)[0])
    except RuntimeError as exc:
        return {"error": str(exc).splitlines()[0], "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_a_dead_rank_ends_the_others_within_the_timeout(tmp_path):
    timeout_s = 10
    codes = _spawn(_dies, 2, tmp_path, timeout=120, timeout_s=timeout_s)
    assert codes[1] == 3 and codes[0] == 0, codes  # rank 0 ended by itself, with an error it could report
    survivor = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert survivor["error"] is not None and survivor["seconds"] < timeout_s + 5, survivor


def _cli(args, env=None, nproc=None):
    import subprocess
    import sys

    prefix = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "--master-port",
            str(_port()),
            "-m",
            "spade_kernels",
        ]
        if nproc
        else [sys.executable, "-m", "spade_kernels"]
    )
    proc = subprocess.run(
        [*prefix, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # 17 s: two CLI runs, one under torchrun; the library's shards run by default above
def test_cli_trains_with_latent_shards_like_one_process(tmp_path):
    common = [
        "train",
        "--dataset",
        "separability",
        "--n-samples",
        "4096",
        "--batch-size",
        "256",
        "--backend",
        "torch",
    ]
    _cli([*common, "--out", str(tmp_path / "one")])
    run = _cli([*common, "--latent-shards", "2", "--out", str(tmp_path / "sharded")], nproc=2)
    assert "1 data replica(s) × 2 latent shard(s)" in run.stdout
    assert run.stdout.count("saved to") == 1  # one report, one checkpoint
    one = sk.SpaDE.from_pretrained(tmp_path / "one")
    sharded = sk.SpaDE.from_pretrained(tmp_path / "sharded")
    for name, value in one.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], value, atol=1e-4, rtol=1e-4)


def test_cli_data_parallel_runs(tmp_path):
    run = _cli(
        [
            "train",
            "--dataset",
            "separability",
            "--n-samples",
            "4096",
            "--batch-size",
            "128",
            "--out",
            str(tmp_path / "ddp"),
        ],
        nproc=2,
    )
    assert "2 data replica(s) × 1 latent shard(s)" in run.stdout and run.stdout.count("saved to") == 1
    assert (tmp_path / "ddp" / "sae_weights.safetensors").exists()


@pytest.mark.slow  # 10 s, a torchrun job: in the slow set (CI runs it), so the README's test command stays under 5 minutes
def test_cli_data_parallel_over_a_shard_directory(tmp_path):
    # Each data replica trains on the rows r, r + R, … of the shards' whole matrix. Shards of odd
    # sizes: striding each shard alone would give the ranks 770 and 767 rows, 13 and 12 steps of
    # 64, and DDP's collectives would not pair up; the whole matrix gives 768 each.
    import numpy as np

    g = np.random.default_rng(0)
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, n in enumerate((513, 511, 513)):
        np.save(folder / f"part{i}.npy", g.standard_normal((n, 6), dtype=np.float32))
    out = tmp_path / "ddp"
    run = _cli(["train", "--data", str(folder), "--batch-size", "64", "--out", str(out)], nproc=2)
    assert "on 1537 samples of shards" in run.stdout and "2 data replica(s)" in run.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 12  # 768 rows per replica
    assert run.stdout.count("saved to") == 1 and (out / "sae_weights.safetensors").exists()


# -- faults under torchrun: a lost rank is named, a killed or interrupted run resumes exactly -------------

FAULT_RUN = [
    "train", "--dataset", "separability", "--n-samples", "4000", "--batch-size", "16", "--d-sae", "32",
    "--backend", "torch", "--checkpoint-every", "10",
]  # fmt: skip
LATEST = os.path.join("train_state.dcp", "LATEST")


def _job(args, tmp_path, stderr=None, timeout_s=None):
    """A 2-rank job through ``train --nproc-per-node 2`` (torch's elastic launcher, as torchrun)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "spade_kernels", *args[:1], "--nproc-per-node", "2", *args[1:]]
    if timeout_s:
        cmd += ["--dist-timeout-s", str(timeout_s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr or subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)  # fmt: skip


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait_for(path, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _workers(out: str) -> list[int]:
    """PIDs of the rank processes training into ``out`` (rank order = PID order: torchrun starts them in order)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if (
            "spade_kernels" in args
            and "train" in args
            and f"{out}" in args
            and "torch.distributed.run" not in args
        ):
            pids.append(int(entry))
    return sorted(pids)


def _same_weights(a, b):
    from safetensors.torch import load_file

    wa, wb = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
    for name, t in wa.items():
        torch.testing.assert_close(wb[name], t, rtol=0, atol=1e-6, msg=name)


def _our_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("spade-kernels") and "warning:" not in line]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--latent-shards", "2"], []], ids=["latent-shards", "data-parallel"])
def test_multi_process_runs_resume_to_the_uninterrupted_weights(layout, tmp_path):
    import signal

    code, _, err = _finish(_job([*FAULT_RUN, *layout, "--out", "whole"], tmp_path))
    assert code == 0 and "Traceback" not in err, err[-3000:]
    # Ctrl-C: the launcher forwards it, every rank finishes its step and writes its part of the state.
    stopped = _job([*FAULT_RUN, *layout, "--out", "stopped"], tmp_path)
    _wait_for(tmp_path / "stopped" / LATEST, stopped)
    stopped.send_signal(signal.SIGINT)
    code, _, err = _finish(stopped)
    assert code == 130 and "Traceback" not in err, err[-3000:]
    lines = _our_lines(err)
    assert (
        len(lines) == 1 and "stopped by SIGINT" in lines[0] and "--nproc-per-node 2 --resume" in lines[0]
    ), err
    # SIGKILL of every process of the job (the launcher and each rank): the last complete state remains.
    killed = _job([*FAULT_RUN, *layout, "--out", "killed"], tmp_path)
    _wait_for(tmp_path / "killed" / LATEST, killed)
    for pid in [killed.pid, *_workers("killed")]:
        os.kill(pid, signal.SIGKILL)
    _finish(killed)
    assert not (tmp_path / "killed" / "sae_weights.safetensors").exists()
    for name in ("stopped", "killed"):
        code, out, err = _finish(_job(["train", "--resume", name], tmp_path))
        assert code == 0 and "Traceback" not in err, err[-3000:]
        assert out.count("saved to") == 1 and not (tmp_path / name / "train_state.dcp").exists()
        _same_weights(tmp_path / "whole", tmp_path / name)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_lost_rank_is_named_by_the_survivor_within_twice_the_timeout(fault, tmp_path):
    import signal

    timeout_s = 4
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        run = _job([*FAULT_RUN, "--n-samples", "60000", "--latent-shards", "2", "--out", "r"], tmp_path,
                   stderr=stderr, timeout_s=timeout_s)  # fmt: skip
        _wait_for(tmp_path / "r" / LATEST, run)
        victim = _workers("r")[-1]
        start = time.monotonic()
        os.kill(victim, getattr(signal, fault))
        try:
            while "rank 0: lost" not in log.read_text():
                assert time.monotonic() - start < 2 * timeout_s + 5, log.read_text()
                time.sleep(0.1)
            elapsed = time.monotonic() - start
        finally:
            if fault == "SIGSTOP":
                os.kill(victim, signal.SIGCONT)
            code = run.wait(timeout=120)
    err = log.read_text()
    assert elapsed <= 2 * timeout_s, elapsed
    state = "exited" if fault == "SIGKILL" else "stopped"
    lines = _our_lines(err)
    assert code == 1 and "Traceback" not in err, err
    assert f"rank 0: lost rank 1 (PID {victim}, {state})" in lines[0] and "is intact" in lines[0], lines
    # A stopped rank that runs again finds rank 0 gone and says so; then the launcher's own line: which
    # ranks failed, and how.
    if fault == "SIGSTOP" and len(lines) == 3:
        assert "rank 1: lost rank 0" in lines[1], lines
    assert len(lines) in (2, 3) and "the run on 2 processes failed: rank 0 exited with 1" in lines[-1], lines


def _huge_prototypes_on_one_shard(rank, world, timeout_s):
    layer = _layer(10, "torch", dtype=torch.float32)
    sharded = D.ShardedSpaDE.from_dense(layer)
    if rank == 1:
        with torch.no_grad():
            sharded.prototypes.mul_(1e30)  # this shard's distances overflow float32
    from spade_kernels.numerics import RangeError

    try:
        sharded(_batches(1, dtype=torch.float32)[0])
    except RangeError as exc:
        return str(exc)
    return None


def test_a_shard_out_of_range_fails_every_rank_at_once(tmp_path):
    # The failing shard's error travels with the forward's first collective: no rank waits for a timeout.
    start = time.monotonic()
    messages = _run(_huge_prototypes_on_one_shard, 2, tmp_path, timeout_s=60)
    assert time.monotonic() - start < 30
    assert "the prototypes hold" in messages[1] or "prototypes holds" in messages[1]
    assert messages[0] is not None and "another shard" in messages[0]


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ({0: 143, 1: 143}, 143),  # every rank stopped and said so
        ({0: -15, 1: 143}, 143),  # rank 1 stopped first; the launcher then tore rank 0's exit down
        ({0: 130, 1: -15}, 130),
        ({0: -15, 1: -15}, 1),  # killed, nobody stopped: a failure
        ({0: -9, 1: 143}, 1),  # a rank killed otherwise: a failure
        ({0: -15, 1: 2}, 2),  # rank 1 refused a damaged state (its line); the agent tore rank 0 down
        ({0: -9, 1: 2}, 1),
        ({0: 1, 1: 143}, 1),
    ],
)
def test_the_launcher_reads_a_stopped_run_from_its_ranks_exit_codes(monkeypatch, capsys, codes, expected):
    # The launcher (train --nproc-per-node) turns the ranks' exit codes into one: a run some rank stopped
    # on a signal is stopped even when the elastic agent killed a slower rank on its way out.
    import torch.distributed.launcher.api as launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from spade_kernels.sae import cli

    failures = {
        r: ProcessFailure(local_rank=r, pid=1, exitcode=c, error_file="/nonexistent")
        for r, c in codes.items()
    }

    def launch(config, entry):
        def run(*args):
            raise ChildFailedError("spade_kernels", failures)

        return run

    monkeypatch.setattr(launcher, "elastic_launch", launch)
    args = cli._build_parser().parse_args(["train", "--dataset", "separability", "--nproc-per-node", "2"])
    assert cli._launch(args, ["train"]) == expected
    err = capsys.readouterr().err
    assert ("failed" in err) == (expected == 1)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_one_step(tmp_path):
    import signal

    run = _job([*FAULT_RUN, "--n-samples", "60000", "--latent-shards", "2", "--out", "r"], tmp_path)
    _wait_for(tmp_path / "r" / LATEST, run)
    os.kill(_workers("r")[-1], signal.SIGTERM)  # rank 1 only, as a scheduler might
    code, _, err = _finish(run)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    lines = _our_lines(err)
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], err
    # A damaged part is refused on resume, one line from the rank that reads it.
    import shutil

    shutil.copytree(tmp_path / "r", tmp_path / "damaged")
    part = next((tmp_path / "damaged" / "train_state.dcp").glob("step-*/__1_0.distcp"))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    code, _, err = _finish(_job(["train", "--resume", "damaged"], tmp_path))
    assert code == 2 and "Traceback" not in err, err[-3000:]
    lines = _our_lines(err)
    assert any("not a readable training state" in line or "damaged" in line for line in lines), err
    code, out, err = _finish(_job(["train", "--resume", "r"], tmp_path))
    assert code == 0 and out.count("saved to") == 1, err[-3000:]
