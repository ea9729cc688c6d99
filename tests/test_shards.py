"""Data larger than RAM: a directory of activation shards (spade_kernels.sae.data.ActivationShards).

Reading (every format, leading dimensions, a float16 shard), an epoch's
order (every row once, shuffled, deterministic, resumable mid-epoch, batches
across shard boundaries), the streaming passes, the errors, ``train`` and
``eval`` on a directory, and a run whose shards exceed an address-space cap
set on its process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spade_kernels.layer import SpaDE
from spade_kernels.sae.cli import main
from spade_kernels.sae.data import ActivationShards, open_activations, row_blocks, scale_to_unit_norm
from spade_kernels.sae.train import Checkpointer, load_train_state, train_spade


def _write(folder, parts):
    """Write ``parts`` (tensors) as shards in turn .npy, .pt, .safetensors; returns their concatenation."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(parts):
        name = folder / f"part{i:02d}"
        if i % 3 == 0:
            np.save(f"{name}.npy", t.numpy())
        elif i % 3 == 1:
            torch.save(t, f"{name}.pt")
        else:
            save_file({"activations": t.contiguous()}, f"{name}.safetensors")
    return torch.cat([t.reshape(-1, t.shape[-1]).float() for t in parts])


@pytest.fixture
def shards(tmp_path):
    g = torch.Generator().manual_seed(0)
    sizes = [37, 50, 13, 64, 1]
    parts = [torch.randn(n, 6, generator=g) for n in sizes]
    parts[3] = parts[3].reshape(8, 8, 6)  # leading dimensions are flattened
    return tmp_path / "shards", _write(tmp_path / "shards", parts)


def test_shards_read_as_their_concatenation(shards):
    folder, whole = shards
    s = open_activations(folder)
    assert isinstance(s, ActivationShards) and s.shape == (165, 6) and len(s) == 165
    assert [f.path.suffix for f in s.files] == [".npy", ".pt", ".safetensors", ".npy", ".pt"]
    torch.testing.assert_close(torch.cat([b for _, b in row_blocks(s, 7)]), whole, rtol=0, atol=0)
    starts = [a for a, _ in row_blocks(s, 7)]
    assert starts[0] == 0 and starts == sorted(starts)
    torch.testing.assert_close(torch.cat([b for _, b in s.scaled(3.0).blocks(10)]), 3 * whole, rtol=0, atol=0)


def test_a_float16_shard_reads_as_float32(tmp_path):
    x = torch.randn(10, 4).half()
    np.save(tmp_path / "a.npy", x.numpy())
    s = ActivationShards(tmp_path)
    block = next(s.blocks())[1]
    assert block.dtype == torch.float32
    torch.testing.assert_close(block, x.float(), rtol=0, atol=0)


def _epoch(s, seed, batch, start=0):
    return list(s.epoch_batches(torch.Generator().manual_seed(seed), batch, start))


def test_an_epoch_visits_every_row_once_in_a_shuffled_order(shards):
    folder, whole = shards
    s = ActivationShards(folder)
    batches = _epoch(s, 0, 16)
    assert [p for p, _ in batches] == list(range(0, 165, 16))
    assert [b.shape[0] for _, b in batches] == [16] * 10 + [5]
    rows = torch.cat([b for _, b in batches])
    # The same multiset of rows (sorted lexicographically), in another order.
    key = lambda t: t[np.lexsort(t.T.numpy()[::-1].copy())]  # noqa: E731
    torch.testing.assert_close(key(rows), key(whole), rtol=0, atol=0)
    assert not torch.equal(rows, whole)
    # Deterministic in the generator, different for another seed.
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(batches, _epoch(s, 0, 16)))
    assert not torch.equal(torch.cat([b for _, b in _epoch(s, 1, 16)]), rows)


