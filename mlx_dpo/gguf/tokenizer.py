"""Rebuild a GGUF's tokenizer as a ``tokenizers`` ``tokenizer.json``.

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``): a GGUF keeps the vocabulary,
the merges, each token's type and a pre-tokenizer name (``tokenizer.ggml.pre``)
that stands for llama.cpp's text-splitting rules. Those rules decide which merges
can apply, so they are rebuilt here per name as llama.cpp applies them (no
normalizer), with control tokens added as special tokens so that text like
``<|im_end|>`` is never split.

SentencePiece BPE (``"llama"``: Llama 2, Mistral, Gemma): the file keeps a score
per token instead of merges. llama.cpp splits the text into characters (spaces
written as ``▁``) and keeps joining the adjacent pair whose joined text is the
highest-scoring token, the leftmost on ties, falling back to byte tokens. A BPE
whose merges are every split of every token into two tokens, ranked by the joined
token's score, joins the same pairs in the same order.
"""

from __future__ import annotations

from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from .reader import GGUFError, value

# Qwen2's split: GPT-4-style words and punctuation, digits one at a time.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PRE_TOKENIZERS = {
    # GPT-2's byte-level split alone.
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # Every digit alone, then GPT-2's byte-level split.
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    ),
    "qwen2": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
}

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp token types
SPACE = "\u2581"  # SentencePiece's ▁


def build_tokenizer(metadata: dict) -> Tokenizer:
    """The GGUF's tokenizer (byte-level or SentencePiece BPE) as a ``tokenizers.Tokenizer``."""
    kind, pre = value(metadata, "tokenizer.ggml.model"), value(metadata, "tokenizer.ggml.pre")
    tokens, control, user_defined = _vocabulary(metadata)
    if kind == "llama":
        tok = _sentencepiece(metadata, tokens)
    elif kind == "gpt2" and pre in PRE_TOKENIZERS:
        tok = _byte_level(metadata, tokens, pre)
    else:
        raise GGUFError(
            f"tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported; supported: SentencePiece BPE ('llama') "
            f"and byte-level BPE ('gpt2') with pre-tokenizer {' or '.join(repr(p) for p in PRE_TOKENIZERS)}"
        )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, normalized=False) for t in user_defined])
    # The BOS/EOS that llama.cpp adds around every text, where the file asks for them.
    bos, eos = (
        _token_id(metadata, tokens, n) if value(metadata, f"tokenizer.ggml.add_{n}_token") else None
        for n in ("bos", "eos")
    )
    if bos is not None or eos is not None:
        head, tail = ([tokens[i]] if i is not None else [] for i in (bos, eos))
        tok.post_processor = processors.TemplateProcessing(
            single=[*head, "$A", *tail],
            pair=[*head, "$A", *tail, *head, "$B", *tail],
            special_tokens=[(tokens[i], i) for i in {bos, eos} - {None}],
        )
    return tok


def _byte_level(metadata: dict, tokens: list[str], pre: str) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in value(metadata, "tokenizer.ggml.merges", [])]
    if not merges:
        raise GGUFError("the file has no tokenizer.ggml.merges, which a byte-level BPE needs")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    return tok


def score_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of every joinable token into two tokens, the highest-scoring joined token first
    (ties in token order, then by the two parts' ids)."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    merges = []
    for i in sorted(ids.values(), key=lambda i: (-scores[i], i)):
        piece = tokens[i]
        splits = [(piece[:c], piece[c:]) for c in range(1, len(piece)) if piece[:c] in ids and piece[c:] in ids]
        merges += sorted(splits, key=lambda lr: (ids[lr[0]], ids[lr[1]]))
    return merges


def _sentencepiece(metadata: dict, tokens: list[str]) -> Tokenizer:
    scores, types = value(metadata, "tokenizer.ggml.scores"), value(metadata, "tokenizer.ggml.token_type")
    if not scores or not types:
        raise GGUFError("the file has no tokenizer.ggml.scores or token_type, which a SentencePiece BPE needs")
    unk = _token_id(metadata, tokens, "unknown")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, score_merges(tokens, scores, types),
                               unk_token=tokens[unk] if unk is not None else None, byte_fallback=True, fuse_unk=True))
    prefix = value(metadata, "tokenizer.ggml.add_space_prefix", True)
    tok.normalizer = normalizers.Sequence([*([normalizers.Prepend(SPACE)] if prefix else []), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tok


def _vocabulary(metadata: dict) -> tuple[list[str], list[str], list[str]]:
    """All tokens, the control ones (never split, special) and the user-defined ones (never split)."""
    tokens = value(metadata, "tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError("the file has no tokenizer.ggml.tokens: a vocabulary is needed")
    types = value(metadata, "tokenizer.ggml.token_type") or []
    return tokens, *([t for t, k in zip(tokens, types) if k == kind] for kind in (CONTROL, USER_DEFINED))


def _token_id(metadata: dict, tokens: list[str], name: str) -> int | None:
    token_id = value(metadata, f"tokenizer.ggml.{name}_token_id")
    return token_id if token_id is not None and 0 <= token_id < len(tokens) else None


def tokenizer_config(metadata: dict) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens, BOS/EOS flags and the chat template."""
    tokens, control, _ = _vocabulary(metadata)
    arch = value(metadata, "general.architecture")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if (length := value(metadata, f"{arch}.context_length")) is not None:
        config["model_max_length"] = length
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown")):
        if (token_id := _token_id(metadata, tokens, name)) is not None:
            config[key] = tokens[token_id]
    config["additional_special_tokens"] = control
    for flag in ("add_bos_token", "add_eos_token"):
        config[flag] = bool(value(metadata, f"tokenizer.ggml.{flag}", False))
    if (template := value(metadata, "tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return config
