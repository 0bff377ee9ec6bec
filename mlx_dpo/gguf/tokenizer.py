"""Rebuild a GGUF's byte-level BPE tokenizer as a ``tokenizers`` ``tokenizer.json``.

A GGUF keeps the vocabulary, the merges, each token's type and a pre-tokenizer
name (``tokenizer.ggml.pre``) that stands for llama.cpp's text-splitting rules.
Those rules decide which merges can apply, so they are rebuilt here per name as
llama.cpp applies them (no normalizer), with control tokens added as special
tokens so that text like ``<|im_end|>`` is never split.
"""

from __future__ import annotations

from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
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
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
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

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def build_tokenizer(metadata: dict) -> Tokenizer:
    """The GGUF's byte-level BPE (``tokenizer.ggml.model == "gpt2"``) as a ``tokenizers.Tokenizer``."""
    kind, pre = value(metadata, "tokenizer.ggml.model"), value(metadata, "tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported; supported: byte-level BPE "
            f"('gpt2') with pre-tokenizer {' or '.join(repr(p) for p in PRE_TOKENIZERS)}"
        )
    tokens, control, user_defined = _vocabulary(metadata)
    merges = [tuple(m.split(" ", 1)) for m in value(metadata, "tokenizer.ggml.merges", [])]
    if not merges:
        raise GGUFError("the file has no tokenizer.ggml.merges, which a byte-level BPE needs")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
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
