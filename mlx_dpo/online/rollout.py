"""Rollouts for on-policy RL (GRPO): G sampled completions per prompt, as token ids.

Batching design. Prompts are sorted by length and cut into batches of whole
groups (``max_batch // G`` prompts, so at most ``max_batch`` rows; a group
larger than ``max_batch`` is split over several batches). For each batch:

1. *Prefill once per prompt.* The distinct prompts of the batch, minus their
   last token, go through the model in ONE forward pass, right-padded to the
   longest. mlx-lm's batch caches (``BatchKVCache`` & co., built by merging
   empty ``make_prompt_cache`` caches) are told the padding (``prepare``) and
   afterwards roll it to the left (``finalize``): the causal mask keeps real
   tokens from ever seeing the right padding, so nothing is fully masked
   (no NaN) and RoPE positions are exact.
2. *Share.* ``cache.filter([0]*G + [1]*G + ...)`` gathers each prompt's
   keys/values G times along the batch axis; the prompts are never re-run.
3. *Decode.* Every row starts from its prompt's last token; each step is one
   ``(B, 1)`` forward pass whose per-row left padding is masked by the cache
   (the model's own, or ``compute.decode``'s with ``fast_decode``).
   Step t+1 is queued (``mx.async_eval``) before the tokens of step t are read,
   so Python bookkeeping overlaps the model. A row stops at an EOS id (kept)
   or at ``max_tokens``; finished rows are dropped from the cache right away,
   so long tails decode with small batches; the batch ends when all rows did.

Sorting by length keeps the padding small; padding is masked, so it only costs
compute, never correctness. Randomness is MLX's global state (seed it first).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..compute.decode import Step, decode_weights
from ..compute.forward import eval_mode
from ..compute.streams import blas_threads

PREFILL_STEP = 2048  # prompt tokens per forward pass: bounds the prefill's memory
SAMPLE_BLOCK = 1024  # vocabulary entries summed together by host_sample


@dataclass
class SamplingParams:
    """How tokens are drawn; the filters act on the temperature-scaled distribution (as in TRL/vLLM)."""

    temperature: float = 1.0
    top_p: float = 1.0  # 1.0 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    max_tokens: int = 256  # max completion length
    threads: int = 0  # BLAS threads while sampling (0: as the run set them); what is drawn does not depend on it
    fast_decode: bool = False  # decode steps through compute/decode.py (the CPU kernel, or merged adapters)


@dataclass
class Completion:
    prompt_index: int  # index into the prompts list given
    token_ids: list[int]  # sampled ids, INCLUDING the final EOS token when one was drawn
    finished: bool  # True iff it ended with an EOS token (False = hit max_tokens)


def eos_ids_of(tokenizer) -> set[int]:
    """Every id that ends a completion: the tokenizer's EOS and any others it lists."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or []) | {tokenizer.eos_token_id}
    ids.discard(None)
    return ids


def _check(params: SamplingParams) -> None:
    if not params.temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {params.top_k}")
    if not 0 <= params.min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {params.min_p}")
    if params.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")


def make_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """``(B, V)`` logits -> ``(B,)`` token ids.

    Order: logits / T, then top-k, top-p, min-p, each on what the previous one
    left (HF's order). Ties at a cut-off are kept. T = 0 is argmax. With
    ``fast_decode`` and no filter, ``host_sample`` draws from the same distribution.
    """
    if params.temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    if params.fast_decode and params.top_k == 0 and params.top_p == 1.0 and params.min_p == 0.0:
        return partial(host_sample, inv_t=1.0 / params.temperature)
    inv_t, k, top_p, min_p = 1.0 / params.temperature, params.top_k, params.top_p, params.min_p
    neg_inf = mx.array(-math.inf, mx.float32)

    def sample(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32) * inv_t
        vocab = logits.shape[-1]
        if 0 < k < vocab:  # keep logits >= the k-th largest
            kth = mx.partition(logits, vocab - k, axis=-1)[..., vocab - k : vocab - k + 1]
            logits = mx.where(logits < kth, neg_inf, logits)
        if top_p < 1.0:  # keep a token iff the mass strictly before it (sorted desc.) is < top_p
            desc = -mx.sort(-logits, axis=-1)
            probs = mx.softmax(desc, axis=-1)
            before = mx.cumsum(probs, axis=-1) - probs
            cut = mx.min(mx.where(before < top_p, desc, math.inf), axis=-1, keepdims=True)
            logits = mx.where(logits < cut, neg_inf, logits)
        if min_p > 0.0:  # keep p >= min_p * p_max
            top = mx.max(logits, axis=-1, keepdims=True)
            logits = mx.where(logits < top + math.log(min_p), neg_inf, logits)
        return mx.random.categorical(logits)

    return sample


