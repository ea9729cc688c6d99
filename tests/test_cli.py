import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import spade_kernels
from spade_kernels import SpaDE, __version__
from spade_kernels.backends import backend_status
from spade_kernels.sae.cli import main
from spade_kernels.sae.data import make_heterogeneity, make_separability, scale_to_unit_norm
from spade_kernels.sae.train import evaluate

TINY = ["--n-samples", "520", "--d-sae", "16", "--batch-size", "64"]


def test_info_lists_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert __version__ in out and torch.__version__ in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for name, reason in backend_status().items():
        assert ("available" if reason is None else reason) in lines[name]
    from spade_kernels import _ext

    extension = next(line for line in out.splitlines() if line.startswith("extension"))
    assert (
        "CUDA kernels" if _ext.cuda_kernels() else "CPU ops only" if _ext.available() else "not loaded"
    ) in extension


def test_help_never_imports_torch():
    # `spade-kernels --help` and every command's but bench's: the parser is built without torch, and
    # `import spade_kernels` imports its public names on first use, so help costs the interpreter's
    # start (the bench harness that defines bench's own flags imports torch).
    code = (
        "import contextlib, io, sys\n"
        "import spade_kernels\n"
        "from spade_kernels.sae.cli import main\n"
        "for argv in (['--help'], ['info', '--help'], ['train', '--help'], ['eval', '--help'],\n"
        "             ['cache', '--help']):\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as exc:\n"
        "            assert exc.code == 0, (argv, exc.code)\n"
        "    assert 'usage: spade-kernels' in out.getvalue(), argv\n"
        "assert not hasattr(spade_kernels, 'train'), 'a former path imported by hasattr'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert sorted(spade_kernels.__all__) == sorted(n for n in dir(spade_kernels) if n in spade_kernels.__all__)\n"
        "assert spade_kernels.SpaDE.__module__ == 'spade_kernels.layer' and 'torch' in sys.modules\n"
        "assert callable(spade_kernels.pipeline.memory_budget)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        spade_kernels.no_such_name  # noqa: B018


def test_bench_help_lists_its_own_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--sweep" in capsys.readouterr().out


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "spade_kernels", "info"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "backends" in result.stdout


def test_train_separability_checkpoint(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["train", "--dataset", "separability", *TINY, "--seed", "1", "--out", str(out_dir)]) == 0
    assert (out_dir / "sae_weights.safetensors").is_file() and (out_dir / "cfg.json").is_file()
    stdout, stderr = capsys.readouterr()
    assert "step 9/9" in stderr
    assert (
        "top-5 F1" in stdout and "final, on the training scale" in stdout and "on raw activations" in stdout
    )
    rows = [line.split() for line in stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(13))

    layer = SpaDE.from_pretrained(out_dir)
    assert (layer.d_in, layer.d_sae) == (2, 16)
    info = json.loads((out_dir / "train_info.json").read_text())
    raw = make_separability(520, seed=1).x
    _, factor = scale_to_unit_norm(raw)
    assert info["scale_factor"] == pytest.approx(factor) and info["steps"] == 9
    # The checkpoint takes raw activations (the training scale is folded in) and
    # reproduces the metrics recorded at the end of training, in raw units:
    # the same codes, so L0 is equal, and MSE and ‖x − a‖² shrink by factor².
    metrics = evaluate(layer, raw)
    assert metrics["loss"] * factor**2 == pytest.approx(info["loss"], rel=1e-4)
    assert metrics["l0"] == pytest.approx(info["l0"], rel=1e-6)


def test_train_heterogeneity_shows_dimensions(tmp_path, capsys):
    args = ["train", "--dataset", "heterogeneity", *TINY, "--init", "data", "--out", str(tmp_path)]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert " dim " in stdout.splitlines()[1]
    dims = [int(line.split()[2]) for line in stdout.splitlines() if line.split()[0].isdigit()]
    assert dims == make_heterogeneity(60).intrinsic_dim.tolist()


def test_train_from_file(tmp_path, capsys):
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).normal(size=(2, 100, 8)).astype(np.float32))
    assert main(["train", "--data", str(path), "--batch-size", "50", "--out", str(tmp_path / "run")]) == 0
    assert "top-5 F1" not in capsys.readouterr().out
    layer = SpaDE.from_pretrained(tmp_path / "run")
    assert (layer.d_in, layer.d_sae) == (8, 32)


