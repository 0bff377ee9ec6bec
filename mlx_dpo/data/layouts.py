"""Record layouts: their names, detection, per-record validation and normalization.

Records come in many layouts (TRL's, axolotl's, Nectar's, or a user mapping).
Every record of a split is checked against its layout before any is
tokenized, so a problem is one ``DataError`` naming the field. Each record is
then normalized to one canonical form: a text prompt with text responses, a
message-list prompt with message-list responses, or two full transcripts whose
shared beginning is the prompt (implicit, split by ``split_implicit_prompt``);
unpaired (KTO) records become ``(prompt, completion, system, label)``.
"""

from __future__ import annotations

import math
import os
import string
from typing import NamedTuple, Optional

from .core import DataError, _type

# Values of ``data_format``: ``auto`` detects the layout from each file's first record.
DATA_FORMATS = (
    "auto",
    "standard",
    "conversational",
    "implicit",
    "chatml.intel",
    "argilla",
    "argilla_chat",
    "icr",
    "prompt_pairs",
    "ultra",
    "nectar",
    "custom",
    "kto",
)

# Per-format options, passed to build_pairs / build_kto / load_datasets as ``options``.
DATA_OPTION_KEYS = (
    "nectar_pairs",
    "field_prompt",
    "field_system",
    "field_chosen",
    "field_rejected",
    "field_completion",
    "field_label",
    "prompt_format",
)

NECTAR_PAIRINGS = ("best_vs_others", "adjacent")

LAYOUTS = {
    "standard": "{prompt: str, chosen: str, rejected: str, system?: str}",
    "conversational": "{prompt: [messages], chosen: [messages], rejected: [messages], system?: str}",
    "implicit": "{chosen, rejected}: two full transcripts (both str or both [messages]) sharing a prompt",
    "chatml.intel": "{question: str, chosen: str, rejected: str, system?: str}",
    "argilla": "{instruction: str, chosen_response: str, rejected_response: str, system?: str}",
    "argilla_chat": "{chosen: [messages], rejected: [messages]} sharing the leading user turns",
    "icr": "{input: str, chosen: str, rejected: str, system?: str}",
    "prompt_pairs": "{prompt: str, chosen: str, rejected: str} (as standard)",
    "ultra": (
        "{prompt: str, chosen: [messages], rejected: [messages], system?: str}, the lists starting "
        "with the user turn or holding only the reply"
    ),
    "nectar": "{prompt: str or [messages], answers: [{answer: str, rank: number}, ...]}, lower rank better",
    "custom": (
        "fields named by the options field_prompt, field_system, field_chosen, field_rejected "
        "(KTO: field_completion, field_label), prompt shaped by prompt_format"
    ),
    "kto": (
        "{prompt, completion, label: bool, system?: str} (prompt and completion both str or both "
        "[messages]); question, instruction or input may stand for prompt"
    ),
}
CONFIDENCE_NOTE = "any paired layout may add confidence: float in [0.5, 1]"

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

# Text layouts: the prompt field and the (chosen, rejected) fields.
_TEXT_PROMPT = {
    "standard": "prompt",
    "prompt_pairs": "prompt",
    "chatml.intel": "question",
    "icr": "input",
    "argilla": "instruction",
}
_RESPONSES = {"argilla": ("chosen_response", "rejected_response")}
_PROMPT_KEYS = ("prompt", "question", "instruction", "input")
# Layouts that also have an unpaired (KTO) variant, and the prompt fields it may use.
_UNPAIRED_PROMPT = {
    "kto": _PROMPT_KEYS,
    "standard": ("prompt",),
    "prompt_pairs": ("prompt",),
    "conversational": ("prompt",),
    "chatml.intel": ("question",),
    "argilla": ("instruction",),
    "icr": ("input",),
}
# The order auto-detection tries the paired layouts in (implicit comes last).
_DETECT_ORDER = ("standard", "conversational", "ultra", "chatml.intel", "icr", "argilla")
# Layouts a first record that fits none may have been meant as, in this order,
# with whether it is the unpaired form: the one with the fewest problems is named.
_CANDIDATES = (("nectar", False), ("kto", True)) + tuple((f, False) for f in _DETECT_ORDER) + (("implicit", False),)
# The fields that tell layouts apart: a record holding one its file's layout
# does not use reads as a different layout rather than as a broken record.
_LAYOUT_KEYS = frozenset(_PROMPT_KEYS) | {
    "chosen", "rejected", "chosen_response", "rejected_response", "answers", "completion", "label",
}

