"""Checking every record against its layout before any is tokenized.

Tokenizing a large split takes minutes; checking it takes a second. So every
record is checked first and a problem anywhere is one ``DataError`` naming the
line and the field, with the layout's fields when the record's shape is off.
A file's layout is its first record's (or the one ``data_format`` names); a
first record that fits none is reported as the layout it comes closest to.
Records that pass need no further checks to be normalized.
"""

from __future__ import annotations

import math
from typing import Optional

from .core import DataError, _describe, _type
from .detect import (
    DETECT_ORDER,
    LAYOUT_KEYS,
    LAYOUTS,
    PROMPT_KEYS,
    SHAREGPT_ROLES,
    custom_names,
    detect_format,
    detect_quietly,
    excluded,
    has_unpaired_form,
    known_layouts,
    sft_layout,
    spec,
    unpaired_form,
)
from .records import _at

# Message roles: the chat roles of OpenAI and Hugging Face chat templates
# (``developer`` is OpenAI's newer system role; Llama 3.1 templates name tool
# results ``ipython``).
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")


# ------------------------------------------------------------------ values


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _messages_problem(key: str, messages: list) -> Optional[str]:
    """What is wrong with a message list, naming the message by its index."""
    for i, m in enumerate(messages):
        at = f"field {key!r}[{i}]"
        if not isinstance(m, dict):
            return f"{at} must be a {{role, content}} message, got {_type(m)}"
        role = m.get("role")
        if "role" not in m:
            if "from" in m and "value" in m:
                return f"{at} is a ShareGPT {{from, value}} message; messages need {{role, content}}"
            return f"{at} has no 'role' (a message is {{role, content}}; fields seen: {_describe(m)})"
        if not isinstance(role, str):
            return f"{at}.role must be a string, got {_type(role)}"
        if role not in MESSAGE_ROLES:
            return f"{at}.role {role!r} is not a known role (expected {', '.join(MESSAGE_ROLES)})"
        content = m.get("content")
        if isinstance(content, str) or (content is None and m.get("tool_calls")):
            continue
        if "content" not in m:
            return f"{at} has no 'content'"
        return f"{at}.content must be a string, got {_type(content)}"
    return None


def _sharegpt_problem(at: str, m, assistant: bool = False) -> Optional[str]:
    """What is wrong with one ShareGPT ``{from, value}`` message (``assistant``: must be a reply)."""
    if not isinstance(m, dict) or "from" not in m or "value" not in m:
        got = _describe(m) if isinstance(m, dict) else _type(m)
        return f"{at} must be a ShareGPT {{from, value}} message, got {got}"
    speaker, text = m["from"], m["value"]
    if speaker not in SHAREGPT_ROLES:
        return f"{at}.from {_short(speaker)} is not a known speaker (expected {', '.join(SHAREGPT_ROLES)})"
    if assistant and SHAREGPT_ROLES[speaker] != "assistant":
        return f"{at}.from is {speaker!r}, but a reply comes from the assistant (gpt)"
    if not isinstance(text, str):
        return f"{at}.value must be a string, got {_type(text)}"
    if assistant and not text.strip():
        return f"{at}.value is empty"
    return None


def _sharegpt_conversation_problem(key: str, value) -> Optional[tuple[str, bool]]:
    if not isinstance(value, list):
        return f"field {key!r} must be a list of ShareGPT {{from, value}} messages, got {_type(value)}", True
    if not value:
        return f"field {key!r} is an empty message list", False
    for i, m in enumerate(value):
        if problem := _sharegpt_problem(f"field {key!r}[{i}]", m):
            return problem, False
    if SHAREGPT_ROLES[value[-1]["from"]] == "assistant":
        return f"field {key!r} ends with a {value[-1]['from']!r} turn; it must end with the turn that chosen and rejected answer", False
    return None


def value_problem(key: str, value, kind: str) -> Optional[tuple[str, bool]]:
    """``(message, about_the_layout)`` if field ``key`` cannot hold ``value``, else None."""
    if value is None:
        return f"field {key!r} is null", True
    if kind == "sharegpt":
        return _sharegpt_conversation_problem(key, value)
    if kind == "reply":
        problem = _sharegpt_problem(f"field {key!r}", value, assistant=True)
        return (problem, not isinstance(value, dict)) if problem else None
    if kind == "label":
        if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
            return None
        return f"field {key!r} must be true or false (or 1 or 0), got {_type(value)} {_short(value)}", False
    if kind == "answers":
        if not isinstance(value, list):
            return f"field {key!r} must be a list of {{answer: str, rank: number}}, got {_type(value)}", True
        for k, a in enumerate(value):
            if not (isinstance(a, dict) and isinstance(a.get("answer"), str) and _number(a.get("rank"))):
                got = _describe(a) if isinstance(a, dict) else _type(a)
                return f"field {key!r}[{k}] must be {{answer: str, rank: number}}; got {got}", False
            if not a["answer"].strip():
                return f"field {key!r}[{k}].answer is empty", False
        return None
    if isinstance(value, str) and kind != "messages":
        if not value.strip():
            return f"field {key!r} is empty" + (" (only whitespace)" if value else ""), False
        return None
    if isinstance(value, list) and kind != "text":
        if not value:
            return f"field {key!r} is an empty message list", False
        problem = _messages_problem(key, value)
        return (problem, False) if problem else None
    want = {"text": "a string", "messages": "a message list", "either": "a string or a message list"}[kind]
    return f"field {key!r} must be {want}, got {_type(value)}", True