def host_sample(logits: mx.array, inv_t: float) -> mx.array:
    """``softmax(logits / T)`` sampled by inverting its cumulative sum at one MLX uniform per row
    (so ``mx.random.seed`` still decides the draw), in NumPy. On a CPU, MLX's ``exp`` and ``log``
    are scalar and its Gumbel draw costs two of them per vocabulary entry; NumPy's are
    vectorised. The exponentials are float32 (the float32 logits already carry more rounding than
    their ``exp`` adds), summed in float64 over blocks of ``SAMPLE_BLOCK`` entries: the uniform
    picks a block from the blocks' running sum, then an entry from that block's own."""
    u = np.asarray(mx.random.uniform(shape=(logits.shape[0],)), np.float64)
    z = np.asarray(logits.astype(mx.float32)) * np.float32(inv_t)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    vocab, starts = e.shape[1], np.arange(0, e.shape[1], SAMPLE_BLOCK)
    running = np.cumsum(np.add.reduceat(e, starts, axis=1, dtype=np.float64), axis=1)
    ids = []
    for row, sums, x in zip(e, running, u):
        target = x * sums[-1]  # the first index whose cumulative mass exceeds it: P(j) = p_j
        b = min(int(np.searchsorted(sums, target, side="right")), starts.size - 1)
        lo, hi = int(starts[b]), min(int(starts[b]) + SAMPLE_BLOCK, vocab)
        within = np.cumsum(row[lo:hi], dtype=np.float64) + (sums[b - 1] if b else 0.0)
        j = lo + int(np.searchsorted(within, target, side="right"))
        # Past the block's own sum (the two sums round apart): its last entry with mass.
        ids.append(j if j < hi else int(np.flatnonzero(row[:hi])[-1]))
    return mx.array(ids, mx.uint32)


def _merge(caches: list[list]) -> list:
    """Per layer, one batch cache from per-row caches (mlx-lm picks the batch class)."""
    return [type(layer[0]).merge(list(layer)) for layer in zip(*caches)]


def _prefill(model: nn.Module, prompts: list[list[int]]) -> list:
    """Batch cache holding ``prompt[:-1]`` of each prompt, left-aligned padding masked."""
    cache = _merge([make_prompt_cache(model) for _ in prompts])
    bodies = [p[:-1] for p in prompts]
    width = max(len(b) for b in bodies)
    if width == 0:
        return cache
    lengths = [len(b) for b in bodies]
    padding = [width - n for n in lengths]
    if max(padding) > 0:
        for c in cache:
            c.prepare(lengths=lengths, right_padding=padding)
    tokens = mx.array([b + [0] * (width - len(b)) for b in bodies])
    for start in range(0, width, PREFILL_STEP):
        model(tokens[:, start : start + PREFILL_STEP], cache=cache)
        mx.eval([c.state for c in cache])
    if max(padding) > 0:
        for c in cache:
            c.finalize()
        mx.eval([c.state for c in cache])
    return cache


def _decode(
    step: Step,
    first: list[int],
    sampler: Callable[[mx.array], mx.array],
    eos: frozenset[int],
    max_tokens: int,
) -> list[tuple[list[int], bool]]:
    """Sample from a filled batch cache until every row has an EOS or ``max_tokens`` ids.
    ``step``: ids -> next-token logits, its cache growing a slot (``compute.decode``)."""
    out: list[list[int]] = [[] for _ in first]
    done = [False] * len(first)
    alive = list(range(len(first)))  # original row of each cache row

    y = sampler(step(mx.array(first)))
    mx.async_eval(y)
    for n in range(1, max_tokens + 1):
        nxt = None
        if n < max_tokens:  # queue the next step before reading this one
            nxt = sampler(step(y))
            mx.async_eval(nxt)
        keep = []
        for j, tok in enumerate(y.tolist()):
            row = alive[j]
            out[row].append(tok)
            if tok in eos:
                done[row] = True
            else:
                keep.append(j)
        if nxt is None or not keep:
            break
        if len(keep) < len(alive):  # drop finished rows: later steps cost less
            step.keep_rows(keep)
            nxt = nxt[mx.array(keep)]
            alive = [alive[j] for j in keep]
        y = nxt
    return list(zip(out, done))


