"""Chain of Hindsight sequences: a preference pair as one text with feedback phrases.

Liu et al. 2023 ("Chain of Hindsight Aligns Language Models with Feedback") train
on ``prompt + "A helpful answer: " + chosen + " An unhelpful answer: " + rejected``
(and the other order) with the next-token loss on the two answers only, never
on the prompt or the phrases; asked with the positive phrase, the model then
writes the kind of answer that phrase introduced. Each pair gives two examples,
one per order, built from the same tokenized pair as DPO's, so every paired
layout works.
"""

from __future__ import annotations

from typing import Optional

from .build import build_pairs_tokens
from .core import DataError, Dataset
from .tokenize import _eos_ids

COH_POSITIVE = "A helpful answer: "
COH_NEGATIVE = " An unhelpful answer: "


def _without_eos(ids: list[int], eos: set[int]) -> list[int]:
    """The first answer of a chain continues with a phrase, not an end of turn (EOS or the chat
    template's own end-of-turn token: ``eos`` holds both)."""
    end = len(ids)
    while end > 0 and ids[end - 1] in eos:
        end -= 1
    return ids[:end]


def _cut(first: int, second: int, budget: int) -> tuple[int, int]:
    """Lengths of two answers cut to ``budget`` tokens in all, each keeping at least half
    the budget when it needs it (so both answers stay in the sequence)."""
    if first + second <= budget:
        return first, second
    half = budget // 2
    if first <= half:
        return first, budget - first
    if second <= budget - half:
        return budget - second, second
    return half, budget - half


def chain(prompt: list[int], good: list[int], bad: list[int], positive: list[int], negative: list[int],
          good_first: bool, max_seq_length: int, eos: set[int]) -> Optional[tuple[list[int], tuple, bool]]:
    """One hindsight sequence ``(tokens, spans, truncated)``, or None when the prompt and
    phrases leave fewer than two answer tokens."""
    first, second = (good, bad) if good_first else (bad, good)
    first_phrase, second_phrase = (positive, negative) if good_first else (negative, positive)
    first = _without_eos(first, eos)
    budget = max_seq_length - len(prompt) - len(first_phrase) - len(second_phrase)
    if budget < 2 or not first:
        return None
    n1, n2 = _cut(len(first), len(second), budget)
    truncated = (n1, n2) != (len(first), len(second))
    a = len(prompt) + len(first_phrase)
    b = a + n1 + len(second_phrase)
    tokens = prompt + first_phrase + first[:n1] + second_phrase + second[:n2]
    return tokens, ((a, a + n1), (b, b + n2)), truncated


def build_coh(
    records: list[dict],
    tokenizer,
    max_seq_length: int,
    data_format: str = "auto",
    options: Optional[dict] = None,
    positive: str = COH_POSITIVE,
    negative: str = COH_NEGATIVE,
) -> tuple[Dataset, dict]:
    """Two hindsight examples per preference pair (positive phrase first, then negative first).

    Each example is ``((tokens, spans),)`` with the two answers as the trained spans. When a
    chain is longer than ``max_seq_length`` both answers are cut (each keeps at least half
    of the room left by the prompt and phrases, so both appear); a pair whose prompt and
    phrases leave no room is dropped (``dropped_long_prompt``).
    """
    if not positive.strip() or not negative.strip() or positive.strip() == negative.strip():
        raise DataError(f"coh_positive and coh_negative must be two different non-empty phrases, not {positive!r} and {negative!r}")
    pos = tokenizer.encode(positive, add_special_tokens=False)
    neg = tokenizer.encode(negative, add_special_tokens=False)
    eos = _eos_ids(tokenizer) | set(getattr(tokenizer, "all_special_ids", None) or ())  # e.g. ChatML's <|im_end|>
    triples, stats = build_pairs_tokens(records, tokenizer, data_format, options)
    out = {"examples": 0, "pairs": 0, "truncated": 0, "dropped_long_prompt": 0,
           **{k: v for k, v in stats.items() if k.startswith("dropped")}}
    examples = []
    for prompt, chosen, rejected, _ in triples:
        chains = [chain(prompt, chosen, rejected, pos, neg, good_first, max_seq_length, eos) for good_first in (True, False)]
        if any(c is None for c in chains):
            out["dropped_long_prompt"] += 1
            continue
        out["pairs"] += 1
        out["truncated"] += any(c[2] for c in chains)
        examples.extend(((tokens, spans),) for tokens, spans, _ in chains)
    out["examples"] = len(examples)
    return Dataset(examples), out
