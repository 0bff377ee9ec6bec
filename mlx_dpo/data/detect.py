"""Which layout a record has: the table of layouts, their options, and detection.

Records come in many layouts (TRL's, axolotl's, Nectar's, or a user mapping).
Each is one entry of ``LAYOUT_TABLE``, naming the fields a pair needs and the kind
of value each holds; the check step validates records against those fields
and the normalize step reads them. Detection only looks at shapes (a string,
something like a message list); what is wrong inside a value is the check
step's to say.

A new layout is an entry in ``LAYOUT_TABLE`` (and in ``DETECT_ORDER`` to be
detected) plus, unless its fields are ``[prompt,] chosen, rejected`` as they
stand, a normalizer in ``normalize.py``. A new kind of field value also needs
its shape in ``_SHAPES`` and its problems in ``check.value_problem``.
"""

from __future__ import annotations

import string
from typing import NamedTuple, Optional

from .core import DataError, _describe


class Layout(NamedTuple):
    """One record layout.

    ``fields``: the ``(field, kind)`` a pair needs, prompt first when there is
    one; a kind is ``text``, ``messages``, ``either`` (text or messages) or
    ``answers``. ``same``: fields that must all be text or all message lists.
    ``unpaired``: the prompt fields of its unpaired (KTO) form, if it has one.
    ``forbids``: fields whose presence rules the layout out when detecting.
    """

    doc: str  # the layout as error messages show it
    fields: tuple = ()
    same: tuple = ()
    unpaired: tuple = ()
    forbids: tuple = ()


def _three(prompt: str, kind: str, chosen: str = "chosen", rejected: str = "rejected") -> tuple:
    """Prompt, chosen and rejected fields, all of one kind."""
    return ((prompt, kind), (chosen, kind), (rejected, kind))


# Fields that may hold the prompt of an unpaired (KTO) record.
PROMPT_KEYS = ("prompt", "question", "instruction", "input")

# Every layout, in the order messages list them. ``custom`` takes its fields
# from the options; ``kto`` is unpaired only.
LAYOUT_TABLE = {
    "standard": Layout(
        "{prompt: str, chosen: str, rejected: str, system?: str}", _three("prompt", "text"), unpaired=("prompt",)
    ),
    "conversational": Layout(
        "{prompt: [messages], chosen: [messages], rejected: [messages], system?: str}",
        _three("prompt", "messages"),
        unpaired=("prompt",),
    ),
    "implicit": Layout(
        "{chosen, rejected}: two full transcripts (both str or both [messages]) sharing a prompt",
        (("chosen", "either"), ("rejected", "either")),
        same=("chosen", "rejected"),
        forbids=PROMPT_KEYS,
    ),
    "chatml.intel": Layout(
        "{question: str, chosen: str, rejected: str, system?: str}", _three("question", "text"), unpaired=("question",)
    ),
    "argilla": Layout(
        "{instruction: str, chosen_response: str, rejected_response: str, system?: str}",
        _three("instruction", "text", "chosen_response", "rejected_response"),
        unpaired=("instruction",),
    ),
    "argilla_chat": Layout(
        "{chosen: [messages], rejected: [messages]} sharing the leading user turns",
        (("chosen", "messages"), ("rejected", "messages")),
    ),
    "icr": Layout("{input: str, chosen: str, rejected: str, system?: str}", _three("input", "text"), unpaired=("input",)),
    "prompt_pairs": Layout(
        "{prompt: str, chosen: str, rejected: str} (as standard)", _three("prompt", "text"), unpaired=("prompt",)
    ),
    "sharegpt": Layout(
        "{conversations: [{from, value}] ending in a human turn, chosen: {from: gpt, value}, "
        "rejected: {from: gpt, value}, system?: str} (LLaMA-Factory, axolotl)",
        (("conversations", "sharegpt"), ("chosen", "reply"), ("rejected", "reply")),
    ),
    "ultra": Layout(
        "{prompt: str, chosen: [messages], rejected: [messages], system?: str}, the lists starting "
        "with the user turn or holding only the reply",
        (("prompt", "text"), ("chosen", "messages"), ("rejected", "messages")),
    ),
    "nectar": Layout(
        "{prompt: str or [messages], answers: [{answer: str, rank: number}, ...]}, lower rank better",
        (("prompt", "either"), ("answers", "answers")),
    ),
    "custom": Layout(
        "fields named by the options field_prompt, field_system, field_chosen, field_rejected "
        "(KTO: field_completion, field_label), prompt shaped by prompt_format"
    ),
    "kto": Layout(
        "{prompt, completion, label: bool, system?: str} (prompt and completion both str or both "
        "[messages]); question, instruction or input may stand for prompt",
        unpaired=PROMPT_KEYS,
    ),
}

