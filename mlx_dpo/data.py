"""Preference and SFT data: read records, find the prompt, tokenize.

Everything here works on plain Python lists of token ids; batching into MLX
arrays is the trainer's job. A preference example is a pair of sequences that
share a prompt, each stored as ``(tokens, offset)`` where ``offset`` is the
index of the first response token, the same convention mlx-lm's datasets use
for ``mask_prompt``.
"""

from __future__ import annotations

import json
import os
import types
import weakref
from pathlib import Path
from typing import Optional

Sequence = tuple[list[int], int]  # (prompt + response token ids, index of first response token)
Example = tuple[Sequence, ...]  # (chosen, rejected) for preference pairs; (seq,) for sft

LAYOUTS = {
    "standard": "{prompt: str, chosen: str, rejected: str, system?: str}",
    "conversational": "{prompt: [messages], chosen: [messages], rejected: [messages]}",
    "implicit": "{chosen, rejected}: two full transcripts (both str or both [messages]) sharing a prompt",
}

# Where an assistant turn starts in a plain-text transcript. The prompt of an
# implicit pair ends right after the last one the two transcripts share.
ASSISTANT_MARKERS = (
    "\n\nAssistant:",
    "Assistant:",
    "<|assistant|>\n",
    "<|im_start|>assistant\n",
    "[/INST]",
    "### Response:",
)


class Dataset(list):
    """Tokenized examples plus optional per-example arrays in ``fields``.

    A 1-D field (N,) is per example (e.g. KTO's ``label``, a pair's
    ``confidence``); a 2-D field (N, k), k = sequences per example, is per
    sequence (e.g. precomputed ``reference_logps``). The batch iterator adds
    each field to every batch, laid out like the batch's rows.
    """

    def __init__(self, examples=(), fields: Optional[dict] = None):
        super().__init__(examples)
        self.fields: dict = dict(fields or {})

    def with_fields(self, **fields) -> "Dataset":
        return Dataset(self, {**self.fields, **fields})


def as_dataset(examples) -> Dataset:
    """``examples`` as a Dataset, keeping its fields if it already is one."""
    return Dataset(examples, getattr(examples, "fields", None))


class DataError(ValueError):
    """A dataset that cannot be used as given; the message says where and why."""


def load_records(path: Path) -> list[dict]:
    """Read a ``.jsonl`` file, one record per line.

    Only trailing blank lines are skipped, so the n-th record is always on
    line n and later errors can name the line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: malformed JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {n}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def load_split_records(data: str, split: str) -> list[dict] | None:
    """Records of one split from a local folder or a Hugging Face dataset id.

    A local folder holds ``{split}.jsonl``; anything else is looked up on the
    Hub, where ``valid`` also matches the more common ``validation``.
    Returns None when the split does not exist.
    """
    path = Path(data).expanduser()
    if path.is_dir():
        file = path / f"{split}.jsonl"
        return load_records(file) if file.exists() else None
    if path.exists() or data.startswith((".", "/", "~")):
        raise DataError(f"{data}: expected a folder with train/valid/test.jsonl or a Hugging Face dataset id")
    try:
        from datasets import get_dataset_split_names, load_dataset
    except ImportError:
        raise DataError(
            f"{data!r} is not a local folder; loading it from the Hugging Face Hub "
            "needs the datasets package: pip install datasets"
        ) from None
    available = get_dataset_split_names(data)
    for name in (split, "validation") if split == "valid" else (split,):
        if name in available:
            return [dict(row) for row in load_dataset(data, split=name)]
    return None


def _is_messages(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def _describe(record: dict) -> str:
    return ", ".join(f"{k} ({type(v).__name__})" for k, v in record.items()) or "none"


def detect_format(record: dict) -> str:
    """Which preference layout a record uses: standard, conversational or implicit."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    system = record.get("system")
    if system is None or isinstance(system, str):
        if "prompt" in record:
            prompt = record["prompt"]
            if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
                return "standard"
            if all(_is_messages(x) for x in (prompt, chosen, rejected)):
                return "conversational"
        elif isinstance(chosen, str) and isinstance(rejected, str):
            return "implicit"
        elif _is_messages(chosen) and _is_messages(rejected):
            return "implicit"
    known = "; ".join(f"{name} {fields}" for name, fields in LAYOUTS.items())
    raise DataError(f"unrecognised record layout; fields seen: {_describe(record)}. Known layouts: {known}")


