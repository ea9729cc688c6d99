import json
import math

import pytest
import torch
from conftest import backends_on

import spade_kernels as sk
from spade_kernels import _ext
from spade_kernels.reference import spade_forward_reference

#: Every registered backend that runs on CPU tensors here (loops across backends).
CPU_BACKENDS = backends_on("cpu")


def _layer(backend, d=6, K=40, dtype=torch.float64, search=None, **kw):
    torch.manual_seed(1)
    options = {"search": search} if search and backend != "reference" else None
    return sk.SpaDE(d, K, backend=backend, dtype=dtype, backend_options=options, **kw)


def test_paper_init():
    m = sk.SpaDE(32, 100)
    torch.testing.assert_close(m.W_dec, m.prototypes)
    assert abs(m.prototypes.std().item() - 1) < 0.05
    torch.testing.assert_close(m.lam, torch.tensor(1 / 64))
    assert m.b_dec is None
    assert math.isclose(sk.SpaDE(8, 4, lambda_init=0.3).lam.item(), 0.3, rel_tol=1e-6)


@pytest.mark.parametrize("reg_on", ["encoder", "decoder"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_forward_and_gradients_match_float64_reference(backend, reg_on, use_bias, product_route, search):
    m = _layer(backend, reg_on=reg_on, use_bias=use_bias, gamma_reg=0.3, search=search)
    with torch.no_grad():
        m.W_dec.add_(0.1 * torch.randn_like(m.W_dec))  # decoder ≠ encoder
        if use_bias:
            m.b_dec.normal_()
    x = torch.randn(9, 6, dtype=torch.float64)
    out = m(x)
    out.loss.backward()
    params = [m.prototypes, m.W_dec, m.lambda_raw] + ([m.b_dec] if use_bias else [])
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    A, W, raw = ref_params[:3]
    b = ref_params[3] if use_bias else None
    x_hat, z, loss, mse, reg = spade_forward_reference(
        x, A, W, torch.nn.functional.softplus(raw), b_dec=b, gamma_reg=0.3, reg_on=reg_on
    )
    loss.backward()
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.codes.to_dense(), z)
    for ours, theirs in ((out.loss, loss), (out.mse, mse), (out.reg, reg)):
        torch.testing.assert_close(ours, theirs)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("reg_on", ["encoder", "decoder"])
def test_gradcheck_layer_loss_torch_backend(reg_on, product_route):
    m = _layer("torch", d=3, K=12, use_bias=True, reg_on=reg_on)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    names = ["prototypes", "W_dec", "lambda_raw", "b_dec"]
    params = [getattr(m, n).detach().clone().requires_grad_() for n in names]

    def loss(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,)).loss

    assert torch.autograd.gradcheck(loss, (x, *params))


def test_encode_decode_and_leading_dims():
    m = _layer("torch")
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    z = m.encode(x)
    assert z.shape == (2, 3, 40)
    codes = m.encode_sparse(x)
    assert codes.indices.shape[:2] == (2, 3)
    torch.testing.assert_close(codes.to_dense(), z)
    torch.testing.assert_close(m.decode(codes), m.decode(z))
    out = m(x)
    assert out.x_hat.shape == x.shape
    torch.testing.assert_close(out.x_hat, m.decode(z))


def test_sparse_decode_gradients_match_dense():
    m = _layer("torch", use_bias=True)
    x = torch.randn(7, 6, dtype=torch.float64)
    codes = m.encode_sparse(x)
    g = torch.randn(7, 6, dtype=torch.float64)
    (m.decode(codes) * g).sum().backward()
    sparse_grads = (m.W_dec.grad.clone(), m.b_dec.grad.clone(), m.prototypes.grad.clone())
    m.zero_grad()
    (m.decode(m.encode(x)) * g).sum().backward()
    for a, b in zip(sparse_grads, (m.W_dec.grad, m.b_dec.grad, m.prototypes.grad)):
        torch.testing.assert_close(a, b)


