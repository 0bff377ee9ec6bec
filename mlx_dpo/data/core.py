"""Types and errors every part of the data layer shares.

An example is a tuple of ``(tokens, offset)`` sequences, ``offset`` being the
index of the first response token (mlx-lm's ``mask_prompt`` convention), or
for a sequence trained on several separate stretches (Chain of Hindsight) a
tuple of ``(start, end)`` token spans; a
``Dataset`` is a list of them with optional per-example arrays. ``DataError``
is the one exception a dataset that cannot be used raises, its message naming
where and why. Kept apart so that every step of the data layer (read, detect,
check, normalize, tokenize, build) can import these without importing a later step.
"""

from __future__ import annotations

from typing import Optional

Spans = tuple[tuple[int, int], ...]  # trained token stretches [start, end), in order
Sequence = tuple[list[int], "int | Spans"]  # (prompt + response token ids, index of first response token, or spans)
Example = tuple[Sequence, ...]  # (chosen, rejected) for preference pairs; (seq, kl_seq) for KTO; (seq,) for sft


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


def _type(value) -> str:
    """A JSON value's type, as error messages name it."""
    return "null" if value is None else type(value).__name__


def _describe(record: dict) -> str:
    """A record's fields and their types, as error messages list them."""
    return ", ".join(f"{k} ({type(v).__name__})" for k, v in record.items()) or "none"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