def _text_prompt_end(common: str) -> int:
    """Where the prompt of two transcripts with this common prefix ends."""
    ends = [common.rfind(m) + len(m) for m in ASSISTANT_MARKERS if m in common]
    if ends:
        return max(ends)
    # No assistant marker: cut before the last whitespace so no word is split
    # and each response starts with its space, as byte-level BPEs tokenize " word".
    spaces = [i for i, ch in enumerate(common) if ch.isspace()]
    return spaces[-1] if spaces else 0


def split_implicit_prompt(chosen, rejected) -> tuple:
    """Split two full transcripts into ``(prompt, chosen_rest, rejected_rest)``.

    Strings are cut after the last assistant marker they share (or at a word
    boundary when there is none); message lists after their common messages.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        end = _text_prompt_end(os.path.commonprefix([chosen, rejected]))
        return chosen[:end], chosen[end:], rejected[end:]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError("implicit chosen and rejected must both be strings or both message lists")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError("implicit chosen and rejected share no leading messages, so there is no prompt")
    if n == len(chosen) or n == len(rejected):
        raise DataError("implicit chosen or rejected has no messages after the shared prompt")
    return chosen[:n], chosen[n:], rejected[n:]


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
        text = response
    else:
        text = "".join(str(m.get("content") or "") for m in response)
    if not text.strip():
        raise DataError(f"empty {name} response")


def _tokenize_text(prompt: str, responses: tuple, tokenizer) -> tuple:
    # Each piece is tokenized on its own so the prompt/response boundary is
    # exact; tokenizing the concatenation can merge tokens across it.
    prompt_ids = _bos_prefix(tokenizer) + tokenizer.encode(prompt, add_special_tokens=False)
    return (prompt_ids,) + tuple(
        _with_eos(tokenizer.encode(r, add_special_tokens=False), tokenizer) for r in responses
    )


def _has_chat_template(tokenizer) -> bool:
    has = getattr(tokenizer, "has_chat_template", None)
    if has is None:
        has = getattr(tokenizer, "chat_template", None) is not None
    return bool(has)


def _tokenize_messages(prompt: list, responses: tuple, tokenizer) -> tuple:
    if not _has_chat_template(tokenizer):
        raise DataError("tokenizer has no chat template, which message-list records need")
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    # The rendered prompt already carries any BOS text, so no special tokens.
    out = [tokenizer.encode(prompt_text, add_special_tokens=False)]
    for response in responses:
        full_text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise DataError(
                "the chat template renders the prompt differently once a response follows, "
                "so the response cannot be separated from it"
            )
        response_text = full_text[len(prompt_text) :].rstrip()
        out.append(_with_eos(tokenizer.encode(response_text, add_special_tokens=False), tokenizer))
    return tuple(out)


def tokenize_pair(record: dict, tokenizer, fmt: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids ``(prompt, chosen, rejected)`` of one preference record.

    Responses end in exactly one EOS; the prompt starts with BOS only where
    the tokenizer (or its chat template) would add one itself.
    """
    if fmt == "implicit":
        prompt, chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"])
    elif fmt in ("standard", "conversational"):
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    else:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(LAYOUTS)}")
    _check_response(chosen, "chosen")
    _check_response(rejected, "rejected")
    system = record.get("system")
    if isinstance(prompt, str):
        if system:
            prompt = system + "\n\n" + prompt
        if fmt == "standard" and not prompt:
            raise DataError("empty prompt")
        return _tokenize_text(prompt, (chosen, rejected), tokenizer)
    if system and prompt[0].get("role") != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    return _tokenize_messages(prompt, (chosen, rejected), tokenizer)