def test_an_epoch_resumed_mid_way_draws_the_same_batches(shards):
    folder, _ = shards
    s = ActivationShards(folder)
    whole = _epoch(s, 3, 16)
    for start in (16, 48, 160):
        resumed = _epoch(s, 3, 16, start)
        assert [p for p, _ in resumed] == [p for p, _ in whole if p >= start]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, whole[start // 16 :]))
    # The generator ends in the same state either way (the next epoch's order).
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    list(s.epoch_batches(g1, 16))
    list(s.epoch_batches(g2, 16, 96))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_parts_are_the_strided_rows_of_the_whole_matrix_in_equal_numbers(shards):
    folder, whole = shards
    s = ActivationShards(folder)  # 165 rows in shards of 37, 50, 13, 64, 1
    for count in (2, 3, 4, 7):
        used = 165 - 165 % count
        for r in range(count):
            part = s.part(r, count)
            rows = torch.cat([b for _, b in part.blocks(5)])
            torch.testing.assert_close(rows, whole[:used][r::count], rtol=0, atol=0)
            assert len(part) == used // count  # every replica the same rows, so the same steps
            assert sum(b.shape[0] for _, b in _epoch(part, 0, 8)) == len(part)
    with pytest.raises(ValueError, match="part index"):
        s.part(2, 2)
    with pytest.raises(ValueError, match="cannot be split over 200 data replicas"):
        s.part(0, 200)


def test_uneven_shards_give_every_replica_the_same_number_of_steps(tmp_path):
    # Two shards of 4097 rows: per-shard striding would give 4098 and 4096 rows (2 steps and 1).
    _write(tmp_path, [torch.randn(4097, 3), torch.randn(4097, 3)])
    s = ActivationShards(tmp_path)
    assert [len(s.part(r, 2)) for r in (0, 1)] == [4097, 4097]
    assert [len(_epoch(s.part(r, 2), 0, 4096)) for r in (0, 1)] == [2, 2]


def test_sample_draws_distinct_rows(shards):
    folder, whole = shards
    s = ActivationShards(folder)
    rows = s.sample(20, torch.Generator().manual_seed(0))
    assert rows.shape == (20, 6)
    assert torch.unique(rows, dim=0).shape[0] == 20
    assert all(bool((whole == r).all(1).any()) for r in rows)
    assert s.sample(1000).shape == (165, 6)  # all rows when there are fewer
    with pytest.raises(ValueError, match="count >= 1"):
        s.sample(0)


def test_scaling_streams_and_matches_the_tensor(shards):
    folder, whole = shards
    scaled, factor = scale_to_unit_norm(ActivationShards(folder))
    _, expected = scale_to_unit_norm(whole)
    assert factor == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(torch.cat([b for _, b in scaled.blocks()]), whole * factor)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "no .npy, .pt or .safetensors files"),
        (lambda d: (np.save(d / "a.npy", np.zeros((3, 4), np.float32)), np.save(d / "b.npy", np.zeros((3, 5), np.float32))), "b.npy: d = 5, but .*a.npy has d = 4"),
        (lambda d: np.save(d / "a.npy", np.zeros((3, 4), np.int32)), "a.npy: activations must be float16, bfloat16"),
        (lambda d: np.save(d / "a.npy", np.zeros((3, 4), ">f4")), "a.npy: .*machine's byte order, got >f4"),
        (lambda d: np.save(d / "a.npy", np.zeros((3, 4), np.longdouble)), "a.npy: activations must be float16"),
        (lambda d: np.save(d / "a.npy", np.asfortranarray(np.zeros((3, 4, 5), np.float32))), "C-contiguous"),
        (lambda d: torch.save(torch.zeros(3, 5, 4).transpose(1, 2), d / "a.pt"), "C-contiguous"),
        (lambda d: (d / "a.pt").write_bytes(b"garbage"), "a.pt: not a readable .pt file"),
        (lambda d: (d / "a.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}"), "a.safetensors: not a readable"),
        (lambda d: np.save(d / "a.npy", np.zeros((0, 4), np.float32)), "a.npy: activations must have shape"),
        (lambda d: torch.save({"x": torch.zeros(2, 3), "y": torch.zeros(2, 3)}, d / "a.pt"), "found 2 tensors"),
    ],
)  # fmt: skip
def test_bad_shard_folders_name_the_file(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(ValueError, match=message):
        ActivationShards(tmp_path)


def test_shards_saved_with_requires_grad_are_read_as_data(tmp_path):
    # Activations saved without .detach(): a batch must not tie back to the file's tensor.
    torch.save(torch.randn(40, 4).requires_grad_(), tmp_path / "a.pt")
    s = ActivationShards(tmp_path)
    assert not any(b.requires_grad for _, b in _epoch(s, 0, 16))
    assert not next(s.blocks())[1].requires_grad and not s.sample(3).requires_grad
    from spade_kernels.sae.data import load_activations

    assert not load_activations(tmp_path / "a.pt").requires_grad


def test_a_truncated_npy_shard_is_refused_at_opening(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((100, 4), np.float32))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="a.npy: not a readable .npy file"):
        ActivationShards(tmp_path)


def test_a_non_finite_row_is_named_with_its_file(tmp_path):
    x = torch.randn(30, 4)
    x[17, 2] = float("nan")
    x[20, 0] = float("inf")
    _write(tmp_path, [torch.randn(5, 4), x])
    with pytest.raises(ValueError, match=r"part01.pt: row 17 holds NaN or inf values .* \(2 such rows"):
        scale_to_unit_norm(ActivationShards(tmp_path))
    with pytest.raises(ValueError, match=r"x: row 17 holds NaN or inf"):
        scale_to_unit_norm(x)
    # A float64 shard beyond float32's range is named too (its rows are read as float32).
    big = torch.ones(6, 4, dtype=torch.float64)
    big[4] = 1e300
    (tmp_path / "big").mkdir()
    np.save(tmp_path / "big" / "zz.npy", big.numpy())
    with pytest.raises(ValueError, match=r"zz.npy: row 4 holds .*beyond float32's range"):
        scale_to_unit_norm(ActivationShards(tmp_path / "big"))
    with pytest.raises(ValueError, match=r"x: row 17 holds NaN or inf"):
        scale_to_unit_norm(x)
    with pytest.raises(ValueError, match="every value is 0"):
        scale_to_unit_norm(torch.zeros(3, 4))


