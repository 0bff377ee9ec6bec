"""Tokenization of canonical pairs and unpaired examples into prompt and response ids.

Prompt and responses are tokenized apart so the boundary between them is
exact: text with the tokenizer's own BOS rule, message lists through the
model's chat template. Every response ends in exactly one EOS.
"""

from __future__ import annotations

import weakref

from .core import DataError, _one_line
from .normalize import Canon

_BOS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` if the tokenizer's own encoding adds a BOS, else ``[]``."""
    try:
        return list(_BOS_CACHE[tokenizer])
    except (KeyError, TypeError):
        pass
    bos = tokenizer.bos_token_id
    with_special = tokenizer.encode("a")
    without = tokenizer.encode("a", add_special_tokens=False)
    adds = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]
    prefix = (bos,) if adds else ()
    try:
        _BOS_CACHE[tokenizer] = prefix
    except TypeError:
        pass
    return list(prefix)


def _eos_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no EOS token")
    return set(getattr(tokenizer, "eos_token_ids", None) or ()) | {eos}


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    """End a response with exactly one EOS, so the model learns to stop."""
    if ids and ids[-1] in _eos_ids(tokenizer):
        return ids
    return ids + [tokenizer.eos_token_id]


def _check_response(response, name: str) -> None:
    if isinstance(response, str):
        empty = not response.strip()
    else:
        empty = not any(m.get("tool_calls") or str(m.get("content") or "").strip() for m in response)
    if empty:
        raise DataError(f"field {name!r} has an empty response")


def _tokenize_text(prompt: str, responses: tuple, tokenizer) -> tuple:
    # Each piece is tokenized on its own so the prompt/response boundary is
    # exact; tokenizing the concatenation can merge tokens across it.
    prompt_ids = _bos_prefix(tokenizer) + tokenizer.encode(prompt, add_special_tokens=False)
    return (prompt_ids,) + tuple(
        _with_eos(tokenizer.encode(r, add_special_tokens=False), tokenizer) for r in responses
    )


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer can render message lists (checking asks before any record is tokenized)."""
    has = getattr(tokenizer, "has_chat_template", None)
    if has is None:
        has = getattr(tokenizer, "chat_template", None) is not None
    return bool(has)


def _render(tokenizer, messages: list, **kwargs):
    """``tokenizer.apply_chat_template``, a template's refusal (``raise_exception``,
    a missing key) turned into a DataError."""
    try:
        from jinja2 import TemplateError
    except ImportError:  # no jinja2, no chat templates: nothing of its own to catch
        TemplateError = ()
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as e:
        raise DataError(f"the chat template of this model rejects the messages: {_one_line(e)}") from None


def _tokenize_messages(prompt: list, responses: tuple, tokenizer) -> tuple:
    if not has_chat_template(tokenizer):
        raise DataError("the tokenizer of this model has no chat template, which message-list records need")
    prompt_text = _render(tokenizer, prompt, add_generation_prompt=True, tokenize=False)
    # The rendered prompt already carries any BOS text, so no special tokens.
    out = [tokenizer.encode(prompt_text, add_special_tokens=False)]
    for response in responses:
        full_text = _render(tokenizer, prompt + response, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise DataError(
                "the chat template renders the prompt differently once a response follows, "
                "so the response cannot be separated from it"
            )
        response_text = full_text[len(prompt_text) :].rstrip()
        out.append(_with_eos(tokenizer.encode(response_text, add_special_tokens=False), tokenizer))
    return tuple(out)


def tokenize_parts(prompt, responses: tuple, names: tuple, system, tokenizer, require_prompt: bool = True) -> tuple:
    """Token ids ``(prompt, *responses)``: text with the system text before the
    prompt, or message lists with the system as the first message."""
    for response, name in zip(responses, names):
        _check_response(response, name)
    if isinstance(prompt, str):
        if not all(isinstance(r, str) for r in responses):
            raise DataError("a text prompt needs text responses")
        if system:
            prompt = system + "\n\n" + prompt
        if require_prompt and not prompt:
            raise DataError("empty prompt")
        return _tokenize_text(prompt, responses, tokenizer)
    if not all(isinstance(r, list) for r in responses):
        raise DataError("a message-list prompt needs message-list responses")
    if system and prompt[0].get("role") != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    return _tokenize_messages(prompt, responses, tokenizer)


def tokenize_canon(canon: Canon, tokenizer) -> tuple:
    """Token ids ``(prompt, chosen, rejected)`` of a canonical pair."""
    prompt, chosen, rejected = canon.parts()
    return tokenize_parts(prompt, (chosen, rejected), canon.names, canon.system, tokenizer, canon.require_prompt)