def test_backends_agree_in_float32():
    x = torch.randn(64, 6)
    outs = [_layer(b, dtype=torch.float32)(x) for b in CPU_BACKENDS]
    for out in outs[1:]:  # every backend against the reference
        torch.testing.assert_close(outs[0].loss, out.loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[0].codes.to_dense(), out.codes.to_dense(), atol=1e-5, rtol=0)


def test_bfloat16_layer():
    m = sk.SpaDE(16, 64, dtype=torch.bfloat16, backend="torch")
    out = m(torch.randn(10, 16, dtype=torch.bfloat16))
    assert out.x_hat.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert m.prototypes.grad.dtype == torch.bfloat16 and torch.isfinite(m.prototypes.grad).all()


def test_init_from_data():
    x = torch.randn(500, 8)
    m = sk.SpaDE(8, 50).init_from_data(x)
    rows = {tuple(r.tolist()) for r in x}
    assert all(tuple(r.tolist()) in rows for r in m.prototypes)
    assert len({tuple(r.tolist()) for r in m.prototypes}) == 50  # without replacement
    torch.testing.assert_close(m.W_dec, m.prototypes)
    small = sk.SpaDE(8, 50).init_from_data(x[:3])  # fewer samples than latents
    assert all(tuple(r.tolist()) in rows for r in small.prototypes)
    with pytest.raises(ValueError, match="8 features"):
        m.init_from_data(torch.randn(10, 3))


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    centers = torch.randn(8, 16) * 3
    data = centers[torch.randint(0, 8, (2048,))] + 0.3 * torch.randn(2048, 16)
    m = sk.SpaDE(16, 32, backend="torch").init_from_data(data[:256])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for step in range(40):
        out = m(data[step * 48 : (step + 1) * 48])
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])


def test_every_backend_trains_like_the_reference(product_route, search):
    data = torch.randn(6, 32, 5, dtype=torch.float64)
    ms = [_layer(b, d=5, K=20, search=search) for b in CPU_BACKENDS]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in ms]
    for batch in data:
        for m, opt in zip(ms, opts):
            opt.zero_grad()
            m(batch).loss.backward()
            opt.step()
    for m in ms[1:]:
        for p, q in zip(ms[0].parameters(), m.parameters()):
            torch.testing.assert_close(p, q)


