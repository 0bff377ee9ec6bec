"""Reward functions for GRPO on the demo's review world (``examples/grpo.yaml``).

A reward function receives the whole batch at once, as TRL and axolotl call it:
``prompts``, ``completions`` (text, or ``[{"role": "assistant", "content": ...}]``
for conversational prompts), ``completion_ids`` and every other dataset column
(here ``item``), and returns one float (or None) per completion.
"""

from __future__ import annotations

from reviews import is_positive


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def positive(completions: list, **kwargs) -> list[float]:
    """1.0 for a review the demo's word-list classifier calls positive, else 0.0."""
    return [1.0 if is_positive(_text(c)) else 0.0 for c in completions]


def mentions_item(completions: list, item: list[str], **kwargs) -> list[float]:
    """1.0 when the review names the item it was asked about (reads the dataset's ``item`` column)."""
    return [1.0 if i.split(" ", 1)[1].lower() in _text(c).lower() else 0.0 for c, i in zip(completions, item)]
