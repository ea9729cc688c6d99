"""SpaDE in Overcomplete: the SAE subclass, its criterion, both of Overcomplete's training loops, checkpoints.

Needs the optional ``overcomplete`` package (scripts/test_overcomplete.sh
installs it in its own venv, with a stand-in torchvision); skipped without it.
"""

import pytest
import torch

pytest.importorskip("overcomplete.sae")

from overcomplete.sae import SAE, train_sae
from overcomplete.sae.train import train_sae_amp
from torch.utils.data import DataLoader, TensorDataset

import spade_kernels as sk
from spade_kernels.sae.integrations.overcomplete import SpaDESAE, spade_criterion

D, K = 16, 64
CPU_BACKENDS = [b for b in ("reference", "torch", "native") if b in sk.available_backends()]


def clustered(n, seed=0, dim=D):
    """Activations around 8 centres, E‖x‖² ≈ d: structure a SpaDE fits in a few steps."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=g)
    return centres[torch.randint(8, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)


def loader(x, batch=64):
    return DataLoader(TensorDataset(x), batch_size=batch, shuffle=False)


def _sae(backend="torch", **kw):
    torch.manual_seed(0)
    sae = SpaDESAE(D, K, backend=backend, gamma_reg=0.2, **kw)
    return sae


def _train(loop, backend, steps=12, **kw):
    x = clustered(64 * steps)
    sae = _sae(backend)
    sae.spade.init_from_data(x, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    logs = loop(sae, loader(x), spade_criterion(), opt, nb_epochs=2, monitoring=1, device="cpu", **kw)
    return sae, logs, x


def test_is_an_overcomplete_sae_with_the_layers_parameter_names():
    sae = _sae(use_bias=True)
    assert isinstance(sae, SAE)
    assert set(sae.state_dict()) == {"prototypes", "W_dec", "lambda_raw", "b_dec"}
    assert sae.get_dictionary() is sae.spade.W_dec and sae.get_dictionary().shape == (K, D)
    assert sum(p.numel() for p in sae.parameters()) == sum(p.numel() for p in sae.spade.parameters())
    other = SpaDESAE(D, K, use_bias=True)
    other.load_state_dict(sae.state_dict())
    for n, t in sae.spade.state_dict().items():
        assert torch.equal(other.spade.state_dict()[n], t), n


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_codes_and_loss_equal_the_layers(backend):
    sae = _sae(backend)
    layer = sk.SpaDE(D, K, backend=backend, gamma_reg=0.2)
    layer.load_state_dict(sae.spade.state_dict())
    x = torch.randn(40, D)
    pre, z, x_hat = sae(x)
    out = layer(x)
    assert pre is z and z.shape == (40, K)
    torch.testing.assert_close(z, out.codes.to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(x_hat, out.x_hat, rtol=0, atol=0)
    loss = spade_criterion()(x, x_hat, pre, z, sae.get_dictionary())
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=0)
    # Against the float64 reference, and the gradients of the criterion's loss too.
    assert torch.equal(sae.encode(x)[1], z)
    loss.backward()
    out.loss.backward()
    for n, p in sae.spade.named_parameters():
        torch.testing.assert_close(p.grad, dict(layer.named_parameters())[n].grad, rtol=1e-6, atol=1e-7)


def test_criterion_gamma_and_errors():
    sae = _sae()
    x = torch.randn(8, D)
    pre, z, x_hat = sae(x)
    t = z.spade_terms
    torch.testing.assert_close(spade_criterion(0.0)(x, x_hat, pre, z, None), t.mse)
    torch.testing.assert_close(spade_criterion(1.5)(x, x_hat, pre, z, None), t.mse + 1.5 * t.reg)
    with pytest.raises(TypeError, match="codes returned by SpaDESAE.forward"):
        spade_criterion()(x, x_hat, pre, z.clone(), None)
    with pytest.raises(ValueError, match="gamma_reg"):
        spade_criterion(-1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_train_sae_trains(backend):
    sae, logs, x = _train(train_sae, backend)
    assert len(logs["step_loss"]) == 24 and logs["avg_loss"][1] < logs["avg_loss"][0]
    assert logs["r2"][1] > 0.5 and 0 <= logs["dead_features"][-1] < 1
    # The trained weights give the layer's codes.
    torch.testing.assert_close(sae.encode(x[:32])[1], sae.spade.encode(x[:32]), rtol=0, atol=0)


def test_train_sae_matches_a_plain_loop_on_the_layer():
    """train_sae (clip 1.0, no scheduler) on SpaDESAE = the same steps written by hand on sk.SpaDE."""
    x = clustered(64 * 6)
    sae = _sae("torch")
    layer = sk.SpaDE(D, K, backend="torch", gamma_reg=0.2)
    layer.load_state_dict(sae.spade.state_dict())
    train_sae(sae, loader(x), spade_criterion(), torch.optim.Adam(sae.parameters(), lr=1e-2), nb_epochs=1,
              monitoring=0)  # fmt: skip
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for (xb,) in loader(x):
        opt.zero_grad()
        layer(xb).loss.backward()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        opt.step()
    for n, t in layer.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[n], t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_train_sae_amp_trains_without_fallbacks(backend, capsys):
    """Overcomplete's AMP loop (autocast bf16 on the CPU, a GradScaler): no NaN fallback, loss falls."""
    sae, logs, _ = _train(train_sae_amp, backend)
    assert logs["epoch_nan_fallbacks"] == [0, 0]
    assert "NaN detected" not in capsys.readouterr().out
    assert len(logs["step_loss"]) == 24 and logs["avg_loss"][1] < logs["avg_loss"][0]
    for p in sae.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()


