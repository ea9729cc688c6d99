"""SpaDE as a SAELens architecture (spade_kernels.sae.integrations.sae_lens).

Needs sae-lens, which the main environment does not install: run
``scripts/test_sae_lens.sh`` (its own venv).  Everything is offline: random
activations, SAELens's own trainer, saver and loader, a randomly initialised
TransformerLens model.
"""

import copy
import importlib
import json
import math

import pytest
import torch

pytest.importorskip("sae_lens")

from sae_lens import SAE, HookedSAETransformer, TrainingSAE, TrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import SAEConfig, TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file

import spade_kernels as sk
from spade_kernels import encode as encode_module
from spade_kernels.layer import _inverse_softplus
from spade_kernels.sae.integrations import sae_lens as sl

D_IN, D_SAE = 16, 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # At these tiny shapes intra-op threads only add overhead, and on a busy
    # 2-core machine a parallel index_add_ waits ~0.1 s per call.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise(sae) -> None:
    """Weights away from the init (W_dec ≠ prototypes, a bias, a different λ)."""
    with torch.no_grad():
        sae.spade.prototypes.normal_()
        sae.spade.W_dec.normal_()
        sae.spade.lambda_raw.fill_(-2.0)
        if sae.spade.b_dec is not None:
            sae.spade.b_dec.normal_()


def _step_input(x: torch.Tensor, gamma: float = 0.1) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={sl.REG_COEFFICIENT: gamma},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )


def _clustered(n_batches: int, batch: int, scale: float = 1.0, seed: int = 0):
    """Activations around 8 fixed random centres (something an SAE can learn),
    E‖x‖² ≈ d·scale² (the paper's data scale at scale=1); ``seed`` draws the samples."""
    centres = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        pick = torch.randint(8, (batch,), generator=g)
        yield scale * (centres[pick] + 0.3 * torch.randn(batch, D_IN, generator=g))


def _params(sae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.named_parameters()}


# -- registration and config ----------------------------------------------------


def test_registered_on_import_and_idempotent():
    assert SAE_CLASS_REGISTRY["spade"] == (sl.SpaDESAE, sl.SpaDESAEConfig)
    assert SAE_TRAINING_CLASS_REGISTRY["spade"] == (sl.SpaDETrainingSAE, sl.SpaDETrainingSAEConfig)
    sl.register()
    sl.register()  # twice: still the same classes, no error
    assert SAE_CLASS_REGISTRY["spade"] == (sl.SpaDESAE, sl.SpaDESAEConfig)
    old = sl.SpaDESAE
    importlib.reload(sl)  # re-runs the module, and so register(), with new class objects
    assert sl.SpaDESAE is not old
    assert SAE_CLASS_REGISTRY["spade"] == (sl.SpaDESAE, sl.SpaDESAEConfig)
    assert SAE_TRAINING_CLASS_REGISTRY["spade"] == (sl.SpaDETrainingSAE, sl.SpaDETrainingSAEConfig)
    sae = SAE.from_dict(sl.SpaDESAEConfig(d_in=D_IN, d_sae=D_SAE).to_dict())
    assert type(sae) is sl.SpaDESAE


def test_register_refuses_a_foreign_spade(monkeypatch):
    class SpaDESAE:  # same name, another module: not ours
        pass

    monkeypatch.setitem(SAE_CLASS_REGISTRY, "spade", (SpaDESAE, sl.SpaDESAEConfig))
    with pytest.raises(ValueError, match="already registered"):
        sl.register()


