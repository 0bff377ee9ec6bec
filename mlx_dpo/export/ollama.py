"""An Ollama ``Modelfile`` beside an exported GGUF: ``FROM`` the file, the chat template in
Ollama's Go-template form, the stop tokens and the model's own sampling defaults.

Ollama does not run Jinja. The template is rebuilt from what the model's Jinja template renders
for marker messages: the text before and after each role's content, the default system block
(SmolLM2's template adds one when there is no system message) and the generation prompt. The
pieces are then checked by re-rendering several conversations from them; a template whose output
is not a fixed text around each message (one that branches on the content, the date or tools)
cannot be written this way, and the Modelfile is written without ``TEMPLATE`` (Ollama then picks
a template from the GGUF's ``tokenizer.chat_template``) with a warning saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

Render = Callable[[list, bool], str]  # (messages, add_generation_prompt) -> text
_MARK = {"system": "\x01SYSTEM\x01", "user": "\x01USER\x01", "assistant": "\x01ASSISTANT\x01"}
# generation_config.json key -> Ollama PARAMETER name
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repetition_penalty": "repeat_penalty"}


@dataclass(frozen=True)
class Pieces:
    """The fixed texts around each role's content in a rendered conversation."""

    begin: str  # the BOS the Jinja template writes as text; llama.cpp adds it itself, so Ollama's template leaves it out
    default_system: str  # the system block written when no system message is given
    system: tuple[str, str]
    # The system block opens the first user turn (Gemma's templates): that user message has no prefix.
    system_in_user: bool
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str


class TemplateError(ValueError):
    """A chat template that is not a fixed text around each message."""


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _between(text: str, start: str, end: Optional[str]) -> str:
    head = text.index(start) + len(start) if start else 0
    return text[head:text.index(end, head)] if end else text[head:]


def derive(render: Render, bos_text: str = "") -> Pieces:
    """The pieces of ``render``'s template; ``TemplateError`` when re-rendering from them differs."""
    s, u, a = _MARK["system"], _MARK["user"], _MARK["assistant"]
    try:
        full = render([_msg("system", s), _msg("user", u), _msg("assistant", a), _msg("user", u + "2")], True)
        alone = render([_msg("user", u)], False)
        answered = render([_msg("user", u), _msg("assistant", a)], False)
    except Exception as e:  # a template may raise on any conversation it does not expect
        raise TemplateError(f"the chat template failed on a plain conversation ({type(e).__name__}: {e})") from e
    if not all(m in full for m in (s, u, a)) or full.count(u) != 2:
        raise TemplateError("the chat template drops or repeats a message")
    user_post = _between(alone, u, None)
    assistant_post = _between(answered, a, None)
    after_a = _between(full, a, u)
    if not after_a.startswith(assistant_post):
        raise TemplateError("an assistant message ends differently in the middle of a conversation")
    user_pre = after_a[len(assistant_post):]
    begin_sys = _between(full, "", s)
    begin = bos_text if bos_text and begin_sys.startswith(bos_text) else ""
    after_s, pre_alone = _between(full, s, u), _between(alone, "", u)
    if not (pre_alone.endswith(user_pre) and pre_alone.startswith(begin)):
        raise TemplateError("a first user message starts differently from a later one")
    in_user = not after_s.endswith(user_pre)
    pieces = Pieces(
        begin=begin,
        default_system=pre_alone[len(begin):len(pre_alone) - len(user_pre)],
        system=(begin_sys[len(begin):], after_s if in_user else after_s[:len(after_s) - len(user_pre)]),
        system_in_user=in_user,
        user=(user_pre, user_post),
        assistant=(_between(full, u, a)[len(user_post):], assistant_post),
        generation=_between(full, u + "2", None)[len(user_post):],
    )
    _check(pieces, render)
    return pieces


def render_pieces(pieces: Pieces, messages: list, add_generation_prompt: bool) -> str:
    """What the Go template of ``pieces`` renders, written out in Python (the check's other side)."""
    # Ollama hands the template every system message as one ``.System``, joined by a blank line.
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    text = pieces.begin + (pieces.system[0] + system + pieces.system[1] if system else pieces.default_system)
    joined = bool(system) and pieces.system_in_user
    for m in messages:
        if m["role"] in ("user", "assistant"):
            pre, post = getattr(pieces, m["role"])
            text += ("" if joined and m["role"] == "user" else pre) + m["content"] + post
            joined = joined and m["role"] != "user"
    return text + (pieces.generation if add_generation_prompt else "")


