"""SpaDE in dictionary_learning: the Dictionary, the trainer in the library's own trainSAE, loading.

Needs the optional ``dictionary-learning`` package (scripts/test_dictionary_learning.sh
installs it in its own venv); skipped without it.
"""

import copy
import itertools
import json
import math
from typing import ClassVar

import pytest
import torch

pytest.importorskip("dictionary_learning")
training = pytest.importorskip("dictionary_learning.training")

from dictionary_learning.dictionary import Dictionary  # noqa: E402
from dictionary_learning.trainers.trainer import SAETrainer  # noqa: E402

import spade_kernels as sk  # noqa: E402
from spade_kernels.sae.integrations.dictionary_learning import (  # noqa: E402
    LossLog,
    SpaDEDictionary,
    SpaDETrainer,
    load_dictionary,
)

D, K, B = 16, 64, 128
#: Backends that run on CPU tensors here ("native" runs its C++ kernels when the extension is built).
CPU_BACKENDS = [b for b in ("reference", "torch", "native") if b in sk.available_backends()]


class RecordingTrainer(SpaDETrainer):
    """SpaDETrainer that keeps what trainSAE does not return: itself, per-step losses, λ, lr."""

    instances: ClassVar[list] = []

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.losses, self.lams, self.lrs = [], [], []
        self.after_first_step = None
        RecordingTrainer.instances.append(self)

    def update(self, step, activations):
        self.lrs.append([g["lr"] for g in self.optimizer.param_groups])
        loss = super().update(step, activations)
        self.losses.append(loss)
        self.lams.append(self.lam)
        if self.after_first_step is None:
            self.after_first_step = copy.deepcopy(self.ae.state_dict())
        return loss