def test_checkpoint_round_trip(tmp_path):
    m = sk.SpaDE(5, 11, use_bias=True, gamma_reg=0.25, lambda_init=0.07, reg_on="decoder")
    with torch.no_grad():
        m.b_dec.normal_()
        m.lambda_raw.add_(0.5)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "spade"
    assert {k: cfg[k] for k in ("d_in", "d_sae", "dtype", "lambda_init", "gamma_reg")} == {
        "d_in": 5,
        "d_sae": 11,
        "dtype": "float32",
        "lambda_init": 0.07,
        "gamma_reg": 0.25,
    }
    assert (tmp_path / "sae_weights.safetensors").exists()
    m2 = sk.SpaDE.from_pretrained(tmp_path, backend="torch")
    for (n, p), (n2, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert n == n2
        torch.testing.assert_close(p, p2)
    assert m2.reg_on == "decoder" and m2.backend == "torch"
    x = torch.randn(4, 5)
    torch.testing.assert_close(m(x).loss, m2(x).loss)
    assert cfg["apply_b_dec_to_input"] is False  # SAELens must not subtract b_dec from x


def test_from_pretrained_reads_configs_without_training_keys(tmp_path):
    # SAELens inference checkpoints store no gamma_reg / lambda_init.
    m = sk.SpaDE(5, 11)
    with torch.no_grad():
        m.lambda_raw.add_(0.5)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["gamma_reg"], cfg["lambda_init"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    m2 = sk.SpaDE.from_pretrained(tmp_path)
    assert m2.gamma_reg == 0.1
    torch.testing.assert_close(m2.lam, m.lam)


@pytest.mark.parametrize(
    "key,value",
    [
        ("apply_b_dec_to_input", True),
        ("normalize_activations", "layer_norm"),
        ("reshape_activations", "hook_z"),
    ],
)
def test_from_pretrained_refuses_sae_lens_options_it_cannot_apply(tmp_path, key, value):
    sk.SpaDE(5, 11, use_bias=True).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg[key] = value
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{key}=.*SAE.load_from_disk"):
        sk.SpaDE.from_pretrained(tmp_path)


def test_fold_input_scale():
    # A layer trained on s·x, folded, takes x: same codes, output x̂/s.
    m = _layer("torch", use_bias=True)
    with torch.no_grad():
        m.b_dec.normal_()
    x = torch.randn(9, 6, dtype=torch.float64)
    before = m(3.0 * x)
    m.fold_input_scale(3.0)
    after = m(x)
    torch.testing.assert_close(after.codes.to_dense(), before.codes.to_dense())
    torch.testing.assert_close(after.x_hat, before.x_hat / 3.0)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        m.fold_input_scale(0.0)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        sk.SpaDE.from_pretrained(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk"}))
    with pytest.raises(ValueError, match="not 'spade'"):
        sk.SpaDE.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"d_in": 0, "d_sae": 4}, "d_in must be a positive int"),
        ({"d_in": 4, "d_sae": 2.5}, "d_sae must be a positive int"),
        ({"d_in": 4, "d_sae": 4, "lambda_init": 0.0}, "lambda_init"),
        ({"d_in": 4, "d_sae": 4, "gamma_reg": -1.0}, "gamma_reg"),
        ({"d_in": 4, "d_sae": 4, "reg_on": "both"}, "reg_on"),
        ({"d_in": 4, "d_sae": 4, "backend": "fast"}, "unknown backend"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sk.SpaDE(**kwargs)


def test_call_errors():
    m = sk.SpaDE(4, 8)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        m(torch.randn(3, 5))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="n_latents=9"):
        m.decode(
            sk.SparseCodes(torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1), torch.ones(1).long(), 9)
        )
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        m.decode(torch.randn(2, 7))


def test_nan_input_row():
    m = sk.SpaDE(4, 8, backend="torch")
    x = torch.randn(3, 4)
    x[1, 2] = math.nan
    out = m(x)
    assert torch.isnan(out.x_hat[1]).all()
    assert torch.isfinite(out.x_hat[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layer_gradients_against_float64(dtype):
    torch.manual_seed(4)
    m = sk.SpaDE(16, 64, backend="torch", dtype=dtype, gamma_reg=0.2)
    x = torch.randn(12, 16, dtype=dtype)
    m(x).loss.backward()
    names = ["prototypes", "W_dec", "lambda_raw"]
    ref = {n: getattr(m, n).detach().double().requires_grad_() for n in names}
    softplus = torch.nn.functional.softplus
    loss = spade_forward_reference(
        x.double(), ref["prototypes"], ref["W_dec"], softplus(ref["lambda_raw"]), gamma_reg=0.2
    )[2]
    loss.backward()
    for n in names:  # gradients come back in the parameter dtype: ~3 significant digits
        ours, theirs = getattr(m, n).grad.double(), ref[n].grad
        assert ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-6)) < 3e-2, n


def test_lambda_trains_in_bfloat16():
    m = sk.SpaDE(768, 64, dtype=torch.bfloat16, backend="torch")
    assert m.lambda_raw.dtype == torch.float32
    assert m.lam.item() == pytest.approx(1 / 1536, rel=1e-6)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    before = m.lambda_raw.item()
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(32, 768, dtype=torch.bfloat16)).loss.backward()
        opt.step()
    assert m.lambda_raw.item() != before


def test_backend_is_checked_by_name_at_construction(monkeypatch):
    # A layer may be built on the CPU and moved to a GPU later: only the name is
    # checked up front; availability is checked on the first call.
    monkeypatch.setattr(_ext, "_LOADED", False)
    monkeypatch.setattr(_ext, "reason", "spade_kernels._C was not built")
    m = sk.SpaDE(4, 8, backend="native")
    with pytest.raises(ValueError, match="backend 'native' is not available: spade_kernels._C was not built"):
        m(torch.randn(2, 4))


