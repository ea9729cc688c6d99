"""SpaDE in EleutherAI's sparsify (spade_kernels.sae.integrations.sparsify).

Needs ``eai-sparsify`` (imported as ``sparsify``), which the main environment
does not install: run ``scripts/test_sparsify.sh`` (its own venv).  Offline:
sparsify's own ``Trainer`` runs a tiny randomly initialised Hugging Face Llama
built from a config on token ids generated here.
"""

import contextlib
import copy
import json
import math
import os
import socket
import sys
import time

import pytest
import torch

pytest.importorskip("sparsify.trainer")

import sparsify.trainer
import torch.distributed as dist
import torch.multiprocessing as mp
from datasets import Dataset
from safetensors.torch import load_file
from sparsify import SaeTrainer, SparseCoder, SparseCoderConfig, TrainConfig
from transformers import LlamaConfig, LlamaForCausalLM

import spade_kernels as sk
from spade_kernels.sae.integrations.sparsify import (
    ARCHITECTURE,
    SpaDECoderConfig,
    SpaDESparseCoder,
    SpaDETrainer,
    load_spade,
    padded_codes,
)

D, VOCAB, SEQ = 32, 16, 16
CPU_BACKENDS = [b for b in ("reference", "torch", "native") if b in sk.available_backends()]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny shapes: intra-op threads only add overhead on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_matmul_precision():
    # sparsify's Trainer.fit sets torch.set_float32_matmul_precision("high") for the whole process.
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)


def tiny_lm(seed=0):
    """A randomly initialised 2-layer Llama, d=32: activations of norm ~130, far from the paper's E‖x‖² = d."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def token_ids(n, seed=1):
    return torch.randint(VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def dataset(n, seed=1):
    """A tokenized dataset as sparsify's trainer reads it: rows of ``input_ids``, torch format."""
    return Dataset.from_dict({"input_ids": token_ids(n, seed).tolist()}).with_format("torch")


def activations(model, ids, layer=0):
    """The outputs of ``model.model.layers[layer]`` on ``ids``, as (tokens, d) rows (what the trainer hooks)."""
    got = {}

    def hook(module, inputs, output):
        got["x"] = (output[0] if isinstance(output, tuple) else output).flatten(0, 1).detach()

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return got["x"]


def train_config(tmp_path, sae=None, **kw):
    kw = {
        "batch_size": 8,
        "layers": [0],
        "log_to_wandb": False,
        "save_dir": str(tmp_path),
        "run_name": "run",
        **kw,
    }
    return TrainConfig(sae or SpaDECoderConfig(num_latents=64), **kw)


def record(coder):
    """Every forward output of ``coder`` during training (a forward hook), in order."""
    outs = []
    coder.register_forward_hook(lambda module, inputs, out: outs.append(out))
    return outs


def state_after_first_forward(coder):
    """The coder's state right after its first forward (after the data init, before any step)."""
    state = {}

    def hook(module, inputs, out):
        if not state:
            state.update(copy.deepcopy(module.state_dict()))

    coder.register_forward_hook(hook)
    return state


def first_state(coder):
    """The coder's state at its first forward, before that forward runs (a forward pre-hook)."""
    state = {}

    def hook(module, inputs):
        if not state:
            state.update(copy.deepcopy(module.state_dict()))

    coder.register_forward_pre_hook(hook)
    return state


def eval_mode(trainer):
    """The schedule-free optimizer's averaged weights in the coders (what the checkpoints hold)."""
    for opt in trainer.optimizers:
        if hasattr(opt, "eval"):
            opt.eval()