def test_training_on_shards_resumes_to_the_uninterrupted_weights(shards, tmp_path):
    folder, _ = shards
    s, _ = scale_to_unit_norm(ActivationShards(folder))

    def layer():
        torch.manual_seed(0)
        return SpaDE(6, 12, dtype=torch.float64)

    whole = layer()
    history = train_spade(whole, s, batch_size=16, epochs=2, progress=False)
    assert len(history) == 2 * 11
    stopped = layer()
    path = os.fspath(tmp_path / "state.pt")
    calls = iter(range(10**6))
    cut = train_spade(
        stopped, s, batch_size=16, epochs=2, progress=False, checkpoint=Checkpointer(path, None, None),
        should_stop=lambda: next(calls) == 14,
    )  # fmt: skip
    assert cut.stopped_at == 15  # mid second epoch, in the middle of a shard
    resumed = layer()
    train_spade(resumed, s, batch_size=16, epochs=2, progress=False, resume=load_train_state(path))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_train_and_eval_commands_take_a_directory(shards, tmp_path, capsys):
    folder, whole = shards
    out = tmp_path / "run"
    assert (
        main(["train", "--data", str(folder), "--d-sae", "12", "--batch-size", "8", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "on 165 samples of shards" in text and "samples/s)" in text
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--data", str(folder), "--out", str(report), "--batch-size", "7"]) == 0
    metrics = json.loads(report.read_text())
    # The same report as for the rows in one file.
    np.save(tmp_path / "whole.npy", whole.numpy())
    assert (
        main(["eval", str(out), "--data", str(tmp_path / "whole.npy"), "--out", str(tmp_path / "w.json")])
        == 0
    )
    same = json.loads((tmp_path / "w.json").read_text())
    for key in ("n_samples", "dead_latents", "l0_histogram", "l0_mean"):
        assert metrics[key] == same[key], key
    assert metrics["fvu"] == pytest.approx(same["fvu"], rel=1e-9)
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "activation file not found" in capsys.readouterr().err


#: Trains on a directory under an address-space cap (RLIMIT_AS) of ``cap`` MiB above what the
#: process has mapped once torch and the package are imported; with "--load-all" it instead
#: reads every shard into memory, which the cap must refuse (the control).
_CAPPED = r"""
import resource, sys
import numpy, safetensors.torch, torch
import spade_kernels.sae.cli as cli
from spade_kernels.sae.data import ActivationShards
# Code a training run imports on its way (torch.optim's dynamo and triton, DCP, symbolic shapes): loaded
# before the cap, which bounds the data's memory, not the libraries'.
import torch._dynamo, torch.distributed.checkpoint, torch.fx.experimental.symbolic_shapes
cap = int(sys.argv[1]) << 20
vm = [int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmSize")][0]
resource.setrlimit(resource.RLIMIT_AS, (vm + cap, vm + cap))
if sys.argv[2] == "--load-all":
    try:
        kept = [b.clone() for _, b in ActivationShards(sys.argv[3]).blocks()]
    except (MemoryError, RuntimeError, ValueError) as exc:
        print("refused:", type(exc).__name__)
        sys.exit(0)
    sys.exit("the cap let all the data into memory")
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_shards_larger_than_a_memory_cap_train(tmp_path):
    # 6 shards of 32 MiB (192 MiB in all) under a cap of 128 MiB. glibc's mmap threshold
    # fixed and one arena, so freed blocks return to the system (the cap is on address space).
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "shards"
    _write(folder, [torch.randn(65536, 128, generator=g) for _ in range(6)])
    total = sum(p.stat().st_size for p in folder.iterdir())
    cap_mib = 128
    assert total > (cap_mib + 48) << 20
    env = {"PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1"}
    env["OMP_NUM_THREADS"] = "1"
    control = subprocess.run(
        [sys.executable, "-c", _CAPPED, str(cap_mib), "--load-all", str(folder)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert control.returncode == 0 and "refused" in control.stdout, control.stdout + control.stderr[-2000:]
    out = tmp_path / "run"
    run = [
        str(cap_mib),
        "train",
        "--data",
        str(folder),
        "--d-sae",
        "128",
        "--threads",
        "1",
        "--batch-size",
        "4096",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _CAPPED, *run, "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "on 393216 samples of shards" in proc.stdout and (out / "sae_weights.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 96 and rows[-1]["samples_per_s"] > 0
