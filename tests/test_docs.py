"""The guides run as written: every shell command of README.md and LORA.md, every YAML snippet.

Each command line of a ```bash block (``\\`` continuations joined, ``#`` comment lines skipped;
in a block of ``$ `` prompts only the prompted lines, the rest being their output) either ends
with a marker comment saying what it needs that a test cannot have (``# needs the hub``,
``# needs the Macs in hosts.json``), or it runs: in document order, README first, with
``bash -c`` in a scratch folder holding copies of ``examples/`` and ``configs/`` (nothing is
written into the repository), ``python`` and the console scripts (``mlx_lm.*``, ``mlx.launch``,
``mlx_dpo.*``) taken from this interpreter's environment, and no hub access. The exit status
must be 0, and ``mlx.launch`` (which exits with 0 whatever its processes do) must not report a
failed process. ``pip install`` commands are checked for being well formed (and for naming
extras that exist) but not run; the README's test command is not run (it would run this test).
``mlx_lm.server`` runs until stopped: it must answer a chat request, then it is stopped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mlx_dpo.config import DEFAULTS, flatten_trl_block, merge_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "LORA.md")  # run in this order: the README's quickstart comes first
MARKERS = ("# needs the hub", "# needs the Macs in hosts.json")
QUICKSTART = "python -m mlx_dpo.lora --config examples/quickstart.yaml"
NOT_RUN = {"python -m pytest -q": "the test suite itself (it includes this test)"}
COPIED = ("examples", "configs")
PLACEHOLDER = re.compile(r"(^|\s)(M|FILE|PATH|ADAPTER_DIR|NAME)(\s|$)|path/to|\.\.\.|<[a-z_-]+>")
COMMAND_TIMEOUT = 300


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str  # the whole command line, marker comment included

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def marker(self) -> str | None:
        return next((m for m in MARKERS if self.text.rstrip().endswith(m)), None)


def fenced_blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """(line number of the first body line, body) of each ```lang block."""
    blocks, body, start, inside = [], [], 0, False
    for n, line in enumerate(text.splitlines(), 1):
        fence = line.strip()
        if not inside and fence == f"```{lang}":
            inside, body, start = True, [], n + 1
        elif inside and fence == "```":
            blocks.append((start, "\n".join(body)))
            inside = False
        elif inside:
            body.append(line)
    assert not inside, f"unclosed ```{lang} block starting at line {start - 1}"
    return blocks


def commands_of(doc: str) -> list[Command]:
    out = []
    for start, body in fenced_blocks((ROOT / doc).read_text(), "bash"):
        lines = body.splitlines()
        prompted = any(ln.startswith("$ ") for ln in lines)
        pending, first = "", 0
        for n, line in enumerate(lines, start):
            if prompted:  # a transcript: "$ command" lines, the others are its output
                if line.startswith("$ "):
                    out.append(Command(doc, n, line[2:].strip()))
                continue
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if not pending:
                first = n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1].rstrip() + " "
                continue
            out.append(Command(doc, first, (pending + line.strip()).strip()))
            pending = ""
        assert not pending, f"{doc}:{first}: a continuation line ends the block"
    return out


ALL_COMMANDS = [c for doc in DOCS for c in commands_of(doc)]