# Values of ``data_format``: ``auto`` detects the layout from each file's first record.
DATA_FORMATS = ("auto",) + tuple(LAYOUT_TABLE)
LAYOUTS = {name: layout.doc for name, layout in LAYOUT_TABLE.items()}
CONFIDENCE_NOTE = "any paired layout may add confidence: float in [0.5, 1]"

# The order ``auto`` tries layouts in; the first that fits is the file's layout.
DETECT_ORDER = (
    "nectar", "kto", "standard", "conversational", "ultra", "chatml.intel", "icr", "argilla", "sharegpt", "implicit",
)

# The fields that tell layouts apart: a record holding one its file's layout
# does not use reads as a different layout rather than as a broken record.
LAYOUT_KEYS = frozenset(k for layout in LAYOUT_TABLE.values() for k, _ in layout.fields) | {
    *PROMPT_KEYS, "completion", "label",
}

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


# ------------------------------------------------------------------ options


def check_format(data_format: str) -> str:
    if data_format not in DATA_FORMATS:
        raise DataError(f"unknown data_format {data_format!r}; expected one of {', '.join(DATA_FORMATS)}")
    return data_format


def check_options(options: Optional[dict]) -> dict:
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


def custom_names(opts: dict) -> dict:
    """The record fields the ``custom`` layout reads, by role."""
    keys = ("prompt", "system", "chosen", "rejected", "completion", "label")
    return {k: opts.get(f"field_{k}") or k for k in keys}


def known_layouts() -> str:
    return "; ".join(f"{name} {fields}" for name, fields in LAYOUTS.items()) + f" ({CONFIDENCE_NOTE})"


# ------------------------------------------------------------------- shapes


