"""The Ollama Modelfile: its TEMPLATE, run by a small Go text/template interpreter written here (the
subset Ollama's chat templates use), renders every conversation as the model's own Jinja template
does through transformers; templates that are not a fixed text around each message are left out
with a reason; the CLI writes FROM, the stop tokens and the model's sampling defaults."""

import json
import re
import shutil

import pytest
from mlx_lm.utils import load_tokenizer

from mlx_dpo.config import load_config
from mlx_dpo.export.ollama import derive, go_template, modelfile
from mlx_dpo.fuse import main as fuse_main
from mlx_dpo.lora import run

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LOWER = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] | lower + '\n' }}{% endfor %}"
CONVERSATIONS = [
    ([{"role": "user", "content": "Hello!"}], True),
    ([{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hi  there\n"},
      {"role": "assistant", "content": "Bonjour."}, {"role": "user", "content": "2+2?"}], True),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
      {"role": "assistant", "content": "d"}], False),
]


def go_render(template: str, system: str, messages: list) -> str:
    """Go's text/template for the actions Ollama's templates use here: text, ``.System``/``.Content``,
    ``if``/``else``/``else if``/``end``, ``range .Messages``, ``eq .Role "x"`` and ``$var`` := / =."""
    parts = re.split(r"(\{\{.*?\}\})", template)
    nodes, _ = _parse(parts, 0)
    variables: dict = {}
    return _run(nodes, {"System": system}, variables, {"System": system, "Messages": messages})


def _parse(parts, i):
    nodes = []
    while i < len(parts):
        part = parts[i]
        if not part.startswith("{{"):
            nodes.append(("text", part))
            i += 1
            continue
        action = part[2:-2].strip()
        if action in ("end", "else") or action.startswith("else if "):
            return nodes, i
        if action.startswith("if ") or action.startswith("range "):
            kind, cond = action.split(" ", 1)
            body, i = _parse(parts, i + 1)
            other = []
            while parts[i][2:-2].strip() != "end":
                tail = parts[i][2:-2].strip()
                if tail == "else":
                    other, i = _parse(parts, i + 1)
                else:  # else if COND: an if nested in the else branch, closed by the same end
                    inner, i = _parse(parts, i + 1)
                    other = [("if", tail[len("else if "):], inner, [])]
                    if parts[i][2:-2].strip() == "else":
                        other[0] = ("if", other[0][1], inner, _parse(parts, i + 1)[0])
                        i = _parse(parts, i + 1)[1]
            nodes.append((kind, cond, body, other))
            i += 1
        else:
            nodes.append(("action", action))
            i += 1
    return nodes, i


def _value(expr, dot, variables):
    if expr.startswith("eq "):
        left, right = expr[3:].split(" ", 1)
        return _value(left, dot, variables) == json.loads(right)
    if expr.startswith("$"):
        return variables[expr]
    if expr in ("true", "false"):
        return expr == "true"
    return dot[expr[1:]]


def _run(nodes, dot, variables, root):
    out = ""
    for node in nodes:
        if node[0] == "text":
            out += node[1]
        elif node[0] == "if":
            out += _run(node[2] if _value(node[1], dot, variables) else node[3], dot, variables, root)
        elif node[0] == "range":
            for item in root["Messages"]:
                out += _run(node[2], {"Role": item["role"], "Content": item["content"]}, variables, root)
        elif ":=" in node[1] or " = " in node[1]:
            name, expr = re.split(r"\s*:?=\s*", node[1], maxsplit=1)
            variables[name] = _value(expr, dot, variables)
        else:
            out += str(_value(node[1], dot, variables))
    return out


def ollama_render(template: str, messages: list) -> str:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return go_render(template, system, messages)


@pytest.mark.parametrize("name, template, bos", [("smollm2", SMOLLM2, ""), ("llama3", LLAMA3, "<s>"),
                                                 ("gemma", GEMMA, "<s>")])
def test_the_go_template_renders_every_conversation_as_the_jinja_template(tiny_tokenizer, name, template, bos):
    def render(messages, generation):
        return tiny_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=generation)

    assert tiny_tokenizer.bos_token == "<s>"
    go = go_template(derive(render, bos))
    assert "<s>" not in go  # llama.cpp adds the BOS itself: a second one would be in every prompt
    for messages, generation in CONVERSATIONS:
        if generation:  # Ollama always ends a prompt with the generation prompt
            assert ollama_render(go, messages) == render(messages, True).removeprefix(bos), name
    # Without a system message SmolLM2's default system block is written; with one, it is not.
    if name == "smollm2":
        assert "{{ else }}<|im_start|>system\nYou are a helpful AI" in go


def test_a_template_that_changes_the_content_is_left_out_with_the_reason(tiny_tokenizer, tmp_path):
    def render(messages, generation):
        return tiny_tokenizer.apply_chat_template(messages, chat_template=LOWER, tokenize=False,
                                                  add_generation_prompt=generation)

    text, why = modelfile(tmp_path / "m.gguf", render, ["</s>"], tmp_path)
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines())
    assert why == "the chat template drops or repeats a message"
    assert text.splitlines()[1] == "FROM ./m.gguf" and 'PARAMETER stop "</s>"' in text


def test_the_cli_writes_a_modelfile_beside_the_gguf(tiny_model_path, tiny_data_path, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_path, base)
    (base / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "do_sample": True}))
    tok = load_tokenizer(base)
    adapters = tmp_path / "ad"
    run(load_config(["--model", str(base), "--data", str(tiny_data_path), "--adapter-path", str(adapters), "--train",
                     "--iters", "1", "--batch-size", "2", "--num-layers", "1", "--val-batches", "0"]))
    fuse_main(["--model", str(base), "--adapter-path", str(adapters), "--save-path", str(tmp_path / "fused"),
               "--export-gguf", str(tmp_path / "out" / "m.gguf"), "--gguf-type", "f32", "--ollama"])
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert f"ollama create NAME -f {tmp_path / 'out' / 'Modelfile'}" in capsys.readouterr().out
    assert "FROM ./m.gguf" in text and 'PARAMETER stop "</s>"' in text
    assert "PARAMETER temperature 0.6" in text and "PARAMETER top_p 0.9" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    for messages, generation in CONVERSATIONS:
        if generation:
            want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert ollama_render(template, messages) == want.removeprefix("<s>")
    assert (tmp_path / "out" / "m.md").read_text().count("ollama create NAME -f Modelfile") == 1


def test_ollama_needs_a_gguf(tiny_model_path, tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit):
        fuse_main(["--model", str(tiny_model_path), "--adapter-path", str(tmp_path), "--ollama"])
    assert "--ollama writes a Modelfile beside the GGUF: add --export-gguf PATH" in capsys.readouterr().err


def test_missing_adapters_are_one_line(tiny_model_path, tmp_path, capsys):
    with pytest.raises(SystemExit):
        fuse_main(["--model", str(tiny_model_path), "--adapter-path", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(adapter_config.json is missing): train first" in err