def _unquoted(command: str):
    """(index, char, outside quotes) for each character of a shell command line."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            if ch == quote:
                quote = None
            yield i, ch, False
        elif ch in "'\"":
            quote = ch
            yield i, ch, False
        else:
            yield i, ch, True
    assert quote is None, f"unbalanced quotes in {command!r}"


def segments(command: str) -> list[str]:
    """The ``&&``-separated parts of a command line, as written, without its trailing comment."""
    code = command
    for i, ch, outside in _unquoted(command):
        if outside and ch == "#" and (i == 0 or command[i - 1].isspace()):
            code = command[:i]
            break
    parts, start = [], 0
    for i, ch, outside in _unquoted(code):
        if outside and code.startswith("&&", i) and i >= start:
            parts.append(code[start:i])
            start = i + 2
    parts.append(code[start:])
    parts = [" ".join(p.split()) if "'" not in p and '"' not in p else p.strip() for p in parts]
    assert all(parts), f"empty part in {command!r}"
    shlex.split(code)  # well formed for a shell: quotes balanced
    return parts


def pyproject_extras() -> set[str]:
    """The extras of pyproject.toml (read without tomllib, which Python 3.10 lacks)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1]
    section = re.split(r"^\[", section, maxsplit=1, flags=re.M)[0]
    return set(re.findall(r"^([A-Za-z0-9][\w.-]*)\s*=", section, flags=re.M))


def check_pip_install(segment: str) -> None:
    """``pip install`` with known options and requirement specifiers; mlx-dpo's extras exist."""
    from packaging.requirements import Requirement

    tokens = shlex.split(segment)
    if tokens[:3] == ["python", "-m", "pip"]:
        tokens = ["pip", *tokens[3:]]
    assert tokens[:2] in (["pip", "install"], ["pip3", "install"]), segment
    targets = [t for t in tokens[2:] if t not in ("-e", "--editable", "-U", "--upgrade")]
    assert targets and not any(t.startswith("-") for t in targets), f"unexpected pip options in {segment!r}"
    for target in targets:
        local = re.fullmatch(r"\.(\[([\w,-]+)\])?", target)
        if local:  # the checkout itself, with extras
            extras = set(local.group(2).split(",")) if local.group(2) else set()
        else:
            req = Requirement(target)
            extras = set(req.extras) if req.name == "mlx-dpo" else set()
        missing = extras - pyproject_extras()
        assert not missing, f"{segment!r}: pyproject.toml has no extra {sorted(missing)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MLX_RANK", None)
    env.pop("MLX_HOSTFILE", None)
    return env


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=environment(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )


def failure(command: str, proc: subprocess.CompletedProcess) -> str:
    tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-25:])
    return f"`{command}` exited with {proc.returncode}:\n{tail}"