# Message roles: the chat roles of OpenAI and Hugging Face chat templates
# (``developer`` is OpenAI's newer system role; Llama 3.1 templates name tool
# results ``ipython``).
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")


# ------------------------------------------------------------------ layouts


def _is_messages(value) -> bool:
    """Whether ``value`` is shaped like a message list (its values are checked by ``_problems``)."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and ("content" in m or "tool_calls" in m) for m in value)
    )


def _is_system(value) -> bool:
    return value is None or isinstance(value, str)


def _both(a, b) -> Optional[str]:
    """``text`` or ``messages`` if both values are of that kind, else None."""
    if isinstance(a, str) and isinstance(b, str):
        return "text"
    if _is_messages(a) and _is_messages(b):
        return "messages"
    return None


def _describe(record: dict) -> str:
    return ", ".join(f"{k} ({type(v).__name__})" for k, v in record.items()) or "none"


def _known_layouts() -> str:
    return "; ".join(f"{name} {fields}" for name, fields in LAYOUTS.items()) + f" ({CONFIDENCE_NOTE})"


def _check_format(data_format: str) -> str:
    if data_format not in DATA_FORMATS:
        raise DataError(f"unknown data_format {data_format!r}; expected one of {', '.join(DATA_FORMATS)}")
    return data_format


def _check_options(options: Optional[dict]) -> dict:
    """The set (non-None) options, checked."""
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(opts) - set(DATA_OPTION_KEYS))
    if unknown:
        raise DataError(f"unknown data option(s) {', '.join(unknown)}; expected {', '.join(DATA_OPTION_KEYS)}")
    for key, value in opts.items():
        if not isinstance(value, str) or not value:
            raise DataError(f"data option {key} must be a non-empty string, got {value!r}")
    if opts.get("nectar_pairs", NECTAR_PAIRINGS[0]) not in NECTAR_PAIRINGS:
        raise DataError(f"nectar_pairs must be one of {', '.join(NECTAR_PAIRINGS)}, got {opts['nectar_pairs']!r}")
    if "prompt_format" in opts:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(opts["prompt_format"]) if f is not None}
        except ValueError as e:
            raise DataError(f"prompt_format {opts['prompt_format']!r} is not a valid format string ({e})") from None
        if not names <= {"prompt", "system"} or "prompt" not in names:
            raise DataError(
                f"prompt_format {opts['prompt_format']!r} must use {{prompt}} and may use {{system}}; "
                f"it uses {', '.join('{' + n + '}' for n in sorted(names)) or 'no field'}"
            )
    return opts


def _wants_custom(opts: dict) -> bool:
    return any(k != "nectar_pairs" for k in opts)


def _custom_names(opts: dict) -> dict:
    keys = ("prompt", "system", "chosen", "rejected", "completion", "label")
    return {k: opts.get(f"field_{k}") or k for k in keys}


def _matches(fmt: str, record: dict, opts: dict) -> bool:
    """Whether ``record`` has the paired layout ``fmt``."""
    if fmt == "custom":
        names = _custom_names(opts)
        return names["chosen"] in record and names["rejected"] in record
    if not _is_system(record.get("system")):
        return False
    get = record.get
    if fmt in _TEXT_PROMPT:
        chosen, rejected = _RESPONSES.get(fmt, ("chosen", "rejected"))
        return all(isinstance(get(k), str) for k in (_TEXT_PROMPT[fmt], chosen, rejected))
    if fmt == "conversational":
        return all(_is_messages(get(k)) for k in ("prompt", "chosen", "rejected"))
    if fmt == "implicit":
        return _both(get("chosen"), get("rejected")) is not None
    if fmt == "argilla_chat":
        return _both(get("chosen"), get("rejected")) == "messages"
    if fmt == "ultra":
        return isinstance(get("prompt"), str) and _both(get("chosen"), get("rejected")) == "messages"
    if fmt == "nectar":
        return isinstance(get("answers"), list) and (isinstance(get("prompt"), str) or _is_messages(get("prompt")))
    return False


def _unpaired_prompt_key(fmt: str, record: dict, opts: dict) -> Optional[str]:
    """The prompt field if ``record`` is an unpaired (KTO) example of ``fmt``, else None."""
    if fmt == "custom":
        names = _custom_names(opts)
        return names["prompt"] if names["completion"] in record and names["label"] in record else None
    if fmt not in _UNPAIRED_PROMPT or "completion" not in record or "label" not in record:
        return None
    if not _is_system(record.get("system")):
        return None
    want = {"kto": ("text", "messages"), "conversational": ("messages",)}.get(fmt, ("text",))
    for key in _UNPAIRED_PROMPT[fmt]:
        if key in record:
            return key if _both(record[key], record["completion"]) in want else None
    return None


def detect_format(record: dict, options: Optional[dict] = None) -> str:
    """Which layout a record uses: a name from ``DATA_FORMATS`` (``kto`` for unpaired examples).

    Any field mapping or ``prompt_format`` in ``options`` means ``custom``;
    TRL's message-list transcripts (axolotl's ``argilla_chat``) are ``implicit``
    and ``prompt_pairs`` is ``standard``.
    """
    opts = _check_options(options)
    if _wants_custom(opts):
        return "custom"
    if _matches("nectar", record, opts):
        return "nectar"
    if _unpaired_prompt_key("kto", record, opts):
        return "kto"
    for fmt in _DETECT_ORDER:
        if _matches(fmt, record, opts):
            return fmt
    if not any(k in record for k in _PROMPT_KEYS) and _matches("implicit", record, opts):
        return "implicit"
    raise DataError(f"unrecognised record layout; fields seen: {_describe(record)}. Known layouts: {_known_layouts()}")


def _mismatch(fmt: str, record: dict, opts: dict, unpaired_too: bool = False) -> DataError:
    want = LAYOUTS[fmt]
    if fmt == "custom":
        n = _custom_names(opts)
        want = f"{{{n['prompt']}?, {n['chosen']}, {n['rejected']}, {n['system']}?}}"
        if unpaired_too:
            want += f" or unpaired {{{n['prompt']}, {n['completion']}, {n['label']}, {n['system']}?}}"
    elif unpaired_too and fmt in _UNPAIRED_PROMPT and fmt != "kto":
        want += ", or its unpaired form with completion and label in place of the responses"
    return DataError(f"record does not match data_format {fmt!r} {want}; fields seen: {_describe(record)}")


# ------------------------------------------------------------- validation


def _unpaired_form(fmt: str, record: dict, opts: dict) -> bool:
    """Whether a record of layout ``fmt`` read as KTO data is in its unpaired form."""
    if fmt == "kto":
        return True
    if fmt == "custom":
        return record.get(_custom_names(opts)["completion"]) is not None
    return fmt in _UNPAIRED_PROMPT and record.get("completion") is not None


def _spec(fmt: str, record: dict, opts: dict, unpaired: bool) -> tuple[tuple, tuple, str]:
    """``(required, same, system)`` of layout ``fmt``: the required fields with their
    kinds (``text``, ``messages``, ``either``, ``label``, ``answers``), the fields that
    must all be text or all message lists, and the name of the optional system field."""
    if fmt == "custom":
        n = _custom_names(opts)
        if unpaired:
            required = ((n["prompt"], "either"), (n["completion"], "either"), (n["label"], "label"))
            return required, (n["prompt"], n["completion"]), n["system"]
        required = ((n["chosen"], "either"), (n["rejected"], "either"))
        if record.get(n["prompt"]) is not None or "field_prompt" in opts or "prompt_format" in opts:
            required = ((n["prompt"], "text" if "prompt_format" in opts else "either"),) + required
        return required, tuple(k for k, _ in required), n["system"]
    if unpaired:
        keys = _UNPAIRED_PROMPT[fmt]
        key = next((k for k in keys if record.get(k) is not None), keys[0])
        kind = {"kto": "either", "conversational": "messages"}.get(fmt, "text")
        return ((key, kind), ("completion", kind), ("label", "label")), (key, "completion"), "system"
    if fmt in _TEXT_PROMPT:
        chosen, rejected = _RESPONSES.get(fmt, ("chosen", "rejected"))
        return ((_TEXT_PROMPT[fmt], "text"), (chosen, "text"), (rejected, "text")), (), "system"
    if fmt == "conversational":
        return (("prompt", "messages"), ("chosen", "messages"), ("rejected", "messages")), (), "system"
    if fmt == "implicit":
        return (("chosen", "either"), ("rejected", "either")), ("chosen", "rejected"), "system"
    if fmt == "argilla_chat":
        return (("chosen", "messages"), ("rejected", "messages")), (), "system"
    if fmt == "ultra":
        return (("prompt", "text"), ("chosen", "messages"), ("rejected", "messages")), (), "system"
    if fmt == "nectar":
        return (("prompt", "either"), ("answers", "answers")), (), "system"
    raise DataError(f"unknown data_format {fmt!r}; expected one of {', '.join(DATA_FORMATS)}")


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


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _value_problem(key: str, value, kind: str) -> Optional[tuple[str, bool]]:
    """``(message, about_the_layout)`` if field ``key`` cannot hold ``value``, else None."""
    if value is None:
        return f"field {key!r} is null", True
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


def _problems(fmt: str, record: dict, opts: dict, unpaired: bool) -> list[tuple[str, bool]]:
    """What is wrong with ``record`` as layout ``fmt`` (``unpaired``: its KTO form), as
    ``(message, about_the_layout)`` pairs; missing fields come alone. Empty: nothing."""
    required, same, system_key = _spec(fmt, record, opts, unpaired)
    absent = [k for k, _ in required if k not in record]
    if absent:
        return [(f"missing field{'s' if len(absent) > 1 else ''} {', '.join(map(repr, absent))}", True)]
    out = [p for p in (_value_problem(k, record[k], kind) for k, kind in required) if p]
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
    names = ", ".join(k for k, _ in _spec(fmt, record, opts, unpaired)[0])
    form = ", unpaired" if unpaired and fmt not in ("kto", "custom") else ""
    return f"(data_format {fmt!r}{form}: {names})" if forced else f"(layout {fmt}{form}: {names})"


def _problem_error(problem: tuple[str, bool], note: str) -> DataError:
    message, about_layout = problem
    return DataError(f"{message} {note}" if about_layout else message)


def _unrecognisable(fmt: str, record: dict, opts: dict, unpaired: bool) -> bool:
    """Whether ``record`` has none of the fields (prompt aside) that layout ``fmt`` needs."""
    required, _, _ = _spec(fmt, record, opts, unpaired)
    prompt_keys = set(_PROMPT_KEYS) | {_custom_names(opts)["prompt"]}
    return not any(record.get(k) is not None for k, _ in required if k not in prompt_keys)


def _detect_quietly(record: dict, opts: dict) -> Optional[str]:
    try:
        return detect_format(record, opts)
    except DataError:
        return None


def _detect_first(record: dict, opts: dict) -> str:
    """The layout of a file's first record. One that fits none is named by the
    layout whose fields it has with the fewest problems, or else fully described."""
    try:
        return detect_format(record, opts)
    except DataError:
        best = None
        for fmt, unpaired in _CANDIDATES:
            if fmt == "implicit" and any(k in record for k in _PROMPT_KEYS):
                continue
            if not all(k in record for k, _ in _spec(fmt, record, opts, unpaired)[0]):
                continue
            problems = _problems(fmt, record, opts, unpaired)
            if problems and (best is None or len(problems) < len(best[2])):
                best = (fmt, unpaired, problems)
        if best is None:
            raise
        fmt, unpaired, problems = best
        raise _problem_error(problems[0], _layout_note(fmt, record, opts, unpaired, forced=False)) from None


def _resolve(record: dict, data_format: str, first: Optional[str], opts: dict, unpaired_ok: bool) -> tuple[str, bool]:
    """``(layout, unpaired)`` of one record, checked against the forced or the first layout.

    Every field the layout needs is checked (present, of the right type, not
    empty, messages well formed), so an error names the field.
    """
    if data_format != "auto":
        fmt = data_format
        if fmt == "kto" and not unpaired_ok:
            raise DataError("data_format 'kto' is unpaired data (prompt, completion, label): it needs loss_type kto")
        unpaired = unpaired_ok and _unpaired_form(fmt, record, opts)
        problems = _problems(fmt, record, opts, unpaired)
        if problems:
            if _unrecognisable(fmt, record, opts, unpaired):
                raise _mismatch(fmt, record, opts, unpaired_ok)
            raise _problem_error(problems[0], _layout_note(fmt, record, opts, unpaired, forced=True))
        return fmt, unpaired
    if first is None:
        fmt = _detect_first(record, opts)
        if fmt == "kto" and not unpaired_ok:
            raise DataError(
                "unpaired records (prompt, completion, label) are KTO data: set loss_type kto, "
                f"or give pairs ({_known_layouts()})"
            )
        unpaired = fmt == "kto" or (fmt == "custom" and unpaired_ok and _unpaired_form(fmt, record, opts))
        problems = _problems(fmt, record, opts, unpaired)
        if problems:
            if fmt == "custom" and _unrecognisable(fmt, record, opts, unpaired):
                raise _mismatch(fmt, record, opts, unpaired_ok)
            raise _problem_error(problems[0], _layout_note(fmt, record, opts, unpaired, forced=False))
        return fmt, unpaired
    fmt = first
    unpaired = fmt == "kto" or (fmt == "custom" and unpaired_ok and _unpaired_form(fmt, record, opts))
    problems = _problems(fmt, record, opts, unpaired)
    stray = [k for k in _PROMPT_KEYS if record.get(k) is not None] if fmt == "implicit" else []
    if problems or stray:
        other = _detect_quietly(record, opts)
        ours = [k for k, _ in _spec(fmt, record, opts, unpaired)[0]]
        foreign = [k for k in record if k in _LAYOUT_KEYS and k not in ours and record[k] is not None]
        if other is not None and other != fmt and (foreign or stray):
            theirs = ", ".join(k for k, _ in _spec(other, record, opts, other == "kto")[0])
            ours = ", ".join(ours)
            raise DataError(f"{other} layout ({theirs}), but line 1 is {fmt} ({ours}); all records must share one layout")
        if problems:
            raise _problem_error(problems[0], _layout_note(fmt, record, opts, unpaired, forced=False))
        raise DataError(
            f"field {stray[0]!r} is not part of the implicit layout of line 1 (chosen, rejected: two transcripts "
            "sharing their prompt); all records must share one layout"
        )
    return fmt, unpaired


def _message_field(fmt: str, record: dict, opts: dict, unpaired: bool) -> Optional[str]:
    """The first field of a (checked) record that holds a message list, if any."""
    for key, kind in _spec(fmt, record, opts, unpaired)[0]:
        if kind in ("messages", "either") and isinstance(record.get(key), list):
            return key
    return None


def _no_template(field: str) -> DataError:
    return DataError(f"field {field!r} is a message list, but the tokenizer of this model has no chat template")


# ------------------------------------------------------------ normalization


class _Canon(NamedTuple):
    """One pair in canonical form: ``prompt`` None means two implicit transcripts."""

    prompt: object
    chosen: object
    rejected: object
    system: Optional[str]
    require_prompt: bool = True
    names: tuple = ("chosen", "rejected")  # the record fields the responses come from


def _text_answer(prompt: str, answer: str) -> str:
    """Nectar answers follow an hh prompt ending in 'Assistant:' after a space, as HH responses do."""
    if prompt.endswith("Assistant:") and answer and not answer[0].isspace():
        return " " + answer
    return answer


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _nectar(record: dict, opts: dict) -> tuple[Optional[list[_Canon]], int]:
    """The pairs of a Nectar record and how many tied pairs were skipped (None: < 2 answers)."""
    prompt, system = record["prompt"], record.get("system")
    answers = record["answers"]  # checked by _problems
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

    canons = [_Canon(prompt, response(good), response(bad), system) for good, bad in kept]
    return canons, len(pairs) - len(kept)


def _ultra(record: dict) -> _Canon:
    prompt, chosen, rejected, system = record["prompt"], record["chosen"], record["rejected"], record.get("system")
    user = [{"role": "user", "content": prompt}]
    if chosen == rejected:
        return _Canon(user, chosen, rejected, system)
    if chosen[0] == rejected[0]:
        shared, chosen, rejected = split_implicit_prompt(chosen, rejected)
        return _Canon(shared, chosen, rejected, system)
    if chosen[0].get("role") == "assistant" and rejected[0].get("role") == "assistant":
        return _Canon(user, chosen, rejected, system)
    raise DataError(
        "ultra chosen and rejected must start with the same user message, or hold only the assistant reply"
    )


def _custom_prompt(record: dict, opts: dict, names: dict, required: bool) -> tuple[object, Optional[str]]:
    """The mapped prompt (prompt_format applied) and system; prompt None if absent and not required."""
    system = record.get(names["system"])
    if not _is_system(system):
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
    if _is_messages(prompt):
        if fmt:
            raise DataError(f"field {names['prompt']!r} is a message list, but prompt_format applies to text prompts")
        return prompt, system
    raise DataError(f"field {names['prompt']!r} (the prompt) must be a string or a message list, got {_type(prompt)}")


def _custom_pair(record: dict, opts: dict) -> _Canon:
    names = _custom_names(opts)
    chosen, rejected = record[names["chosen"]], record[names["rejected"]]
    kind = _both(chosen, rejected)
    if kind is None:
        raise DataError(
            f"fields {names['chosen']!r} and {names['rejected']!r} must both be strings or both "
            f"message lists; got {_type(chosen)} and {_type(rejected)}"
        )
    prompt, system = _custom_prompt(record, opts, names, required=False)
    if prompt is None:
        return _Canon(None, chosen, rejected, system, require_prompt=False, names=(names["chosen"], names["rejected"]))
    if (kind == "text") != isinstance(prompt, str):
        raise DataError(
            f"fields {names['prompt']!r}, {names['chosen']!r} and {names['rejected']!r} must all be text "
            "or all message lists"
        )
    return _Canon(prompt, chosen, rejected, system, names=(names["chosen"], names["rejected"]))


def _normalize_pair(record: dict, fmt: str, opts: dict) -> _Canon:
    """The canonical pair of a record of paired layout ``fmt`` (not nectar)."""
    if not _matches(fmt, record, opts):
        raise _mismatch(fmt, record, opts)
    system = record.get("system")
    if fmt in _TEXT_PROMPT:
        c, r = _RESPONSES.get(fmt, ("chosen", "rejected"))
        return _Canon(record[_TEXT_PROMPT[fmt]], record[c], record[r], system, names=(c, r))
    if fmt == "conversational":
        return _Canon(record["prompt"], record["chosen"], record["rejected"], system)
    if fmt in ("implicit", "argilla_chat"):
        return _Canon(None, record["chosen"], record["rejected"], system, require_prompt=False)
    if fmt == "ultra":
        return _ultra(record)
    if fmt == "custom":
        return _custom_pair(record, opts)
    raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(DATA_FORMATS)}")


def _pairs_of(record: dict, fmt: str, opts: dict) -> tuple[Optional[list[_Canon]], int]:
    """All canonical pairs of a record (None: a Nectar record with too few answers), tied pairs skipped."""
    if fmt == "nectar":
        if not _matches(fmt, record, opts):
            raise _mismatch(fmt, record, opts)
        return _nectar(record, opts)
    return [_normalize_pair(record, fmt, opts)], 0


def _split(canon: _Canon) -> tuple:
    """``(prompt, chosen, rejected)`` with implicit transcripts split."""
    if canon.prompt is None:
        return split_implicit_prompt(canon.chosen, canon.rejected)
    return canon.prompt, canon.chosen, canon.rejected


def _confidence(record: dict) -> Optional[float]:
    value = record.get("confidence")
    if value is None:
        return None
    if not (_number(value) and 0.5 <= value <= 1.0):
        raise DataError(
            f"field 'confidence' must be a number in [0.5, 1] (the probability that chosen is better), "
            f"got {_short(value)}"
        )
    return float(value)


def _label(value, key: str = "label") -> bool:
    problem = _value_problem(key, value, "label")
    if problem:
        raise DataError(problem[0])
    return bool(value)


def _unpaired(record: dict, fmt: str, opts: dict) -> tuple:
    """``(prompt, completion, system, label)`` of an unpaired (KTO) record."""
    if fmt == "custom":
        names = _custom_names(opts)
        completion = record[names["completion"]]
        prompt, system = _custom_prompt(record, opts, names, required=True)
        if _both(prompt, completion) is None:
            raise DataError(
                f"fields {names['prompt']!r} and {names['completion']!r} must both be strings or both message "
                f"lists; got {_type(prompt)} and {_type(completion)}"
            )
        return prompt, completion, system, _label(record[names["label"]], names["label"])
    key = _spec(fmt, record, opts, True)[0][0][0]  # the prompt field it uses
    return record[key], record["completion"], record.get("system"), _label(record["label"])


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
