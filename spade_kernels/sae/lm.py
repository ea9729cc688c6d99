"""Language models for the SAE commands: activations at a hook (``cache``) and the SAE spliced in (``eval``).

A model is named as ``--model`` names it: a Hugging Face model (a hub name or
a local directory, read by ``transformers``) or a directory written by
:func:`spade_kernels.sae.formal_language.save_model` (the formal-language
transformer, which needs no ``transformers``).  A hook is the dotted name of
one of its modules (``encoder.layer.3``, ``model.layers.6``, ``blocks.0``);
its activations are that module's output (the first element of a tuple).

Texts are cut into windows of at most ``context`` tokens, each framed by the
model's special tokens (``[CLS]``/``[SEP]``, ``<bos>``, none for GPT-2).
The rows the SAE sees, cached or spliced, are the windows' ordinary tokens:
special tokens and padding are never rows.

* :func:`cache_activations` — the rows of a corpus written as the shard
  directory ``spade-kernels train --data DIR`` reads: a shard at a time
  (bounded memory), resumable after an interruption, with progress.
* :func:`spliced_losses` — a causal LM's next-token loss clean, with the
  SAE's reconstruction in place of the hook's output (at the rows' tokens),
  and with zeros there; the fraction of the loss recovered and the KL
  divergence of the spliced next-token distribution from the clean one.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CACHE_STATE",
    "LanguageModel",
    "cache_activations",
    "load_language_model",
    "read_texts",
    "spliced_losses",
]

#: The cache directory's record of its settings and progress (shards done, documents consumed).
CACHE_STATE = "cache.json"


@dataclass
class LanguageModel:
    """A model with what the commands need: token windows, the forward pass, the hook's module."""

    module: nn.Module
    #: Ids of a text without special tokens.
    encode: Callable[[str], list[int]]
    #: The special tokens the model puts before and after a sequence (never rows).
    prefix: list[int]
    suffix: list[int]
    pad_id: int
    #: The longest window the model takes (None: no limit known).
    max_context: int | None
    causal: bool
    #: What ``--model`` named, for the records.
    name: str
    vocab_size: int
    #: Logits (B, T, V) of ids (B, T) with the attention mask (B, T).
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def hook_module(self, hook: str) -> nn.Module:
        """The module named ``hook``; ValueError listing some valid names otherwise."""
        try:
            return self.module.get_submodule(hook)
        except AttributeError:
            names = [n for n, _ in self.module.named_modules() if n and n.split(".")[-1].isdigit()]
            shown = ", ".join(names[:12]) + (", …" if len(names) > 12 else "")
            raise ValueError(
                f"--hook {hook!r}: {self.name} has no module of that name; some it has: {shown}"
            ) from None

    def windows(self, text: str, context: int) -> list[list[int]]:
        """``text``'s ids in consecutive windows, each framed, each at most ``context`` tokens long.

        The rows of a window are its positions ``len(prefix)`` … ``len(window) − len(suffix) − 1``:
        every token of the text, ``[UNK]`` included; never the frame.
        """
        ids = self.encode(text)
        width = context - len(self.prefix) - len(self.suffix)
        if width < 1:
            raise ValueError(f"--context {context} leaves no room beside the model's special tokens")
        return [[*self.prefix, *ids[i : i + width], *self.suffix] for i in range(0, len(ids), width)]


def load_language_model(
    spec: str | os.PathLike, *, device: torch.device, causal: bool = False
) -> LanguageModel:
    """The model ``spec`` names (see the module docstring), in eval mode on ``device``.

    ``causal`` asks for a causal LM head (``AutoModelForCausalLM``); without
    it a Hugging Face model is loaded with its head when its config names a
    causal-LM architecture, else as ``AutoModel``.
    """
    from .formal_language import is_model_dir

    spec = os.fspath(spec)
    if is_model_dir(spec):
        return _formal_language(spec, device)
    if (os.sep in spec or spec.startswith(".")) and not Path(spec).exists():
        raise ValueError(f"--model {spec}: no such directory")
    return _hugging_face(spec, device, causal)


def _formal_language(spec: str, device: torch.device) -> LanguageModel:
    from .formal_language import load_model

    model, tok = load_model(spec)
    model.to(device)
    return LanguageModel(
        module=model,
        encode=lambda text: tok.encode(text)[1:-1],
        prefix=[tok.bos],
        suffix=[tok.eos],
        pad_id=tok.pad,
        max_context=model.sizes["max_len"],
        causal=True,
        name=os.fspath(spec),
        vocab_size=len(tok.vocab),
        logits=lambda ids, mask: model(ids),  # causal and padded on the right: the padding is never attended
    )


