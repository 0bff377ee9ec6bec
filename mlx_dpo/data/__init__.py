"""Preference, KTO and SFT data: read records, find the prompt, tokenize.

Everything here works on plain Python lists of token ids; batching into MLX
arrays is the trainer's job (the data layer never imports MLX). A preference
example is a pair of sequences that share a prompt, each stored as
``(tokens, offset)`` where ``offset`` is the index of the first response
token, the same convention mlx-lm's datasets use for ``mask_prompt``.

This module holds the builders that turn a split's records into a
``Dataset`` (``build_pairs``, ``build_kto``, ``build_sft``, ``load_datasets``)
and re-exports the data layer's public names. The parts: ``core`` (shared
types and ``DataError``), ``records`` (reading files and hub splits),
``layouts`` (detection, validation, normalization) and ``tokenize``.

Every record of a split is checked before any is tokenized: a problem is one
``DataError`` line naming the file (or hub split), the line (``record N`` in a
JSON list, ``row N`` in a table) and the field.
"""

from __future__ import annotations

import types
from typing import Optional

import numpy as np

from .core import DataError, Dataset, Example, Sequence, _one_line, as_dataset
from .layouts import (
    ASSISTANT_MARKERS,
    CONFIDENCE_NOTE,
    DATA_FORMATS,
    DATA_OPTION_KEYS,
    LAYOUTS,
    MESSAGE_ROLES,
    NECTAR_PAIRINGS,
    _check_format,
    _check_options,
    _confidence,
    _custom_names,
    _describe,
    _no_template,
    _pairs_of,
    _problem_error,
    _resolve,
    _unpaired,
    _value_problem,
    detect_format,
    split_implicit_prompt,
)
from .records import (
    Records,
    _at,
    _in,
    load_json_records,
    load_parquet_records,
    load_records,
    load_split_records,
)
from .tokenize import _check_template, _has_chat_template, _tokenize_canon, _tokenize_parts, tokenize_pair

__all__ = [
    "ASSISTANT_MARKERS",
    "CONFIDENCE_NOTE",
    "DATA_FORMATS",
    "DATA_OPTION_KEYS",
    "LAYOUTS",
    "MESSAGE_ROLES",
    "NECTAR_PAIRINGS",
    "DataError",
    "Dataset",
    "Example",
    "Records",
    "Sequence",
    "as_dataset",
    "build_kto",
    "build_pairs",
    "build_sft",
    "detect_format",
    "load_datasets",
    "load_json_records",
    "load_parquet_records",
    "load_records",
    "load_split_records",
    "sft_examples",
    "split_implicit_prompt",
    "tokenize_pair",
]


def _check_records(records, data_format: str, opts: dict, unpaired_ok: bool, tokenizer) -> list[tuple[str, bool]]:
    """``(layout, unpaired)`` of every record, all checked before any is tokenized,
    so a bad record anywhere is reported at once; errors name the line and field."""
    has_template = _has_chat_template(tokenizer)
    layouts = []
    first = None
    for line, record in enumerate(records, 1):
        try:
            fmt, unpaired = _resolve(record, data_format, first, opts, unpaired_ok)
            first = first or fmt
            _check_template(fmt, record, opts, unpaired, has_template)
            if not unpaired:
                _confidence(record)
        except DataError as e:
            raise DataError(f"{_at(records, line)}: {e}") from None
        layouts.append((fmt, unpaired))
    return layouts


