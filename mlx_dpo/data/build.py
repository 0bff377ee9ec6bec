"""Building examples: the one pass from records to a ``Dataset``.

Each builder runs the data layer's steps in order, every step a module of its
own: check all records (``check``), then per record normalize (``normalize``)
and tokenize (``tokenize``), then cut to length, drop what carries no signal
and count it. No step calls back into a builder.
"""

from __future__ import annotations

import math
import numbers
import types
from typing import Optional

import numpy as np

from .check import check_records, check_sft, check_template, resolve
from .core import DataError, Dataset, Example, _one_line
from .detect import DATA_FORMATS, check_format, check_options
from .normalize import (
    normalize_pair,
    normalize_pairs,
    normalize_unpaired,
    pair_confidence,
)
from .records import _at, _in
from .tokenize import has_chat_template, tokenize_canon, tokenize_parts


def build_pairs_tokens(
    records: list[dict], tokenizer, data_format: str = "auto", options: Optional[dict] = None
) -> tuple[list[tuple[list[int], list[int], list[int], int]], dict]:
    """Every record's pairs as token ids ``(prompt, chosen, rejected, line)``, before any length cut.

    ``line`` is the record's 1-based position. Pairs whose chosen equals their rejected are
    dropped (``dropped_identical``); Nectar records add ``dropped_few_answers`` and
    ``dropped_tied`` to the stats.
    """
    data_format = check_format(data_format)
    opts = check_options(options)
    stats = {"dropped_identical": 0}
    out = []
    layouts = check_records(records, data_format, opts, False, has_chat_template(tokenizer))
    for line, (record, (fmt, _)) in enumerate(zip(records, layouts), 1):
        try:
            canons, tied = normalize_pairs(record, fmt, opts)
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
                tokenized.append(tokenize_canon(canon, tokenizer))
        except DataError as e:
            raise DataError(f"{_at(records, line)}: {e}") from None
        for prompt, chosen, rejected in tokenized:
            if chosen == rejected:
                stats["dropped_identical"] += 1
                continue
            out.append((prompt, chosen, rejected, line))
    return out, stats


def numeric_columns(records: list[dict]) -> list[str]:
    """The fields that are numbers (or booleans) in every record, ``confidence`` aside: the columns
    loss terms read."""
    if not records:
        return []
    names = [k for k, v in records[0].items() if k != "confidence" and _is_number(v)]
    return [k for k in names if all(_is_number(r.get(k)) for r in records)]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(float(value))


def _column_values(records: list[dict], line: int, names: list[str]) -> list[float]:
    record, values = records[line - 1], []
    for name in names:
        value = record.get(name)
        if not _is_number(value):
            raise DataError(
                f"{_at(records, line)}: column {name!r} is {value!r}; the loss terms read it as a number "
                "in every record (the train split has it in all of its records)"
            )
        values.append(float(value))
    return values


def build_pairs(
    records: list[dict],
    tokenizer,
    max_seq_length: int,
    data_format: str = "auto",
    options: Optional[dict] = None,
    columns: "bool | list[str]" = False,
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
    (1.0 where a record has none). With ``columns``, each field that is a
    number in every record (``numeric_columns``) becomes a float32 field
    ``column.<name>`` (for loss terms); a list of names requires those fields.
    """
    triples, token_stats = build_pairs_tokens(records, tokenizer, data_format, options)
    stats = {"pairs": 0, "truncated": 0, "dropped_long_prompt": 0, **token_stats}
    names = list(columns) if isinstance(columns, (list, tuple)) else numeric_columns(records) if columns else []
    pairs, confidences, values = [], [], []
    confidence_of = {}
    for line, record in enumerate(records, 1):
        try:
            confidence_of[line] = pair_confidence(record)
        except DataError as e:
            raise DataError(f"{_at(records, line)}: {e}") from None
    has_confidence = any(c is not None for c in confidence_of.values())
    for prompt, chosen, rejected, line in triples:
        confidence = confidence_of[line]
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
        values.append(_column_values(records, line, names))
    stats["pairs"] = len(pairs)
    fields = {"confidence": np.array(confidences, dtype=np.float32)} if has_confidence else {}
    for j, name in enumerate(names):
        fields[f"column.{name}"] = np.array([v[j] for v in values], dtype=np.float32)
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
    data_format = check_format(data_format)
    opts = check_options(options)
    stats = {"examples": 0, "desirable": 0, "undesirable": 0, "truncated": 0, "dropped_long_prompt": 0}
    tokenized = []  # (prompt ids, completion ids, label)
    layouts = check_records(records, data_format, opts, True, has_chat_template(tokenizer))
    for line, (record, (fmt, unpaired)) in enumerate(zip(records, layouts), 1):
        try:
            if unpaired:
                example = normalize_unpaired(record, fmt, opts)
                prompt_ids, completion_ids = tokenize_parts(
                    example.prompt, (example.completion,), (example.name,), example.system, tokenizer
                )
                tokenized.append((prompt_ids, completion_ids, example.label))
                continue
            stats.setdefault("dropped_identical", 0)
            canons, _ = normalize_pairs(record, fmt, opts)
            if canons is None:
                stats["dropped_few_answers"] = stats.get("dropped_few_answers", 0) + 1
                continue
            seen = set()
            for canon in canons:
                if canon.chosen == canon.rejected:
                    stats["dropped_identical"] += 1
                    continue
                prompt_ids, chosen, rejected = tokenize_canon(canon, tokenizer)
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
    check_sft(records, has_chat_template(tokenizer), mask_prompt, features)
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


def tokenize_pair(
    record: dict, tokenizer, fmt: str, options: Optional[dict] = None
) -> tuple[list[int], list[int], list[int]]:
    """Token ids ``(prompt, chosen, rejected)`` of one preference record of layout ``fmt``.

    Responses end in exactly one EOS; the prompt starts with BOS only where
    the tokenizer (or its chat template) would add one itself. A Nectar
    record holds several pairs: use ``build_pairs``.
    """
    opts = check_options(options)
    if fmt not in DATA_FORMATS or fmt in ("nectar", "kto"):
        raise DataError(f"tokenize_pair takes one pair of a paired layout, not {fmt!r}; see build_pairs/build_kto")
    fmt, _ = resolve(record, fmt, None, opts, unpaired_ok=False)
    if fmt == "nectar":
        raise DataError("tokenize_pair takes one pair of a paired layout, not 'nectar'; see build_pairs/build_kto")
    check_template(fmt, record, opts, False, has_chat_template(tokenizer))
    return tokenize_canon(normalize_pair(record, fmt, opts), tokenizer)


