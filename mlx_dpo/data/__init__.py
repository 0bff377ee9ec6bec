"""Preference, KTO and SFT data: read records, find the prompt, tokenize.

Everything here works on plain Python lists of token ids; batching into MLX
arrays is the trainer's job (the data layer never imports MLX). A preference
example is a pair of sequences that share a prompt, each stored as
``(tokens, offset)`` where ``offset`` is the index of the first response
token, the same convention mlx-lm's datasets use for ``mask_prompt``.

A split takes one way through, each step a module of its own that imports
only earlier steps: ``records`` (read a file or hub split) -> ``detect`` (which
layout) -> ``check`` (every record, before any is tokenized) -> ``normalize``
(one canonical pair per record) -> ``tokenize`` -> ``build`` (cut, drop, count:
a ``Dataset``). ``core`` holds the types and ``DataError`` they share. This
module re-exports the public names and holds ``load_datasets``.

A problem is one ``DataError`` line naming the file (or hub split), the line
(``record N`` in a JSON list, ``row N`` in a table) and the field.
"""

from __future__ import annotations

from typing import Optional

from .build import (
    build_kto,
    build_pairs,
    build_pairs_tokens,
    build_sft,
    numeric_columns,
    sft_examples,
    tokenize_pair,
)
from .check import MESSAGE_ROLES
from .core import DataError, Dataset, Example, Sequence, as_dataset
from .detect import (
    CONFIDENCE_NOTE,
    DATA_FORMATS,
    DATA_OPTION_KEYS,
    LAYOUTS,
    NECTAR_PAIRINGS,
    detect_format,
)
from .hindsight import COH_NEGATIVE, COH_POSITIVE, build_coh
from .normalize import ASSISTANT_MARKERS, split_implicit_prompt
from .prompts import Prompt, build_prompts, load_prompt_splits
from .records import (
    Records,
    load_json_records,
    load_parquet_records,
    load_records,
    load_split_records,
    split_records,
)

__all__ = [
    "ASSISTANT_MARKERS",
    "COH_NEGATIVE",
    "COH_POSITIVE",
    "CONFIDENCE_NOTE",
    "DATA_FORMATS",
    "DATA_OPTION_KEYS",
    "LAYOUTS",
    "MESSAGE_ROLES",
    "NECTAR_PAIRINGS",
    "Prompt",
    "DataError",
    "Dataset",
    "Example",
    "Records",
    "Sequence",
    "as_dataset",
    "build_coh",
    "build_kto",
    "build_pairs",
    "build_pairs_tokens",
    "build_prompts",
    "build_sft",
    "detect_format",
    "load_datasets",
    "load_json_records",
    "load_parquet_records",
    "load_prompt_splits",
    "load_records",
    "load_split_records",
    "numeric_columns",
    "sft_examples",
    "split_implicit_prompt",
    "tokenize_pair",
]


def _summary(split: str, stats: dict, max_seq_length: int) -> str:
    kind = "examples" if "examples" in stats else "pairs"
    notes = []
    if kind == "examples" and "pairs" in stats:  # Chain of Hindsight: two orders per pair
        notes.append(f"from {stats['pairs']} pairs, both orders")
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


def load_datasets(
    data: str,
    tokenizer,
    kind: str,
    max_seq_length: int,
    *,
    mask_prompt: bool = False,
    splits=("train", "valid", "test"),
    data_format: str = "auto",
    options: Optional[dict] = None,
    hub_splits: Optional[dict] = None,
    seed: int = 0,
    columns: "bool | list[str]" = False,
    coh_phrases: tuple[str, str] = (COH_POSITIVE, COH_NEGATIVE),
    **features,
) -> dict[str, list[Example] | None]:
    """Load and tokenize each split (None where it is missing).

    ``kind`` is what the records are read as: ``sft`` reads mlx-lm SFT records
    (``features`` rename their fields); ``kto`` reads unpaired examples (or
    unpairs pairs) with ``build_kto``; ``pairs`` reads preference pairs with
    ``build_pairs``.
    ``data_format`` and ``options`` choose and configure the layout;
    ``hub_splits`` maps ``train``/``valid``/``test`` (or ``train_split``/
    ``valid_split``/``test_split``) to the split names of a hub dataset.
    ``coh`` reads pairs as Chain of Hindsight sequences joined by
    ``coh_phrases`` (positive, negative); ``columns`` gives pairs the numeric
    fields of their records (``build_pairs``), for loss terms: those of the
    first split loaded (train), required in the others.
    """
    if kind not in ("sft", "kto", "coh", "pairs"):
        raise ValueError(f"unknown kind of data {kind!r}: sft, kto, coh or pairs")
    out = {}
    for split, records in split_records(data, splits, hub_splits):
        if records is None:
            out[split] = None
            continue
        # Errors name the file (or hub split), the line and the field.
        if kind == "sft":
            examples, stats = build_sft(records, tokenizer, max_seq_length, mask_prompt, **features)
        elif kind == "kto":
            examples, stats = build_kto(records, tokenizer, max_seq_length, data_format, options, seed=seed)
        elif kind == "coh":
            examples, stats = build_coh(records, tokenizer, max_seq_length, data_format, options, *coh_phrases)
        else:
            examples, stats = build_pairs(records, tokenizer, max_seq_length, data_format, options, columns=columns)
            if columns is True:  # the first split (train) names the columns; the others must have them
                columns = [k[len("column."):] for k in examples.fields if k.startswith("column.")]
        print(_summary(split, stats, max_seq_length))
        out[split] = examples
    return out