def test_amp_and_plain_training_agree():
    _, logs32, _ = _train(train_sae, "native" if "native" in CPU_BACKENDS else "torch")
    _, logs16, _ = _train(train_sae_amp, "native" if "native" in CPU_BACKENDS else "torch")
    assert abs(logs16["avg_loss"][-1] - logs32["avg_loss"][-1]) <= 0.05 * logs32["avg_loss"][-1]


def test_monitoring_level_two_and_a_scheduler():
    from overcomplete.sae import CosineScheduler

    x = clustered(64 * 4)
    sae = _sae()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sched = CosineScheduler(opt, base_value=1e-2, final_value=1e-4, total_iters=4)
    logs = train_sae(sae, loader(x), spade_criterion(), opt, scheduler=sched, nb_epochs=1, monitoring=2)
    assert len(logs["params_grad_norm_spade.prototypes"]) == 4 and logs["lr"][-1] < 1e-2


def test_tokens_and_images_are_flattened_as_overcomplete_does():
    tok = SpaDESAE((5, D), K)
    x = torch.randn(3, 5, D)
    _, z, x_hat = tok(x)
    assert z.shape == (15, K) and x_hat.shape == (15, D)
    torch.testing.assert_close(z, tok.spade.encode(x.reshape(15, D)), rtol=0, atol=0)
    img = SpaDESAE((D, 4, 3), K)
    x = torch.randn(2, D, 4, 3)
    _, z, x_hat = img(x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, D)
    assert z.shape == (24, K)
    torch.testing.assert_close(z, img.spade.encode(rows), rtol=0, atol=0)
    # Overcomplete's own R² lines x up with x̂ the same way.
    from overcomplete.sae.train import _compute_reconstruction_error

    assert -10 < _compute_reconstruction_error(x, x_hat) <= 1
    # And a loop over images trains.
    train_sae(img, loader(torch.randn(8, D, 4, 3), batch=4), spade_criterion(),
              torch.optim.Adam(img.parameters(), lr=1e-3), nb_epochs=1, monitoring=1)  # fmt: skip


@pytest.mark.parametrize(
    "args, match",
    [(((D, 2, 3, 4), K), "input_shape"), (((0,), K), "input_shape"), (("16", K), "input_shape")],
)
def test_constructor_errors(args, match):
    with pytest.raises(ValueError, match=match):
        SpaDESAE(*args)
    with pytest.raises(ValueError, match="pre_codes"):
        SpaDESAE(D, K, pre_codes="scores")


def test_input_errors():
    sae = SpaDESAE((5, D), K)
    with pytest.raises(ValueError, match=r"\(N, 5, 16\)"):
        sae(torch.randn(3, 4, D))
    with pytest.raises(TypeError, match="torch.Tensor"):
        sae.encode([1.0] * D)
    with pytest.raises(NotImplementedError, match="prototypes"):
        sae.tied()


def test_distance_pre_codes():
    sae = _sae(pre_codes="distances")
    x = torch.randn(6, D)
    pre, _, _ = sae(x)
    torch.testing.assert_close(pre, torch.cdist(x, sae.spade.prototypes.detach()) ** 2, rtol=1e-4, atol=1e-4)
    assert torch.equal(sae.encode(x)[0], pre)


def test_sparse_encode_decode():
    sae = _sae()
    x = torch.randn(10, D)
    codes = sae.encode_sparse(x)
    torch.testing.assert_close(codes.to_dense(), sae.encode(x)[1], rtol=0, atol=0)
    torch.testing.assert_close(sae.decode(codes), sae.decode(codes.to_dense()), rtol=1e-6, atol=1e-6)


def test_checkpoints_convert_both_ways(tmp_path):
    sae, _, x = _train(train_sae, "torch", steps=3)
    sae.save_pretrained(tmp_path / "a")
    layer = sk.SpaDE.from_pretrained(tmp_path / "a", backend="torch")
    torch.testing.assert_close(layer.encode(x[:20]), sae.encode(x[:20])[1], rtol=0, atol=0)
    layer.save_pretrained(tmp_path / "b")
    back = SpaDESAE.from_pretrained(tmp_path / "b", (4, D), backend="torch")
    assert back.input_shape == (4, D) and back.gamma_reg == sae.gamma_reg
    torch.testing.assert_close(back.encode(x[:20])[1], sae.encode(x[:20])[1], rtol=0, atol=0)
    shared = SpaDESAE.from_spade(layer)
    assert shared.spade is layer and shared.prototypes is layer.prototypes
    with pytest.raises(ValueError, match="features"):
        SpaDESAE.from_spade(layer, (D + 1,))
    # Overcomplete users' plain torch.save of the state dict loads into a fresh SAE.
    torch.save(sae.state_dict(), tmp_path / "sd.pt")
    fresh = SpaDESAE(D, K, backend="torch")
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    torch.testing.assert_close(fresh.encode(x[:20])[1], sae.encode(x[:20])[1], rtol=0, atol=0)