def build_pairs(
    records: list[dict],
    tokenizer,
    max_seq_length: int,
    data_format: str = "auto",
    options: Optional[dict] = None,
) -> tuple[Dataset, dict]:
    """Tokenize preference records into ``((chosen, offset), (rejected, offset))`` pairs.

    ``data_format`` names the layout (``auto``: detected from line 1, every
    record must share it); ``options`` holds the per-format options
    (``DATA_OPTION_KEYS``). Sequences are cut to ``max_seq_length``; a pair is
    dropped when its prompt alone fills that length (no response token would
    be left to score) or when chosen and rejected are the same (it carries no
    preference). ``truncated`` counts pairs with at least one cut sequence.
    Nectar records add ``dropped_few_answers`` (records with fewer than two
    answers) and ``dropped_tied`` (pairs of equal rank) to the stats. Records
    with a ``confidence`` give the Dataset a float32 ``confidence`` field
    (1.0 where a record has none).
    """
    data_format = _check_format(data_format)
    opts = _check_options(options)
    stats = {"pairs": 0, "truncated": 0, "dropped_long_prompt": 0, "dropped_identical": 0}
    pairs, confidences = [], []
    has_confidence = False
    layouts = _check_records(records, data_format, opts, False, tokenizer)
    for line, (record, (fmt, _)) in enumerate(zip(records, layouts), 1):
        try:
            canons, tied = _pairs_of(record, fmt, opts)
            confidence = _confidence(record)
            if fmt == "nectar":
                stats.setdefault("dropped_few_answers", 0)
                stats["dropped_tied"] = stats.get("dropped_tied", 0) + tied
                if canons is None:
                    stats["dropped_few_answers"] += 1
                    continue
            tokenized = []
            for canon in canons:
                if canon.chosen == canon.rejected:
                    stats["dropped_identical"] += 1
                    continue
                tokenized.append(_tokenize_canon(canon, tokenizer))
        except DataError as e:
            raise DataError(f"{_at(records, line)}: {e}") from None
        has_confidence = has_confidence or confidence is not None
        for prompt, chosen, rejected in tokenized:
            if chosen == rejected:
                stats["dropped_identical"] += 1
                continue
            if len(prompt) >= max_seq_length:
                stats["dropped_long_prompt"] += 1
                continue
            seqs = [prompt + chosen, prompt + rejected]
            if any(len(s) > max_seq_length for s in seqs):
                if seqs[0][:max_seq_length] == seqs[1][:max_seq_length]:
                    # The responses differ only past the limit: no signal left.
                    stats["dropped_identical_truncated"] = stats.get("dropped_identical_truncated", 0) + 1
                    continue
                stats["truncated"] += 1
            pairs.append(tuple((s[:max_seq_length], len(prompt)) for s in seqs))
            confidences.append(1.0 if confidence is None else confidence)
    stats["pairs"] = len(pairs)
    fields = {"confidence": np.array(confidences, dtype=np.float32)} if has_confidence else {}
    return Dataset(pairs, fields), stats


def build_kto(
    records: list[dict],
    tokenizer,
    max_seq_length: int,
    data_format: str = "auto",
    options: Optional[dict] = None,
    seed: int = 0,
) -> tuple[Dataset, dict]:
    """Tokenize unpaired (KTO) records into ``((prompt+completion, offset), (prompt+other, offset))``.

    Unpaired layouts (``{prompt, completion, label}`` and its question /
    instruction / input variants) are read as they are; paired layouts are
    unpaired, chosen labelled desirable and rejected undesirable (a pair whose
    chosen equals its rejected is skipped, counted in ``dropped_identical``;
    repeated answers of one Nectar record count once per label). The second
    sequence of each example joins its prompt with the completion of the next
    example in a seeded random order (cyclic), the mismatched pairs KTO's KL
    baseline is estimated from. ``fields["label"]`` holds 1.0 (desirable) or
    0.0 (undesirable). Examples whose prompt fills ``max_seq_length`` are
    dropped; ``truncated`` counts examples with at least one cut sequence.
    """
    data_format = _check_format(data_format)
    opts = _check_options(options)
    stats = {"examples": 0, "desirable": 0, "undesirable": 0, "truncated": 0, "dropped_long_prompt": 0}
    tokenized = []  # (prompt ids, completion ids, label)
    layouts = _check_records(records, data_format, opts, True, tokenizer)
    for line, (record, (fmt, unpaired)) in enumerate(zip(records, layouts), 1):
        try:
            if unpaired:
                prompt, completion, system, label = _unpaired(record, fmt, opts)
                name = _custom_names(opts)["completion"] if fmt == "custom" else "completion"
                prompt_ids, completion_ids = _tokenize_parts(prompt, (completion,), (name,), system, tokenizer)
                tokenized.append((prompt_ids, completion_ids, label))
                continue
            stats.setdefault("dropped_identical", 0)
            canons, _ = _pairs_of(record, fmt, opts)
            if canons is None:
                stats["dropped_few_answers"] = stats.get("dropped_few_answers", 0) + 1
                continue
            seen = set()
            for canon in canons:
                if canon.chosen == canon.rejected:
                    stats["dropped_identical"] += 1
                    continue
                prompt_ids, chosen, rejected = _tokenize_canon(canon, tokenizer)
                for ids, label in ((chosen, True), (rejected, False)):
                    key = (tuple(prompt_ids), tuple(ids), label)
                    if key not in seen:
                        seen.add(key)
                        tokenized.append((prompt_ids, ids, label))
        except DataError as e:
            raise DataError(f"{_at(records, line)}: {e}") from None
    kept = []
    for prompt_ids, completion_ids, label in tokenized:
        if len(prompt_ids) >= max_seq_length:
            stats["dropped_long_prompt"] += 1
        else:
            kept.append((prompt_ids, completion_ids, label))
    if len(kept) < 2:
        raise DataError(
            f"{_in(records)}KTO needs at least 2 examples (each prompt is paired with another example's "
            f"completion for the KL estimate); {len(kept)} left"
        )
    order = np.random.default_rng(seed).permutation(len(kept))
    partner = np.empty(len(kept), dtype=np.int64)
    partner[order] = np.roll(order, -1)
    examples, labels = [], []
    for i, (prompt_ids, completion_ids, label) in enumerate(kept):
        seqs = [prompt_ids + completion_ids, prompt_ids + kept[partner[i]][1]]
        if any(len(s) > max_seq_length for s in seqs):
            stats["truncated"] += 1
        examples.append(tuple((s[:max_seq_length], len(prompt_ids)) for s in seqs))
        labels.append(1.0 if label else 0.0)
    stats["examples"] = len(examples)
    stats["desirable"] = int(sum(labels))
    stats["undesirable"] = len(labels) - stats["desirable"]
    return Dataset(examples, {"label": np.array(labels, dtype=np.float32)}), stats


