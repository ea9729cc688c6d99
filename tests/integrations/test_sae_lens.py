"""SpaDE as a SAELens architecture (spade_kernels.sae.integrations.sae_lens).

Needs sae-lens, which the main environment does not install: run
``scripts/test_sae_lens.sh`` (its own venv).  Everything is offline: random
activations, SAELens's own trainer, saver and loader, a randomly initialised
TransformerLens model, and for the command line a randomly initialised
Hugging Face GPT-2 and a text dataset written to a temporary directory.
"""

import copy
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

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


# -- W_enc / b_enc: the encoder read as a linear map ------------------------------------


@pytest.mark.parametrize("cls", [sl.SpaDESAE, sl.SpaDETrainingSAE])
def test_w_enc_and_b_enc_give_the_codes_exactly(cls):
    """codes = sparsemax(sae_in @ W_enc + b_enc), scores = that − λ‖sae_in‖², with b_dec applied."""
    cfg_cls = sl.SpaDESAEConfig if cls is sl.SpaDESAE else sl.SpaDETrainingSAEConfig
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, use_bias=True, apply_b_dec_to_input=True, dtype="float64"))
    _randomise(sae)
    A, lam = sae.prototypes.detach(), sae.lam.detach()
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.b_enc.shape == (D_SAE,)
    torch.testing.assert_close(sae.W_enc, 2 * lam * A.T)
    torch.testing.assert_close(sae.b_enc, -lam * (A**2).sum(-1))
    x = torch.randn(3, 5, D_IN, dtype=torch.float64)
    sae_in = x - sae.b_dec.detach()
    linear = sae_in @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.encode(x), sk.sparsemax(linear))
    scores = -lam * ((sae_in[..., None, :] - A) ** 2).sum(-1)
    torch.testing.assert_close(scores, linear - lam * (sae_in**2).sum(-1, keepdim=True))
    # Differentiable in the prototypes and λ.
    (sae.W_enc.sum() + sae.b_enc.sum()).backward()
    assert sae.spade.prototypes.grad.abs().sum() > 0 and sae.spade.lambda_raw.grad.abs() > 0


def test_w_enc_is_read_only_and_not_saved(tmp_path):
    sae = sl.SpaDESAE(sl.SpaDESAEConfig(d_in=D_IN, d_sae=D_SAE))
    before = _params(sae)
    with pytest.raises(AttributeError, match="computed from the prototypes"):
        sae.W_enc = torch.zeros(D_IN, D_SAE)
    with pytest.raises(AttributeError, match="computed from the prototypes"):
        sae.b_enc = torch.zeros(D_SAE)
    with pytest.raises(KeyError, match="already exists"):  # nn.Module's own refusal for a Parameter
        sae.W_enc = torch.nn.Parameter(torch.zeros(D_IN, D_SAE))
    with torch.no_grad():
        sae.W_enc.mul_(0.0)  # writing into the computed tensor changes nothing
    for name, value in _params(sae).items():
        assert torch.equal(value, before[name]), name
    assert not {"W_enc", "b_enc", "spade.W_enc", "spade.b_enc"} & set(sae.state_dict())
    sae.save_model(tmp_path)
    assert set(load_file(tmp_path / "sae_weights.safetensors")) == {"prototypes", "W_dec", "lambda_raw"}
    half = SAE.load_from_disk(tmp_path, dtype="bfloat16")
    assert half.W_enc.dtype == half.b_enc.dtype == torch.bfloat16


