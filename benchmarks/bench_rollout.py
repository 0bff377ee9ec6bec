"""Rollout throughput: ``sample_groups`` vs mlx-lm's ``batch_generate`` on the same work.

Both sample G completions for each prompt at temperature 1 with no EOS, so
every completion has exactly ``--max-tokens`` ids and both do the same number
of decode steps. mlx-lm gets each prompt G times (it has no notion of a
group, so it prefills each copy) and the same batch size for prefill and
decoding. Time includes prefill; one untimed warm-up round first.

    python benchmarks/bench_rollout.py --prompts 8 --G 8 --max-tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_dpo  # noqa: E402,F401  (loads the fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
from mlx_lm.generate import batch_generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

from mlx_dpo.online.rollout import SamplingParams, sample_groups  # noqa: E402


class NoEosTokenizer:
    """The tokenizer with no EOS ids, so ``batch_generate`` never stops early."""

    eos_token_ids: list[int] = []

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random ids, lengths in [length/2, length]: padding matters as in real prompts."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(max(1, length // 2), length))] for _ in range(n)]


def time_rounds(fn, rounds: int) -> tuple[float, int]:
    fn(0)  # warm-up
    times, tokens = [], 0
    for r in range(rounds):
        mx.random.seed(r)
        tic = time.perf_counter()
        tokens = fn(r)
        times.append(time.perf_counter() - tic)
    return statistics.median(times), tokens


def engines(model, tokenizer, prompts: list[list[int]], G: int, T: int, batch: int):
    """``(ours, theirs)``: each samples G completions of T tokens per prompt (temperature 1, no EOS)
    with ``batch`` rows decoded together, and returns the number of completion tokens."""
    params = SamplingParams(temperature=1.0, max_tokens=T)

    def ours(_: int) -> int:
        comps = sample_groups(model, prompts, G, params, [], max_batch=batch)
        return sum(len(c.token_ids) for c in comps)

    repeated = [q for q in prompts for _ in range(G)]
    no_eos = NoEosTokenizer(tokenizer)

    def theirs(_: int) -> int:
        out = batch_generate(
            model, no_eos, repeated, max_tokens=T, return_token_ids=True, sampler=make_sampler(temp=1.0),
            completion_batch_size=batch, prefill_batch_size=batch,
        )
        return sum(len(t) for t in out.token_ids)

    return ours, theirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="Model path (default: a random 256-wide, 4-layer Llama, vocabulary 2048).")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--G", type=int, default=8, help="Completions per prompt.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64, help="Longest prompt (shortest: half).")
    p.add_argument("--max-batch", type=int, default=64, help="Rows decoded together, for both engines.")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    if args.model:
        path = args.model
    else:
        from mlx_dpo.toy import make_model

        path = str(make_model(tempfile.mkdtemp(), hidden_size=256, num_layers=4, vocab_size=2048, tokenizer_vocab=512))
    model, tokenizer = load(path)
    model.eval()
    prompts = make_prompts(args.prompts, args.prompt_len, min(tokenizer.vocab_size, 512), seed=0)
    G, T = args.G, args.max_tokens
    ours, theirs = engines(model, tokenizer, prompts, G, T, args.max_batch)

    rows = []
    for name, fn in (("mlx_dpo sample_groups", ours), ("mlx_lm batch_generate", theirs)):
        seconds, tokens = time_rounds(fn, args.rounds)
        rows.append((name, seconds, tokens))
    base = rows[1][2] / rows[1][1]
    print(
        f"\n{args.prompts} prompts x G={G}, {T} tokens each, prompts of {args.prompt_len // 2}-{args.prompt_len}"
        f" tokens, max batch {args.max_batch}, median of {args.rounds} rounds\n"
    )
    print("| engine | completion tokens | median s | tokens/s | vs mlx_lm |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, tokens in rows:
        tps = tokens / seconds
        print(f"| {name} | {tokens} | {seconds:.3f} | {tps:,.0f} | {tps / base:.2f}x |")


if __name__ == "__main__":
    main()