def build_pairs(records: list[dict], tokenizer, max_seq_length: int) -> tuple[list[Example], dict]:
    """Tokenize preference records into ``((chosen, offset), (rejected, offset))`` pairs.

    Sequences are cut to ``max_seq_length``; a pair is dropped when its prompt
    alone fills that length (no response token would be left to score) or when
    chosen and rejected are the same (it carries no preference).
    ``truncated`` counts pairs with at least one cut sequence.
    """
    stats = {"pairs": 0, "truncated": 0, "dropped_long_prompt": 0, "dropped_identical": 0}
    pairs = []
    first_fmt = None
    for line, record in enumerate(records, 1):
        try:
            fmt = detect_format(record)
            if first_fmt is None:
                first_fmt = fmt
            elif fmt != first_fmt:
                raise DataError(
                    f"{fmt} layout, but line 1 is {first_fmt}; all records must share one layout"
                )
            if record["chosen"] == record["rejected"]:
                stats["dropped_identical"] += 1
                continue
            prompt, chosen, rejected = tokenize_pair(record, tokenizer, fmt)
        except DataError as e:
            raise DataError(f"line {line}: {e}") from None
        if chosen == rejected:
            stats["dropped_identical"] += 1
            continue
        if len(prompt) >= max_seq_length:
            stats["dropped_long_prompt"] += 1
            continue
        seqs = [prompt + chosen, prompt + rejected]
        if any(len(s) > max_seq_length for s in seqs):
            stats["truncated"] += 1
        pairs.append(tuple((s[:max_seq_length], len(prompt)) for s in seqs))
    stats["pairs"] = len(pairs)
    return pairs, stats


def build_sft(
    records: list[dict], tokenizer, max_seq_length: int, mask_prompt: bool, **features
) -> tuple[list[Example], dict]:
    """Tokenize SFT records with mlx-lm's own datasets into ``((tokens, offset),)``.

    ``features`` (``prompt_feature``, ``completion_feature``, ``text_feature``,
    ``chat_feature``) rename the record fields as in mlx-lm. Examples whose
    masked prompt fills ``max_seq_length`` are dropped: nothing would be trained.
    """
    from mlx_lm.tuner.datasets import create_dataset

    stats = {"examples": 0, "truncated": 0, "dropped_long_prompt": 0}
    if not records:
        return [], stats
    config = types.SimpleNamespace(
        mask_prompt=mask_prompt, **{k: v for k, v in features.items() if v is not None}
    )
    try:
        dataset = create_dataset(records, tokenizer, config)
    except ValueError as e:
        raise DataError(f"line 1: {e}") from None
    return sft_examples(dataset, max_seq_length, mask_prompt)


def sft_examples(dataset, max_seq_length: int, mask_prompt: bool) -> tuple[list[Example], dict]:
    """Examples from an mlx-lm dataset object (``dataset[i]`` a record, ``.process`` its tokenizer)."""
    stats = {"examples": 0, "truncated": 0, "dropped_long_prompt": 0}
    examples = []
    for line in range(1, len(dataset) + 1):
        try:
            tokens, offset = dataset.process(dataset[line - 1])
        except (KeyError, TypeError, IndexError) as e:
            raise DataError(f"line {line}: record does not match the layout of line 1 ({e!r})") from None
        tokens = list(tokens)
        if mask_prompt and offset >= max_seq_length:
            stats["dropped_long_prompt"] += 1
            continue
        if len(tokens) > max_seq_length:
            stats["truncated"] += 1
            tokens = tokens[:max_seq_length]
        examples.append(((tokens, offset),))
    stats["examples"] = len(examples)
    return examples, stats


def _summary(split: str, stats: dict, max_seq_length: int) -> str:
    kind = "examples" if "examples" in stats else "pairs"
    notes = []
    if stats["truncated"]:
        notes.append(f"{stats['truncated']} truncated to {max_seq_length} tokens")
    if stats.get("dropped_long_prompt"):
        notes.append(f"{stats['dropped_long_prompt']} dropped: prompt reaches max_seq_length")
    if stats.get("dropped_identical"):
        notes.append(f"{stats['dropped_identical']} dropped: chosen same as rejected")
    line = f"{split}: {stats[kind]} {kind}"
    return f"{line} ({', '.join(notes)})" if notes else line


def load_datasets(
    data: str,
    tokenizer,
    loss_type: str,
    max_seq_length: int,
    mask_prompt: bool = False,
    splits=("train", "valid", "test"),
    **features,
) -> dict[str, list[Example] | None]:
    """Load and tokenize each split (None where it is missing).

    ``loss_type == "sft"`` reads mlx-lm SFT records (``features`` rename their
    fields); any other loss reads preference pairs.
    """
    out = {}
    for split in splits:
        records = load_split_records(data, split)
        if records is None:
            out[split] = None
            continue
        try:
            if loss_type == "sft":
                examples, stats = build_sft(records, tokenizer, max_seq_length, mask_prompt, **features)
            else:
                examples, stats = build_pairs(records, tokenizer, max_seq_length)
        except DataError as e:
            raise DataError(f"{data} ({split}): {e}") from None
        print(_summary(split, stats, max_seq_length))
        out[split] = examples
    return out