def test_saelens_featurewise_weight_metrics():
    """SAELens's own feature-wise metrics (which read W_enc and b_enc) on a SpaDE SAE."""
    from sae_lens.evals import get_featurewise_weight_based_metrics

    sae = sl.SpaDESAE(sl.SpaDESAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64"))
    _randomise(sae)
    metrics = get_featurewise_weight_based_metrics(sae)
    A, W_dec, lam = sae.prototypes.detach(), sae.W_dec.detach(), sae.lam.detach()
    cos = (A * W_dec).sum(-1) / (A.norm(dim=-1) * W_dec.norm(dim=-1))
    assert metrics["encoder_decoder_cosine_sim"] == pytest.approx(cos.tolist())
    assert metrics["encoder_norm"] == pytest.approx((2 * lam * A.norm(dim=-1)).tolist())
    assert metrics["encoder_bias"] == pytest.approx((-lam * A.norm(dim=-1) ** 2).tolist())


# -- loading in a fresh process: KeyError: 'spade' --------------------------------------


def _subprocess_env() -> dict[str, str]:
    """No network, one thread, this checkout importable."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}",
    }


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_saved_configs_say_how_to_load(tmp_path):
    """Every cfg.json SAELens writes for "spade" names the import that registers it; SAELens ignores the key."""
    cfg = sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, gamma_reg=0.2)
    sae = sl.SpaDETrainingSAE(cfg)
    assert sl.IMPORT_LINE == "import spade_kernels.sae.integrations.sae_lens"
    assert sl.IMPORT_LINE in sl.HOW_TO_LOAD and "KeyError: 'spade'" in sl.HOW_TO_LOAD
    for save, loader, cls in (
        (sae.save_model, TrainingSAE, sl.SpaDETrainingSAE),
        (sae.save_inference_model, SAE, sl.SpaDESAE),
    ):
        path = tmp_path / save.__name__
        save(path)
        on_disk = json.loads((path / "cfg.json").read_text())
        assert on_disk["how_to_load"] == sl.HOW_TO_LOAD
        keys = list(on_disk)
        assert keys.index("how_to_load") == keys.index("architecture") + 1
        assert type(loader.load_from_disk(path)) is cls
    inference = sl.SpaDESAE(sl.SpaDESAEConfig(d_in=D_IN, d_sae=D_SAE))
    inference.save_model(tmp_path / "inference")
    assert json.loads((tmp_path / "inference" / "cfg.json").read_text())["how_to_load"] == sl.HOW_TO_LOAD
    assert TrainingSAE.load_from_disk(tmp_path / "save_model").cfg.gamma_reg == 0.2
    # The helper loads (and registers, here already done).
    assert type(sl.load_from_disk(tmp_path / "save_inference_model")) is sl.SpaDESAE
    assert type(sl.load_from_disk(tmp_path / "save_model", training=True)) is sl.SpaDETrainingSAE


def test_fresh_process_without_the_import_and_with_it(tmp_path):
    """A new interpreter: SAELens alone fails with KeyError: 'spade'; the cfg.json's
    "how_to_load" line, executed as written, and our load_from_disk both load."""
    sae = sl.SpaDETrainingSAE(sl.SpaDETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    _randomise(sae)
    ckpt = tmp_path / "ckpt"
    sae.save_model(ckpt)
    x = torch.randn(4, D_IN)
    torch.save(x, tmp_path / "x.pt")
    expected = sae.encode(x)

    plain = _python(
        "import sys\n"
        "from sae_lens import SAE\n"
        "try:\n"
        "    SAE.load_from_disk('ckpt')\n"
        "except KeyError as exc:\n"
        "    print('sae_lens alone:', repr(exc))\n"
        "assert 'spade_kernels.sae.integrations.sae_lens' not in sys.modules\n"
        "from spade_kernels.sae.integrations.sae_lens import load_from_disk\n"
        "import torch\n"
        "sae = load_from_disk('ckpt')\n"
        "torch.save(sae.encode(torch.load('x.pt')), 'codes.pt')\n"
        "print('helper:', type(sae).__name__, type(load_from_disk('ckpt', training=True)).__name__)\n",
        tmp_path,
    )
    assert plain.returncode == 0, plain.stderr
    assert "sae_lens alone: KeyError('spade')" in plain.stdout
    assert "helper: SpaDESAE SpaDETrainingSAE" in plain.stdout
    torch.testing.assert_close(torch.load(tmp_path / "codes.pt"), expected, rtol=0, atol=0)

    hint = json.loads((ckpt / "cfg.json").read_text())["how_to_load"]
    hinted = _python(
        f"{hint}\nfrom sae_lens import SAE\nprint(type(SAE.load_from_disk('ckpt')).__name__)\n", tmp_path
    )
    assert hinted.returncode == 0, hinted.stderr
    assert hinted.stdout.split() == ["SpaDESAE"]


# -- command line: python -m spade_kernels.sae.integrations.sae_lens ------------------


def test_cli_help(capsys):
    for argv in (["--help"], []):
        with pytest.raises(SystemExit) as exc:
            sl.main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(sl.CLI_DESCRIPTION)
        assert "usage: python -m spade_kernels.sae.integrations.sae_lens" in out
        # SAELens's own help for the runner and for the SpaDE config.
        for flag in (
            "--hook_name",
            "--training_tokens",
            "--gamma_reg",
            "--reg_on {encoder,decoder}",
            "--lambda_init",
        ):
            assert flag in out, flag
        assert "SpaDETrainingSAEConfig" in out


def test_cli_parse_args_is_saelens_parser_with_spade_default():
    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.llm_sae_training_runner import _parse_cfg_args

    argv_before = list(sys.argv)
    args = [
        "--d_in", "16", "--d_sae", "64", "--gamma_reg", "0.3", "--reg_on", "decoder", "--backend", "torch",
        "--model_name", "m", "--hook_name", "blocks.0.hook_resid_post", "--dataset_path", "d", "--lr", "0.01",
    ]  # fmt: skip
    cfg = sl.parse_args(args)
    assert sys.argv == argv_before
    assert isinstance(cfg, LanguageModelSAERunnerConfig) and type(cfg.sae) is sl.SpaDETrainingSAEConfig
    expected = LanguageModelSAERunnerConfig(
        sae=sl.SpaDETrainingSAEConfig(d_in=16, d_sae=64, gamma_reg=0.3, reg_on="decoder", backend="torch"),
        model_name="m",
        hook_name="blocks.0.hook_resid_post",
        dataset_path="d",
        lr=0.01,
    )

    def as_dict(c):  # without checkpoint_path, which SAELens suffixes with a random id
        d = c.to_dict()
        assert d.pop("checkpoint_path").startswith("checkpoints/")
        return d

    assert as_dict(cfg) == as_dict(expected)
    assert cfg.sae.lambda_init == 1 / 32  # the default follows --d_in
    # Exactly what SAELens's parser gives once "spade" is named.
    assert as_dict(_parse_cfg_args(["--architecture", "spade", *args])) == as_dict(cfg)
    # Another registered architecture can still be chosen.
    for flag in (["--architecture", "standard"], ["--architecture=standard"], ["--sae", "standard"]):
        assert sl.parse_args([*flag, "--d_in", "16"]).sae.architecture() == "standard"


def test_cli_refuses_bad_values(capsys):
    assert sl.main(["--d_in", "16", "--lambda_init", "-1"]) == 2
    assert "error: lambda_init must be a finite float > 0" in capsys.readouterr().err
    assert sl.main(["--d_in", "16", "--normalize_activations", "covariance_whitening"]) == 2
    assert "Mahalanobis" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own exit for an unknown flag
        sl.main(["--d_in", "16", "--no_such_flag", "1"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err


def _tiny_hf_language_model(path: Path) -> None:
    """A randomly initialised 1-layer GPT-2 (width D_IN) and a 32-word tokenizer, saved for from_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=32, n_positions=16, n_embd=D_IN, n_layer=1, n_head=2)
    ).save_pretrained(path)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(32)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="w0", bos_token="w1", eos_token="w2", pad_token="w3"
    )
    tokenizer.save_pretrained(path)


