"""Preference, KTO and SFT data: read records, find the prompt, tokenize.

Everything here works on plain Python lists of token ids; batching into MLX
arrays is the trainer's job. A preference example is a pair of sequences that
share a prompt, each stored as ``(tokens, offset)`` where ``offset`` is the
index of the first response token, the same convention mlx-lm's datasets use
for ``mask_prompt``.

Records come in many layouts (TRL's, axolotl's, Nectar's, or a user mapping).
Each is normalized to one of three canonical forms before tokenization: a
text prompt with text responses, a message-list prompt with message-list
responses, or two full transcripts whose shared beginning is the prompt
(implicit).

Every record of a split is checked before any is tokenized: a problem is one
``DataError`` line naming the file (or hub split), the line (``record N`` in a
JSON list, ``row N`` in a table) and the field.
"""

from __future__ import annotations

import json
import math
import os
import string
import types
import weakref
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

Sequence = tuple[list[int], int]  # (prompt + response token ids, index of first response token)
Example = tuple[Sequence, ...]  # (chosen, rejected) for preference pairs; (seq, kl_seq) for KTO; (seq,) for sft

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


# ------------------------------------------------------------------ reading


class Records(list):
    """Records read from one source, which errors name: ``source: line 7``.

    ``source`` is the file path as given (or ``dataset, split name`` for the
    Hub) and ``unit`` what a position is called there: ``line`` in JSON lines
    (the line in the file), ``record`` in a JSON list, ``row`` in a table.
    """

    def __init__(self, records=(), source: Optional[str] = None, unit: str = "line"):
        super().__init__(records)
        self.source = source
        self.unit = unit

    def at(self, n: int) -> str:
        """Where the n-th record (1-based) is, for an error message."""
        return f"{self.source}: {self.unit} {n}" if self.source else f"{self.unit} {n}"


def _at(records, n: int) -> str:
    return records.at(n) if isinstance(records, Records) else f"line {n}"