def test_config_round_trip():
    cfg = sl.SpaDETrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        lambda_init=0.2,
        use_bias=True,
        apply_b_dec_to_input=True,
        backend="torch",
        gamma_reg=0.3,
        gamma_reg_warm_up_steps=5,
        reg_on="decoder",
        normalize_activations="expected_average_only_in",
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["architecture"] == "spade"
    back = TrainingSAEConfig.from_dict(d)
    assert type(back) is sl.SpaDETrainingSAEConfig
    assert back.to_dict() == cfg.to_dict()

    # The inference config keeps what inference needs, from either dict.
    for src in (d, cfg.get_inference_sae_cfg_dict()):
        inf = SAEConfig.from_dict(json.loads(json.dumps(src)))
        assert type(inf) is sl.SpaDESAEConfig
        assert (inf.lambda_init, inf.use_bias, inf.apply_b_dec_to_input, inf.backend) == (
            0.2,
            True,
            True,
            "torch",
        )
        assert inf.normalize_activations == "expected_average_only_in"
        assert not hasattr(inf, "gamma_reg")
    assert cfg.get_inference_sae_cfg_dict()["metadata"]["training_architecture_details"]["gamma_reg"] == 0.3

    # Defaults: paper λ, no bias, encoder input not shifted by b_dec.
    default = sl.SpaDESAEConfig(d_in=D_IN, d_sae=D_SAE)
    assert default.lambda_init == 1 / (2 * D_IN)
    assert (default.use_bias, default.apply_b_dec_to_input, default.backend) == (False, False, "auto")
    assert sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE).decoder_init_norm is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "nope"}, ValueError, "unknown backend"),
        ({"lambda_init": 0.0}, ValueError, "lambda_init"),
        ({"gamma_reg": -1.0}, ValueError, "gamma_reg"),
        ({"reg_on": "both"}, ValueError, "reg_on"),
        ({"use_bias": 1}, TypeError, "use_bias"),
        ({"normalize_activations": "covariance_whitening"}, ValueError, "Mahalanobis"),
    ],
)
def test_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **kwargs)


# -- encoder, decoder, training step -------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_matches_the_spade_layer(backend):
    sae = sl.SpaDESAE(sl.SpaDESAEConfig(d_in=D_IN, d_sae=D_SAE, use_bias=True, backend=backend))
    _randomise(sae)
    assert sae.spade.backend == backend
    x = torch.randn(3, 5, D_IN)  # leading dimensions are kept
    z = sae.encode(x)
    assert z.shape == (3, 5, D_SAE)
    layer = sae.spade
    torch.testing.assert_close(z, sk.spade_encode(x, layer.prototypes, layer.lam).to_dense())
    torch.testing.assert_close(sae(x), layer(x).x_hat)
    torch.testing.assert_close(sae.decode(z), layer(x).x_hat)
    torch.testing.assert_close(sae.encode_sparse(x).to_dense(), z)


def test_backend_is_used(monkeypatch):
    calls = []
    real = encode_module.encode_sparse

    def spy(backend, *args, **kwargs):
        calls.append(backend)
        return real(backend, *args, **kwargs)

    monkeypatch.setattr(encode_module, "encode_sparse", spy)
    sae = sl.SpaDETrainingSAE(sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, backend="torch"))
    x = torch.randn(8, D_IN)
    sae.training_forward_pass(_step_input(x))
    sae(x)
    assert calls == ["torch", "torch"]
    calls.clear()
    sae_ref = sl.SpaDETrainingSAE(sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, backend="reference"))
    sae_ref.training_forward_pass(_step_input(x))
    assert not calls


