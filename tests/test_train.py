import io
import math

import pytest
import torch

from spade_kernels import SpaDE
from spade_kernels.sae.data import make_separability, scale_to_unit_norm
from spade_kernels.sae.train import concept_metrics, evaluate, train_spade


def _layer(d_in=2, d_sae=32, seed=0, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SpaDE(d_in, d_sae, **kwargs)


@pytest.fixture(scope="module")
def data():
    ds = make_separability(4096, seed=0)
    return ds, scale_to_unit_norm(ds.x)[0]


def test_loss_falls_and_history(data):
    _, x = data
    layer = _layer()
    before = evaluate(layer, x)["loss"]
    history = train_spade(layer, x, batch_size=64, progress=False)
    assert len(history) == 64
    for values in (history.loss, history.mse, history.l0, history.lam, history.lr):
        assert len(values) == 64 and all(math.isfinite(v) for v in values)
    assert sum(history.loss[-5:]) / 5 < 0.5 * sum(history.loss[:5]) / 5
    assert evaluate(layer, x)["loss"] < 0.5 * before
    assert all(1 <= v <= 32 for v in history.l0)
    assert history.lam[0] == pytest.approx(layer.lambda_init)
    assert history.lam[-1] != history.lam[0]  # λ is trained


def test_cosine_schedule(data):
    _, x = data
    history = train_spade(_layer(), x[:640], batch_size=64, epochs=2, lr=1e-2, lr_final=1e-4, progress=False)
    assert len(history) == 20
    assert history.lr[0] == pytest.approx(1e-2) and history.lr[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(history.lr, history.lr[1:]))
    assert history.lr[9] + history.lr[10] == pytest.approx(1e-2 + 1e-4)  # symmetric about the midpoint


def test_deterministic_given_seed(data):
    _, x = data
    runs = [train_spade(_layer(), x[:512], batch_size=64, seed=5, progress=False).loss for _ in range(2)]
    assert runs[0] == runs[1]
    other = train_spade(_layer(), x[:512], batch_size=64, seed=6, progress=False).loss
    assert other != runs[0]


def test_progress_lines(data):
    _, x = data
    stream = io.StringIO()
    train_spade(_layer(), x[:640], batch_size=64, log_every=4, stream=stream)
    lines = stream.getvalue().splitlines()
    # Steps 4 and 8, then the last step (10).
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]
    assert all(key in lines[-1] for key in ("loss", "mse", "L0", "λ"))


def test_progress_tty(data):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    _, x = data
    stream = Tty()
    train_spade(_layer(), x[:640], batch_size=64, stream=stream)
    text = stream.getvalue()
    # One redrawn line: tqdm's bar (the default), or the plain line without tqdm.
    assert text.endswith("\n") and text.count("\n") == 1
    last = text.rsplit("\r", 1)[-1]
    assert "10/10" in last and "loss " in last and "λ " in last


def test_float64_layer(data):
    _, x = data
    layer = _layer(dtype=torch.float64)
    history = train_spade(layer, x[:256].double(), batch_size=64, progress=False)
    assert len(history) == 4 and all(math.isfinite(v) for v in history.loss)


