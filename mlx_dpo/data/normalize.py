"""Turning checked records of any layout into one canonical form.

A pair becomes a ``Canon``: a text prompt with text responses, a message-list
prompt with message-list responses, or (prompt None) two full transcripts
whose shared beginning is the prompt, split only after pairs with identical
responses are dropped (splitting two equal transcripts leaves no response).
Unpaired (KTO) records become an ``Unpaired``. Records
arrive checked, so normalizers read fields without checking them again.
"""

from __future__ import annotations

import os
import string
from typing import NamedTuple, Optional

from .core import DataError, _describe, _type
from .detect import (
    LAYOUT_TABLE,
    SHAREGPT_ROLES,
    both,
    custom_names,
    is_messages,
    is_system,
    spec,
)

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


class Canon(NamedTuple):
    """One pair in canonical form: ``prompt`` None means two implicit transcripts."""

    prompt: object
    chosen: object
    rejected: object
    system: Optional[str]
    require_prompt: bool = True
    names: tuple = ("chosen", "rejected")  # the record fields the responses come from

    def parts(self) -> tuple:
        """``(prompt, chosen, rejected)`` with implicit transcripts split."""
        if self.prompt is None:
            return split_implicit_prompt(self.chosen, self.rejected)
        return self.prompt, self.chosen, self.rejected


class Unpaired(NamedTuple):
    """One unpaired (KTO) example in canonical form; ``label`` True means desirable."""

    prompt: object
    completion: object
    system: Optional[str]
    label: bool
    name: str = "completion"  # the record field the completion comes from


# ------------------------------------------------------------- normalizers


def _by_fields(record: dict, fields: tuple) -> Canon:
    """A layout whose fields are ``[prompt,] chosen, rejected`` as they stand."""
    *prompt, (chosen, _), (rejected, _) = fields
    system = record.get("system")
    if not prompt:
        return Canon(None, record[chosen], record[rejected], system, require_prompt=False, names=(chosen, rejected))
    return Canon(record[prompt[0][0]], record[chosen], record[rejected], system, names=(chosen, rejected))


def _ultra(record: dict, opts: dict) -> Canon:
    prompt, chosen, rejected, system = record["prompt"], record["chosen"], record["rejected"], record.get("system")
    user = [{"role": "user", "content": prompt}]
    if chosen == rejected:
        return Canon(user, chosen, rejected, system)
    if chosen[0] == rejected[0]:
        shared, chosen, rejected = split_implicit_prompt(chosen, rejected)
        return Canon(shared, chosen, rejected, system)
    if chosen[0].get("role") == "assistant" and rejected[0].get("role") == "assistant":
        return Canon(user, chosen, rejected, system)
    raise DataError(
        "ultra chosen and rejected must start with the same user message, or hold only the assistant reply"
    )