def _sft_layout(record: dict, features: dict) -> tuple[str, tuple]:
    """mlx-lm's SFT layout of a first record (as ``create_dataset`` picks it) and its fields."""
    prompt = features.get("prompt_feature") or "prompt"
    completion = features.get("completion_feature") or "completion"
    chat = features.get("chat_feature") or "messages"
    text = features.get("text_feature") or "text"
    if prompt in record and completion in record:
        return "completions", ((prompt, "text"), (completion, "text"))
    if chat in record:
        return "chat", ((chat, "messages"),)
    if text in record:
        return "text", ((text, "text"),)
    raise DataError(
        f"unrecognised SFT record layout; fields seen: {_describe(record)}. mlx-lm's layouts: "
        f"text {{{text}: str}}; chat {{{chat}: [messages], tools?}}; completions {{{prompt}: str, {completion}: str}}"
    )


def _check_sft(records, tokenizer, mask_prompt: bool, features: dict) -> None:
    """Check every SFT record against the layout of the first, naming line and field."""
    n = 1
    try:
        layout, fields = _sft_layout(records[0], features)
        if layout == "text" and mask_prompt:
            raise DataError(
                f"field {fields[0][0]!r}: text records have no prompt to mask; mask_prompt needs "
                "completions or chat records"
            )
        if layout != "text" and not _has_chat_template(tokenizer):
            if layout == "chat":
                raise _no_template(fields[0][0])
            raise DataError(
                f"fields {fields[0][0]!r} and {fields[1][0]!r} are rendered as a chat (mlx-lm's completions "
                "layout), but the tokenizer of this model has no chat template"
            )
        note = f"(SFT layout {layout}: {', '.join(k for k, _ in fields)})"
        for n, record in enumerate(records, 1):
            absent = [k for k, _ in fields if k not in record]
            if absent:
                s = "s" if len(absent) > 1 else ""
                raise DataError(f"missing field{s} {', '.join(map(repr, absent))} {note}")
            for key, kind in fields:
                problem = _value_problem(key, record[key], kind)
                if problem:
                    raise _problem_error(problem, note)
    except DataError as e:
        raise DataError(f"{_at(records, n)}: {e}") from None


def build_sft(
    records: list[dict], tokenizer, max_seq_length: int, mask_prompt: bool, **features
) -> tuple[list[Example], dict]:
    """Tokenize SFT records with mlx-lm's own datasets into ``((tokens, offset),)``.

    ``features`` (``prompt_feature``, ``completion_feature``, ``text_feature``,
    ``chat_feature``) rename the record fields as in mlx-lm. Every record is
    checked against the layout of the first before any is tokenized. Examples
    whose masked prompt fills ``max_seq_length`` are dropped: nothing would be trained.
    """
    from mlx_lm.tuner.datasets import create_dataset

    stats = {"examples": 0, "truncated": 0, "dropped_long_prompt": 0}
    if not records:
        return [], stats
    features = {k: v for k, v in features.items() if v is not None}
    _check_sft(records, tokenizer, mask_prompt, features)
    config = types.SimpleNamespace(mask_prompt=mask_prompt, **features)
    dataset = create_dataset(records, tokenizer, config)
    try:
        return sft_examples(dataset, max_seq_length, mask_prompt)
    except DataError as e:
        raise DataError(f"{_in(records)}{e}") from None