def _hugging_face(spec: str, device: torch.device, causal: bool) -> LanguageModel:
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"--model {spec}: a Hugging Face model needs the transformers package (pip install transformers); "
            "a formal-language model directory (python -m spade_kernels.sae.formal_language) does not"
        ) from None
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {spec}: cannot load it ({str(exc).splitlines()[0]})") from None
    names = " ".join(getattr(config, "architectures", None) or [])
    is_causal = "CausalLM" in names or "LMHeadModel" in names
    if causal and not is_causal:
        raise ValueError(
            f"--model {spec}: {names or config.model_type} is not a causal language model "
            "(the spliced next-token loss needs one)"
        )
    loader = transformers.AutoModelForCausalLM if is_causal else transformers.AutoModel
    try:
        model = loader.from_pretrained(spec).to(device).eval()
        tok = transformers.AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {spec}: cannot load it ({str(exc).splitlines()[0]})") from None
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    prefix, suffix = _framing(tok)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits

    return LanguageModel(
        module=model,
        encode=lambda text: tok(text, add_special_tokens=False, verbose=False)["input_ids"],
        prefix=prefix,
        suffix=suffix,
        pad_id=pad,
        max_context=limit,
        causal=is_causal,
        name=spec,
        vocab_size=model.get_output_embeddings().weight.shape[0] if is_causal else config.vocab_size,
        logits=logits,
    )


def _framing(tok) -> tuple[list[int], list[int]]:
    """The special tokens ``tok`` puts around one sequence (BERT's [CLS] … [SEP], Llama's <s> …, GPT-2's none).

    Read off a probe text tokenized with and without them; a template that
    does not keep the text's ids together is refused.
    """
    probe = "hello world"
    bare = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare) :])
    raise ValueError(f"{type(tok).__name__}: cannot tell where its special tokens go around a text")


def _text_bytes(path: str | os.PathLike) -> int:
    """The corpus's size: a resumed cache refuses a corpus that changed (it skips documents by count)."""
    path = Path(path)
    files = [p for p in path.iterdir() if p.suffix.lower() in (".txt", ".jsonl")] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files if p.is_file())


def read_texts(path: str | os.PathLike, skip: int = 0) -> Iterator[tuple[str, str]]:
    """(``file:line``, document) of ``path`` one at a time, after the first ``skip``: streamed, never read whole.

    A ``.txt`` file holds one document per line; a ``.jsonl`` file one JSON
    object per line with a ``"text"`` field; a directory, its ``.txt`` and
    ``.jsonl`` files in name order.  Blank lines are not documents, so a
    document's index counts the non-blank lines before it, over all files.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise ValueError(f"--text {path}: no .txt or .jsonl files in the directory")
    elif path.is_file():
        if path.suffix.lower() not in (".txt", ".jsonl"):
            raise ValueError(f"--text {path}: expected a .txt or .jsonl file or a directory of them")
        files = [path]
    else:
        raise FileNotFoundError(f"--text {path}: no such file or directory")
    seen = 0
    for file in files:
        jsonl = file.suffix.lower() == ".jsonl"
        with open(file, "rb") as f:  # decoded a line at a time, so an error names its line
            for number, raw in enumerate(f, 1):
                where = f"{file}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{where}: not UTF-8 text ({exc.reason})") from None
                if not line.strip():
                    continue
                seen += 1
                if seen <= skip:
                    continue
                if not jsonl:
                    yield where, line.rstrip("\r\n")
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f'{where}: not a JSON object with a "text" field') from None
                if not isinstance(text, str):
                    raise ValueError(f'{where}: "text" is not a string')
                yield where, text


class _Captured(Exception):
    """Raised by the capture hook to end the forward pass: the layers after the hook are not needed."""


def _output(value):
    return value[0] if isinstance(value, tuple) else value


@dataclass
class _Batch:
    """At most ``batch_size`` windows: ids, attention mask and rows (B, T), each window's document, and
    where the next batch starts (document, window of it)."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    document: torch.Tensor  # (B,)
    next: tuple[int, int]