def _in(records) -> str:
    """``source: `` for errors about a whole split, or nothing."""
    source = getattr(records, "source", None)
    return f"{source}: " if source else ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_records(path: Path) -> list[dict]:
    """Read a ``.jsonl`` file, one record per line.

    Only trailing blank lines are skipped, so the n-th record is always on
    line n and later errors can name the line. Returns ``Records`` naming
    ``path``; an empty file is an error.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: no records (the file is empty)")
    records = Records(source=str(path), unit="line")
    loads = json.loads
    for n, line in enumerate(lines, 1):
        try:
            record = loads(line)
        except json.JSONDecodeError as e:
            if not line.strip():
                raise DataError(f"{path}: line {n}: blank line (each line must hold one JSON object)") from None
            raise DataError(f"{path}: line {n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {n}: expected a JSON object, got {_type(record)}")
        records.append(record)
    return records


def load_json_records(path: Path) -> list[dict]:
    """Read a ``.json`` file: a JSON list of records (errors name ``record N``), or JSON lines."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: no records (the file is empty)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise DataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        return load_records(path)  # JSON lines, with per-line errors
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {_type(data)}")
    if not data:
        raise DataError(f"{path}: no records (an empty list)")
    for n, record in enumerate(data, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {n}: expected a JSON object, got {_type(record)}")
    return Records(data, source=str(path), unit="record")


def load_parquet_records(path: Path) -> list[dict]:
    """Read a ``.parquet`` file with pyarrow (an optional dependency); errors name ``row N``."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet files needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(str(path)).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:  # a damaged or non-parquet file
        raise DataError(f"{path}: cannot read parquet ({_one_line(e)})") from None
    if not rows:
        raise DataError(f"{path}: no records (the table has no rows)")
    return Records(rows, source=str(path), unit="row")


_READERS = {".jsonl": load_records, ".json": load_json_records, ".parquet": load_parquet_records}


def _hub_split_names(split: str, train_split, valid_split, test_split) -> tuple[tuple[str, ...], bool]:
    """Hub split names to try for ``split``, and whether the user named them."""
    chosen = {"train": train_split, "valid": valid_split, "test": test_split}.get(split)
    if chosen:
        return (chosen,), True
    defaults = {"train": ("train",), "valid": ("validation", "valid", "test"), "test": ("test",)}
    return defaults.get(split, (split,)), False


def load_split_records(
    data: str,
    split: str,
    *,
    train_split: Optional[str] = None,
    valid_split: Optional[str] = None,
    test_split: Optional[str] = None,
) -> Records | None:
    """Records of one split from a local folder or a Hugging Face dataset id.

    A local folder holds ``{split}.jsonl``, ``{split}.json`` (a list of
    records or JSON lines) or ``{split}.parquet``. Anything else is looked up
    on the Hub: ``train_split``/``valid_split``/``test_split`` name the hub
    splits (``train[:1000]`` slices work); unnamed, ``train`` and ``test`` are
    used as they are, and ``valid`` is the first of ``validation``, ``valid``,
    ``test`` that exists. Returns None when the split does not exist; a split
    named explicitly that does not exist, or one with no records, is an error.
    The ``Records`` name their file (or hub split), so errors can point at a line.
    """
    path = Path(data).expanduser()
    if path.is_dir():
        files = [path / f"{split}{ext}" for ext in _READERS if (path / f"{split}{ext}").exists()]
        if len(files) > 1:
            raise DataError(f"{data}: several files for the {split} split ({', '.join(f.name for f in files)}); keep one")
        return _READERS[files[0].suffix](files[0]) if files else None
    if path.exists() or data.startswith((".", "/", "~")):
        raise DataError(
            f"{data}: expected a folder with train/valid/test .jsonl, .json or .parquet files, "
            "or a Hugging Face dataset id"
        )
    try:
        from datasets import get_dataset_split_names, load_dataset
    except ImportError:
        raise DataError(
            f"{data!r} is not a local folder; loading it from the Hub needs the datasets package: "
            "pip install datasets"
        ) from None
    names, explicit = _hub_split_names(split, train_split, valid_split, test_split)
    available = get_dataset_split_names(data)
    for name in names:
        if name.split("[", 1)[0] in available:
            rows = Records((dict(row) for row in load_dataset(data, split=name)), source=f"{data}, split {name}", unit="row")
            if not rows:
                raise DataError(f"{rows.source}: no records (the split has no rows)")
            return rows
    if explicit:
        raise DataError(f"{data}: no split {names[0]!r} on the Hub; it has {', '.join(available)}")
    return None


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


# ------------------------------------------------------------- tokenization

_BOS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` if the tokenizer's own encoding adds a BOS, else ``[]``."""
    try:
        return list(_BOS_CACHE[tokenizer])
    except (KeyError, TypeError):
        pass
    bos = tokenizer.bos_token_id
    with_special = tokenizer.encode("a")
    without = tokenizer.encode("a", add_special_tokens=False)
    adds = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]
    prefix = (bos,) if adds else ()
    try:
        _BOS_CACHE[tokenizer] = prefix
    except TypeError:
        pass
    return list(prefix)


def _eos_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no EOS token")
    return set(getattr(tokenizer, "eos_token_ids", None) or ()) | {eos}


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    """End a response with exactly one EOS, so the model learns to stop."""
    if ids and ids[-1] in _eos_ids(tokenizer):
        return ids
    return ids + [tokenizer.eos_token_id]


def _check_response(response, name: str) -> None:
    if isinstance(response, str):
        empty = not response.strip()
    else:
        empty = not any(m.get("tool_calls") or str(m.get("content") or "").strip() for m in response)
    if empty:
        raise DataError(f"field {name!r} has an empty response")


def _tokenize_text(prompt: str, responses: tuple, tokenizer) -> tuple:
    # Each piece is tokenized on its own so the prompt/response boundary is
    # exact; tokenizing the concatenation can merge tokens across it.
    prompt_ids = _bos_prefix(tokenizer) + tokenizer.encode(prompt, add_special_tokens=False)
    return (prompt_ids,) + tuple(
        _with_eos(tokenizer.encode(r, add_special_tokens=False), tokenizer) for r in responses
    )