def _check(pieces: Pieces, render: Render) -> None:
    conversations = [
        ([_msg("user", "Hi there")], True),
        ([_msg("system", "Be brief."), _msg("user", "What is 2+2?"), _msg("assistant", "4."), _msg("user", "And 3+3?")], True),
        ([_msg("user", "Name a colour."), _msg("assistant", "Blue.")], False),
    ]
    for messages, generation in conversations:
        if render(messages, generation) != render_pieces(pieces, messages, generation):
            raise TemplateError("the chat template is not a fixed text around each message")


def _quote(text: str) -> str:
    """``text`` as a Modelfile triple-quoted value (which cannot hold three quotes in a row)."""
    if '"""' in text:
        raise TemplateError('the chat template holds """, which a Modelfile value cannot')
    return f'"""{text}"""'


def go_template(pieces: Pieces) -> str:
    """``pieces`` as the Go template Ollama renders (``.System`` holds the system messages)."""
    (sp, ss), (up, us), (ap, as_) = pieces.system, pieces.user, pieces.assistant
    default = "{{ else }}" + pieces.default_system if pieces.default_system else ""
    if pieces.system_in_user:  # a Go variable carries "the system block opened this turn" into the loop
        head, ss = "{{ $joined := false }}", ss + "{{ $joined = true }}"
        up = f"{{{{ if $joined }}}}{{{{ $joined = false }}}}{{{{ else }}}}{up}{{{{ end }}}}"
    else:
        head = ""
    return (f"{head}{{{{ if .System }}}}{sp}{{{{ .System }}}}{ss}{default}{{{{ end }}}}"
            f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{up}{{{{ .Content }}}}{us}'
            f'{{{{ else if eq .Role "assistant" }}}}{ap}{{{{ .Content }}}}{as_}{{{{ end }}}}{{{{ end }}}}'
            f"{pieces.generation}")


def stop_tokens(eos_texts: list[str], pieces: Optional[Pieces]) -> list[str]:
    """The end-of-turn texts: every EOS token and the special token that closes an assistant turn."""
    stops = list(dict.fromkeys(eos_texts))
    if pieces is not None:
        closing = pieces.assistant[1].strip()
        if closing and closing not in stops:
            stops.append(closing)
    return stops


def sampling_defaults(model_dir: Path) -> dict:
    """The model's own sampling settings (``generation_config.json``) under Ollama's names."""
    path = Path(model_dir) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("do_sample") is False:
        return {"temperature": 0}
    return {name: config[key] for key, name in _SAMPLING.items() if config.get(key) is not None}


def modelfile(gguf_path: Path, render: Optional[Render], eos_texts: list[str], model_dir: Path,
              bos_text: str = "") -> tuple[str, Optional[str]]:
    """The Modelfile text and, when the template could not be written, why (for a warning)."""
    pieces, why = None, None
    if render is None:
        why = "the model has no chat template"
    else:
        try:
            pieces = derive(render, bos_text)
            template = _quote(go_template(pieces))
        except TemplateError as e:
            pieces, why = None, str(e)
    lines = ["# ollama create NAME -f Modelfile", f"FROM ./{Path(gguf_path).name}", ""]
    if pieces is not None:
        lines += [f"TEMPLATE {template}", ""]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop_tokens(eos_texts, pieces)]
    lines += [f"PARAMETER {k} {v}" for k, v in sampling_defaults(model_dir).items()]
    return "\n".join(lines) + "\n", why


def write_modelfile(gguf_path: Path, render: Optional[Render], eos_texts: list[str], model_dir: Path,
                    bos_text: str = "") -> tuple[Path, Optional[str]]:
    """``Modelfile`` beside ``gguf_path``; returns its path and the reason ``TEMPLATE`` was left out, if it was."""
    text, why = modelfile(gguf_path, render, eos_texts, model_dir, bos_text)
    path = Path(gguf_path).with_name("Modelfile")
    path.write_text(text, encoding="utf-8")
    return path, why
