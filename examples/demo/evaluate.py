"""Does preference training change what the model writes? Sample, classify, measure the KL.

    python examples/demo/evaluate.py --model examples/demo/model --adapter-path adapters/quickstart

Samples ``--n`` completions (temperature 1.0, fixed seed) for prompts about
items that appear in no training text, and prints, for the base model and
(if given) the model with the adapter: the share of positive reviews by the
word-list classifier in ``reviews.py`` (whose accuracy on held-out corpus
reviews is printed too), the mean completion length, and a sampled estimate of
the per-token KL divergence from the base model,
``E_y~π [log π(y|x) - log π_base(y|x)] / E[len y]``. With ``--coh`` the
adapter is a Chain of Hindsight one: its prompts end with the positive phrase
it was trained with (the base model's too, for its KL), and each completion is
cut where the negative phrase begins.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import mlx_dpo  # noqa: E402,F401  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

from mlx_dpo.compute.batching import pad_batch  # noqa: E402
from mlx_dpo.generate import coh_phrases  # noqa: E402
from mlx_dpo.compute.logps import get_batched_logps  # noqa: E402
from reviews import is_positive, prompt_for, review, split_items  # noqa: E402


def classifier_accuracy(items: list[str], n: int = 400, seed: int = 12345) -> float:
    """Accuracy of ``is_positive`` on labelled reviews of held-out items."""
    rng = random.Random(seed)
    labels = [i % 2 == 0 for i in range(n)]
    texts = [review(rng.choice(items), lab, rng) for lab in labels]
    return float(np.mean([is_positive(t) == lab for t, lab in zip(texts, labels)]))


def prompts_for(items: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [prompt_for(rng.choice(items)) for _ in range(n)]


def encode_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False)


def sample(model, prompts: list[list[int]], max_tokens: int, temp: float, eos: set[int]) -> list[list[int]]:
    """Sampled completions (ending with EOS where one was drawn), prompts batched by length."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for length in sorted(groups):
        idx = groups[length]
        cache = make_prompt_cache(model)
        logits = model(mx.array([prompts[i] for i in idx]), cache=cache)[:, -1, :]
        done = np.zeros(len(idx), bool)
        for _ in range(max_tokens):
            tok = mx.random.categorical(logits.astype(mx.float32) / temp) if temp > 0 else mx.argmax(logits, axis=-1)
            toks = np.array(tok).tolist()
            for j, t in enumerate(toks):
                if not done[j]:
                    out[idx[j]].append(t)
                    done[j] = t in eos
            if done.all():
                break
            logits = model(tok[:, None], cache=cache)[:, -1, :]
    return out


def completion_logps(model, prompts: list[list[int]], completions: list[list[int]], batch: int = 50) -> np.ndarray:
    """Summed log-probability of each completion given its prompt."""
    res = []
    for i in range(0, len(prompts), batch):
        b = pad_batch([((p + c, len(p)),) for p, c in zip(prompts[i : i + batch], completions[i : i + batch])])
        res.append(np.array(get_batched_logps(model, b["tokens"], b["mask"])[0]))
    return np.concatenate(res)


def cut_at(ids: list[int], phrase: list[int]) -> list[int]:
    """``ids`` up to the first occurrence of ``phrase`` (a hindsight chain's negative phrase)."""
    for i in range(len(ids) - len(phrase) + 1):
        if ids[i : i + len(phrase)] == phrase:
            return ids[:i]
    return ids


def evaluate(model_path: str, adapter_path: str | None = None, n: int = 200, temp: float = 1.0, seed: int = 0,
             max_tokens: int = 64, coh: bool = False) -> list[dict]:
    """Rows of the table: one for the base model, one for the adapter (if given)."""
    _, held_out = split_items()
    base, tokenizer = load(model_path)
    eos = set(tokenizer.eos_token_ids) | {tokenizer.eos_token_id}
    plain = [encode_prompt(tokenizer, t) for t in prompts_for(held_out, n, seed)]
    rows = []
    for name, path in [("base", None)] + ([("adapter", adapter_path)] if adapter_path else []):
        model = base if path is None else load(model_path, adapter_path=path)[0]
        prompts, negative = plain, None
        if coh and path is not None:
            positive, negative = (tokenizer.encode(p, add_special_tokens=False) for p in coh_phrases(path))
            prompts = [p + positive for p in plain]
        mx.random.seed(seed)
        comps = sample(model, prompts, max_tokens, temp, eos)
        if negative:
            comps = [cut_at(c, negative) for c in comps]
        texts = [tokenizer.decode([t for t in c if t not in eos]) for c in comps]
        if path is None:
            kl = 0.0
        else:
            diff = completion_logps(model, prompts, comps) - completion_logps(base, prompts, comps)
            kl = float(diff.sum() / max(sum(len(c) for c in comps), 1))
        rows.append({
            "model": name if path is None else f"{name} ({path}{', positive phrase' if negative else ''})",
            "samples": n,
            "positive": float(np.mean([is_positive(t) for t in texts])),
            "mean_tokens": float(np.mean([len(c) for c in comps])),
            "kl_per_token": kl,
            "example": texts[0],
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(HERE / "model"))
    p.add_argument("--adapter-path", default=None)
    p.add_argument("--n", type=int, default=200, help="Completions sampled per model.")
    p.add_argument("--temp", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--coh", action="store_true", help="The adapter is Chain of Hindsight: prompt it with its positive phrase.")
    args = p.parse_args()

    _, held_out = split_items()
    print(f"Word-list classifier accuracy on 400 labelled held-out corpus reviews: {classifier_accuracy(held_out):.1%}")
    rows = evaluate(args.model, args.adapter_path, args.n, args.temp, args.seed, args.max_tokens, args.coh)
    print(f"\nPrompts about {len(held_out)} items never seen in training; temperature {args.temp}, seed {args.seed}.\n")
    print("| model | samples | positive | mean length (tokens) | KL from base (nats/token) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['samples']} | {r['positive']:.1%} | {r['mean_tokens']:.1f} | {r['kl_per_token']:.3f} |")
    print()
    for r in rows:
        print(f"{r['model']}: {r['example']!r}")


if __name__ == "__main__":
    main()