def test_decode_checks_device_and_indices():
    m = sk.SpaDE(4, 8)
    with pytest.raises(ValueError, match="z is on meta"):
        m.decode(torch.randn(3, 8, device="meta"))
    bad = sk.SparseCodes(torch.tensor([[9]]), torch.ones(1, 1), torch.ones(1).long(), 8)
    with pytest.raises(ValueError, match=r"codes.indices must lie in \[0, 8\)"):
        m.decode(bad)


def test_nan_row_does_not_poison_decoder_gradient():
    m = sk.SpaDE(4, 8, backend="torch")
    x = torch.randn(3, 4)
    x[1, 0] = math.nan
    out = m.decode(m.encode_sparse(x))
    out[[0, 2]].sum().backward()
    assert torch.isfinite(m.W_dec.grad).all()


def test_constructor_type_errors_and_dtype_names(tmp_path):
    with pytest.raises(TypeError, match="lambda_init must be a float"):
        sk.SpaDE(4, 8, lambda_init=True)
    sk.SpaDE(4, 8).save_pretrained(tmp_path)
    assert sk.SpaDE.from_pretrained(tmp_path, dtype="float64").prototypes.dtype == torch.float64
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        sk.SpaDE.from_pretrained(tmp_path, dtype="float99")


def test_one_d_input_and_three_leading_dims():
    m = sk.SpaDE(4, 8, backend="torch")
    assert m(torch.randn(4)).x_hat.shape == (4,)
    out = m(torch.randn(2, 3, 5, 4))
    assert out.x_hat.shape == (2, 3, 5, 4) and out.codes.to_dense().shape == (2, 3, 5, 8)


def test_from_pretrained_names_the_file_and_field(tmp_path):
    import json as _json

    from safetensors.torch import save_file

    good = tmp_path / "good"
    sk.SpaDE(4, 6).save_pretrained(good)
    cfg = _json.loads((good / "cfg.json").read_text())
    # The cfg.json path works as well as its folder.
    assert sk.SpaDE.from_pretrained(good / "cfg.json").d_sae == 6

    def case(name, cfg_text=None, tensors=None):
        d = tmp_path / name
        d.mkdir()
        (d / "cfg.json").write_text(_json.dumps(cfg) if cfg_text is None else cfg_text)
        state = sk.SpaDE(4, 6).state_dict()
        save_file(
            {k: v.contiguous() for k, v in (tensors or state).items()}, str(d / "sae_weights.safetensors")
        )
        return d

    state = sk.SpaDE(4, 6).state_dict()
    cases = [
        (case("truncated", cfg_text=_json.dumps(cfg)[:20]), r"cfg.json is not valid JSON"),
        (case("list", cfg_text="[1, 2]"), r"cfg.json must hold a JSON object, got list"),
        (
            case("no_d_in", cfg_text=_json.dumps({k: v for k, v in cfg.items() if k != "d_in"})),
            r"'d_in' must be",
        ),
        (
            case("shape", cfg_text=_json.dumps({**cfg, "d_in": 5})),
            r"'prototypes' has shape \(6, 4\) but .*cfg.json",
        ),
        (case("nan", tensors={**state, "W_dec": torch.full((6, 4), math.nan)}), r"'W_dec' must hold finite"),
        (case("lam", tensors={**state, "lambda_raw": torch.tensor(-1e4)}), r"λ = softplus\(lambda_raw\) = 0"),
        (case("extra", tensors={**state, "junk": torch.zeros(2)}), r"does not have: \['junk'\]"),
        (case("missing", tensors={k: v for k, v in state.items() if k != "W_dec"}), r"lacks \['W_dec'\]"),
    ]
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            sk.SpaDE.from_pretrained(path)
    bad = case("garbage")
    (bad / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        sk.SpaDE.from_pretrained(bad)