def _batches(lm: LanguageModel, texts, context: int, batch_size: int, start: tuple[int, int] = (0, 0)):
    """:class:`_Batch` es of at most ``batch_size`` windows of ``texts`` (``read_texts`` from ``start[0]``),
    the first ``start[1]`` windows of the first document skipped: a batch may end inside a document,
    and a long document is spread over as many batches as it needs (bounded memory).  An error in a
    document names its ``file:line``."""
    windows, owners = [], []
    document, skip = start
    for where, text in texts:
        try:
            new = lm.windows(text, context)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        for w in range(skip, len(new)):
            windows.append(new[w])
            owners.append(document)
            if len(windows) == batch_size:
                following = (document, w + 1) if w + 1 < len(new) else (document + 1, 0)
                yield _padded(lm, windows, owners, following)
                windows, owners = [], []
        document, skip = document + 1, 0
    if windows:
        yield _padded(lm, windows, owners, (document, 0))


def _padded(
    lm: LanguageModel, windows: list[list[int]], owners: list[int], following: tuple[int, int]
) -> _Batch:
    width = max(map(len, windows))
    ids = torch.full((len(windows), width), lm.pad_id, dtype=torch.int64)
    mask = torch.zeros(len(windows), width, dtype=torch.int64)
    rows = torch.zeros(len(windows), width, dtype=torch.bool)
    before, after = len(lm.prefix), len(lm.suffix)
    for i, w in enumerate(windows):
        ids[i, : len(w)] = torch.tensor(w, dtype=torch.int64)
        mask[i, : len(w)] = 1
        rows[i, before : len(w) - after] = True
    return _Batch(ids, mask, rows, torch.tensor(owners, dtype=torch.int64), following)


@torch.no_grad()
def _hook_output(lm: LanguageModel, module: nn.Module, ids, mask) -> torch.Tensor:
    """The hook's output (B, T, d) on ``ids``; the forward pass stops there."""
    seen = []

    def capture(_module, _inputs, output):
        seen.append(_output(output))
        raise _Captured

    handle = module.register_forward_hook(capture)
    try:
        lm.logits(ids, mask)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("the hook's module did not run in the model's forward pass")
    out = seen[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != ids.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the hook's output must be (batch, tokens, d) = {tuple(ids.shape)} + (d,), got {shape}"
        )
    return out


#: Tokens per window when none is asked for (or the model's limit, if smaller).
DEFAULT_CONTEXT = 128


def _check_context(lm: LanguageModel, context: int | None) -> int:
    """``context``, or the default one for ``lm``; ValueError if ``lm`` cannot take it."""
    if context is None:
        return min(DEFAULT_CONTEXT, lm.max_context or DEFAULT_CONTEXT)
    if context < 2:
        raise ValueError(f"--context must be ≥ 2, got {context}")
    if lm.max_context is not None and context > lm.max_context:
        raise ValueError(f"--context {context}: {lm.name} takes at most {lm.max_context} tokens")
    return context