@pytest.mark.parametrize(
    ("reg_on", "use_bias", "backend"),
    [("encoder", False, "torch"), ("decoder", True, "torch"), ("encoder", True, "reference")],
)
def test_sparse_step_equals_saelens_dense_step(reg_on, use_bias, backend):
    """Our training_forward_pass (SpaDE kernels) against SAELens's generic one
    (encode_with_hidden_pre → decode → MSE + calculate_aux_loss), values and gradients."""
    cfg = sl.SpaDETrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        reg_on=reg_on,
        use_bias=use_bias,
        apply_b_dec_to_input=use_bias,
        backend=backend,
        dtype="float64",
    )
    sae = sl.SpaDETrainingSAE(cfg)
    _randomise(sae)
    x = torch.randn(32, D_IN, dtype=torch.float64)
    results = []
    for step in (sae.training_forward_pass, lambda s: TrainingSAE.training_forward_pass(sae, s)):
        sae.zero_grad()
        out = step(_step_input(x, gamma=0.7))
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in sae.named_parameters()}
        results.append((out, grads))
    (fast, g_fast), (dense, g_dense) = results
    assert fast.feature_acts.is_sparse and not dense.feature_acts.is_sparse
    assert set(fast.losses) == set(dense.losses) == {"mse_loss", "dist_weighted_l1_loss"}
    for name in fast.losses:
        torch.testing.assert_close(fast.losses[name], dense.losses[name])
    torch.testing.assert_close(fast.loss, dense.loss)
    torch.testing.assert_close(fast.sae_out, dense.sae_out)
    torch.testing.assert_close(fast.feature_acts.to_dense(), dense.feature_acts)
    # hidden_pre: the scores −λ·‖x − a‖², on the support for the sparse step.
    support = dense.feature_acts > 0
    torch.testing.assert_close(fast.hidden_pre.to_dense()[support], dense.hidden_pre[support])
    assert set(g_fast) == set(g_dense) == {k for k, _ in sae.named_parameters()}
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_dense[name], msg=name)
    assert g_fast["spade.lambda_raw"].abs() > 0


def test_aux_loss_is_gamma_times_distance_weighted_l1():
    sae = sl.SpaDETrainingSAE(sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64"))
    _randomise(sae)
    x = torch.randn(16, D_IN, dtype=torch.float64)
    out = sae.training_forward_pass(_step_input(x, gamma=0.25))
    A, lam = sae.prototypes.detach(), sae.lam.detach()
    D = ((x[:, None, :] - A[None]) ** 2).sum(-1)
    z = sk.sparsemax(-lam * D)
    x_hat = z @ sae.W_dec.detach()
    torch.testing.assert_close(out.losses["dist_weighted_l1_loss"], 0.25 * (z * D).sum(-1).mean())
    torch.testing.assert_close(out.losses["mse_loss"], ((x_hat - x) ** 2).sum(-1).mean())
    assert sae.get_coefficients()[sl.REG_COEFFICIENT].value == 0.1


def test_hooks_see_and_steer_the_dense_scores():
    sae = sl.SpaDESAE(sl.SpaDESAEConfig(d_in=D_IN, d_sae=D_SAE))
    _randomise(sae)
    x = torch.randn(4, D_IN)
    plain = sae(x)
    seen = {}

    def record(t, hook):
        seen[hook.name] = t.detach().clone()

    for name in ("hook_sae_acts_pre", "hook_sae_acts_post"):
        sae.hook_dict[name].add_hook(record)
    torch.testing.assert_close(sae(x), plain)  # the dense path gives the same result
    A, lam = sae.prototypes.detach(), sae.lam.detach()
    scores = -lam * ((x[:, None, :] - A[None]) ** 2).sum(-1)
    torch.testing.assert_close(seen["hook_sae_acts_pre"], scores)
    torch.testing.assert_close(seen["hook_sae_acts_post"], sk.sparsemax(scores))
    sae.reset_hooks()

    def boost(t, hook):  # an intervention on the scores changes the codes
        t = t.clone()
        t[:, 7] = t.max() + 10.0
        return t

    sae.hook_sae_acts_pre.add_hook(boost)
    z = sae.encode(x)
    torch.testing.assert_close(z[:, 7], torch.ones(4))
    torch.testing.assert_close(sae(x), sae.W_dec[7].detach().expand(4, D_IN))
    sae.reset_hooks()


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
def test_spliced_into_a_transformer_lens_model():
    from transformer_lens import HookedTransformerConfig

    model = HookedSAETransformer(
        HookedTransformerConfig(
            n_layers=1, d_model=D_IN, n_ctx=8, d_head=4, n_heads=4, d_vocab=32, act_fn="relu", d_mlp=32
        )
    )
    sae = sl.SpaDESAE(sl.SpaDESAEConfig(d_in=D_IN, d_sae=D_SAE))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    tokens = torch.randint(0, 32, (2, 8))
    _, clean = model.run_with_cache(tokens)
    resid = clean["blocks.0.hook_resid_post"]
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    torch.testing.assert_close(cache["blocks.0.hook_resid_post.hook_sae_acts_post"], sae.encode(resid))
    expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: sae(t))])
    torch.testing.assert_close(logits, expected)