def serve(command: str, cwd: Path) -> None:
    """Start a server command, require one chat completion from it, stop it."""
    port = free_port()
    tokens = shlex.split(command, comments=True)
    if "--port" in tokens:
        tokens[tokens.index("--port") + 1] = str(port)
    else:
        tokens += ["--port", str(port)]
    proc = subprocess.Popen(tokens, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps({"messages": [{"role": "user", "content": "Write a review of the Quartz pizzeria."}],
                         "max_tokens": 20, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    answer, deadline = None, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with opener.open(request, timeout=30) as r:
                    answer = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert answer is not None, f"`{command}` never answered a chat request:\n{out[-3000:]}"
    assert answer["choices"][0]["message"]["content"], answer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch copy of the files the guides use, with the quickstart already trained."""
    ws = tmp_path_factory.mktemp("docs")
    for name in COPIED:
        # examples/real/work holds the real-model run's downloads and model (hundreds of MB).
        shutil.copytree(ROOT / name, ws / name, ignore=shutil.ignore_patterns("__pycache__", "work"))
    proc = run(QUICKSTART, ws)
    assert proc.returncode == 0, failure(QUICKSTART, proc)
    assert (ws / "adapters" / "quickstart" / "adapters.safetensors").is_file()
    return ws


def test_the_guides_have_commands():
    docs = {c.doc for c in ALL_COMMANDS}
    assert docs == set(DOCS), docs
    assert any(QUICKSTART in segments(c.text) for c in ALL_COMMANDS if c.doc == "README.md")


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.id)
def test_command_runs_or_is_marked(command: Command, workspace: Path):
    assert not PLACEHOLDER.search(command.text.split(" # ")[0]), f"{command.id}: placeholder in `{command.text}`"
    if command.marker:
        segments(command.text)  # well formed, at least
        return
    to_run = []
    for part in segments(command.text):
        if part in NOT_RUN:
            continue  # see NOT_RUN for why
        if re.match(r"(python -m )?pip3? install\b", part):
            check_pip_install(part)
        elif part == QUICKSTART:
            continue  # the workspace fixture ran it, in this folder, and checked it
        else:
            to_run.append(part)
    if not to_run:
        return
    if shlex.split(to_run[0])[0] == "mlx_lm.server":
        assert len(to_run) == 1
        serve(to_run[0], workspace)
        return
    joined = " && ".join(to_run)
    proc = run(joined, workspace)
    assert proc.returncode == 0, f"{command.id}: " + failure(joined, proc)
    # mlx.launch exits with 0 even when a process fails; it only warns.
    failed = re.findall(r"Node with rank \d+ (?:exited with code -?\d+|was killed)", proc.stdout + proc.stderr)
    assert not failed, f"{command.id}: {failed}\n" + failure(joined, proc)


def yaml_blocks(doc: str) -> list[tuple[int, str]]:
    return fenced_blocks((ROOT / doc).read_text(), "yaml")


@pytest.mark.parametrize("doc", DOCS)
def test_yaml_snippets_validate(doc):
    from mlx_lm.lora import yaml_loader

    blocks = yaml_blocks(doc)
    assert blocks or doc == "README.md"
    for line, body in blocks:
        cfg = yaml.load(body, yaml_loader)
        assert isinstance(cfg, dict) and cfg, f"{doc}:{line}: not a mapping of keys"
        if "runs" in cfg and "eval" in cfg:  # a sweep file for mlx_dpo.frontier: its runs' keys are config keys
            assert set(cfg) <= {"output", "base", "eval", "runs"}, f"{doc}:{line}: unknown sweep keys"
            for r in cfg["runs"]:
                keys = {k: v for k, v in r.items() if k not in ("name", "method", "config")}
                try:
                    merge_config(keys)
                except ValueError as e:
                    pytest.fail(f"{doc}:{line}: run {r.get('name')}: {e}")
            continue
        try:
            merge_config(flatten_trl_block(cfg))  # as load_config reads a file (axolotl's trl: block too)
        except ValueError as e:
            pytest.fail(f"{doc}:{line}: {e}")


def test_json_snippets_parse():
    for line, body in fenced_blocks((ROOT / "LORA.md").read_text(), "json"):
        value = json.loads(body)
        if isinstance(value, list) and value and all(isinstance(h, dict) and "ssh" in h for h in value):
            assert all(isinstance(h.get("ips", []), list) for h in value), f"LORA.md:{line}: a hostfile's ips are lists"


def key_table() -> list[tuple[list[str], str]]:
    """(keys, default cell) of each row of LORA.md's configuration key table."""
    text = (ROOT / "LORA.md").read_text()
    section = text.split("## Configuration keys", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[1]))
    return rows


def test_key_table_lists_every_key_with_its_default():
    from mlx_lm.lora import yaml_loader

    rows = key_table()
    listed = [k for keys, _ in rows for k in keys]
    assert sorted(set(DEFAULTS) - set(listed)) == [], "keys missing from LORA.md's table"
    assert sorted(set(listed) - set(DEFAULTS)) == [], "LORA.md's table lists keys that do not exist"
    for keys, default in rows:
        if default == "none":
            assert all(DEFAULTS[k] is None for k in keys), (keys, default)
            continue
        literals = re.findall(r"`([^`]+)`", default)
        if len(literals) == 1 and len(keys) > 1:
            literals *= len(keys)
        if len(literals) != len(keys):
            continue  # prose, checked by reading
        for key, literal in zip(keys, literals):
            assert yaml.load(literal, yaml_loader) == DEFAULTS[key], f"LORA.md says {key} defaults to {literal}, it is {DEFAULTS[key]!r}"
