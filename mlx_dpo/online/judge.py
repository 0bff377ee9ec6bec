"""An LLM judge as a reward: ``judge: {url | model, mode, template, timeout, retries, concurrency}``.

The judge is a chat model asked, greedily, to grade completions:

- ``pointwise``: one question per completion; the reward is the first number in the answer
  (the default template asks for 0 to 10).
- ``pairwise``: the completions of one prompt (consecutive in a batch, as every sampling method
  hands them over) are compared two at a time, each pair in both orders so that a judge that
  prefers the first (or second) position cancels out. A completion's reward is its share of
  won comparisons (a pair judged differently in the two orders is half a win each). With two
  completions a prompt (online DPO) the winner gets 1 and the loser 0.

An answer with no grade in it is no reward for that completion (None, as a reward function's
"no opinion"; the run's ``rewards/<name>/unscored`` metric counts them). A judge that cannot be
reached after its retries raises ``JudgeError``, which ends the run in one line after a
checkpoint, as any failing reward does.

The judge is an OpenAI-compatible endpoint (``url``: ``mlx_lm.server``, llama.cpp's server,
Ollama, a hosted API; ``model`` is then the name sent with each request, and the key comes from
``api_key_env``), or a model loaded in this process with mlx-lm (``model`` alone: a path or hub id).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Callable, Optional

from mlx_lm.generate import generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load

POINTWISE_TEMPLATE = (
    "Rate the response to the prompt below for quality, from 0 (worst) to 10 (best).\n\n"
    "Prompt:\n{prompt}\n\nResponse:\n{completion}\n\nReply with the number only."
)
PAIRWISE_TEMPLATE = (
    "Which response answers the prompt better?\n\nPrompt:\n{prompt}\n\n"
    "Response A:\n{a}\n\nResponse B:\n{b}\n\nReply with the letter A or B only."
)
PLACEHOLDERS = {"pointwise": ("{prompt}", "{completion}"), "pairwise": ("{prompt}", "{a}", "{b}")}
MODES = tuple(PLACEHOLDERS)


class JudgeError(Exception):
    """The judge could not be asked (unreachable, refused, an answer that is not a chat reply)."""


@dataclass
class JudgeConfig:
    """The ``judge:`` block of a configuration."""

    url: Optional[str] = None  # an OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1
    model: Optional[str] = None  # with url: the model name sent; alone: a local path or hub id
    mode: str = "pointwise"
    template: Optional[str] = None  # default: POINTWISE_TEMPLATE or PAIRWISE_TEMPLATE
    timeout: float = 60.0  # seconds per request
    retries: int = 2  # further tries after a failed request, with 0.5 s, 1 s, 2 s ... between
    concurrency: int = 4  # requests in flight at once (an endpoint)
    max_tokens: int = 16
    name: str = "judge"  # its reward's name in the metrics
    api_key_env: str = "OPENAI_API_KEY"  # read when set; never logged

    @classmethod
    def from_dict(cls, block: dict) -> "JudgeConfig":
        """A checked configuration; any problem is a ValueError of one line."""
        if not isinstance(block, dict):
            raise ValueError("expected a mapping with url or model, mode, template, timeout, retries, concurrency")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(block) - known):
            raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        cfg = cls(**block)
        if not cfg.url and not cfg.model:
            raise ValueError("give 'url' (an OpenAI-compatible endpoint) or 'model' (a local model's path or hub id)")
        if cfg.mode not in MODES:
            raise ValueError(f"mode {cfg.mode!r}: choose pointwise or pairwise")
        if missing := [p for p in PLACEHOLDERS[cfg.mode] if p not in cfg.prompt_template]:
            raise ValueError(f"the {cfg.mode} template lacks {', '.join(missing)}")
        for key in ("timeout", "retries", "concurrency", "max_tokens"):
            value = getattr(cfg, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < (0 if key == "retries" else 1e-9):
                raise ValueError(f"{key} {value!r}: expected a positive number")
        return cfg

    @property
    def prompt_template(self) -> str:
        return self.template or (POINTWISE_TEMPLATE if self.mode == "pointwise" else PAIRWISE_TEMPLATE)


# ----------------------------------------------------------------- asking


def http_chat(cfg: JudgeConfig) -> Callable[[str], str]:
    """``ask(question) -> answer`` through ``{url}/chat/completions``, with timeout and retries."""
    endpoint = cfg.url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get(cfg.api_key_env):
        headers["Authorization"] = f"Bearer {key}"

    def ask(question: str) -> str:
        body = {"model": cfg.model or "default_model", "messages": [{"role": "user", "content": question}],
                "max_tokens": cfg.max_tokens, "temperature": 0.0}
        request = urllib.request.Request(endpoint, json.dumps(body).encode(), headers)
        error: Exception = JudgeError("no try made")
        for attempt in range(int(cfg.retries) + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=cfg.timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                error = e
        reason = getattr(error, "reason", None) or error
        raise JudgeError(f"the judge at {cfg.url} did not answer after {int(cfg.retries) + 1} tries ({' '.join(str(reason).split())})")

    return ask


def local_chat(cfg: JudgeConfig) -> Callable[[str], str]:
    """``ask(question) -> answer`` from a model loaded here with mlx-lm (greedy)."""
    model, tokenizer = load(cfg.model)
    greedy = make_sampler(0.0)

    def ask(question: str) -> str:
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) \
            if getattr(tokenizer, "chat_template", None) else question + "\n"
        return generate(model, tokenizer, text, max_tokens=cfg.max_tokens, sampler=greedy)

    return ask


# ----------------------------------------------------------------- grading


def as_text(value) -> str:
    """A prompt or completion as the judge reads it: text, or a message list's turns."""
    if isinstance(value, str):
        return value
    turns = [m for m in value if isinstance(m, dict)]
    if len(turns) == 1 and turns[0].get("role") in ("assistant", "user"):
        return str(turns[0].get("content") or "")
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in turns)