# -- SAELens's trainer, saver and loader ---------------------------------------------


def test_saelens_trainer_trains_saves_and_reloads(tmp_path):
    batch, steps = 64, 30
    cfg = sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, gamma_reg=0.05, backend="torch")
    sae = sl.SpaDETrainingSAE(cfg)
    held_out = next(_clustered(1, 256, seed=1))

    def loss_on(x):
        with torch.no_grad():
            return sae.training_forward_pass(_step_input(x, gamma=cfg.gamma_reg)).loss.item()

    before_loss, before = loss_on(held_out), _params(sae)
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=batch * steps,
            train_batch_size_samples=batch,
            lr=3e-2,
            lr_scheduler_name="cosineannealing",
            lr_end=1e-3,
            checkpoint_path=str(tmp_path),
            save_final_checkpoint=True,
        ),
        sae=sae,
        data_provider=_clustered(steps, batch),
    )
    trained = trainer.fit()
    assert trained is sae and trainer.n_training_steps == steps
    after_loss = loss_on(held_out)
    assert torch.isfinite(torch.tensor(after_loss))
    assert after_loss < 0.5 * before_loss, (before_loss, after_loss)
    after = _params(sae)
    for name in ("spade.prototypes", "spade.W_dec", "spade.lambda_raw"):
        assert not torch.equal(before[name], after[name]), name
    # The trainer's firing statistics came from the sparse feature_acts.
    assert trainer.act_freq_scores.sum() > 0
    assert sae.cfg.metadata.l0 == pytest.approx(trainer.feature_sparsity.sum().item())

    # SAELens's own checkpoint (save_model), read back by SAELens's own loaders.
    ckpt = tmp_path / f"final_{batch * steps}"
    tensors = load_file(ckpt / "sae_weights.safetensors")
    assert set(tensors) == {"prototypes", "W_dec", "lambda_raw"}
    assert json.loads((ckpt / "cfg.json").read_text())["architecture"] == "spade"
    x = next(_clustered(1, 32, seed=2))
    for loader, cls in ((SAE, sl.SpaDESAE), (TrainingSAE, sl.SpaDETrainingSAE)):
        loaded = loader.load_from_disk(ckpt)
        assert type(loaded) is cls
        assert loaded.state_dict().keys() == sae.state_dict().keys()
        for name, value in sae.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), name
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)
    assert TrainingSAE.load_from_disk(ckpt).cfg.gamma_reg == 0.05
    # The training checkpoint is also a SpaDE.save_pretrained directory.
    layer = sk.SpaDE.from_pretrained(ckpt, backend=sae.cfg.backend)  # the same backend: the same bits
    torch.testing.assert_close(layer(x).x_hat, sae(x), rtol=0, atol=0)