def test_train_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spade-kernels: error:") and str(missing) in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["train"],
        ["train", "--dataset", "bogus"],
        ["train", "--dataset", "separability", "--data", "x.pt"],
        ["train", "--dataset", "separability", "--batch-size", "0"],
        ["train", "--dataset", "separability", "--backend", "nope"],
    ],
)
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unavailable_backend_is_a_clean_error(tmp_path, capsys):
    unavailable = [name for name, reason in backend_status().items() if reason is not None]
    if not unavailable:
        pytest.skip("every backend is available here")
    argv = ["train", "--dataset", "separability", *TINY, "--backend", unavailable[0], "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("spade-kernels: error:") and unavailable[0] in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys):
    assert (
        main(["train", "--dataset", "separability", *TINY, "--device", "cuda", "--out", str(tmp_path)]) == 2
    )
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--lr", "inf"], "--lr: must be finite and > 0"),
        (["--lr", "nan"], "--lr: must be finite and > 0"),
        (["--gamma-reg", "inf"], "--gamma-reg: must be finite and >= 0"),
        (["--gamma-reg", "-1"], "--gamma-reg: must be finite and >= 0"),
        (["--threads", "0"], "--threads: must be finite and > 0"),
    ],
)
def test_non_finite_numbers_are_refused_before_training(flags, match, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "separability", *TINY, *flags])
    assert info.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--device", "meta"], "--device meta: SpaDE trains on cpu or cuda devices, not meta"),
        (["--device", "mps"], "--device mps: SpaDE trains on cpu or cuda devices"),
        (["--device", "gpu0"], "--device gpu0: not a torch device"),
        (["--n-samples", "5"], "--n-samples 5:"),
    ],
)
def test_bad_device_and_sizes_are_one_error_line(flags, match, tmp_path, capsys):
    assert main(["train", "--dataset", "separability", *TINY, *flags, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spade-kernels: error:") and match in err and "\n" not in err
    assert "Traceback" not in err


def test_unwritable_out_is_refused_before_the_first_step(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--dataset", "separability", *TINY, "--out", str(blocker)]) == 2
    err = capsys.readouterr()
    assert "is not a directory" in err.err and "training SpaDE" not in err.out
    assert main(["train", "--dataset", "separability", *TINY, "--out", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_few_steps_warn_with_the_numbers_and_threads_apply(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        argv = ["train", "--dataset", "separability", "--n-samples", "512", "--batch-size", "256"]
        assert main([*argv, "--threads", "1", "--out", str(tmp_path / "r")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "warning: only 2 optimizer steps (512 samples, batch 256, 1 epoch(s))" in err and "--epochs" in err


def test_train_writes_a_metrics_log_and_curves_and_eval_reports(tmp_path, capsys):
    import json as _json

    from spade_kernels.layer import SpaDE
    from spade_kernels.sae.data import make_separability

    out = tmp_path / "run"
    assert main(["train", "--dataset", "separability", *TINY, "--out", str(out)]) == 0
    rows = [_json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert (
        steps == sorted(set(steps))
        and steps[-1] == _json.loads((out / "train_info.json").read_text())["steps"]
    )
    assert {"step", "loss", "mse", "nmse", "l0", "lam", "lr", "samples_per_s"} <= set(rows[0])
    assert all(r["nmse"] == pytest.approx(r["mse"] / 2) for r in rows)  # d = 2, E‖x‖² = d
    assert (out / "training_curves.png").stat().st_size > 0
    # eval on raw activations, against the metrics computed here.
    x = make_separability(3000, seed=5).x
    torch.save(x, tmp_path / "x.pt")
    assert main(["eval", str(out), "--data", str(tmp_path / "x.pt"), "--batch-size", "1000"]) == 0
    report = _json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 0
    layer = SpaDE.from_pretrained(out)
    with torch.no_grad():
        codes = layer.encode_sparse(x)
        x_hat = layer.decode(codes)
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert report["fvu"] == pytest.approx(fvu, rel=1e-5)
    dense = codes.to_dense()
    assert report["dead_latents"] == int(((dense > 0).sum(0) == 0).sum())
    assert report["l0_mean"] == pytest.approx(float((dense > 0).sum(1).double().mean()))
    assert sum(report["l0_histogram"]["count"]) == 3000
    assert (
        sum(report["firing_frequency_log10_histogram"]["count"]) == report["d_sae"] - report["dead_latents"]
    )
    # Errors: one line each.
    torch.save(torch.randn(10, 3), tmp_path / "wrong.pt")
    assert main(["eval", str(out), "--data", str(tmp_path / "wrong.pt")]) == 2
    assert "d_in = 2" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere"), "--data", str(tmp_path / "x.pt")]) == 2
    assert "no cfg.json" in capsys.readouterr().err


def test_train_takes_a_config_file_and_flags_override_it(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('dataset = "separability"\nn_samples = 520\n"d-sae" = 16\nbatch_size = 64\nseed = 1\n')
    assert main(["train", "--config", str(toml), "--d-sae", "8", "--out", str(tmp_path / "a")]) == 0
    assert SpaDE.from_pretrained(tmp_path / "a").d_sae == 8  # the flag, not the file's 16
    # JSON, and a source of data on the command line replaces the file's.
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"dataset": "heterogeneity", "n_samples": 520, "d_sae": 16, "batch_size": 64}))
    assert (
        main(["train", "--config", str(js), "--dataset", "separability", "--out", str(tmp_path / "b")]) == 0
    )
    assert SpaDE.from_pretrained(tmp_path / "b").d_in == 2  # separability's d (heterogeneity's is larger)
    # The same run from flags alone gives the same weights.
    assert main(["train", "--dataset", "separability", *TINY, "--out", str(tmp_path / "c")]) == 0
    a, c = SpaDE.from_pretrained(tmp_path / "b"), SpaDE.from_pretrained(tmp_path / "c")
    torch.testing.assert_close(a.prototypes, c.prototypes, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("u.toml", "nope = 1", "--config .*u.toml: nope: train has no such flag"),
        ("v.json", '{"lr": "fast"}', "--config .*v.json: lr = 'fast': could not convert"),
        ("w.json", '{"backend": "gpu"}', r"--config .*w.json: backend = 'gpu': expected one of \['auto'"),
        ("x.toml", "lr = true", "--config .*x.toml: lr = True: expected a number or a string"),
        ("y.json", "[1, 2]", "--config .*y.json: must hold a table of settings"),
        ("z.toml", "lr = = 1", "--config .*z.toml: not valid TOML"),
        ("c.yaml", "lr: 1", r"--config .*c.yaml: expected a .toml or .json file"),
    ],
)
def test_a_bad_config_file_is_one_error_line_naming_the_file_and_key(tmp_path, capsys, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    assert (
        main(["train", "--config", str(path), "--dataset", "separability", "--out", str(tmp_path / "r")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert not (tmp_path / "r").exists()


class _FakeWandbRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.summary, self.exit_code = kwargs, [], {}, None

    def log(self, row, step):
        self.logged.append((step, row))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def test_wandb_gets_the_metrics_logs_rows(tmp_path, capsys, monkeypatch):
    import types

    runs = []
    import importlib.machinery

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: runs.append(_FakeWandbRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "separability", *TINY, "--out", str(out), "--wandb", "proj"]) == 0
    (run,) = runs
    assert run.init["project"] == "proj" and run.init["dir"] == str(out) and run.init["config"]["d_sae"] == 16
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in run.logged] == [r["step"] for r in rows]
    assert run.logged[-1][1] == {k: v for k, v in rows[-1].items() if k != "step"}
    assert run.summary["steps"] == 9 and run.exit_code == 0


def test_wandb_without_the_package_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    out = tmp_path / "run"
    assert main(["train", "--dataset", "separability", *TINY, "--out", str(out), "--wandb", "proj"]) == 2
    assert "--wandb proj: needs the wandb package" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # 9 s, importing wandb: in the slow set (CI runs it), so the README's test command stays under 5 minutes
def test_wandb_offline_run_is_written_under_out(tmp_path):
    pytest.importorskip("wandb")  # a dev requirement: installed by scripts/setup_env.sh
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "spade_kernels",
        "train",
        "--dataset",
        "separability",
        *TINY,
        "--out",
        str(out),
    ]
    done = subprocess.run([*cmd, "--wandb", "proj"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (record,) = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert record.stat().st_size > 0
