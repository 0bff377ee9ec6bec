"""``python -m mlx_dpo.generate``: sample from a model with (or without) trained adapters.

The prompt goes through the tokenizer's chat template, as training on
conversational data does; ``--ignore-chat-template`` feeds it as raw text, as
training on plain-string prompts does. ``--coh`` asks a Chain of Hindsight
adapter for its positive answer: the prompt ends with the positive phrase it was
trained with, and the answer ends where the negative phrase would begin.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.generate import generate as mlx_lm_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load

from .data import COH_NEGATIVE, COH_POSITIVE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate text with an mlx-dpo (or mlx-lm) adapter.")
    p.add_argument("--model", required=True, help="Hub id or local path of the base model.")
    p.add_argument("--adapter-path", default=None, help="Folder with adapters.safetensors and adapter_config.json.")
    p.add_argument("--prompt", "-p", default="Hello", help="The user message (or raw text with --ignore-chat-template).")
    p.add_argument("--system-prompt", default=None, help="Optional system message.")
    p.add_argument("--ignore-chat-template", action="store_true", help="Use the prompt as raw text.")
    p.add_argument("--max-tokens", "-m", type=int, default=100, help="Maximum tokens to generate.")
    p.add_argument("--temp", type=float, default=0.0, help="Sampling temperature (0: greedy).")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold.")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed.")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow custom code from the model repo.")
    p.add_argument("--coh", action="store_true", help="Chain of Hindsight: end the prompt with the positive phrase, stop at the negative one.")
    p.add_argument("--coh-positive", default=None, help="The positive phrase (default: the adapter's coh_positive, else 'A helpful answer: ').")
    p.add_argument("--coh-negative", default=None, help="The negative phrase (default: the adapter's coh_negative, else ' An unhelpful answer: ').")
    return p


def coh_phrases(adapter_path: Optional[str], positive: Optional[str] = None, negative: Optional[str] = None) -> tuple[str, str]:
    """The hindsight phrases: as given, else as the adapter was trained with, else the defaults."""
    saved = {}
    config = Path(adapter_path) / "adapter_config.json" if adapter_path else None
    if config is not None and config.is_file():
        saved = json.loads(config.read_text())
    return (
        positive if positive is not None else saved.get("coh_positive", COH_POSITIVE),
        negative if negative is not None else saved.get("coh_negative", COH_NEGATIVE),
    )


def cut_at_phrase(text: str, phrase: str) -> str:
    """The answer before the first ``phrase`` (a hindsight chain's next feedback phrase)."""
    at = text.find(phrase.strip())
    return (text[:at] if at >= 0 else text).rstrip()


def format_prompt(tokenizer, prompt: str, system_prompt: Optional[str] = None, use_chat_template: bool = True) -> list[int]:
    """Token ids for ``prompt``, rendered with the chat template when there is one."""
    if use_chat_template and tokenizer.chat_template is not None:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    return tokenizer.encode(text)


def main(argv: Optional[list[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    mx.random.seed(args.seed)
    model, tokenizer = load(
        args.model,
        adapter_path=args.adapter_path,
        tokenizer_config={"trust_remote_code": args.trust_remote_code},
        trust_remote_code=args.trust_remote_code,
    )
    prompt = format_prompt(tokenizer, args.prompt, args.system_prompt, not args.ignore_chat_template)
    sampler = make_sampler(temp=args.temp, top_p=args.top_p if args.top_p < 1.0 else 0.0)
    if not args.coh:
        return mlx_lm_generate(model, tokenizer, prompt, verbose=True, max_tokens=args.max_tokens, sampler=sampler)
    positive, negative = coh_phrases(args.adapter_path, args.coh_positive, args.coh_negative)
    prompt = list(prompt) + tokenizer.encode(positive, add_special_tokens=False)  # as training joined them
    text = cut_at_phrase(mlx_lm_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler), negative)
    print(text)
    return text


if __name__ == "__main__":
    main()