def cache_activations(
    lm: LanguageModel,
    hook: str,
    texts: str | os.PathLike,
    out: str | os.PathLike,
    *,
    context: int | None = None,
    batch_size: int = 32,
    shard_rows: int = 65536,
    max_rows: int | None = None,
    dtype: torch.dtype = torch.float32,
    log=print,
) -> dict:
    """Write the hook's activations at every row token of ``texts`` to shards in ``out``; returns the state.

    Shards (``shard-00000.safetensors``, …) hold ``activations`` (rows, d)
    in ``dtype`` and the rows' ``token_ids`` and ``document`` (the
    document's index in ``texts``: non-blank lines counted over all files).
    A forward pass takes at most ``batch_size`` windows; a shard is written
    once it holds ``shard_rows`` rows (or up to a batch more), atomically, and
    then :data:`CACHE_STATE` records it and where the next batch starts
    (document and window).  An interrupted run called again with the same
    settings starts there and goes on with the next shard (rows of an
    unfinished shard are computed again); a corpus whose size changed is
    refused (documents are skipped by count).  ``max_rows`` stops after
    exactly that many rows.  Memory: a shard's rows, one batch's forward
    pass, and the token ids of the longest document.
    """
    from safetensors.torch import save_file

    from spade_kernels.files import DirectoryLock, atomic_write, read_json

    context = _check_context(lm, context)
    for name, value in (
        ("--batch-size", batch_size),
        ("--shard-rows", shard_rows),
        ("--max-tokens", max_rows),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")
    module = lm.hook_module(hook)
    out = Path(out)
    settings = {
        "model": lm.name, "hook": hook, "text": os.fspath(texts), "text_bytes": _text_bytes(texts), "context": context,
        "batch_size": batch_size, "shard_rows": shard_rows, "max_tokens": max_rows,
        "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip
    empty = f"--text {os.fspath(texts)}: no tokens to cache (every document empty?)"
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out):
        state_path = out / CACHE_STATE

        def save_state() -> None:
            atomic_write(state_path, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=1) + "\n"))

        if state_path.is_file():
            state = read_json(state_path, "a cache state")
            changed = [k for k in settings if state["settings"].get(k) != settings[k]]
            if changed:
                raise ValueError(
                    f"{out} holds a cache made with other settings ({', '.join(changed)}: "
                    + ", ".join(f"{state['settings'].get(k)!r}" for k in changed)
                    + "); pick another --out or repeat those settings to resume it"
                )
            if state["complete"]:
                if not state["rows"]:
                    raise ValueError(empty)
                log(f"{out}: already complete ({state['rows']} rows in {len(state['shards'])} shards)")
                return state
            log(f"resuming {out}: {state['rows']} rows in {len(state['shards'])} shards, next: document "
                f"{state['next'][0]} window {state['next'][1]}")  # fmt: skip
        else:
            if any(p.suffix.lower() in (".pt", ".npy", ".safetensors") for p in out.iterdir()):
                raise ValueError(
                    f"{out} already holds activation files and no {CACHE_STATE}; pick another --out"
                )
            state = {
                "settings": settings,
                "shards": [],
                "rows": 0,
                "next": [0, 0],
                "d": None,
                "complete": False,
            }
            save_state()  # before any shard: a run stopped after its first shard resumes

        def flush(parts: list[dict], following, complete: bool) -> None:
            if parts:
                tensors = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
                name = f"shard-{len(state['shards']):05d}.safetensors"
                atomic_write(out / name, lambda tmp: save_file(tensors, tmp))
                state["shards"].append(name)
                state["rows"] += tensors["activations"].shape[0]
            state["next"] = list(following)
            state["complete"] = complete
            save_state()

        parts, buffered, following = [], 0, tuple(state["next"])
        start = last_report = time.monotonic()
        rows_before = state["rows"]
        device = next(lm.module.parameters()).device
        texts_left = read_texts(texts, state["next"][0])
        for batch in _batches(lm, texts_left, context, batch_size, start=tuple(state["next"])):
            acts = _hook_output(lm, module, batch.ids.to(device), batch.mask.to(device))
            if state["d"] is None:
                state["d"] = acts.shape[-1]
            rows = batch.rows
            part = {
                "activations": acts[rows.to(acts.device)].to(dtype).cpu(),
                "token_ids": batch.ids[rows],
                "document": batch.document[:, None].expand_as(rows)[rows],
            }
            following = batch.next
            done = max_rows is not None and state["rows"] + buffered + part["token_ids"].numel() >= max_rows
            if done:
                part = {k: v[: max_rows - state["rows"] - buffered] for k, v in part.items()}
            parts.append(part)
            buffered += part["token_ids"].numel()
            if done:
                break
            if buffered >= shard_rows:
                flush(parts, following, False)
                parts, buffered = [], 0
            now = time.monotonic()
            if now - last_report >= 5.0:
                last_report = now
                rate = (state["rows"] + buffered - rows_before) / max(now - start, 1e-9)
                log(f"cached {state['rows'] + buffered} rows ({len(state['shards'])} shards written), "
                    f"document {following[0]}, {rate:.0f} rows/s")  # fmt: skip
        if not state["rows"] and not buffered:
            raise ValueError(empty)
        flush(parts, following, True)
        log(f"wrote {state['rows']} rows of d = {state['d']} in {len(state['shards'])} shards to {out}")
        return state


#: Logits per forward pass of the next-token loss, when its batch size is not given.
LOGITS_PER_BATCH = 1 << 26


def _next_token_logp(logits: torch.Tensor, target: torch.Tensor, scored: torch.Tensor):
    """Log-probabilities (n, V) of the scored next tokens' distributions, and the sum of their loss."""
    logp = torch.log_softmax(logits[:, :-1][scored].float(), -1)
    return logp, float(-logp.gather(-1, target[scored].unsqueeze(-1)).sum())