# SAELens's own warnings about this tiny set-up (a small dataset, HookedTransformer's deprecation, ...).
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_language_model_training_runner(tmp_path):
    """SAELens's full runner (activation store, trainer, final save) on a random
    TransformerLens model and an in-memory token dataset."""
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=1, d_model=D_IN, n_ctx=16, d_head=4, n_heads=4, d_vocab=32, act_fn="relu", d_mlp=32
        )
    )
    tokens = Dataset.from_dict({"input_ids": torch.randint(0, 32, (64, 16)).tolist()})
    hook = "blocks.0.hook_resid_post"
    cfg = LanguageModelSAERunnerConfig(
        sae=sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE),
        model_name="random-tiny",
        hook_name=hook,
        dataset_path="",
        is_dataset_tokenized=True,
        context_size=16,
        prepend_bos=False,
        training_tokens=64 * 10,
        train_batch_size_tokens=64,
        n_batches_in_buffer=4,
        store_batch_size_prompts=4,
        lr=1e-2,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(tmp_path / "checkpoints"),
        output_path=str(tmp_path / "final"),
    )
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=tokens, override_model=model)
    initial = _params(runner.sae)
    sae = runner.run()
    assert type(sae) is sl.SpaDETrainingSAE
    assert not torch.equal(initial["spade.prototypes"], sae.prototypes)
    loaded = SAE.load_from_disk(tmp_path / "final")
    assert type(loaded) is sl.SpaDESAE and loaded.cfg.metadata.hook_name == hook
    _, cache = model.run_with_cache(torch.randint(0, 32, (2, 16)))
    resid = cache[hook]
    torch.testing.assert_close(loaded(resid), sae(resid), rtol=0, atol=0)


def test_inference_save_and_load_with_bias(tmp_path):
    cfg = sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, use_bias=True, apply_b_dec_to_input=True)
    sae = sl.SpaDETrainingSAE(cfg)
    _randomise(sae)
    sae.save_inference_model(tmp_path)
    assert set(load_file(tmp_path / "sae_weights.safetensors")) == {
        "prototypes",
        "W_dec",
        "lambda_raw",
        "b_dec",
    }
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is sl.SpaDESAE and loaded.cfg.apply_b_dec_to_input
    x = torch.randn(16, D_IN)
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)


def test_loads_spade_save_pretrained_and_keeps_lambda_float32(tmp_path):
    layer = sk.SpaDE(D_IN, D_SAE, lambda_init=0.05)
    with torch.no_grad():
        layer.W_dec.normal_()
    layer.save_pretrained(tmp_path)
    sae = SAE.load_from_disk(tmp_path)
    assert type(sae) is sl.SpaDESAE
    x = torch.randn(16, D_IN)
    torch.testing.assert_close(sae(x), layer(x).x_hat, rtol=0, atol=0)
    # SAELens's loader casts to the requested dtype; λ's raw parameter is
    # restored to float32 (rounded once through bfloat16).
    half = SAE.load_from_disk(tmp_path, dtype="bfloat16")
    assert half.W_dec.dtype == torch.bfloat16 and half.spade.lambda_raw.dtype == torch.float32
    assert half.lam.item() == pytest.approx(layer.lam.item(), rel=0.02)
    assert half(x.bfloat16()).dtype == torch.bfloat16


# -- folding ----------------------------------------------------------------------------


def _assert_fold_rule(unfolded, folded, s: float, x: torch.Tensor) -> None:
    """The folded SAE on x = the unfolded SAE on s·x, reconstruction scaled by 1/s."""
    torch.testing.assert_close(folded.encode(x), unfolded.encode(s * x))
    torch.testing.assert_close(folded(x), unfolded(s * x) / s)
    torch.testing.assert_close(folded.prototypes, unfolded.prototypes / s)
    torch.testing.assert_close(folded.W_dec, unfolded.W_dec / s)
    torch.testing.assert_close(folded.lam, unfolded.lam * s**2)
    assert folded.cfg.normalize_activations == "none"


@pytest.mark.parametrize("s", [0.37, 4.0])
def test_fold_activation_norm_scaling_factor(s):
    cfg = sl.SpaDESAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        use_bias=True,
        apply_b_dec_to_input=True,
        normalize_activations="expected_average_only_in",
        dtype="float64",
    )
    unfolded = sl.SpaDESAE(cfg)
    _randomise(unfolded)
    folded = copy.deepcopy(unfolded)
    folded.fold_activation_norm_scaling_factor(s)
    x = torch.randn(64, D_IN, dtype=torch.float64) / s
    _assert_fold_rule(unfolded, folded, s, x)
    torch.testing.assert_close(folded.b_dec, unfolded.b_dec / s)
    # Not λ·s (what a homogeneous SAE's encoder would take): the codes differ.
    wrong = copy.deepcopy(folded)
    with torch.no_grad():
        wrong.spade.lambda_raw.fill_(_inverse_softplus(unfolded.lam.item() * s))
    assert not torch.allclose(wrong.encode(x), unfolded.encode(s * x), atol=1e-3)
    with pytest.raises(ValueError, match="scaling_factor"):
        folded.fold_activation_norm_scaling_factor(0.0)


