"""Prompt datasets for online methods (GRPO): the model writes the completions.

A record holds a prompt and any other fields, which reward functions receive
as keyword arguments (a reference answer, test cases, ...), as in TRL:

- ``{"prompt": "text", ...}``: plain text, tokenized with the tokenizer's own
  BOS rule like every text prompt of the data layer;
- ``{"prompt": [{"role": ..., "content": ...}, ...], ...}``: a conversation,
  rendered by the chat template with the generation prompt; one that ends
  with an assistant message is continued instead (a prefilled answer start);
- ``{"messages": [...], ...}`` (no ``prompt`` field): a conversation that is
  the prompt whole, so it must not end with an assistant message (that
  would be an SFT record, its answer given).

Every record is checked before any is tokenized; a problem is one
``DataError`` naming the file (or hub split), the line and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .check import MESSAGE_ROLES, no_template, problem_error, value_problem
from .core import DataError, _describe, _one_line, _type
from .records import _at, split_records
from .tokenize import _bos_prefix, _render, has_chat_template

PROMPT_FIELDS = ("prompt", "messages")
# Keyword arguments reward functions get besides the columns: no field may take them.
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids")
# What a prompt conversation may end with: a turn the model answers, or an
# assistant message to continue (``system``/``developer`` alone ask nothing).
_LAST_ROLES = tuple(r for r in MESSAGE_ROLES if r not in ("system", "developer"))
_LAYOUT = "(prompt layout: prompt as text or a message list, or messages; other fields are passed to reward functions)"


@dataclass
class Prompt:
    """One prompt: its token ids, the prompt as given and the record's other fields."""

    ids: list[int]  # what generation starts from
    prompt: str | list[dict]  # what reward functions receive as ``prompts``
    columns: dict = field(default_factory=dict)  # every other field; None where this record lacks one


def _prompt_key(record) -> str:
    """The field holding the prompt, or a DataError naming what is wrong with the record."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {_type(record)}")
    key = next((k for k in PROMPT_FIELDS if k in record), None)
    if key is None:
        raise DataError(f"missing field 'prompt' {_LAYOUT}; fields seen: {_describe(record)}")
    value = record[key]
    problem = value_problem(key, value, "either" if key == "prompt" else "messages")
    if problem:
        raise problem_error(problem, _LAYOUT)
    if isinstance(value, list):
        last = value[-1]["role"]
        if key == "messages" and last == "assistant":
            raise DataError(
                "field 'messages' ends with an assistant message; a prompt ends with the turn the model answers"
            )
        if last not in _LAST_ROLES:
            raise DataError(f"field {key!r} ends with a {last!r} message; a prompt ends with the turn the model answers")
        if not any(str(m.get("content") or "").strip() for m in value):
            raise DataError(f"field {key!r} is empty (every message's content is blank)")
    for name in RESERVED_COLUMNS:
        if name in record:
            raise DataError(f"field {name!r} has the name of a reward function argument; rename it")
    return key


def _tokenize(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        return _bos_prefix(tokenizer) + tokenizer.encode(prompt, add_special_tokens=False)
    if prompt[-1]["role"] == "assistant":
        try:
            text = _render(tokenizer, prompt, continue_final_message=True, tokenize=False)
        except ValueError as e:  # the template changes the last message, so it cannot be continued
            if isinstance(e, DataError):
                raise
            raise DataError(f"cannot continue the final assistant message: {_one_line(e)}") from None
    else:
        text = _render(tokenizer, prompt, add_generation_prompt=True, tokenize=False)
    # The rendered text carries any BOS of the template, so no special tokens.
    return tokenizer.encode(text, add_special_tokens=False)


def build_prompts(records, tokenizer, max_prompt_length: Optional[int] = None) -> tuple[list[Prompt], dict]:
    """Tokenize prompt records; stats ``{"prompts": n, "truncated": k}``.

    A prompt longer than ``max_prompt_length`` keeps its last
    ``max_prompt_length`` tokens (TRL cuts from the left: the end of a prompt,
    where the question and the generation prompt are, matters most). The
    columns of every prompt have the same keys, the union over all records in
    the order first seen, None where a record lacks one, so a batch can pass
    each column as one list.
    """
    if max_prompt_length is not None and (
        isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 1
    ):
        raise DataError(f"max_prompt_length must be a positive integer or None, got {max_prompt_length!r}")
    keys = []
    template = has_chat_template(tokenizer)
    for line, record in enumerate(records, 1):
        try:
            key = _prompt_key(record)
            if keys and key != keys[0]:
                raise DataError(
                    f"the prompt is in field {key!r}, but {getattr(records, 'unit', 'line')} 1 has it in {keys[0]!r}; "
                    "all records must share one layout"
                )
            if isinstance(record[key], list) and not template:
                raise no_template(key)
        except DataError as e:
            raise DataError(f"{_at(records, line)}: {e}") from None
        keys.append(key)
    names = list(dict.fromkeys(k for record in records for k in record if k not in keys[:1]))
    prompts, truncated = [], 0
    for line, (record, key) in enumerate(zip(records, keys), 1):
        try:
            ids = _tokenize(record[key], tokenizer)
        except DataError as e:
            raise DataError(f"{_at(records, line)}: field {key!r}: {e}") from None
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids = ids[-max_prompt_length:]
            truncated += 1
        prompts.append(Prompt(ids, record[key], {k: record.get(k) for k in names}))
    return prompts, {"prompts": len(prompts), "truncated": truncated}


def load_prompt_splits(
    data: str,
    tokenizer,
    max_prompt_length: Optional[int] = None,
    splits=("train", "valid", "test"),
    hub_splits: Optional[dict] = None,
) -> dict[str, list[Prompt] | None]:
    """Prompts of each split (None where it is missing) from a folder of
    ``train``/``valid``/``test`` files, or a hub dataset id (``hub_splits``
    names its splits, as in ``load_datasets``); prints a line per split."""
    out = {}
    for split, records in split_records(data, splits, hub_splits):
        if records is None:
            out[split] = None
            continue
        prompts, stats = build_prompts(records, tokenizer, max_prompt_length)
        note = f" ({stats['truncated']} cut to their last {max_prompt_length} tokens)" if stats["truncated"] else ""
        print(f"{split}: {stats['prompts']} prompts{note}")
        out[split] = prompts
    return out
