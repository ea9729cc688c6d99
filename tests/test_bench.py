import csv
import json

import pytest
import torch

import spade_kernels as sk
from spade_kernels import bench
from spade_kernels.bench.measure import cpu_model


def test_measure_reports_times_memory_and_l0():
    r = bench.measure("torch", "train", 16, 8, 64, torch.float32, torch.device("cpu"), repeats=2, warmup=0)
    assert len(r["times_ms"]) == 2 and all(t > 0 for t in r["times_ms"])
    assert r["mean_l0"] >= 1
    # The reference holds a dense B×K float32 distance matrix and its sort: the
    # measured peak must see at least the distances (in its own process, where
    # the peak is the configuration's alone), and the floor's output.
    B, d, K = 512, 16, 8192
    ref = bench.measure_in_subprocess(
        {"name": "reference", "mode": "encode", "B": B, "d": d, "K": K, "dtype": "float32", "device": "cpu",
         "repeats": 1, "warmup": 0}, timeout=120,
    )  # fmt: skip
    assert ref["peak_bytes"] >= B * K * 4
    small = bench.measure(
        "floor", "encode", 8, 4, 16, torch.float32, torch.device("cpu"), repeats=1, warmup=0
    )
    assert small["peak_bytes"] < B * K * 4


@pytest.mark.slow  # 26 s of measuring: in the slow set, which CI runs
def test_bench_main_writes_json_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--shape", "16,8,64", "--shape", "16,8,256", "--modes", "encode,train", "--repeats", "2"]
    argv += ["--warmup", "0", "--device", "cpu", "--backends", "reference,torch,triton", "--out", str(out)]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert "| implementation |" in text
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    env = data["environment"]
    assert {"device_name", "commit", "torch", "triton", "python", "load_average_at_start"} <= set(env)
    names = {(r["name"], r["mode"], r["K"]) for r in rows}
    for name in ("reference", "torch", "floor", "entmax"):
        assert (name, "encode", 64) in names and (name, "train", 256) in names
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] for r in ok)
    assert all(r["dtype"] == "float32" and r["device"] == env["device_name"] for r in rows)
    # The CPU is named (machines of one kind differ), not only its architecture.
    assert env["device_name"].startswith(cpu_model())
    ref = [r for r in ok if r["name"] == "reference"]
    assert all(r["speedup_vs_reference"] == pytest.approx(1.0) for r in ref)
    assert all(r["ratio_to_floor"] is not None for r in ok)
    triton_rows = [r for r in rows if r["name"] == "triton"]
    assert triton_rows and all(r["status"].startswith("skipped") for r in triton_rows)
    with open(out / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and "commit" in csv_rows[0]
    assert (out / "time_vs_K.png").stat().st_size > 0
    assert (out / "memory_vs_K.png").stat().st_size > 0


def test_configuration_too_large_or_too_long_is_skipped_not_run(capsys):
    # The reference's training step keeps B×K tensors (TiB here): skipped for memory.
    rows, _ = bench.run_sweep(
        [("huge", (1 << 20, 64, 1 << 20))], ["reference"], [], ["float32"], ["train"],
        torch.device("cpu"), repeats=1, warmup=0,
    )  # fmt: skip
    assert rows[0].status.startswith("skipped: needs ") and rows[0].status.endswith(" GiB")
    assert rows[0].median_ms is None
    # Its encode is row-blocked (it fits), but its GEMM alone would take hours: skipped for time.
    rows, _ = bench.run_sweep(
        [("huge", (1 << 20, 64, 1 << 20))], ["reference", "auto"], [], ["float32"], ["encode"],
        torch.device("cpu"), repeats=1, warmup=0, max_config_s=60,
    )  # fmt: skip
    assert all(r.status.startswith("skipped: estimated ≥ ") and r.median_ms is None for r in rows), rows
    assert rows[1].meta["resolves_to"] in ("native", "torch")


def test_cpu_model_names_the_processor(monkeypatch):
    import builtins
    import io
    import platform

    cpuinfo = "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t: fpu\n"
    real_open = builtins.open
    monkeypatch.setattr(
        builtins,
        "open",
        lambda p, *a, **k: io.StringIO(cpuinfo) if p == "/proc/cpuinfo" else real_open(p, *a, **k),
    )
    assert cpu_model() == f"Example CPU 9000 ({platform.machine()})"

    def missing(p, *a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(builtins, "open", missing)
    assert cpu_model() == (platform.processor() or platform.machine())


def test_shape_parsing_and_bad_names():
    assert bench.parse_shape("C1") == ("C1", (1024, 768, 16384))
    assert bench.parse_shape("4,5,6") == ("4x5x6", (4, 5, 6))
    with pytest.raises(Exception, match="B,d,K"):
        bench.parse_shape("4,5")
    with pytest.raises(SystemExit, match="unknown modes"):
        bench.main(["--modes", "sprint", "--shape", "4,4,4"])


def test_deadline_skips_the_rest_and_partial_results_are_saved(tmp_path):
    saved = []

    def on_row(rows, env):
        path = bench.write_results(rows, env, str(tmp_path), plots=False, csv_file=False)[0]
        saved.append(len(json.loads(open(path).read())["rows"]))

    rows, _ = bench.run_sweep(
        [("tiny", (8, 4, 16))], ["reference", "torch"], ["floor"], ["float32"], ["encode"],
        torch.device("cpu"), repeats=1, warmup=0, deadline=0.0, on_row=on_row,
    )  # fmt: skip
    # The first configuration starts at t = 0 (not past the deadline); none after it does.
    assert rows[0].status == "ok" and rows[0].median_ms is not None
    assert [r.status for r in rows[1:]] == ["skipped: deadline (0 s) passed"] * 2
    assert saved == [1, 2, 3]  # results.json rewritten after every configuration
    assert not (tmp_path / "results.json.tmp").exists()


def test_resume_keeps_what_was_measured_and_auto_reuses_its_backend(tmp_path, monkeypatch):
    first, _ = bench.run_sweep(
        [("tiny", (8, 4, 16))], ["torch", "auto"], [], ["float32"], ["encode"],
        torch.device("cpu"), repeats=1, warmup=0, deadline=0.0,
    )  # fmt: skip
    assert first[0].status == "ok" and first[1].status.startswith("skipped: deadline")
    assert first[0].output_mib is not None and first[0].output_mib > 0
    calls = []
    real = bench.sweep.measure_in_subprocess
    monkeypatch.setattr(
        bench.sweep, "measure_in_subprocess", lambda a, t: calls.append(a["name"]) or real(a, t)
    )
    from dataclasses import asdict

    rows, _ = bench.run_sweep(
        [("tiny", (8, 4, 16))], ["torch", "native", "auto"], [], ["float32"], ["encode"],
        torch.device("cpu"), repeats=1, warmup=0, previous=[asdict(r) for r in first],
    )  # fmt: skip
    # torch came from the earlier run; native was measured; auto (→ native here) is native's row.
    assert rows[0].median_ms == first[0].median_ms
    assert calls == ["native"]
    assert rows[2].meta["resolves_to"] == "native" and rows[2].meta["measured_as"] == "native"
    assert rows[2].median_ms == rows[1].median_ms


def test_a_resume_over_fewer_shapes_or_backends_keeps_the_other_rows_in_place():
    from dataclasses import asdict

    shapes = [("a", (8, 4, 16)), ("b", (8, 4, 32))]
    first, _ = bench.run_sweep(
        shapes, ["torch", "native"], [], ["float32"], ["encode"],
        torch.device("cpu"), repeats=1, warmup=0, deadline=0.0,
    )  # fmt: skip
    assert [r.status for r in first] == ["ok"] + ["skipped: deadline (0 s) passed"] * 3
    previous = [asdict(r) for r in first]
    rows, _ = bench.run_sweep(
        shapes[1:], ["native"], [], ["float32"], ["encode"],
        torch.device("cpu"), repeats=1, warmup=0, previous=previous,
    )  # fmt: skip
    # Every earlier row is still there, in its place; only (b, native) was measured.
    assert [(r.shape_name, r.name) for r in rows] == [(r.shape_name, r.name) for r in first]
    assert rows[0].median_ms == first[0].median_ms and rows[1].status == first[1].status
    assert rows[2].status == first[2].status and rows[3].status == "ok" and rows[3].median_ms > 0


def test_a_named_sweep_is_recorded_from_the_first_partial_save():
    saved = []
    rows, env = bench.run_sweep(
        [("a", (8, 4, 16))], ["native"], [], ["float32"], ["encode"], torch.device("cpu"),
        repeats=1, warmup=0, on_row=lambda rows, env: saved.append(dict(env)), sweep="scaling",
    )  # fmt: skip
    assert saved and all(e["sweep"] == "scaling" for e in saved) and env["sweep"] == "scaling"
    assert rows[0].meta["sweep"] == "scaling"


def test_scaling_table_marks_each_target():
    def row(name, B, mode, ms, mib, out=None):
        return {"name": name, "shape_name": f"{B}x2x8", "B": B, "d": 2, "K": 8, "mode": mode, "median_ms": ms,
                "peak_mem_mib": mib, "output_mib": out, "status": "ok", "meta": {"resolves_to": "native"}}  # fmt: skip

    rows = [row("reference", 10, "encode", 2.0, 100.0), row("auto", 10, "encode", 1.0, 40.0)]
    rows += [row("reference", 10, "train", 2.0, 100.0), row("auto", 10, "train", 3.0, 60.0)]
    rows += [row("reference", 99, "encode", 2.0, 0.5), row("auto", 99, "encode", 1.0, 300.0, out=20.0)]
    lines = bench.format_scaling_table(rows, budget_mib=256).splitlines()[2:]
    assert lines[0].endswith("| 0.50 | 100 | 40 | 0.40 | — | time ✓, memory ✓ |")
    assert lines[1].endswith("| 1.50 | 100 | 60 | 0.60 | — | time ✗, memory ✗ |")
    # Below 1 MiB the reference's memory gives no ratio; the largest B checks output + budget.
    assert lines[2].endswith("| — | 20.0 | time ✓, ≤ 1.5·out + budget ✗ |")


def test_profile_step_splits_a_step_into_stages(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("profile_step", path)
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "p.json"
        assert (
            profile_step.main(["--shape", "64,8,32", "--threads", "1", "--repeats", "2", "--json", str(out)])
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["cpu"] == cpu_model()
    (row,) = data["rows"]
    assert row["shape"] == [64, 8, 32] and row["floor_ms"] > 0 and row["step_ms"] > 0
    stages = row["stages_ms"]
    assert set(stages) == {s for s, _ in profile_step.STAGES} | {"rest"}
    assert sum(stages.values()) == pytest.approx(row["profiled_ms"])
    assert stages["selection"] > 0 and stages["exact stage"] > 0  # the sparse pipeline's own ops were seen
    assert "| 64, 8, 32 | 1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        profile_step.main(["--shape", "64,8"])


def test_compare_results_flags_slower_and_hungrier_rows(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_results.py"
    spec = importlib.util.spec_from_file_location("compare_results", path)
    cr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cr)

    def run(name, rows):
        f = tmp_path / f"{name}.json"
        base = {"mode": "train", "B": 8, "d": 2, "dtype": "float32", "status": "ok"}
        f.write_text(json.dumps({"environment": {}, "rows": [{**base, **r} for r in rows]}))
        return str(f)

    old = run("old", [
        {"name": "native", "K": 4, "median_ms": 10.0, "peak_mem_mib": 100.0},
        {"name": "native", "K": 8, "median_ms": 10.0, "peak_mem_mib": 100.0},
        {"name": "native", "K": 16, "median_ms": 10.0, "peak_mem_mib": 1.0},
        {"name": "native", "K": 32, "median_ms": 10.0, "peak_mem_mib": 1.0},  # not in the new run
    ])  # fmt: skip
    new = run("new", [
        {"name": "native", "K": 4, "median_ms": 12.0, "peak_mem_mib": 100.0},  # 20% slower
        {"name": "native", "K": 8, "median_ms": 9.0, "peak_mem_mib": 130.0},  # 30% (30 MiB) hungrier
        {"name": "native", "K": 16, "median_ms": 10.5, "peak_mem_mib": 1.5},  # +50% but half a MiB: noise
        {"name": "native", "K": 64, "median_ms": 1.0, "peak_mem_mib": 1.0, "status": "skipped: deadline"},
    ])  # fmt: skip
    assert cr.main([old, new]) == 0
    out = capsys.readouterr().out
    assert "| 8, 2, 4 | train | native | 10.0 | 12.0 | 1.20 | 100.0 | 100.0 | slower |" in out
    assert "| 8, 2, 8 | train | native | 10.0 | 9.0 | 0.90 | 100.0 | 130.0 | hungrier |" in out
    assert "| 8, 2, 16 | train | native | 10.0 | 10.5 | 1.05 | 1.0 | 1.5 | — |" in out
    assert "3 configurations in both runs; 2 flagged" in out
    assert cr.main([old, run("other", [{"name": "torch", "K": 4, "median_ms": 1.0}])]) == 1


def _benchmark_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_trees_sweep_table_flags_by_the_compare_results_rule(tmp_path, capsys):
    ct = _benchmark_script("compare_trees")

    def rec(role, K, mode, ms, mib):
        return {"tree": f"/trees/{role}", "role": role, "B": 8, "d": 2, "K": K, "mode": mode,
                "median_ms": ms, "n": 3, "peak_mib": mib}  # fmt: skip

    records = [
        rec("old", 4, "encode", 10.0, 100.0), rec("new", 4, "encode", 12.0, 100.0),  # 20% slower
        rec("new", 4, "encode", 12.0, 100.0), rec("old", 4, "encode", 10.0, 100.0),
        rec("old", 4, "train", 10.0, 1.0), rec("new", 4, "train", 9.0, 1.8),  # +80% but under 1 MiB
        rec("old", 8, "train", 10.0, 10.0), rec("new", 8, "train", 10.0, 13.0),  # 30% and 3 MiB hungrier
        rec("new", 8, "train", 10.0, 12.0), rec("old", 8, "train", 10.0, 10.0),  # (the means: 10 → 12.5)
        rec("old", 16, "train", 10.0, 1.0),  # measured by one tree only: not compared
    ]  # fmt: skip
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert ct.main(["--table", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| 8, 2, 4 | encode | native | 10.0 | 12.0 | 1.20 | 100.0 | 100.0 | slower |" in out
    assert "| 8, 2, 4 | train | native | 10.0 | 9.0 | 0.90 | 1.0 | 1.8 | — |" in out
    assert "| 8, 2, 8 | train | native | 10.0 | 10.0 | 1.00 | 10.0 | 12.5 | hungrier |" in out
    assert "3 configurations measured by both trees; 2 flagged." in out
    # Records of one role only: nothing compared, exit 1.
    path.write_text("".join(json.dumps(r) + "\n" for r in records if r["role"] == "old"))
    assert ct.main(["--table", str(path)]) == 1
    capsys.readouterr()
    # Trees are not names for --table (the records carry their roles); --sweep needs two different trees.
    for argv in (["a", "b", "--table", str(path)], ["a", "--sweep", "x.jsonl"], ["a", "a", "--sweep", "x.jsonl"],
                 ["a", "b", "--sweep", "x.jsonl", "--shape", "8,2"], ["a", "b", "--sweep", "x.jsonl", "--modes", "fwd"]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            ct.main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--table takes no trees" in err and "two different trees" in err
    assert "--shape takes B,d,K" in err and "--modes takes encode and/or train" in err


@pytest.mark.slow  # eight measuring processes: in the slow set (CI runs it)
@pytest.mark.skipif("native" not in sk.available_backends(), reason="the sweep measures the native backend")
def test_compare_trees_sweep_measures_each_tree_by_its_own_worker(tmp_path):
    from pathlib import Path

    ct = _benchmark_script("compare_trees")
    root = Path(__file__).resolve().parents[1]
    other = tmp_path / "other-tree"
    other.symlink_to(root, target_is_directory=True)  # a second tree: the same code under another path
    out = tmp_path / "records.jsonl"
    records = ct.sweep([str(root), str(other)], str(out), threads=1, shapes=[(64, 8, 32)], modes=("train",))
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    # A B B A, each record naming its tree and role.
    assert [(r["tree"], r["role"]) for r in records] == [
        (str(root), "old"), (str(other), "new"), (str(other), "new"), (str(root), "old")
    ]  # fmt: skip
    assert all((r["mode"], r["B"], r["d"], r["K"], r["threads"]) == ("train", 64, 8, 32, 1) for r in records)
    assert all(r["median_ms"] > 0 and r["n"] == 7 for r in records)  # 7 repeats within the 4 s budget
    text, compared = ct.sweep_table(records)
    assert compared == 1 and "| 64, 8, 32 | train | native |" in text


@pytest.mark.slow  # fresh processes importing torch: in the slow set (CI runs it)
def test_startup_cost_measures_start_up_and_the_trainers_overhead(tmp_path, monkeypatch):
    sc = _benchmark_script("startup_cost")
    monkeypatch.setitem(sc.TRAIN, "steps", 4)
    threads = torch.get_num_threads()
    try:
        assert sc.main(["--rounds", "2", "--json", str(tmp_path / "s.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["cpu"] == cpu_model()
    start = data["startup"]
    for key in (
        "python -c 'import torch'",
        "import_torch",
        "import_spade_kernels",
        "first_encode",
        "cli --help",
        "cli info",
    ):
        assert 0 < start[key]["min_s"] <= start[key]["median_s"] <= start[key]["max_s"]
    # The first encode of CPU tensors imports neither triton nor dynamo (docs/performance.md, start-up).
    assert start["triton_imported"] is False and start["dynamo_imported"] is False
    trainer = data["trainer"]
    assert trainer["same_weights"] is True  # the bare loop does the trainer's math, so times compare
    assert {k: len(v) for k, v in trainer["seconds"].items()} == {"train_spade": 2, "bare loop": 2}
    med = trainer["median_s"]
    assert trainer["ratio"] == pytest.approx(med["train_spade"] / med["bare loop"])


def test_measure_in_subprocess_runs_a_trees_worker_and_reports_its_failure(tmp_path):
    # A stub tree whose worker reports where it ran and the environment it got: the tree's own
    # worker runs (its directory, its package first on the path), with env= on top of ours.
    worker = tmp_path / "spade_kernels" / "bench" / "measure.py"
    worker.parent.mkdir(parents=True)
    (tmp_path / "spade_kernels" / "__init__.py").write_text("")
    (worker.parent / "__init__.py").write_text("")
    worker.write_text(
        "import json, os, sys\n"
        "args = json.loads(sys.argv[1])\n"
        "if args['B'] < 0:\n"
        "    print('lines before', file=sys.stderr)\n"
        "    sys.exit('the stub worker failed on purpose')\n"
        "print(json.dumps({'cwd': os.getcwd(), 'omp': os.environ.get('OMP_NUM_THREADS'),\n"
        "                  'mmap': os.environ.get('MALLOC_MMAP_THRESHOLD_'), 'B': args['B']}))\n"
    )
    r = bench.measure_in_subprocess({"B": 16}, 60, tree=str(tmp_path), env={"OMP_NUM_THREADS": "3"})
    assert r == {"cwd": str(tmp_path), "omp": "3", "mmap": "131072", "B": 16}
    with pytest.raises(RuntimeError, match="worker failed: the stub worker failed on purpose") as exc:
        bench.measure_in_subprocess({"B": -1}, 60, tree=str(tmp_path))
    assert "lines before" in exc.value.output