@torch.no_grad()
def spliced_losses(
    lm: LanguageModel,
    hook: str,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    texts: str | os.PathLike,
    *,
    context: int | None = None,
    batch_size: int | None = None,
    max_rows: int = 32768,
    d_in: int | None = None,
    log=print,
) -> tuple[dict, torch.Tensor]:
    """Next-token loss clean / spliced / zero-ablated, loss recovered and KL; and the rows' activations.

    ``reconstruct`` maps activations (N, d) to their reconstruction (``d_in``,
    when given, is checked against the hook's d first).  Spliced and
    zero-ablated forward passes replace the hook's output at the row tokens
    only (the frame's special tokens and padding keep theirs).  The loss is
    the mean cross-entropy of every next token that is not padding; KL is
    the mean over the same positions of KL(clean ‖ spliced) = Σ_v p_clean
    (log p_clean − log p_spliced).  Loss recovered is (zero − spliced) /
    (zero − clean): 1 is the clean model, 0 no better than zeros (None when
    zero-ablation changes nothing).  ``batch_size`` windows per forward pass
    (default: as many as keep a batch's logits near 2^26 numbers, at most
    256); batches are read until they hold at least ``max_rows`` rows (at
    most one batch more) or the texts end.  The rows' activations (N, d)
    come back for the SAE's own metrics.
    """
    if not lm.causal:
        raise ValueError(f"--model {lm.name}: not a causal language model (the next-token loss needs one)")
    context = _check_context(lm, context)
    if batch_size is None:  # the logits of a batch, (windows, context, vocab), about 2^26 numbers
        batch_size = max(1, min(256, LOGITS_PER_BATCH // (context * lm.vocab_size)))
    module = lm.hook_module(hook)
    device = next(lm.module.parameters()).device
    #: The hook's job in the next forward pass: ("capture", rows) or ("replace", rows, function).
    action: list = [None]
    seen: list = []

    def hook_fn(_module, _inputs, output):
        out = _output(output)
        rows = action[0][1]
        if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != rows.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"--hook {hook}: its output must be (batch, tokens, d) = {tuple(rows.shape)} + (d,), got {shape}"
            )
        if d_in is not None and out.shape[-1] != d_in:
            raise ValueError(
                f"--hook {hook}: its output has d = {out.shape[-1]} but the SAE takes d_in = {d_in}"
            )
        if action[0][0] == "capture":
            seen.append(out[rows].detach().float().cpu())
            return None
        new = out.clone()
        new[rows] = action[0][2](out[rows]).to(out.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    count = rows_seen = 0
    last_report = time.monotonic()
    handle = module.register_forward_hook(hook_fn)
    try:
        for batch in _batches(lm, read_texts(texts), context, batch_size):
            ids, mask, rows = batch.ids.to(device), batch.mask.to(device), batch.rows.to(device)
            target, scored = ids[:, 1:], mask[:, 1:].bool()
            loss_of = functools.partial(_next_token_logp, target=target, scored=scored)
            action[0] = ("capture", rows)
            before = len(seen)
            clean_logp, clean = loss_of(lm.logits(ids, mask))
            if len(seen) == before:
                raise ValueError(f"--hook {hook}: the module did not run in the model's forward pass")
            action[0] = ("replace", rows, reconstruct)
            spliced_logp, spliced = loss_of(lm.logits(ids, mask))
            action[0] = ("replace", rows, torch.zeros_like)
            _, zero = loss_of(lm.logits(ids, mask))
            kl = (clean_logp.exp() * (clean_logp - spliced_logp)).sum(-1)
            sums["clean"] += clean
            sums["spliced"] += spliced
            sums["zero"] += zero
            sums["kl"] += float(kl.double().sum())
            count += int(scored.sum())
            rows_seen += int(rows.sum())
            if rows_seen >= max_rows:
                break
            now = time.monotonic()
            if now - last_report >= 5.0:
                last_report = now
                log(f"scored {count} tokens, {rows_seen} rows spliced")
    finally:
        handle.remove()
    if not count or not rows_seen:
        raise ValueError(f"--text {os.fspath(texts)}: no tokens to score")
    mean = {k: v / count for k, v in sums.items()}
    gap = mean["zero"] - mean["clean"]
    result = {
        "ce_loss_clean": mean["clean"],
        "ce_loss_spliced": mean["spliced"],
        "ce_loss_zero_ablated": mean["zero"],
        "ce_loss_recovered": (mean["zero"] - mean["spliced"]) / gap if gap != 0 else None,
        "kl_div_spliced": mean["kl"],
        "scored_tokens": count,
        "rows": rows_seen,
        "context": context,
    }
    return result, torch.cat(seen)