def coder(K=24, d=8, dtype=torch.float32, backend="torch", seed=0, **kw):
    torch.manual_seed(seed)
    return SpaDESparseCoder(d, SpaDECoderConfig(num_latents=K, backend=backend, **kw), dtype=dtype)


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"normalize_decoder": True}, "normalize_decoder"),
        ({"multi_topk": True}, "multi_topk"),
        ({"skip_connection": True}, "skip_connection"),
        ({"transcode": True}, "transcode"),
        ({"activation": "groupmax"}, "activation"),
        ({"gamma_reg": -1.0}, "gamma_reg"),
        ({"lambda_init": 0.0}, "lambda_init"),
        ({"reg_on": "both"}, "reg_on"),
        ({"backend": "cuda-magic"}, "backend"),
        ({"init": "zeros"}, "init"),
        ({"num_latents": -1}, "num_latents"),
        ({"num_latents": 0, "expansion_factor": 0}, "num_latents or expansion_factor"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SpaDECoderConfig(**kw)


def test_config_defaults_and_serialisation():
    cfg = SpaDECoderConfig(num_latents=64, lambda_init=1, backend="auto")
    assert cfg.normalize_decoder is False and cfg.init == "data" and cfg.gamma_reg == 0.1
    assert isinstance(cfg.lambda_init, float)
    back = SpaDECoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    # A config from sparsify's own defaults: width from expansion_factor.
    assert SpaDESparseCoder(8, SpaDECoderConfig()).num_latents == 8 * 32


def test_trainer_refusals_leave_sparsify_untouched(tmp_path):
    model, ds = tiny_lm(), dataset(8)
    with pytest.raises(TypeError, match="SpaDECoderConfig"):
        SpaDETrainer(train_config(tmp_path, SparseCoderConfig()), ds, model)
    with pytest.raises(ValueError, match="auxk_alpha"):
        SpaDETrainer(train_config(tmp_path, auxk_alpha=1 / 32), ds, model)
    for loss_fn in ("ce", "kl"):
        with pytest.raises(ValueError, match="gamma_reg=0"):
            SpaDETrainer(train_config(tmp_path, loss_fn=loss_fn), ds, model)
    with pytest.raises(TypeError, match="SpaDECoderConfig"):
        SpaDESparseCoder(8, SparseCoderConfig())
    with pytest.raises(ValueError, match="decoder"):
        SpaDESparseCoder(8, SpaDECoderConfig(), decoder=False)
    # The trainer's class is swapped only while a SpaDETrainer is built, also when that fails (here no
    # module matches the hookpoint: sparsify's Trainer.__init__ fails building its optimizer).
    with pytest.raises(ValueError, match="empty parameter list"):
        SpaDETrainer(train_config(tmp_path, layers=[], hookpoints=["nope"]), ds, model)
    assert sparsify.trainer.SparseCoder is SparseCoder
    SpaDETrainer(train_config(tmp_path), ds, model)
    assert sparsify.trainer.SparseCoder is SparseCoder
    # sparsify's own trainer refuses a SpaDE config instead of training TopK coders from it.
    with pytest.raises(TypeError, match="would build a TopK coder"):
        sparsify.trainer.Trainer(train_config(tmp_path), ds, model)
    with pytest.raises(TypeError, match="would build a TopK coder"):
        SparseCoder(8, cfg=SpaDECoderConfig())
    assert type(SparseCoder(8, SparseCoderConfig(num_latents=16))) is SparseCoder


# -- the coder -------------------------------------------------------------------------------------


def test_coder_is_a_sparse_coder():
    c = coder()
    assert isinstance(c, SparseCoder) and c.num_latents == 24 and c.d_in == 8
    assert set(c.state_dict()) == {"prototypes", "W_dec", "lambda_raw", "b_dec", "initialised"}
    assert {n for n, _ in c.named_parameters()} == {
        "b_dec",
        "spade.prototypes",
        "spade.W_dec",
        "spade.lambda_raw",
    }
    assert c.W_dec is c.spade.W_dec and c.prototypes is c.spade.prototypes and c.W_skip is None
    assert c.device.type == "cpu" and c.dtype == torch.float32
    c.backend = "reference"
    assert c.spade.backend == "reference" == c.cfg.backend
    with pytest.raises(NotImplementedError, match="normalize_decoder"):
        c.set_decoder_norm_to_unit_norm()
    with pytest.raises(ValueError, match="AuxK"):
        c(torch.randn(4, 8), dead_mask=torch.zeros(24, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"rows \(N, 8\)"):
        c(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="y must have"):
        c(torch.randn(4, 8), torch.randn(5, 8))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reg_on", ["encoder", "decoder"])
def test_forward_is_spade_on_centred_input_float64(backend, reg_on):
    """The coder = SpaDE on x − b_dec plus b_dec; its fvu carries the value of the FVU and the gradient of
    (Σ‖y − x̂‖² + γ·Σ z·D)/TV; the folded bias-free SpaDE gives the same codes, x̂ and loss."""
    c = coder(K=40, d=6, dtype=torch.float64, backend=backend, gamma_reg=0.3, reg_on=reg_on, init="none")
    with torch.no_grad():
        c.b_dec.normal_()
        c.spade.W_dec.add_(0.2 * torch.randn_like(c.spade.W_dec))
        c.spade.lambda_raw.fill_(-1.0)
    layer = sk.SpaDE(6, 40, backend=backend, gamma_reg=0.3, reg_on=reg_on, dtype=torch.float64)
    layer.load_state_dict(c.spade.state_dict())
    b = c.b_dec.detach().clone().requires_grad_()
    x = torch.randn(30, 6, dtype=torch.float64) + 2.0
    out = c(x)
    ref = layer(x - b)
    x_hat = ref.x_hat + b
    tv = (x - x.mean(0)).pow(2).sum()
    l2 = (x - x_hat).pow(2).sum()
    objective = (l2 + 0.3 * 30 * ref.reg) / tv
    torch.testing.assert_close(out.sae_out, x_hat, rtol=0, atol=0)
    torch.testing.assert_close(out.reg, ref.reg, rtol=0, atol=0)
    torch.testing.assert_close(out.fvu, l2 / tv, rtol=1e-15, atol=0)
    torch.testing.assert_close(out.loss, objective, rtol=1e-15, atol=0)
    assert out.reg > 0 and out.loss > out.fvu
    dense = torch.zeros(30, 40, dtype=torch.float64).scatter_add(1, out.latent_indices, out.latent_acts)
    torch.testing.assert_close(dense, ref.codes.to_dense(), rtol=0, atol=0)
    assert torch.equal(out.auxk_loss, torch.zeros(())) and torch.equal(out.multi_topk_fvu, torch.zeros(()))
    # Gradients: those of the objective, not of the FVU alone.
    out.fvu.backward()
    objective.backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(
            dict(c.spade.named_parameters())[name].grad, p.grad, rtol=1e-12, atol=1e-12
        )
    torch.testing.assert_close(c.b_dec.grad, b.grad, rtol=1e-12, atol=1e-12)
    # The bias-free SpaDE of the folded weights: same codes, x̂, regulariser and loss.
    folded = c.to_spade()
    assert isinstance(folded, sk.SpaDE) and folded.b_dec is None and folded.reg_on == reg_on
    f = folded(x)
    torch.testing.assert_close(f.codes.to_dense(), ref.codes.to_dense(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.x_hat, out.sae_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f.reg, out.reg, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f.loss * 30 / tv, out.loss, rtol=1e-10, atol=1e-12)
    # And back: a coder around that layer (b_dec = 0) computes the same again.
    back = SpaDESparseCoder.from_spade(folded)
    assert bool(back.initialised) and torch.equal(back.b_dec, torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(back(x).sae_out, out.sae_out, rtol=1e-10, atol=1e-10)
    # A SpaDE with a decoder bias: folded into the coder's decoder rows.
    biased = sk.SpaDE(6, 40, backend=backend, use_bias=True, dtype=torch.float64)
    with torch.no_grad():
        biased.b_dec.normal_()
    torch.testing.assert_close(
        SpaDESparseCoder.from_spade(biased)(x).sae_out, biased(x).x_hat, rtol=1e-10, atol=1e-10
    )


def test_micro_batches_add_up_to_the_batch():
    """With the whole batch's variance passed in (as the trainer does for micro_acc_steps), chunks sum to the FVU."""
    c = coder(init="none")
    x = torch.randn(40, 8)
    whole = c(x)
    tv = (x - x.mean(0)).pow(2).sum()
    parts = [c(chunk, total_variance=tv) for chunk in x.chunk(3)]
    torch.testing.assert_close(sum(p.fvu for p in parts), whole.fvu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(p.loss for p in parts), whole.loss, rtol=1e-5, atol=1e-6)


def test_padding_names_only_latents_that_fired():
    """Padded slots carry activation 0 and the row's top latent, never SparseCodes' padding index 0."""
    c = coder(K=24, d=8, init="none")
    with torch.no_grad():
        c.spade.lambda_raw.fill_(-3.0)  # small λ: supports of several latents, of varying size
    x = torch.randn(64, 8)
    raw = c.spade.encode_sparse(x - c.b_dec)
    sizes = raw.support_size
    padded_rows = sizes < raw.width
    # The premise: SpaDE's own layout pads with latent 0 in rows where latent 0 has no code.
    no_zero = ~(raw.values.gt(0) & raw.indices.eq(0)).any(-1)
    assert (padded_rows & no_zero).any() and sizes.min() < sizes.max()
    out = c(x)
    acts, idx = out.latent_acts, out.latent_indices
    slots = torch.arange(raw.width) < sizes[:, None]
    assert torch.equal(acts[~slots], torch.zeros_like(acts[~slots]))
    assert torch.equal(idx, torch.where(slots, raw.indices, raw.indices[:, :1]))
    for row in range(64):
        assert set(idx[row].tolist()) == set(raw.indices[row, : sizes[row]].tolist())
    assert not (idx.eq(0) & no_zero[:, None]).any()
    # encode() gives the same layout; decode() of it is the forward's reconstruction.
    enc = c.encode(x)
    assert torch.equal(enc.top_indices, idx) and torch.equal(enc.top_acts, acts) and enc.pre_acts is None
    torch.testing.assert_close(c.decode(enc.top_acts, enc.top_indices), out.sae_out, rtol=1e-6, atol=1e-6)
    scores = c.encode(x, pre_acts=True).pre_acts
    torch.testing.assert_close(sk.sparsemax(scores, dim=-1), raw.to_dense(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        c.decode(acts, idx[:, :1])
    # The helper on SparseCodes directly, leading dims kept.
    a3, i3 = padded_codes(raw.reshape_batch((8, 8)))
    assert torch.equal(i3.reshape(64, -1), idx) and a3.shape == (8, 8, raw.width)


def test_trainer_dead_latent_bookkeeping_ignores_padding(tmp_path):
    """Latent 0 never fires (its prototype is far away): sparsify's trainer must count it as never fired."""
    model = tiny_lm()
    cfg = train_config(tmp_path, SpaDECoderConfig(num_latents=32, init="none"), optimizer="adam", lr=1e-3)
    trainer = SpaDETrainer(cfg, dataset(32), model)
    ((name, c),) = trainer.saes.items()
    with torch.no_grad():
        c.spade.prototypes[0].fill_(1e3)
        c.spade.lambda_raw.fill_(-2.0)
    outs = record(c)
    trainer.fit()
    tokens = 32 * SEQ
    assert len(outs) == 4
    # Padding was there (rows of different support sizes), and names no latent outside each row's support.
    assert any((o.latent_acts == 0).any() for o in outs)
    assert not any(o.latent_indices.eq(0).any() for o in outs)
    counts = trainer.num_tokens_since_fired[name]
    assert counts[0] == tokens
    fired = torch.zeros(32, dtype=torch.bool)
    for o in outs:
        fired[o.latent_indices[o.latent_acts > 0]] = True
    # Counts are reset each step for the latents that fired in it; a latent that fired in the last step reads 0.
    last = torch.zeros(32, dtype=torch.bool)
    last[outs[-1].latent_indices[outs[-1].latent_acts > 0]] = True
    assert torch.equal(counts == 0, last) and not fired[0]
    assert torch.equal(counts == tokens, ~fired)


# -- initialisation --------------------------------------------------------------------------------


def test_data_init_at_the_first_training_forward():
    c = coder(K=24, d=8)
    x = torch.randn(50, 8) * 3 + 1
    with torch.no_grad():
        c.b_dec.copy_(x.mean(0))
        c(x)  # no gradient: no init
    assert not bool(c.initialised)
    c.eval()
    c(x)  # eval mode: no init
    assert not bool(c.initialised)
    c.train()
    c(x)
    assert bool(c.initialised)
    centered = x - c.b_dec.detach()
    rows = {tuple(r) for r in centered.tolist()}
    assert all(tuple(p) in rows for p in c.spade.prototypes.detach().tolist())
    assert torch.equal(c.spade.prototypes, c.spade.W_dec)
    assert len({tuple(p) for p in c.spade.prototypes.detach().tolist()}) == 24
    m = centered.pow(2).sum(-1).mean().item()
    assert math.isclose(c.lam.item(), 1 / (2 * m), rel_tol=1e-5)
    before = c.spade.prototypes.detach().clone()
    c(x + 5)  # only once
    assert torch.equal(c.spade.prototypes, before)


def test_data_init_with_fewer_rows_than_latents_gives_distinct_prototypes():
    c = coder(K=24, d=8, lambda_init=0.25)
    x = torch.randn(5, 8).repeat(3, 1)  # 15 rows, 5 distinct
    c(x)
    protos = c.spade.prototypes.detach()
    assert len({tuple(p) for p in protos.tolist()}) == 24
    # Five are the distinct rows exactly; the rest are near one of them.
    exact = [p for p in protos if (x == p).all(-1).any()]
    assert len(exact) == 5
    dist_to_rows = torch.cdist(protos, x[:5]).min(-1).values
    rms = math.sqrt(x[:5].pow(2).sum(-1).mean() / 8)
    assert dist_to_rows.max() < 1.0 * rms * math.sqrt(8)
    assert math.isclose(c.lam.item(), 0.25, rel_tol=1e-6)


def test_init_modes_and_seeds():
    x = torch.randn(100, 8) * 0.01
    # "normal": the paper's N(0, 1) prototypes scaled to the data's per-coordinate RMS.
    c = coder(K=24, d=8, init="normal")
    start = c.spade.prototypes.detach().clone()
    c(x)
    m = x.pow(2).sum(-1).mean().item()
    torch.testing.assert_close(c.spade.prototypes.detach(), start * math.sqrt(m / 8), rtol=1e-5, atol=1e-9)
    assert math.isclose(c.lam.item(), 1 / (2 * m), rel_tol=1e-4)
    # "none": construction-time init untouched, λ = 1/(2d).
    c = coder(K=24, d=8, init="none")
    start = c.spade.prototypes.detach().clone()
    c(x)
    assert torch.equal(c.spade.prototypes, start) and math.isclose(c.lam.item(), 1 / 16, rel_tol=1e-6)
    # The data init draws from the seed set before construction (sparsify's init_seeds).
    a, b, a2 = coder(seed=0), coder(seed=1), coder(seed=0)
    for cc in (a, b, a2):
        cc(x)
    assert torch.equal(a.spade.prototypes, a2.spade.prototypes)
    assert not torch.equal(a.spade.prototypes, b.spade.prototypes)
    with pytest.raises(ValueError, match="finite and > 0"):
        coder()(torch.zeros(10, 8))


def _broadcast_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        c = coder(seed=rank)  # different seeds and data on each rank
        c._broadcast_init = True
        c(torch.randn(40, 8, generator=torch.Generator().manual_seed(10 + rank)))
        torch.save(c.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        sys.stdout.flush()
    os._exit(0)


def test_data_init_is_broadcast_from_rank_zero_under_ddp(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_broadcast_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in ("prototypes", "W_dec", "lambda_raw"):
        assert torch.equal(s0[key], s1[key]), key
    # Without the broadcast they differ (different seeds and data).
    single = [coder(seed=r) for r in range(2)]
    for r, cc in enumerate(single):
        cc(torch.randn(40, 8, generator=torch.Generator().manual_seed(10 + r)))
    assert not torch.equal(single[0].spade.prototypes, single[1].spade.prototypes)
    assert torch.equal(single[0].spade.prototypes, s0["prototypes"])


# -- training through sparsify's trainer -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SpaDE trained by sparsify's Trainer with its defaults (signum, schedule-free): 64 steps of 128 tokens."""
    tmp = tmp_path_factory.mktemp("sparsify")
    model = tiny_lm()
    trainer = SpaDETrainer(train_config(tmp), dataset(512), model)
    ((name, c),) = trainer.saes.items()
    first, outs = state_after_first_forward(c), record(c)
    trainer.fit()
    eval_mode(trainer)
    return {"trainer": trainer, "coder": c, "name": name, "model": model, "outs": list(outs),
            "dir": tmp / "run" / name, "first": first}  # fmt: skip


def test_training_reduces_the_fvu(trained):
    c, outs = trained["coder"], trained["outs"]
    assert len(outs) == 64 and trained["trainer"].global_step == 64
    x = activations(trained["model"], token_ids(16, seed=99))  # held out
    start = copy.deepcopy(c)
    start.load_state_dict(trained["first"])  # the weights of the first step, after the data init
    with torch.no_grad():
        before, after = start(x), c(x)
    assert after.fvu < 0.9 * before.fvu, (before.fvu, after.fvu)
    assert after.loss < before.loss
    # The steps' own FVU falls too; every step reports the regulariser in loss, not in fvu.
    fvus = torch.stack([o.fvu.detach() for o in outs])
    assert fvus[-8:].mean() < fvus[1:9].mean()
    assert all(o.loss > o.fvu and torch.isfinite(o.loss) for o in outs)
    # b_dec was set by the trainer to the first batch's mean and trained from there.
    assert bool(c.initialised) and c.b_dec.abs().sum() > 0


def test_checkpoint_round_trip(trained):
    c, ckpt = trained["coder"], trained["dir"]
    assert sorted(os.listdir(ckpt)) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((ckpt / "cfg.json").read_text())
    assert cfg["architecture"] == ARCHITECTURE and cfg["d_in"] == D and cfg["num_latents"] == 64
    assert set(load_file(ckpt / "sae.safetensors")) == {
        "prototypes",
        "W_dec",
        "lambda_raw",
        "b_dec",
        "initialised",
    }
    x = activations(trained["model"], token_ids(4, seed=98))
    with torch.no_grad():
        ref = c(x)
        # The coder, reloaded: the file bit for bit, and the trained coder's weights.  (Those went through
        # the schedule-free optimizer's eval() → save → train() in the trainer and eval() here: equal up to
        # the rounding of those interpolations.)
        again = SpaDESparseCoder.load_from_disk(ckpt)
        for key, t in load_file(ckpt / "sae.safetensors").items():
            assert torch.equal(again.state_dict()[key], t), key
            torch.testing.assert_close(c.state_dict()[key], t, rtol=1e-5, atol=1e-4)
        # As a plain SpaDE layer.
        layer = load_spade(ckpt, backend="torch")
        assert isinstance(layer, sk.SpaDE) and layer.b_dec is None and layer.d_sae == 64
        # λ's initial value as the data init chose it (not the 1/(2d) of a config that left it None).
        assert layer.lambda_init == pytest.approx(c.spade.lambda_init) == pytest.approx(cfg["lambda_init"])
        out = layer(x)
    torch.testing.assert_close(out.x_hat, ref.sae_out, rtol=1e-5, atol=1e-4)  # activations of size ~30
    dense = torch.zeros(x.shape[0], 64).scatter_add(1, ref.latent_indices, ref.latent_acts)
    torch.testing.assert_close(out.codes.to_dense(), dense, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.codes.to_dense() > 0, dense > 0)
    # Its own format, and float64.
    layer.save_pretrained(ckpt.parent / "spade")
    torch.testing.assert_close(sk.SpaDE.from_pretrained(ckpt.parent / "spade").encode(x), layer.encode(x))
    assert load_spade(ckpt, dtype=torch.float64).prototypes.dtype == torch.float64
    # Other loaders refuse rather than misread.
    with pytest.raises(ValueError, match="spade-sparsify"):
        sk.SpaDE.from_pretrained(ckpt)
    with pytest.raises(RuntimeError, match="encoder.weight"):
        SparseCoder.load_from_disk(ckpt)
    with pytest.raises(ValueError, match="not describe a SpaDE coder"):
        SpaDESparseCoder.load_from_disk(ckpt.parent / "spade")
    with pytest.raises(FileNotFoundError):
        load_spade(ckpt.parent / "missing")


def test_resume_and_finetune(trained, tmp_path):
    """sparsify's resume (Trainer.load_state) and its finetune flag, on SpaDE runs."""
    run = trained["dir"].parent
    trainer = SpaDETrainer(train_config(tmp_path), dataset(512 + 16), trained["model"])
    (c,) = trainer.saes.values()
    assert not bool(c.initialised)
    trainer.load_state(str(run))
    assert trainer.global_step == 64 and bool(c.initialised)
    # The checkpoint's weights (the optimizer's averaged ones), exactly.
    loaded = copy.deepcopy(c.state_dict())
    for key, t in load_file(trained["dir"] / "sae.safetensors").items():
        assert torch.equal(loaded[key], t), key
    at_start, outs = first_state(c), record(c)
    trainer.fit()  # the two remaining batches
    assert len(outs) == 2 and trainer.global_step == 66
    # Resumed, not restarted: neither the trainer's b_dec reset nor the data init ran again.
    for key, t in loaded.items():
        assert torch.equal(at_start[key], t), key
    assert not torch.equal(c.spade.prototypes, loaded["prototypes"])
    # Fine-tuning a plain SpaDE (from_spade: b_dec = 0): with finetune set, the trainer keeps b_dec.
    layer = load_spade(trained["dir"])
    cfg = train_config(tmp_path, SpaDECoderConfig(num_latents=64, init="none"), finetune="yes", run_name="ft")
    ft = SpaDETrainer(cfg, dataset(16), trained["model"])
    (target,) = ft.saes.values()
    start = SpaDESparseCoder.from_spade(layer).state_dict()
    target.load_state_dict(start)
    at_start = first_state(target)
    ft.fit()
    assert ft.global_step == 2
    for key, t in start.items():
        assert torch.equal(at_start[key], t), key


@pytest.mark.parametrize("optimizer, lr", [("adam", 3e-2), ("muon", None)])
def test_other_optimizers_micro_batches_and_two_seeds(tmp_path, optimizer, lr):
    """Adam and Muon, two coders per hookpoint (init_seeds), micro-batches (the whole batch's variance passed in)."""
    model = tiny_lm()
    cfg = train_config(
        tmp_path, optimizer=optimizer, lr=lr, lr_warmup_steps=0, init_seeds=[0, 1], micro_acc_steps=2
    )
    trainer = SpaDETrainer(cfg, dataset(64), model)
    assert sorted(trainer.saes) == ["layers.0/seed0", "layers.0/seed1"]
    # Each coder's state after the data init, before the first step.
    initial = {name: state_after_first_forward(c) for name, c in trainer.saes.items()}
    variances = []

    def keep(module, args, kwargs, out):  # the trainer calls forward(x=..., y=..., total_variance=...)
        variances.append((kwargs["x"], kwargs["total_variance"]))

    handles = [c.register_forward_hook(keep, with_kwargs=True) for c in trainer.saes.values()]
    trainer.fit()
    for handle in handles:
        handle.remove()
    assert len(variances) == 2 * 8 * 2  # 2 coders × 8 steps × 2 micro-batches
    for x, tv in variances:  # each micro-batch is scored against a larger (the whole batch's) variance
        assert x.shape[0] == 8 * SEQ // 2 and tv > (x - x.mean(0)).pow(2).sum()
    a, b = trainer.saes.values()
    assert not torch.equal(a.spade.prototypes, b.spade.prototypes)
    for name, c in trainer.saes.items():  # every parameter trained (W_dec, prototypes: Muon's with "muon")
        for key in ("prototypes", "W_dec", "lambda_raw", "b_dec"):
            assert torch.isfinite(c.state_dict()[key]).all(), key
            assert not torch.equal(c.state_dict()[key], initial[name][key]), key
    x = activations(model, token_ids(2, seed=7))
    for name, c in trainer.saes.items():
        layer = load_spade(tmp_path / "run" / name)
        with torch.no_grad():
            torch.testing.assert_close(layer(x).x_hat, c(x).sae_out, rtol=1e-5, atol=1e-5)


def test_end_to_end_ce_loss(tmp_path):
    """loss_fn="ce": the model's loss through the coder's output (γ = 0)."""
    model = tiny_lm()
    cfg = train_config(tmp_path, SpaDECoderConfig(num_latents=64, gamma_reg=0.0), loss_fn="ce", optimizer="adam",
                       lr=1e-2, lr_warmup_steps=0)  # fmt: skip
    trainer = SpaDETrainer(cfg, dataset(32), model)
    (c,) = trainer.saes.values()
    outs, start = record(c), state_after_first_forward(c)
    trainer.fit()
    assert len(outs) == 4  # the clean-loss batch runs without the coder
    assert all(torch.isfinite(o.sae_out).all() for o in outs)
    # The model's loss reached every parameter through the coder's output.
    for key in ("prototypes", "W_dec", "lambda_raw", "b_dec"):
        assert not torch.equal(c.state_dict()[key], start[key]), key
        assert torch.isfinite(c.state_dict()[key]).all(), key


def held_out_fvu(tmp_path, how):
    """Train 32 steps (sparsify's defaults) in precision mode ``how``; the held-out FVU after the data init and at the end."""
    model = tiny_lm()
    if how == "bf16-model":
        model = model.to(torch.bfloat16)
    trainer = SpaDETrainer(train_config(tmp_path / how), dataset(256), model)
    ((name, c),) = trainer.saes.items()
    first, outs = state_after_first_forward(c), record(c)
    region = torch.autocast("cpu", dtype=torch.bfloat16) if how == "autocast" else contextlib.nullcontext()
    with region:
        trainer.fit()
    assert len(outs) == 32
    assert all(torch.isfinite(o.loss) and o.sae_out.dtype == torch.float32 for o in outs)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in c.parameters())
    eval_mode(trainer)
    x = activations(tiny_lm(), token_ids(16, seed=99))
    start = copy.deepcopy(c)
    start.load_state_dict(first)
    with torch.no_grad():
        before, after = start(x).fvu.item(), c(x).fvu.item()
        # The checkpoint, as a SpaDE, reconstructs as the coder does.
        layer = load_spade(tmp_path / how / "run" / name)
        torch.testing.assert_close(layer(x).x_hat, c(x).sae_out, rtol=1e-5, atol=1e-4)
    return before, after


@pytest.mark.parametrize("how", ["autocast", "bf16-model"])
def test_mixed_precision_on_the_cpu(tmp_path, how):
    """The trainer under a CPU bfloat16 autocast region, and a bfloat16 model feeding a float32 coder:
    training goes as in float32."""
    before, after = held_out_fvu(tmp_path, how)
    _, after32 = held_out_fvu(tmp_path, "float32")
    assert after < 0.95 * before, (before, after)
    assert abs(after - after32) < 0.1 * after32, (after, after32)


def test_sae_trainer_alias_is_the_base():
    assert issubclass(SpaDETrainer, SaeTrainer)