def _sharegpt(record: dict, opts: dict) -> Canon:
    """A conversational pair: ``{from, value}`` messages become ``{role, content}``."""

    def message(m: dict) -> dict:
        return {"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]}

    prompt = [message(m) for m in record["conversations"]]
    return Canon(prompt, [message(record["chosen"])], [message(record["rejected"])], record.get("system"))


def _custom_prompt(record: dict, opts: dict, names: dict, required: bool) -> tuple[object, Optional[str]]:
    """The mapped prompt (prompt_format applied) and system; prompt None if absent and not required."""
    system = record.get(names["system"])
    if not is_system(system):
        raise DataError(f"field {names['system']!r} (system) must be a string, got {_type(system)}")
    fmt = opts.get("prompt_format")
    if names["prompt"] not in record:
        if required or "field_prompt" in opts or fmt:
            raise DataError(f"missing field {names['prompt']!r} (the prompt); fields seen: {_describe(record)}")
        return None, system
    prompt = record[names["prompt"]]
    if isinstance(prompt, str):
        if fmt:
            uses_system = any(f == "system" for _, f, _, _ in string.Formatter().parse(fmt))
            prompt = fmt.format(prompt=prompt, system=system or "")
            if uses_system:
                system = None  # placed by the format, not prepended again
        return prompt, system
    if is_messages(prompt):
        if fmt:
            raise DataError(f"field {names['prompt']!r} is a message list, but prompt_format applies to text prompts")
        return prompt, system
    raise DataError(f"field {names['prompt']!r} (the prompt) must be a string or a message list, got {_type(prompt)}")


def _custom(record: dict, opts: dict) -> Canon:
    names = custom_names(opts)
    chosen, rejected = record[names["chosen"]], record[names["rejected"]]
    kind = both(chosen, rejected)
    if kind is None:
        raise DataError(
            f"fields {names['chosen']!r} and {names['rejected']!r} must both be strings or both "
            f"message lists; got {_type(chosen)} and {_type(rejected)}"
        )
    prompt, system = _custom_prompt(record, opts, names, required=False)
    if prompt is None:
        return Canon(None, chosen, rejected, system, require_prompt=False, names=(names["chosen"], names["rejected"]))
    if (kind == "text") != isinstance(prompt, str):
        raise DataError(
            f"fields {names['prompt']!r}, {names['chosen']!r} and {names['rejected']!r} must all be text "
            "or all message lists"
        )
    return Canon(prompt, chosen, rejected, system, names=(names["chosen"], names["rejected"]))


def _text_answer(prompt: str, answer: str) -> str:
    """Nectar answers follow an hh prompt ending in 'Assistant:' after a space, as HH responses do."""
    if prompt.endswith("Assistant:") and answer and not answer[0].isspace():
        return " " + answer
    return answer


def _nectar(record: dict, opts: dict) -> tuple[Optional[list[Canon]], int]:
    """The pairs of a Nectar record and how many tied pairs were skipped (None: < 2 answers)."""
    prompt, system = record["prompt"], record.get("system")
    answers = record["answers"]
    if len(answers) < 2:
        return None, 0
    ranked = sorted(answers, key=lambda a: a["rank"])  # stable: ties keep their order
    if opts.get("nectar_pairs", "best_vs_others") == "adjacent":
        pairs = list(zip(ranked, ranked[1:]))
    else:
        pairs = [(ranked[0], a) for a in ranked[1:]]
    kept = [(good, bad) for good, bad in pairs if good["rank"] < bad["rank"]]

    def response(a):
        if isinstance(prompt, str):
            return _text_answer(prompt, a["answer"])
        return [{"role": "assistant", "content": a["answer"]}]

    canons = [Canon(prompt, response(good), response(bad), system) for good, bad in kept]
    return canons, len(pairs) - len(kept)


# Layouts whose pair is more than their fields as they stand (nectar: several pairs).
_NORMALIZERS = {"ultra": _ultra, "custom": _custom, "sharegpt": _sharegpt}


# -------------------------------------------------------------- the step


def normalize_pair(record: dict, fmt: str, opts: dict) -> Canon:
    """The canonical pair of a checked record of paired layout ``fmt`` (not nectar)."""
    normalizer = _NORMALIZERS.get(fmt)
    return normalizer(record, opts) if normalizer else _by_fields(record, LAYOUT_TABLE[fmt].fields)


def normalize_pairs(record: dict, fmt: str, opts: dict) -> tuple[Optional[list[Canon]], int]:
    """All canonical pairs of a checked record (None: a Nectar record with too few answers)
    and how many tied pairs were skipped."""
    if fmt == "nectar":
        return _nectar(record, opts)
    return [normalize_pair(record, fmt, opts)], 0


def normalize_unpaired(record: dict, fmt: str, opts: dict) -> Unpaired:
    """The canonical form of a checked unpaired (KTO) record."""
    if fmt == "custom":
        names = custom_names(opts)
        completion = record[names["completion"]]
        prompt, system = _custom_prompt(record, opts, names, required=True)
        if both(prompt, completion) is None:
            raise DataError(
                f"fields {names['prompt']!r} and {names['completion']!r} must both be strings or both message "
                f"lists; got {_type(prompt)} and {_type(completion)}"
            )
        return Unpaired(prompt, completion, system, bool(record[names["label"]]), names["completion"])
    key = spec(fmt, record, opts, True)[0][0][0]  # the prompt field it uses
    return Unpaired(record[key], record["completion"], record.get("system"), bool(record["label"]))


def pair_confidence(record: dict) -> Optional[float]:
    """A checked record's confidence, or None where it has none."""
    value = record.get("confidence")
    return None if value is None else float(value)


# ------------------------------------------------------- implicit prompts


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