def _block_output(model, tokens: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.transformer.h[0].register_forward_hook(
        lambda module, inputs, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    return seen[0].reshape(-1, D_IN)


def test_cli_trains_end_to_end_offline(tmp_path, monkeypatch):
    """``python -m spade_kernels.sae.integrations.sae_lens`` with SAELens's flags, in a new process:
    a local Hugging Face model and a local text dataset, SAELens's runner, its final save."""
    from transformers import AutoModelForCausalLM

    _tiny_hf_language_model(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "text").mkdir()
    with open(tmp_path / "text" / "train.jsonl", "w") as f:
        for _ in range(32):
            words = torch.randint(4, 32, (40,), generator=g).tolist()
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in words)}) + "\n")
    steps, batch = 40, 64
    # fmt: off
    argv = [
        "--model_class_name", "AutoModelForCausalLM", "--model_name", "model", "--hook_name", "transformer.h.0",
        "--d_in", str(D_IN), "--d_sae", str(D_SAE), "--gamma_reg", "0.05", "--backend", "torch",
        "--dataset_path", "text", "--is_dataset_tokenized", "False", "--dataset_trust_remote_code", "False",
        "--context_size", "16", "--prepend_bos", "False",
        "--training_tokens", str(steps * batch), "--train_batch_size_tokens", str(batch),
        "--n_batches_in_buffer", "4", "--store_batch_size_prompts", "4", "--n_eval_batches", "1",
        "--lr", "1e-2", "--log_to_wandb", "False", "--checkpoint_path", "checkpoints", "--output_path", "final",
    ]
    # fmt: on
    run = subprocess.run(
        [sys.executable, "-m", "spade_kernels.sae.integrations.sae_lens", *argv],
        cwd=tmp_path,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    # The lines it prints load the SAE (run here in a namespace of their own).
    printed = run.stdout.splitlines()
    at = printed.index("spade SAE saved to final; load it with")
    namespace: dict = {}
    monkeypatch.chdir(tmp_path)
    exec("\n".join(line.strip() for line in printed[at + 1 : at + 3]), namespace)
    assert type(namespace["sae"]) is sl.SpaDESAE
    assert "RuntimeWarning" not in run.stderr  # no double import of this module by ``-m``

    final = tmp_path / "final"
    assert json.loads((final / "cfg.json").read_text())["how_to_load"] == sl.HOW_TO_LOAD
    runner_cfg = json.loads((final / "runner_cfg.json").read_text())
    assert runner_cfg["sae"]["architecture"] == "spade" and runner_cfg["training_tokens"] == steps * batch
    sae = SAE.load_from_disk(final)
    assert type(sae) is sl.SpaDESAE and sae.cfg.backend == "torch"
    assert sae.cfg.metadata.hook_name == "transformer.h.0"
    assert sae.cfg.metadata.training_architecture_details["gamma_reg"] == 0.05
    assert sae.cfg.lambda_init == 1 / (2 * D_IN)
    # Trained on the model's activations: far better than a fresh SAE there.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    acts = _block_output(model, torch.randint(4, 32, (8, 16), generator=g))
    torch.manual_seed(0)
    fresh = sl.SpaDESAE(sl.SpaDESAEConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        trained_mse, fresh_mse = (((s(acts) - acts) ** 2).sum(-1).mean().item() for s in (sae, fresh))
    assert trained_mse < 0.1 * fresh_mse, (trained_mse, fresh_mse)