def test_trainer_folds_its_scaling_factor(monkeypatch):
    """SAELens's trainer with normalize_activations="expected_average_only_in"
    trains on scaled activations and folds the factor at the end of fit."""
    batch, steps = 32, 5
    cfg = sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="expected_average_only_in")
    sae = sl.SpaDETrainingSAE(cfg)
    seen = {}
    fold = sae.fold_activation_norm_scaling_factor

    def spy(s):
        seen["s"], seen["unfolded"] = s, copy.deepcopy(sae)
        fold(s)

    monkeypatch.setattr(sae, "fold_activation_norm_scaling_factor", spy)
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=batch * steps,
            train_batch_size_samples=batch,
            lr_end=3e-4,
            n_batches_for_norm_estimate=4,
        ),
        sae=sae,
        data_provider=_clustered(steps + 4, batch, scale=10.0),
    )
    trainer.fit()
    s = seen["s"]
    assert s == pytest.approx(0.1, rel=0.3)  # sqrt(d)/E‖x‖ for this data
    x = next(_clustered(1, 64, scale=10.0, seed=3))
    _assert_fold_rule(seen["unfolded"], sae, s, x)


def test_decoder_norm_and_whitening_folds_are_refused(tmp_path):
    sae = sl.SpaDESAE(sl.SpaDESAEConfig(d_in=D_IN, d_sae=D_SAE))
    before = _params(sae)
    with pytest.raises(NotImplementedError, match="fold_W_dec_norm is not supported for SpaDE"):
        sae.fold_W_dec_norm()
    with pytest.raises(NotImplementedError, match="fold_W_dec_norm is not supported for SpaDE"):
        sae.fold_and_get_W_dec_norm()
    eye = torch.eye(D_IN)
    with pytest.raises(NotImplementedError, match="whitening cannot be folded"):
        sae.fold_activation_whitening(torch.zeros(D_IN), eye, eye)
    for name, value in _params(sae).items():
        assert torch.equal(value, before[name]), name
    sae.save_model(tmp_path)
    with pytest.raises(NotImplementedError, match="fold_W_dec_norm"):
        SAE.load_from_disk(tmp_path, fold_W_dec_norm=True)
    training = sl.SpaDETrainingSAE(sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with pytest.raises(NotImplementedError, match="fold_W_dec_norm"):
        training.fold_W_dec_norm()


@pytest.mark.parametrize(
    "backend", [b for b in ("reference", "torch", "native") if b in sk.available_backends()]
)
def test_saelens_trainer_with_autocast(backend, tmp_path):
    """SAELens's ``autocast`` option (bfloat16 autocast around the training step) trains on every backend."""
    batch, steps = 64, 20
    cfg = sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, gamma_reg=0.05, backend=backend)
    sae = sl.SpaDETrainingSAE(cfg)
    held_out = next(_clustered(1, 256, seed=1))

    def loss_on(x):
        with torch.no_grad():
            return sae.training_forward_pass(_step_input(x, gamma=cfg.gamma_reg)).loss.item()

    before = loss_on(held_out)
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=batch * steps,
            train_batch_size_samples=batch,
            lr=3e-2,
            lr_end=3e-2,
            autocast=True,
            checkpoint_path=str(tmp_path),
        ),
        sae=sae,
        data_provider=_clustered(steps, batch),
    )
    trainer.fit()
    after = loss_on(held_out)
    assert math.isfinite(after) and after < 0.7 * before, (before, after)
    for p in sae.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