def test_train_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        train_spade(_layer(), torch.randn(10, 3), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train_spade(_layer(), torch.randn(10, 2), batch_size=0, progress=False)


def test_concept_metrics_perfect_detector():
    # One prototype per cluster centre and a large λ: every sample activates exactly
    # its own concept's latent, so top-1 F1 is 1 and L0 is 1.
    ds = make_separability(1300, noise=0.05, seed=0)
    layer = _layer(2, 13, lambda_init=100.0)
    with torch.no_grad():
        centres = torch.stack([ds.x[ds.labels == c].mean(0) for c in range(13)])
        layer.prototypes.copy_(centres[torch.arange(13).roll(1)])  # latent k detects concept k-1
    m = concept_metrics(layer, ds.x, ds.labels, 13, top_k=1, batch_size=100)
    torch.testing.assert_close(m["top_f1"], torch.ones(13, dtype=torch.float64))
    torch.testing.assert_close(m["mean_l0"], torch.ones(13, dtype=torch.float64))
    assert m["count"].sum() == 1300
    # With top-5 the four other latents never fire on the concept: F1 = 1/5.
    m5 = concept_metrics(layer, ds.x, ds.labels, 13, batch_size=100)
    torch.testing.assert_close(m5["top_f1"], torch.full((13,), 0.2, dtype=torch.float64))


def test_concept_metrics_ranges_and_batching(data):
    ds, x = data
    layer = _layer()
    a = concept_metrics(layer, x, ds.labels, ds.n_concepts, batch_size=4096)
    b = concept_metrics(layer, x, ds.labels, ds.n_concepts, batch_size=333)
    assert ((a["top_f1"] >= 0) & (a["top_f1"] <= 1)).all()
    assert (a["mean_l0"] >= 1).all()
    torch.testing.assert_close(a["top_f1"], b["top_f1"])
    torch.testing.assert_close(a["mean_l0"], b["mean_l0"])
    # Batched L0 agrees with the whole-batch encoder.
    per_sample = layer.encode_sparse(x).support_size.double()
    expected = torch.stack([per_sample[ds.labels == c].mean() for c in range(ds.n_concepts)])
    torch.testing.assert_close(a["mean_l0"], expected)


def test_concept_metrics_rejects_bad_labels(data):
    ds, x = data
    with pytest.raises(ValueError, match="labels must lie"):
        concept_metrics(_layer(), x, ds.labels, ds.n_concepts - 1)
    with pytest.raises(ValueError, match="labels must have shape"):
        concept_metrics(_layer(), x, ds.labels[:-1], ds.n_concepts)


def test_evaluate_matches_full_batch(data):
    _, x = data
    layer = _layer()
    stats = evaluate(layer, x, batch_size=1000)
    with torch.no_grad():
        out = layer(x)
    assert stats["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert stats["mse"] == pytest.approx(out.mse.item(), rel=1e-5)
    assert stats["l0"] == pytest.approx(out.codes.support_size.float().mean().item(), rel=1e-6)
    assert stats["lam"] == pytest.approx(layer.lam.item())


def test_concept_metrics_any_encoder(data):
    # A callable encoder is scored by the same metric: dense codes and SparseCodes give the
    # layer's own result.
    ds, x = data
    layer = _layer()
    expected = concept_metrics(layer, x, ds.labels, ds.n_concepts, batch_size=1000)
    for encode in (layer.encode, layer.encode_sparse):
        got = concept_metrics(encode, x, ds.labels, ds.n_concepts, batch_size=1000)
        for key in ("top_f1", "mean_l0", "count"):
            torch.testing.assert_close(got[key], expected[key])


def test_concept_metrics_relu_style_codes():
    # Hand-made codes: latent 0 fires on concept 0 only, latent 1 on everything, latent 2 never.
    labels = torch.tensor([0, 0, 1, 1])
    x = labels[:, None].float()

    def encode(xb):
        return torch.stack([1 - xb[:, 0], torch.full_like(xb[:, 0], 0.5), torch.zeros_like(xb[:, 0])], 1)

    m = concept_metrics(encode, x, labels, 2, top_k=1, batch_size=3)
    # Concept 0: latent 0 (F1 1); concept 1: latent 1 (2·2 / (4 + 2)).
    torch.testing.assert_close(m["top_f1"], torch.tensor([1.0, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(m["mean_l0"], torch.tensor([2.0, 1.0], dtype=torch.float64))


def test_concept_metrics_rejects_bad_encoder(data):
    ds, x = data
    with pytest.raises(TypeError, match="callable encoder"):
        concept_metrics("not an encoder", x, ds.labels, ds.n_concepts)
    with pytest.raises(ValueError, match="the encoder must return codes"):
        concept_metrics(lambda xb: xb.sum(1), x, ds.labels, ds.n_concepts)


def test_tty_progress_is_a_tqdm_bar_with_the_same_fields():
    pytest.importorskip("tqdm")
    import io

    class TTY(io.StringIO):
        def isatty(self):
            return True

    stream = TTY()
    train_spade(SpaDE(4, 16), torch.randn(1000, 4), batch_size=64, progress=True, stream=stream)
    text = stream.getvalue()
    assert "16/16" in text and "step/s" in text
    last = text.rstrip("\n").split("\r")[-1]
    for field in ("loss ", "mse ", "L0 ", "λ "):
        assert field in last, last


def test_the_trainer_steps_with_fused_adam_which_matches_plain_adam():
    from spade_kernels.sae import train as train_module

    torch.manual_seed(0)
    layers = [SpaDE(8, 32), SpaDE(8, 32)]
    layers[1].load_state_dict(layers[0].state_dict())
    fused = train_module._adam(layers[0], 1e-2)
    assert fused.defaults["fused"] is True  # CPU float32: torch has a fused kernel
    plain = torch.optim.Adam(layers[1].parameters(), lr=1e-2)
    x = torch.randn(256, 8)
    for xb in x.split(32):
        for layer, opt in zip(layers, (fused, plain)):
            opt.zero_grad()
            layer(xb).loss.backward()
            opt.step()
    for a, b in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