def problem_error(problem: tuple[str, bool], note: str) -> DataError:
    message, about_layout = problem
    return DataError(f"{message} {note}" if about_layout else message)


# ----------------------------------------------------------------- records


def _problems(fmt: str, record: dict, opts: dict, unpaired: bool) -> list[tuple[str, bool]]:
    """What is wrong with ``record`` as layout ``fmt`` (``unpaired``: its KTO form), as
    ``(message, about_the_layout)`` pairs; missing fields come alone. Empty: nothing."""
    required, same, system_key = spec(fmt, record, opts, unpaired)
    absent = [k for k, _ in required if k not in record]
    if absent:
        return [(f"missing field{'s' if len(absent) > 1 else ''} {', '.join(map(repr, absent))}", True)]
    out = [p for p in (value_problem(k, record[k], kind) for k, kind in required) if p]
    if not out and len(same) > 1 and len({isinstance(record[k], str) for k in same}) > 1:
        quantifier = "both" if len(same) == 2 else "all"
        out.append((
            f"fields {' and '.join(map(repr, same))} must {quantifier} be strings or {quantifier} message "
            f"lists; got {' and '.join(_type(record[k]) for k in same)}",
            True,
        ))
    system = record.get(system_key)
    if system is not None and not isinstance(system, str):
        out.append((f"field {system_key!r} must be a string, got {_type(system)}", False))
    return out


def _layout_note(fmt: str, record: dict, opts: dict, unpaired: bool, forced: bool) -> str:
    names = ", ".join(k for k, _ in spec(fmt, record, opts, unpaired)[0])
    form = ", unpaired" if unpaired and fmt not in ("kto", "custom") else ""
    return f"(data_format {fmt!r}{form}: {names})" if forced else f"(layout {fmt}{form}: {names})"


def _unrecognisable(fmt: str, record: dict, opts: dict, unpaired: bool) -> bool:
    """Whether ``record`` has none of the fields (prompt aside) that layout ``fmt`` needs."""
    required, _, _ = spec(fmt, record, opts, unpaired)
    prompt_keys = set(PROMPT_KEYS) | {custom_names(opts)["prompt"]}
    return not any(record.get(k) is not None for k, _ in required if k not in prompt_keys)


def _mismatch(fmt: str, record: dict, opts: dict, unpaired_too: bool = False) -> DataError:
    want = LAYOUTS[fmt]
    if fmt == "custom":
        n = custom_names(opts)
        want = f"{{{n['prompt']}?, {n['chosen']}, {n['rejected']}, {n['system']}?}}"
        if unpaired_too:
            want += f" or unpaired {{{n['prompt']}, {n['completion']}, {n['label']}, {n['system']}?}}"
    elif unpaired_too and has_unpaired_form(fmt) and fmt != "kto":
        want += ", or its unpaired form with completion and label in place of the responses"
    return DataError(f"record does not match data_format {fmt!r} {want}; fields seen: {_describe(record)}")


def _detect_first(record: dict, opts: dict) -> str:
    """The layout of a file's first record. One that fits none is named by the
    layout whose fields it has with the fewest problems, or else fully described."""
    try:
        return detect_format(record, opts)
    except DataError:
        best = None
        for fmt in DETECT_ORDER:
            unpaired = fmt == "kto"
            if excluded(fmt, record) or not all(k in record for k, _ in spec(fmt, record, opts, unpaired)[0]):
                continue
            problems = _problems(fmt, record, opts, unpaired)
            if problems and (best is None or len(problems) < len(best[2])):
                best = (fmt, unpaired, problems)
        if best is None:
            raise
        fmt, unpaired, problems = best
        raise problem_error(problems[0], _layout_note(fmt, record, opts, unpaired, forced=False)) from None