def parse_score(answer: str) -> Optional[float]:
    hit = re.search(r"-?\d+(?:\.\d+)?", answer)
    return float(hit.group()) if hit else None


# A bare letter ("B", "(A).", "The answer is B"), or "Response A" named in a longer reply; the
# article "a" and a reply that starts "A great film ..." are not choices.
_BARE_CHOICE = re.compile(r"\W*(?:(?:the\s+)?(?:better\s+)?(?:answer|response|choice)(?:\s+is)?\s*[:\-]?\s*)?\(?([AB])\)?\W*", re.I)
_NAMED_CHOICE = re.compile(r"\bResponse\s+([AB])\b")


def parse_choice(answer: str) -> Optional[str]:
    bare = _BARE_CHOICE.fullmatch(answer.strip())
    if bare and bare.group(1) in "AB":
        return bare.group(1)
    named = set(_NAMED_CHOICE.findall(answer))
    return named.pop() if len(named) == 1 else None


def groups_of(prompts: list) -> list[list[int]]:
    """Indices of consecutive completions that share one prompt."""
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if out and prompts[out[-1][0]] == p:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@dataclass
class Judge:
    """A judge as a reward function: ``judge(prompts, completions, **_) -> list[float | None]``."""

    cfg: JudgeConfig
    ask: Callable[[str], str]
    threads: int = 1
    __name__: str = field(init=False)

    def __post_init__(self):
        self.__name__ = self.cfg.name

    def answers(self, questions: list[str]) -> list[str]:
        if self.threads <= 1 or len(questions) <= 1:
            return [self.ask(q) for q in questions]
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            return list(pool.map(self.ask, questions))

    def __call__(self, prompts: list, completions: list, **_) -> list[Optional[float]]:
        texts, asked = [as_text(c) for c in completions], [as_text(p) for p in prompts]
        template = self.cfg.prompt_template
        if self.cfg.mode == "pointwise":
            questions = [template.replace("{prompt}", p).replace("{completion}", c) for p, c in zip(asked, texts)]
            return [parse_score(a) for a in self.answers(questions)]
        duels = [(i, j) for g in groups_of(asked) for i in g for j in g if i != j]  # (A, B): both orders
        questions = [template.replace("{prompt}", asked[i]).replace("{a}", texts[i]).replace("{b}", texts[j]) for i, j in duels]
        wins, judged = [0.0] * len(texts), [0] * len(texts)
        for (i, j), answer in zip(duels, self.answers(questions)):
            if (choice := parse_choice(answer)) is not None:
                winner = i if choice == "A" else j
                wins[winner] += 1.0
                judged[i] += 1
                judged[j] += 1
        return [w / n if n else None for w, n in zip(wins, judged)]


def make_judge(block: dict) -> Judge:
    """The judge a ``judge:`` block describes (a local model is loaded now)."""
    cfg = JudgeConfig.from_dict(block)
    if cfg.url:
        return Judge(cfg, http_chat(cfg), int(cfg.concurrency))
    return Judge(cfg, local_chat(cfg), 1)