def _has_chat_template(tokenizer) -> bool:
    has = getattr(tokenizer, "has_chat_template", None)
    if has is None:
        has = getattr(tokenizer, "chat_template", None) is not None
    return bool(has)


def _render(tokenizer, messages: list, **kwargs):
    """``tokenizer.apply_chat_template``, a template's refusal (``raise_exception``,
    a missing key) turned into a DataError."""
    try:
        from jinja2 import TemplateError
    except ImportError:  # no jinja2, no chat templates: nothing of its own to catch
        TemplateError = ()
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as e:
        raise DataError(f"the chat template of this model rejects the messages: {_one_line(e)}") from None


def _tokenize_messages(prompt: list, responses: tuple, tokenizer) -> tuple:
    if not _has_chat_template(tokenizer):
        raise DataError("the tokenizer of this model has no chat template, which message-list records need")
    prompt_text = _render(tokenizer, prompt, add_generation_prompt=True, tokenize=False)
    # The rendered prompt already carries any BOS text, so no special tokens.
    out = [tokenizer.encode(prompt_text, add_special_tokens=False)]
    for response in responses:
        full_text = _render(tokenizer, prompt + response, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise DataError(
                "the chat template renders the prompt differently once a response follows, "
                "so the response cannot be separated from it"
            )
        response_text = full_text[len(prompt_text) :].rstrip()
        out.append(_with_eos(tokenizer.encode(response_text, add_special_tokens=False), tokenizer))
    return tuple(out)


def _tokenize_parts(prompt, responses: tuple, names: tuple, system, tokenizer, require_prompt: bool = True) -> tuple:
    """Token ids ``(prompt, *responses)``: text with the system text before the
    prompt, or message lists with the system as the first message."""
    for response, name in zip(responses, names):
        _check_response(response, name)
    if isinstance(prompt, str):
        if not all(isinstance(r, str) for r in responses):
            raise DataError("a text prompt needs text responses")
        if system:
            prompt = system + "\n\n" + prompt
        if require_prompt and not prompt:
            raise DataError("empty prompt")
        return _tokenize_text(prompt, responses, tokenizer)
    if not all(isinstance(r, list) for r in responses):
        raise DataError("a message-list prompt needs message-list responses")
    if system and prompt[0].get("role") != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    return _tokenize_messages(prompt, responses, tokenizer)


def _tokenize_canon(canon: _Canon, tokenizer) -> tuple:
    prompt, chosen, rejected = _split(canon)
    return _tokenize_parts(prompt, (chosen, rejected), canon.names, canon.system, tokenizer, canon.require_prompt)


def tokenize_pair(
    record: dict, tokenizer, fmt: str, options: Optional[dict] = None
) -> tuple[list[int], list[int], list[int]]:
    """Token ids ``(prompt, chosen, rejected)`` of one preference record of layout ``fmt``.

    Responses end in exactly one EOS; the prompt starts with BOS only where
    the tokenizer (or its chat template) would add one itself. A Nectar
    record holds several pairs: use ``build_pairs``.
    """
    opts = _check_options(options)
    if fmt not in DATA_FORMATS or fmt in ("nectar", "kto"):
        raise DataError(f"tokenize_pair takes one pair of a paired layout, not {fmt!r}; see build_pairs/build_kto")
    fmt, _ = _resolve(record, fmt, None, opts, unpaired_ok=False)
    if fmt == "nectar":
        raise DataError("tokenize_pair takes one pair of a paired layout, not 'nectar'; see build_pairs/build_kto")
    _check_template(fmt, record, opts, False, _has_chat_template(tokenizer))
    return _tokenize_canon(_normalize_pair(record, fmt, opts), tokenizer)


def _check_template(fmt: str, record: dict, opts: dict, unpaired: bool, has_template: bool) -> None:
    """A message-list record needs a chat template: say which field has one."""
    if not has_template:
        field = _message_field(fmt, record, opts, unpaired)
        if field is not None:
            raise _no_template(field)


# ------------------------------------------------------------------ builders


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