def sft_examples(dataset, max_seq_length: int, mask_prompt: bool) -> tuple[list[Example], dict]:
    """Examples from an mlx-lm dataset object (``dataset[i]`` a record, ``.process`` its tokenizer)."""
    try:
        from jinja2 import TemplateError
    except ImportError:
        TemplateError = ()
    stats = {"examples": 0, "truncated": 0, "dropped_long_prompt": 0}
    examples = []
    for line in range(1, len(dataset) + 1):
        try:
            tokens, offset = dataset.process(dataset[line - 1])
        except (KeyError, TypeError, IndexError) as e:
            raise DataError(f"line {line}: record does not match the layout of line 1 ({e!r})") from None
        except TemplateError as e:
            raise DataError(f"line {line}: the chat template of this model rejects the messages: {_one_line(e)}") from None
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
    if "desirable" in stats:
        notes.append(f"{stats['desirable']} desirable, {stats['undesirable']} undesirable")
    if stats["truncated"]:
        notes.append(f"{stats['truncated']} truncated to {max_seq_length} tokens")
    if stats.get("dropped_long_prompt"):
        notes.append(f"{stats['dropped_long_prompt']} dropped: prompt reaches max_seq_length")
    if stats.get("dropped_identical"):
        notes.append(f"{stats['dropped_identical']} dropped: chosen same as rejected")
    if stats.get("dropped_identical_truncated"):
        notes.append(f"{stats['dropped_identical_truncated']} dropped: chosen and rejected differ only after max_seq_length")
    if stats.get("dropped_few_answers"):
        notes.append(f"{stats['dropped_few_answers']} records dropped: fewer than two answers")
    if stats.get("dropped_tied"):
        notes.append(f"{stats['dropped_tied']} pairs skipped: tied ranks")
    line = f"{split}: {stats[kind]} {kind}"
    return f"{line} ({', '.join(notes)})" if notes else line


def _data_kind(loss_type) -> str:
    """``sft``, ``kto`` or ``pairs``: what records the loss type reads."""
    types_ = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if types_ and all(t == "sft" for t in types_):
        return "sft"
    return "kto" if "kto" in types_ else "pairs"


def load_datasets(
    data: str,
    tokenizer,
    loss_type: str,
    max_seq_length: int,
    mask_prompt: bool = False,
    splits=("train", "valid", "test"),
    data_format: str = "auto",
    options: Optional[dict] = None,
    hub_splits: Optional[dict] = None,
    seed: int = 0,
    **features,
) -> dict[str, list[Example] | None]:
    """Load and tokenize each split (None where it is missing).

    ``loss_type == "sft"`` reads mlx-lm SFT records (``features`` rename their
    fields); ``kto`` reads unpaired examples (or unpairs pairs) with
    ``build_kto``; any other loss reads preference pairs with ``build_pairs``.
    ``data_format`` and ``options`` choose and configure the layout;
    ``hub_splits`` maps ``train``/``valid``/``test`` (or ``train_split``/
    ``valid_split``/``test_split``) to the split names of a hub dataset.
    """
    names = {}
    for key, value in (hub_splits or {}).items():
        split_key = key if key.endswith("_split") else f"{key}_split"
        if split_key not in ("train_split", "valid_split", "test_split"):
            raise DataError(f"unknown hub split key {key!r}; expected train, valid or test")
        names[split_key] = value
    kind = _data_kind(loss_type)
    out = {}
    for split in splits:
        records = load_split_records(data, split, **names)
        if records is None:
            out[split] = None
            continue
        if not isinstance(records, Records):
            records = Records(records, source=f"{data} ({split})")
        # Errors name the file (or hub split), the line and the field.
        if kind == "sft":
            examples, stats = build_sft(records, tokenizer, max_seq_length, mask_prompt, **features)
        elif kind == "kto":
            examples, stats = build_kto(records, tokenizer, max_seq_length, data_format, options, seed=seed)
        else:
            examples, stats = build_pairs(records, tokenizer, max_seq_length, data_format, options)
        print(_summary(split, stats, max_seq_length))
        out[split] = examples
    return out