def resolve(record: dict, data_format: str, first: Optional[str], opts: dict, unpaired_ok: bool) -> tuple[str, bool]:
    """``(layout, unpaired)`` of one record, checked against the forced or the first layout.

    Every field the layout needs is checked (present, of the right type, not
    empty, messages well formed), so an error names the field.
    """
    if data_format != "auto":
        fmt = data_format
        if fmt == "kto" and not unpaired_ok:
            raise DataError("data_format 'kto' is unpaired data (prompt, completion, label): it needs loss_type kto")
        unpaired = unpaired_ok and unpaired_form(fmt, record, opts)
        problems = _problems(fmt, record, opts, unpaired)
        if problems:
            if _unrecognisable(fmt, record, opts, unpaired):
                raise _mismatch(fmt, record, opts, unpaired_ok)
            raise problem_error(problems[0], _layout_note(fmt, record, opts, unpaired, forced=True))
        return fmt, unpaired
    if first is None:
        fmt = _detect_first(record, opts)
        if fmt == "kto" and not unpaired_ok:
            raise DataError(
                "unpaired records (prompt, completion, label) are KTO data: set loss_type kto, "
                f"or give pairs ({known_layouts()})"
            )
        unpaired = fmt == "kto" or (fmt == "custom" and unpaired_ok and unpaired_form(fmt, record, opts))
        problems = _problems(fmt, record, opts, unpaired)
        if problems:
            if fmt == "custom" and _unrecognisable(fmt, record, opts, unpaired):
                raise _mismatch(fmt, record, opts, unpaired_ok)
            raise problem_error(problems[0], _layout_note(fmt, record, opts, unpaired, forced=False))
        return fmt, unpaired
    fmt = first
    unpaired = fmt == "kto" or (fmt == "custom" and unpaired_ok and unpaired_form(fmt, record, opts))
    problems = _problems(fmt, record, opts, unpaired)
    stray = [k for k in PROMPT_KEYS if record.get(k) is not None] if fmt == "implicit" else []
    if problems or stray:
        other = detect_quietly(record, opts)
        ours = [k for k, _ in spec(fmt, record, opts, unpaired)[0]]
        foreign = [k for k in record if k in LAYOUT_KEYS and k not in ours and record[k] is not None]
        if other is not None and other != fmt and (foreign or stray):
            theirs = ", ".join(k for k, _ in spec(other, record, opts, other == "kto")[0])
            ours = ", ".join(ours)
            raise DataError(f"{other} layout ({theirs}), but line 1 is {fmt} ({ours}); all records must share one layout")
        if problems:
            raise problem_error(problems[0], _layout_note(fmt, record, opts, unpaired, forced=False))
        raise DataError(
            f"field {stray[0]!r} is not part of the implicit layout of line 1 (chosen, rejected: two transcripts "
            "sharing their prompt); all records must share one layout"
        )
    return fmt, unpaired


def no_template(field: str) -> DataError:
    return DataError(f"field {field!r} is a message list, but the tokenizer of this model has no chat template")


def check_template(fmt: str, record: dict, opts: dict, unpaired: bool, has_template: bool) -> None:
    """A message-list record needs a chat template: say which field has one."""
    if has_template:
        return
    for key, kind in spec(fmt, record, opts, unpaired)[0]:
        if kind in ("messages", "either", "sharegpt") and isinstance(record.get(key), list):
            raise no_template(key)


def _check_confidence(record: dict) -> None:
    value = record.get("confidence")
    if value is not None and not (_number(value) and 0.5 <= value <= 1.0):
        raise DataError(
            f"field 'confidence' must be a number in [0.5, 1] (the probability that chosen is better), "
            f"got {_short(value)}"
        )


def check_records(records, data_format: str, opts: dict, unpaired_ok: bool, has_template: bool) -> list[tuple[str, bool]]:
    """``(layout, unpaired)`` of every record, all checked before any is tokenized,
    so a bad record anywhere is reported at once; errors name the line and field."""
    layouts = []
    first = None
    for line, record in enumerate(records, 1):
        try:
            fmt, unpaired = resolve(record, data_format, first, opts, unpaired_ok)
            first = first or fmt
            check_template(fmt, record, opts, unpaired, has_template)
            if not unpaired:
                _check_confidence(record)
        except DataError as e:
            raise DataError(f"{_at(records, line)}: {e}") from None
        layouts.append((fmt, unpaired))
    return layouts


def check_sft(records, has_template: bool, mask_prompt: bool, features: dict) -> None:
    """Check every SFT record against the layout of the first, naming line and field."""
    n = 1
    try:
        layout, fields = sft_layout(records[0], features)
        if layout == "text" and mask_prompt:
            raise DataError(
                f"field {fields[0][0]!r}: text records have no prompt to mask; mask_prompt needs "
                "completions or chat records"
            )
        if layout != "text" and not has_template:
            if layout == "chat":
                raise no_template(fields[0][0])
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
                problem = value_problem(key, record[key], kind)
                if problem:
                    raise problem_error(problem, note)
    except DataError as e:
        raise DataError(f"{_at(records, n)}: {e}") from None