def is_messages(value) -> bool:
    """Whether ``value`` is shaped like a message list (the check step checks its values)."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and ("content" in m or "tool_calls" in m) for m in value)
    )


# ShareGPT speakers (``from``) and the chat roles they are (LLaMA-Factory's and
# axolotl's names: ``observation`` is a tool result, ``function_call`` a tool call).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


def is_sharegpt_message(value) -> bool:
    return isinstance(value, dict) and "from" in value and "value" in value


def is_sharegpt(value) -> bool:
    """Whether ``value`` is shaped like a ShareGPT conversation, a list of ``{from, value}``."""
    return isinstance(value, list) and len(value) > 0 and all(is_sharegpt_message(m) for m in value)


def is_system(value) -> bool:
    return value is None or isinstance(value, str)


def both(a, b) -> Optional[str]:
    """``text`` or ``messages`` if both values are of that kind, else None."""
    if isinstance(a, str) and isinstance(b, str):
        return "text"
    if is_messages(a) and is_messages(b):
        return "messages"
    return None


_SHAPES = {
    "text": lambda v: isinstance(v, str),
    "messages": is_messages,
    "either": lambda v: isinstance(v, str) or is_messages(v),
    "answers": lambda v: isinstance(v, list),
    "sharegpt": is_sharegpt,
    "reply": is_sharegpt_message,
}


# ---------------------------------------------------------------- detection


def spec(fmt: str, record: dict, opts: dict, unpaired: bool) -> tuple[tuple, tuple, str]:
    """``(required, same, system)`` of layout ``fmt``: the required fields with their
    kinds (``text``, ``messages``, ``either``, ``label``, ``answers``), the fields that
    must all be text or all message lists, and the name of the optional system field."""
    if fmt == "custom":
        return _custom_spec(record, opts, unpaired)
    layout = LAYOUT_TABLE.get(fmt)
    if layout is None:
        raise DataError(f"unknown data_format {fmt!r}; expected one of {', '.join(DATA_FORMATS)}")
    if unpaired:
        keys = layout.unpaired
        key = next((k for k in keys if record.get(k) is not None), keys[0])
        kind = layout.fields[0][1] if layout.fields else "either"  # the kind of the paired prompt
        return ((key, kind), ("completion", kind), ("label", "label")), (key, "completion"), "system"
    return layout.fields, layout.same, "system"


def _custom_spec(record: dict, opts: dict, unpaired: bool) -> tuple[tuple, tuple, str]:
    n = custom_names(opts)
    if unpaired:
        required = ((n["prompt"], "either"), (n["completion"], "either"), (n["label"], "label"))
        return required, (n["prompt"], n["completion"]), n["system"]
    required = ((n["chosen"], "either"), (n["rejected"], "either"))
    if record.get(n["prompt"]) is not None or "field_prompt" in opts or "prompt_format" in opts:
        required = ((n["prompt"], "text" if "prompt_format" in opts else "either"),) + required
    return required, tuple(k for k, _ in required), n["system"]


def has_unpaired_form(fmt: str) -> bool:
    """Whether layout ``fmt`` has an unpaired (KTO) form, completion and label in place of the responses."""
    return fmt in LAYOUT_TABLE and bool(LAYOUT_TABLE[fmt].unpaired)


def unpaired_form(fmt: str, record: dict, opts: dict) -> bool:
    """Whether a record of layout ``fmt`` read as KTO data is in its unpaired form."""
    if fmt == "kto":
        return True
    if fmt == "custom":
        return record.get(custom_names(opts)["completion"]) is not None
    return has_unpaired_form(fmt) and record.get("completion") is not None


def _is_unpaired(record: dict) -> bool:
    """Whether ``record`` is an unpaired (KTO) example: a prompt field, completion and label."""
    if "completion" not in record or "label" not in record or not is_system(record.get("system")):
        return False
    key = next((k for k in PROMPT_KEYS if k in record), None)
    return key is not None and both(record[key], record["completion"]) is not None


def excluded(fmt: str, record: dict) -> bool:
    """Whether ``record`` holds a field that rules layout ``fmt`` out (a prompt, for implicit)."""
    return any(k in record for k in getattr(LAYOUT_TABLE.get(fmt), "forbids", ()))


def matches(fmt: str, record: dict, opts: dict) -> bool:
    """Whether ``record`` has layout ``fmt`` (``kto``: is an unpaired example)."""
    if fmt == "custom":
        names = custom_names(opts)
        return names["chosen"] in record and names["rejected"] in record
    if fmt == "kto":
        return _is_unpaired(record)
    layout = LAYOUT_TABLE[fmt]
    if not layout.fields or not is_system(record.get("system")) or excluded(fmt, record):
        return False
    if not all(_SHAPES[kind](record.get(k)) for k, kind in layout.fields):
        return False
    return len({isinstance(record[k], str) for k in layout.same}) <= 1


def detect_format(record: dict, options: Optional[dict] = None) -> str:
    """Which layout a record uses: a name from ``DATA_FORMATS`` (``kto`` for unpaired examples).

    Any field mapping or ``prompt_format`` in ``options`` means ``custom``;
    TRL's message-list transcripts (axolotl's ``argilla_chat``) are ``implicit``
    and ``prompt_pairs`` is ``standard``.
    """
    opts = check_options(options)
    if any(k != "nectar_pairs" for k in opts):
        return "custom"
    for fmt in DETECT_ORDER:
        if matches(fmt, record, opts):
            return fmt
    raise DataError(f"unrecognised record layout; fields seen: {_describe(record)}. Known layouts: {known_layouts()}")


def detect_quietly(record: dict, opts: dict) -> Optional[str]:
    """The layout of ``record``, or None where it fits none."""
    try:
        return detect_format(record, opts)
    except DataError:
        return None


def sft_layout(record: dict, features: dict) -> tuple[str, tuple]:
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