def clustered_batches(n, scale=1.0, seed=0, batch=B):
    """Activations around 8 centres: structure a SpaDE can fit in a few steps."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, D, generator=g)
    out = []
    for _ in range(n):
        idx = torch.randint(8, (batch,), generator=g)
        out.append(scale * (centres[idx] + 0.3 * torch.randn(batch, D, generator=g)))
    return out


def run_trainsae(steps, data_scale=1.0, save_dir=None, **trainer_kwargs):
    """Train one RecordingTrainer through dictionary_learning's trainSAE; return it."""
    run_kwargs = {
        k: trainer_kwargs.pop(k)
        for k in ("normalize_activations", "verbose", "autocast_dtype")
        if k in trainer_kwargs
    }
    cfg = {
        "trainer": RecordingTrainer,
        "steps": steps,
        "activation_dim": D,
        "dict_size": K,
        "layer": 3,
        "lm_name": "toy-lm",
        "device": "cpu",
        "seed": 0,
        "backend": "torch",
        **trainer_kwargs,
    }
    RecordingTrainer.instances.clear()
    # trainSAE divides the batches in place when it normalises: hand it copies.
    data = [b.clone() for b in clustered_batches(steps + 1, data_scale)]
    training.trainSAE(
        data,
        [cfg],
        steps=steps,
        save_dir=None if save_dir is None else str(save_dir),
        save_steps=[steps // 2] if save_dir is not None else None,
        log_steps=5,
        device="cpu",
        **run_kwargs,
    )
    (trainer,) = RecordingTrainer.instances
    return trainer


def fvu(x, x_hat):
    return (((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item()


# -- the Dictionary ---------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lead", [(7,), (3, 5)])
def test_forward_output_features(backend, lead):
    ae = SpaDEDictionary(D, K, use_bias=True, backend=backend)
    assert isinstance(ae, Dictionary)
    assert (ae.activation_dim, ae.dict_size) == (D, K)
    with torch.no_grad():
        ae.b_dec.normal_()
    x = torch.randn(*lead, D)
    x_hat, f = ae(x, output_features=True)
    assert x_hat.shape == (*lead, D)
    assert f.shape == (*lead, K)
    assert (f >= 0).all()
    torch.testing.assert_close(f.sum(-1), torch.ones(lead), atol=1e-5, rtol=0)
    torch.testing.assert_close(ae(x), x_hat)
    torch.testing.assert_close(ae.encode(x), f, atol=1e-6, rtol=0)
    torch.testing.assert_close(ae.decode(f), x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ae.encode_sparse(x).to_dense(), f, atol=1e-6, rtol=0)
    # The same codes as the package's layer with the same parameters.
    torch.testing.assert_close(ae.spade.encode(x), f, atol=1e-6, rtol=0)


def test_backends_agree():
    ae = SpaDEDictionary(D, K, backend="reference")
    x = torch.randn(40, D)
    x_ref, f_ref = ae(x, output_features=True)
    ae.backend = "torch"
    assert ae.spade.backend == "torch"
    x_t, f_t = ae(x, output_features=True)
    torch.testing.assert_close(f_t, f_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_t, x_ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown backend"):
        ae.backend = "nope"


@pytest.mark.parametrize("scale", [3.7, 0.05])
def test_scale_biases_maps_the_model_to_scaled_activations(scale):
    ae = SpaDEDictionary(D, K, use_bias=True, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        ae.b_dec.normal_()
    x = torch.randn(50, D, dtype=torch.float64)
    x_hat, f = ae(x, output_features=True)
    lam = ae.lam.item()

    scaled = copy.deepcopy(ae)
    scaled.scale_biases(scale)
    x_hat_s, f_s = scaled(scale * x, output_features=True)
    torch.testing.assert_close(f_s, f, atol=1e-9, rtol=0)
    torch.testing.assert_close(x_hat_s, scale * x_hat, atol=1e-9, rtol=1e-9)
    assert scaled.lam.item() == pytest.approx(lam / scale**2, rel=1e-12)
    torch.testing.assert_close(scaled.prototypes, scale * ae.prototypes)
    torch.testing.assert_close(scaled.W_dec, scale * ae.W_dec)
    torch.testing.assert_close(scaled.b_dec, scale * ae.b_dec)

    # trainSAE's use: trained on x / n, scale_biases(n) gives the model of raw x.
    n = scale
    raw = copy.deepcopy(ae)
    raw.scale_biases(n)
    torch.testing.assert_close(raw(x), n * ae(x / n), atol=1e-9, rtol=1e-9)

    # ... and its checkpoint round trip, scale_biases(n) then (1/n), is the identity.
    scaled.scale_biases(1 / scale)
    for name, p in ae.state_dict().items():
        torch.testing.assert_close(scaled.state_dict()[name], p, atol=1e-12, rtol=1e-12)


def test_scale_biases_one_is_exact_and_bad_scales_raise():
    ae = SpaDEDictionary(D, K)
    before = copy.deepcopy(ae.state_dict())
    ae.scale_biases(1.0)
    for name, p in ae.state_dict().items():
        assert torch.equal(p, before[name])
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            ae.scale_biases(bad)


def test_from_pretrained_layouts(tmp_path):
    ae = SpaDEDictionary(D, K, use_bias=True, backend="torch")
    with torch.no_grad():
        ae.b_dec.normal_()
        ae.spade.lambda_raw.fill_(-1.0)
    x = torch.randn(20, D)
    # A bare state dict, as trainSAE saves it.
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    loaded = SpaDEDictionary.from_pretrained(tmp_path / "ae.pt", gamma_reg=0.3, backend="torch")  # same bits
    assert loaded.spade.gamma_reg == 0.3 and loaded.b_dec is not None
    torch.testing.assert_close(loaded(x), ae(x), atol=0, rtol=0)
    # The SAELens layout of SpaDE.save_pretrained.
    ae.spade.save_pretrained(tmp_path / "sae")
    from_sae = SpaDEDictionary.from_pretrained(tmp_path / "sae", dtype="float64")
    assert from_sae.prototypes.dtype == torch.float64
    torch.testing.assert_close(from_sae(x.double()), ae(x).double(), atol=1e-5, rtol=1e-5)

    with pytest.raises(FileNotFoundError):
        SpaDEDictionary.from_pretrained(tmp_path / "missing.pt")
    torch.save({"encoder.weight": torch.zeros(K, D)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a SpaDEDictionary"):
        SpaDEDictionary.from_pretrained(tmp_path / "other.pt")


# -- the trainer, through trainSAE -------------------------------------------------


def test_trainsae_trains_saves_and_reloads(tmp_path):
    steps = 30
    trainer = run_trainsae(steps, save_dir=tmp_path)
    assert isinstance(trainer, SAETrainer)
    losses = torch.tensor(trainer.losses)
    assert len(losses) == steps and torch.isfinite(losses).all()
    assert losses[-5:].mean() < 0.8 * losses[:5].mean()
    for name, p in trainer.ae.state_dict().items():
        assert not torch.equal(p, trainer.after_first_step[name]), f"{name} did not change"

    run_dir = tmp_path / "trainer_0"
    cfg = json.loads((run_dir / "config.json").read_text())["trainer"]
    assert cfg == json.loads(json.dumps(trainer.config))
    assert (cfg["trainer_class"], cfg["dict_class"]) == ("RecordingTrainer", "SpaDEDictionary")
    assert (cfg["activation_dim"], cfg["dict_size"], cfg["backend"]) == (D, K, "torch")
    assert (cfg["layer"], cfg["lm_name"], cfg["steps"], cfg["seed"]) == (3, "toy-lm", steps, 0)

    x = clustered_batches(1, seed=1)[0]
    with torch.no_grad():
        want_x_hat, want_f = trainer.ae(x, output_features=True)
        loaded, config = load_dictionary(run_dir)
        assert config["trainer"] == cfg
        assert loaded.spade.gamma_reg == cfg["gamma_reg"]
        got_x_hat, got_f = loaded(x, output_features=True)
        torch.testing.assert_close(got_f, want_f, atol=0, rtol=0)
        torch.testing.assert_close(got_x_hat, want_x_hat, atol=0, rtol=0)
        for path in (run_dir, run_dir / "ae.pt"):
            reloaded = SpaDEDictionary.from_pretrained(
                path, backend=cfg["backend"]
            )  # the same backend: same bits
            torch.testing.assert_close(reloaded(x), want_x_hat, atol=0, rtol=0)
        # The mid-run checkpoint loads too and is an earlier model: held-out
        # reconstruction improves from step 1 to the checkpoint to the end.
        ckpt = SpaDEDictionary.from_pretrained(run_dir / "checkpoints" / f"ae_{steps // 2}.pt")
        first = SpaDEDictionary(D, K)
        first.load_state_dict(trainer.after_first_step)
        assert fvu(x, first(x)) > fvu(x, ckpt(x)) > fvu(x, got_x_hat)
        assert fvu(x, got_x_hat) < 0.6


def test_trainsae_normalized_run_saves_a_model_of_raw_activations(tmp_path):
    scale = 40.0
    trainer = run_trainsae(20, data_scale=scale, save_dir=tmp_path, normalize_activations=True)
    raw = clustered_batches(1, scale, seed=1)[0]
    loaded, _ = load_dictionary(tmp_path / "trainer_0")
    with torch.no_grad():
        assert fvu(raw, loaded(raw)) < 0.6
    # trainSAE's norm factor over the training batches (what it divided by).
    n = torch.stack([b.pow(2).sum(-1).mean() for b in clustered_batches(21, scale)]).mean().sqrt().item()
    # λ was learned on x / n; the saved model has λ / n².
    assert loaded.lam.item() * n**2 == pytest.approx(trainer.lams[-1], rel=1e-4)


def test_normalize_activations_consumes_the_first_batches_of_a_one_shot_iterator():
    # What docs/integrations.md warns of: with normalize_activations=True, trainSAE reads up to 102
    # batches of `data` for its norm factor before training; a generator loses them (a finite one
    # of 60 batches trains no step), a list is read again from its start.
    batches = clustered_batches(60)
    for data, trained in ((iter([b.clone() for b in batches]), 0), ([b.clone() for b in batches], 60)):
        # A new configuration each time: trainSAE pops from it.
        cfg = {"trainer": RecordingTrainer, "steps": 60, "activation_dim": D, "dict_size": K, "layer": 3,
               "lm_name": "toy-lm", "device": "cpu", "seed": 0, "backend": "torch"}  # fmt: skip
        RecordingTrainer.instances.clear()
        training.trainSAE(data, [cfg], steps=60, normalize_activations=True, device="cpu")
        (trainer,) = RecordingTrainer.instances
        assert len(trainer.losses) == trained


def test_match_data_scale_makes_training_scale_free():
    # Data at E‖x‖² ≈ d and the same data ×c: the runs should be the same run.
    c = 4.0
    base = run_trainsae(12)
    scaled = run_trainsae(12, data_scale=c)
    m = clustered_batches(1)[0].double().pow(2).sum(-1).mean().item()
    # Step 0 starts from λ = 1/(2m) on data of mean squared norm m (= 1/(2d) when m = d).
    assert base.after_first_step is not None
    for trainer, mm in ((base, m), (scaled, c * c * m)):
        lam0 = torch.nn.functional.softplus(trainer.after_first_step["spade.lambda_raw"]).item()
        assert lam0 * 2 * mm == pytest.approx(1.0, rel=0.05)  # one Adam step of lr 1e-2 on raw λ
    torch.testing.assert_close(
        torch.tensor(scaled.losses) / c**2, torch.tensor(base.losses), rtol=0.02, atol=0
    )
    assert scaled.lams[-1] * c**2 == pytest.approx(base.lams[-1], rel=0.02)
    # The prototypes' learning rate carries the factor c; λ's does not.
    assert scaled.lrs[1][0] / base.lrs[1][0] == pytest.approx(c, rel=1e-3)
    assert scaled.lrs[1][1] == pytest.approx(base.lrs[1][1], rel=1e-12)


def test_lr_schedule_warmup_then_cosine():
    steps, warmup = 21, 4
    trainer = run_trainsae(steps, warmup_steps=warmup, lr=1e-2, lr_final=1e-4, match_data_scale=False)
    lam_lrs = [lr[1] for lr in trainer.lrs]
    assert lam_lrs[0] == pytest.approx(1e-2 / warmup)
    assert lam_lrs[warmup - 1] == pytest.approx(1e-2)
    assert lam_lrs[warmup] == pytest.approx(1e-2)
    assert lam_lrs[-1] == pytest.approx(1e-4)
    assert all(a < b for a, b in itertools.pairwise(lam_lrs[:warmup]))
    assert all(a > b for a, b in itertools.pairwise(lam_lrs[warmup:]))
    assert lam_lrs[warmup + (steps - 1 - warmup) // 2] == pytest.approx((1e-2 + 1e-4) / 2)
    # Without match_data_scale both groups follow the same schedule.
    assert all(a == b for a, b in trainer.lrs)


def test_logging_loss_and_sparsity_warmup(capsys):
    trainer = run_trainsae(10, sparsity_warmup_steps=5, verbose=True)
    assert "frac_variance_explained" in capsys.readouterr().out  # trainSAE's log_stats ran
    assert trainer.get_logging_parameters() == {"lam": trainer.lam}
    x = clustered_batches(1, seed=2)[0]
    with torch.no_grad():
        log = trainer.loss(x, step=0, logging=True)
        assert isinstance(log, LossLog)
        assert log.f.shape == (B, K) and log.x_hat.shape == (B, D)
        assert set(log.losses) == {"l2_loss", "mse_loss", "sparsity_loss", "loss"}
        # γ is ramped from 0: step 0 is pure MSE, step 5 on has the full γ.
        assert log.losses["loss"] == pytest.approx(log.losses["mse_loss"])
        full = trainer.loss(x, step=5, logging=True).losses
        assert full["loss"] == pytest.approx(full["mse_loss"] + trainer.gamma_reg * full["sparsity_loss"])
        assert trainer.loss(x, step=5).item() == pytest.approx(full["loss"])
        out = trainer.ae.spade(x)
        assert full["mse_loss"] == pytest.approx(out.mse.item())
        assert full["l2_loss"] == pytest.approx((x - out.x_hat).norm(dim=-1).mean().item())


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_backend_is_selectable_and_backends_train_alike(backend):
    ref = run_trainsae(8, backend="reference")
    fast = run_trainsae(8, backend=backend)
    assert ref.ae.spade.backend == "reference" and fast.ae.spade.backend == backend
    assert fast.config["backend"] == backend
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(ref.losses), rtol=1e-4, atol=0)


def test_data_init():
    x = clustered_batches(1, scale=3.0)[0]
    trainer = SpaDETrainer(
        steps=10, activation_dim=D, dict_size=K, layer=0, lm_name="toy", init="data", device="cpu", seed=0
    )
    trainer._initialise(x)
    m = x.pow(2).sum(-1).mean().item()
    assert trainer.ae.lam.item() == pytest.approx(1 / (2 * m), rel=1e-5)
    # Every prototype is a distinct row of the batch, and W_dec starts equal to them.
    dist = (trainer.ae.prototypes[:, None] - x[None]).norm(dim=-1)
    assert dist.min(dim=1).values.max() == 0
    assert len(set(dist.argmin(dim=1).tolist())) == K
    assert torch.equal(trainer.ae.W_dec, trainer.ae.prototypes)

    # A batch smaller than dict_size: rows repeat, the jitter keeps prototypes apart.
    small = SpaDETrainer(
        steps=10, activation_dim=D, dict_size=K, layer=0, lm_name="toy", init="data", device="cpu", seed=0
    )
    small._initialise(x[:10])
    assert torch.pdist(small.ae.prototypes).min() > 0
    near = (small.ae.prototypes[:, None] - x[None, :10]).norm(dim=-1).min(dim=1).values
    assert near.max() < math.sqrt(m / D)  # the jitter is 0.1·RMS per coordinate: ≈ 0.4·RMS in norm


def test_trainer_and_loader_reject_bad_input(tmp_path):
    base = {"activation_dim": D, "dict_size": K, "layer": 0, "lm_name": "toy", "device": "cpu"}
    for kwargs, match in (
        ({"steps": 10, "warmup_steps": 10}, "warmup_steps"),
        ({"steps": 10, "decay_start": 10}, "decay_start"),
        ({"steps": 0}, "steps"),
        ({"steps": 10, "init": "zeros"}, "init"),
        ({"steps": 10, "lr": 0.0}, "lr"),
        ({"steps": 10, "backend": "nope"}, "backend"),
    ):
        with pytest.raises(ValueError, match=match):
            SpaDETrainer(**{**base, **kwargs})
    with pytest.raises(ValueError, match="lm_name"):
        SpaDETrainer(**{**base, "steps": 10, "lm_name": None})

    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_dictionary(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    torch.save({}, tmp_path / "ae.pt")
    with pytest.raises(ValueError, match="AutoEncoder"):
        load_dictionary(tmp_path)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_trainsae_with_bfloat16_activations_and_under_autocast(backend):
    """trainSAE's autocast_dtype: on the CPU it hands bfloat16 activations to the float32 model (its
    autocast region is GPU-only); under an explicit CPU autocast the layer's own policy applies."""
    trainer = run_trainsae(12, autocast_dtype=torch.bfloat16, backend=backend)
    assert all(math.isfinite(l) for l in trainer.losses)
    assert trainer.losses[-1] < trainer.losses[0]
    assert trainer.ae.spade.prototypes.dtype == torch.float32
    x = clustered_batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, f = trainer.ae(x, output_features=True)
        loss = trainer.loss(x)
    assert f.dtype == torch.float32 and torch.isfinite(x_hat).all()
    loss = loss.loss if hasattr(loss, "loss") else loss
    loss.backward()
    for p in trainer.ae.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