def _batches(lengths: Sequence[int], group: int, max_batch: int) -> Iterable[tuple[list[int], list[list[int]]]]:
    """``(prompt indices to prefill, [row -> position in that list] per decode batch)``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if group <= max_batch:
        per = max_batch // group
        for s in range(0, len(order), per):
            chunk = order[s : s + per]
            yield chunk, [[j for j in range(len(chunk)) for _ in range(group)]]
    else:  # one prompt, its group split over several decode batches
        for i in order:
            yield [i], [[0] * min(max_batch, group - s) for s in range(0, group, max_batch)]


def sample_groups(
    model: nn.Module,
    prompts: list[list[int]],
    num_generations: int,
    params: SamplingParams,
    eos_ids: set[int] | list[int],
    max_batch: int = 64,
    keep: Optional[dict] = None,
) -> list[Completion]:
    """num_generations completions per prompt, grouped: result[i*G + g] belongs to prompts[i].

    The model is put in eval mode (no dropout, e.g. LoRA's) while sampling
    and its previous training mode is restored afterwards; ``params.fast_decode`` runs the decode
    steps as ``compute.decode`` says (the model's own layers are back afterwards), its packed
    weights kept in ``keep`` for the next call.
    """
    _check(params)
    G = num_generations
    if G < 1 or max_batch < 1:
        raise ValueError(f"num_generations and max_batch must be >= 1, got {G} and {max_batch}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    eos = frozenset(int(t) for t in eos_ids)
    sampler = make_sampler(params)
    result: list[Completion | None] = [None] * (len(prompts) * G)
    threads = blas_threads(params.threads) if params.threads else contextlib.nullcontext()
    with eval_mode(model), threads, decode_weights(model, params.fast_decode, params.threads, keep) as decoding:
        for chunk, row_batches in _batches([len(p) for p in prompts], G, max_batch):
            cache = _prefill(model, [list(prompts[i]) for i in chunk])
            for b, rows in enumerate(row_batches):
                rows_cache = cache if b == len(row_batches) - 1 else copy.deepcopy(cache)
                idx = mx.array(rows)
                for c in rows_cache:
                    c.filter(idx)
                first = [prompts[chunk[j]][-1] for j in rows]
                with decoding(rows_cache, params.max_tokens) as step:
                    outs = _decode(step, first, sampler, eos, params.max_tokens)
                seen: dict[int, int] = {}
                for j, (ids, finished) in zip(rows, outs):
                    i = chunk[j]
                    g = seen.get(i, b * max_batch if len(row_batches) > 1 else 0)
                    seen[i] = g + 1
                    result[i * G + g] = Completion(i, ids, finished)
            del cache
    return result  # type: ignore[return-value]


def rollout_problem(model: nn.Module, fast_decode: bool = False) -> Optional[str]:
    """Why this model cannot sample batches of prompts (None if it can), found by sampling three
    prompts of different lengths greedily for two steps (as the run will: ``fast_decode``) and
    decoding each alone without a cache: the padded batch cache is mlx-lm's, and an attention
    layer that cannot take its per-row mask fails, or samples other tokens, here rather than mid-run."""
    prompts, kind = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]], getattr(model, "model_type", "this model")
    try:
        with eval_mode(model):
            batched = sample_groups(model, prompts, 1, SamplingParams(temperature=0.0, max_tokens=2, fast_decode=fast_decode), eos_ids=[])
            for c in batched:
                seq = list(prompts[c.prompt_index])
                for _ in range(2):
                    seq.append(int(model(mx.array([seq]))[0, -1].argmax()))
                if seq[-2:] != c.token_ids:
                    return f"{kind}'s greedy tokens from mlx-lm's batch cache differ from decoding one prompt without a cache"
    except Exception as e:  # noqa: BLE001 - any failure means: not supported
        first = str(e).splitlines()[0] if str(e) else ""
        return f"{kind} cannot sample a padded batch of prompts with mlx-lm's batch cache ({type(e).__name__}: {first})"
    return None
