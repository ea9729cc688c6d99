"""SAEBench's core eval on a SpaDE SAE (spade_kernels.sae.integrations.sae_lens).

Needs sae-lens and sae-bench, which the main environment does not install:
run ``scripts/test_saebench.sh`` (the SAELens venv plus ``sae-bench==0.6.0
--no-deps`` and the one extra module its core eval imports).  Offline: a
randomly initialised TransformerLens model with a 32-word tokenizer saved to
a temporary directory, and a text dataset written there; SAEBench's model
loader is replaced by one that returns that model, nothing else is patched.
"""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("sae_lens", reason="sae-lens is not installed (run scripts/test_saebench.sh)")
core = pytest.importorskip(
    "sae_bench.evals.core.main",
    reason="sae-bench's core eval is not importable (run scripts/test_saebench.sh, which installs it)",
)

from spade_kernels.sae.integrations import sae_lens as sl  # noqa: E402

D_IN, D_SAE, VOCAB, CTX = 16, 64, 32, 16
HOOK = "blocks.0.hook_resid_post"
FEATURE_METRICS = (
    "encoder_bias",
    "encoder_norm",
    "encoder_decoder_cosine_sim",
    "max_encoder_cosine_sim",
    "max_decoder_cosine_sim",
    "feature_density",
    "consistent_activation_heuristic",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokenizer(path: Path):
    """A 32-word whitespace tokenizer, saved and reloaded (TransformerLens re-reads it by path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="w0", bos_token="w1", eos_token="w2", pad_token="w3"
    ).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _max_other_cosine(rows: torch.Tensor) -> torch.Tensor:
    """For each row, its largest cosine similarity with another row."""
    unit = rows / rows.norm(dim=-1, keepdim=True)
    cos = unit @ unit.T
    cos.fill_diagonal_(-math.inf)
    return cos.max(dim=-1).values


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_core_eval_with_featurewise_metrics(tmp_path, monkeypatch, caplog):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=1, d_model=D_IN, n_ctx=CTX, d_head=4, n_heads=4, d_vocab=VOCAB, act_fn="relu", d_mlp=32
        ),
        tokenizer=_tokenizer(tmp_path / "tokenizer"),
    )
    loads = []

    class _Loader:  # what SAEBench's multiple_evals calls to load sae.cfg.model_name
        @staticmethod
        def from_pretrained_no_processing(name, **kwargs):
            loads.append((name, kwargs))
            return model

    monkeypatch.setattr(core, "HookedTransformer", _Loader)

    g = torch.Generator().manual_seed(0)
    (tmp_path / "text").mkdir()
    with open(tmp_path / "text" / "train.jsonl", "w") as f:
        for _ in range(64):
            words = torch.randint(4, VOCAB, (2 * CTX,), generator=g).tolist()
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in words)}) + "\n")

    sae = sl.SpaDESAE(sl.SpaDESAEConfig(d_in=D_IN, d_sae=D_SAE, backend="torch"))
    meta = sae.cfg.metadata
    meta.model_name, meta.hook_name, meta.context_size, meta.prepend_bos = "tiny-random", HOOK, CTX, False
    _, cache = model.run_with_cache(torch.randint(4, VOCAB, (16, CTX), generator=g), names_filter=[HOOK])
    acts = cache[HOOK].reshape(-1, D_IN)
    sae.init_from_data(acts, generator=g)  # prototypes = W_dec = activation samples, then
    with torch.no_grad():  # a decoder apart from the prototypes, so the encoder/decoder cosines are not all 1
        sae.spade.W_dec.add_(0.5 * acts.std() * torch.randn(D_SAE, D_IN, generator=g))

    results = core.multiple_evals(
        selected_saes=[("spade-tiny", sae)],
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        eval_batch_size_prompts=4,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        dataset=str(tmp_path / "text"),
        context_size=CTX,
        output_folder=str(tmp_path / "out"),
        device="cpu",
    )
    # multiple_evals logs an SAE's failure and goes on: no result means it failed.
    assert len(results) == 1, caplog.text
    assert [name for name, _ in loads] == ["tiny-random"]
    assert loads[0][1]["dtype"] == sae.W_enc.dtype == torch.float32

    features = results[0]["feature_metrics"]
    assert set(FEATURE_METRICS) <= set(features)
    for name in FEATURE_METRICS:
        assert len(features[name]) == D_SAE, name
    for name in FEATURE_METRICS[:5]:
        assert all(math.isfinite(v) for v in features[name]), name

    # The weight-based metrics, computed by hand from the SpaDE weights:
    # SAEBench reads W_enc = 2λ·Aᵀ and b_enc = −λ‖a_k‖².
    A, W_dec, lam = sae.prototypes.detach(), sae.W_dec.detach(), sae.lam.item()
    expected = {
        "encoder_decoder_cosine_sim": torch.nn.functional.cosine_similarity(A, W_dec, dim=-1),
        "encoder_norm": 2 * lam * A.norm(dim=-1),
        "encoder_bias": -lam * A.pow(2).sum(-1),
        "max_encoder_cosine_sim": _max_other_cosine(A),
        "max_decoder_cosine_sim": _max_other_cosine(W_dec),
    }
    for name, value in expected.items():
        torch.testing.assert_close(torch.tensor(features[name]), value, rtol=1e-5, atol=1e-6, msg=name)
    cos = torch.tensor(features["encoder_decoder_cosine_sim"])
    assert cos.min() < 0.99  # the check above compares something that varies

    # Density statistics agree with the scalar sparsity metrics, and SpaDE's
    # codes sum to 1 per token (sparsemax), which SAEBench reports as L1.
    metrics = results[0]["metrics"]
    density = torch.tensor(features["feature_density"])
    assert ((density >= 0) & (density <= 1)).all()
    assert density.sum().item() == pytest.approx(metrics["sparsity"]["l0"], rel=1e-5)
    assert metrics["sparsity"]["l0"] >= 1
    assert metrics["sparsity"]["l1"] == pytest.approx(1.0, abs=1e-5)
    for group, name in (
        ("reconstruction_quality", "explained_variance"),
        ("reconstruction_quality", "mse"),
        ("model_behavior_preservation", "kl_div_score"),
        ("model_performance_preservation", "ce_loss_score"),
        ("shrinkage", "l2_ratio"),
    ):
        assert math.isfinite(metrics[group][name]), (group, name)

    # SAEBench's result file, with one record per latent.
    saved = json.loads((tmp_path / "out" / "spade-tiny_custom_sae_eval_results.json").read_text())
    details = saved["eval_result_details"]
    assert [d["index"] for d in details] == list(range(D_SAE))
    assert [d["encoder_norm"] for d in details] == pytest.approx(features["encoder_norm"])
    assert saved["sae_cfg_dict"]["architecture"] == "spade"
