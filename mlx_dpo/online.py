"""Online training as a batch source: prompts -> rollouts -> rewards -> advantages -> batches.

The trainer pulls batches from ``iterate(prompts, batch_size, ...)`` exactly as
it pulls preference batches, and never learns that these are sampled by the
policy it is training. One *generation batch* is ``batch_size`` prompts (over
all ranks) times ``grad_accumulation_steps``, with ``num_generations``
completions each: it is sampled once, scored once by every reward function,
then yielded as micro-batches ``num_iterations`` times (GRPO's mu). Old-policy
log-probs are computed only when mu > 1; reference log-probs only when
``beta > 0``. A resumed run starts at a generation boundary and seeds each
generation from (seed, generation index, rank), so it samples what an
uninterrupted run would have sampled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .batching import pad_batch
from .data.prompts import Prompt
from .advantages import combine_rewards, group_advantages
from .policy_losses import grpo_loss
from .prefix import sequence_token_logps, shared_prefix_fields, with_shared_prefix
from .reference import adapters_disabled
from .rewards import RewardError, score_completions
from .rollout import Completion, SamplingParams, eos_ids_of, sample_groups
from .trainer import BatchSourceError

TokenLogpsFn = Callable[[dict], mx.array]  # batch -> per-token log-probs, aligned with its response mask


@dataclass
class OnlineArgs:
    """What a generation batch is and how it is turned into training rows (TRL's names)."""

    num_generations: int = 8
    num_iterations: int = 1
    grad_accumulation_steps: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    reward_weights: Optional[Sequence[float]] = None
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    beta: float = 0.0
    loss_type: str = "dapo"
    chunk_size: int = 0  # positions per vocabulary projection (0: all at once); see logps.get_token_logps
    pad_multiple: int = 32  # fewer distinct widths: fewer traces of the compiled step
    share_prefix: bool = False  # each prompt runs once for its G completions (see prefix.py)


class RolloutError(BatchSourceError):
    """A reward function failed; the message names it and the problem."""


def token_reference(
    model: nn.Module, reference_model: Optional[nn.Module], temperature: float, chunk_size: int = 0
) -> TokenLogpsFn:
    """Reference per-token log-probs (no gradient): the separate model, or the policy with its adapters bypassed."""

    def fn(batch: dict) -> mx.array:
        if reference_model is not None:
            return mx.stop_gradient(sequence_token_logps(reference_model, batch, temperature, chunk_size=chunk_size)[0])
        with adapters_disabled(model):
            return mx.stop_gradient(sequence_token_logps(model, batch, temperature, chunk_size=chunk_size)[0])

    return fn


def _stats(completions: list[Completion], rewards: np.ndarray, names: list[str], seconds: float) -> dict[str, float]:
    lengths = np.array([len(c.token_ids) for c in completions], dtype=np.float64)
    finished = np.array([c.finished for c in completions])
    out = {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(1.0 - finished.mean()),
    }
    for j, name in enumerate(names):
        col = rewards[:, j]
        ok = col[~np.isnan(col)]
        out[f"rewards/{name}/mean"] = float(ok.mean()) if ok.size else 0.0
        out[f"rewards/{name}/std"] = float(ok.std(ddof=1)) if ok.size > 1 else 0.0
    return out


def score_rollouts(
    tokenizer, reward_funcs: list[tuple[str, Callable]], chunk: Sequence[Prompt], completions: list[Completion], eos_ids: set
) -> np.ndarray:
    """(N, F) rewards of each completion by each function: text (or an assistant message for
    conversational prompts), ids and the prompts' columns go to the functions; a failure is a
    ``RolloutError`` naming the function."""
    prompts = [chunk[c.prompt_index].prompt for c in completions]
    ids = [list(c.token_ids) for c in completions]
    texts = [completion_text(tokenizer, c, eos_ids) for c in ids]
    conversational = [isinstance(p, list) for p in prompts]
    shown = [[{"role": "assistant", "content": t}] if conv else t for t, conv in zip(texts, conversational)]
    keys = sorted({k for p in chunk for k in p.columns})
    columns = {k: [chunk[c.prompt_index].columns.get(k) for c in completions] for k in keys}
    try:
        return score_completions(reward_funcs, prompts, shown, ids, columns)
    except RewardError as e:
        raise RolloutError(str(e)) from None


def completion_text(tokenizer, ids: Sequence[int], eos_ids: set) -> str:
    """A sampled completion as the reward functions read it: decoded, without EOS or special tokens."""
    return tokenizer.decode([t for t in ids if t not in eos_ids], skip_special_tokens=True)


def process_ranks(comm_group: Optional[mx.distributed.Group], batch_size: int) -> tuple[int, int]:
    """``(rank, world)``; a batch that cannot be split evenly over the processes is a ValueError."""
    rank, world = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world})")
    return rank, world


def sampled_generations(
    model: nn.Module, prompts: Sequence[Prompt], per_generation: int, num_generations: int, sampling: SamplingParams,
    eos_ids: set, seed: int, shuffle: bool, drop_last: bool, loop: bool, skip: int, rank: int, world: int,
) -> Iterator[tuple[int, np.ndarray, list[Prompt], list[Completion], float]]:
    """``(generation, this rank's prompt indices, its prompts, their completions, sampling seconds)``
    for each generation batch after the first ``skip``; each is seeded from (seed, generation, rank),
    so a resumed run samples what an uninterrupted one would have."""
    for generation, picked in prompt_batches(len(prompts), per_generation, seed, shuffle, drop_last, loop):
        if generation <= skip:
            continue
        mine = picked[rank::world]
        chunk = [prompts[j] for j in mine]
        tic = time.perf_counter()
        mx.random.seed(rollout_seed(seed, generation, rank))
        comps = sample_groups(model, [p.ids for p in chunk], num_generations, sampling, eos_ids) if chunk else []
        yield generation, mine, chunk, comps, time.perf_counter() - tic


def raise_if_any_failed(failure: Optional[RolloutError], comm_group: Optional[mx.distributed.Group]) -> None:
    """A collective every rank joins, failed or not: this rank's failure, or one on another rank, is raised."""
    if _all_sum(np.array([failure is not None], np.float64), comm_group)[0]:
        raise failure or RolloutError("a reward function failed on another process (see its output)")


def prompt_batches(
    n: int, per_generation: int, seed: int, shuffle: bool, drop_last: bool, loop: bool
) -> Iterator[tuple[int, np.ndarray]]:
    """``(generation, prompt indices)`` for each generation batch: a fresh seeded order each epoch
    (``shuffle``), the last short batch kept unless ``drop_last``, epochs repeated while ``loop``."""
    generation, epoch = 0, 0
    while True:
        order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
        end = n - per_generation + 1 if drop_last else n
        for i in range(0, max(end, 0), per_generation):
            generation += 1
            yield generation, order[i : i + per_generation]
        epoch += 1
        if not loop:
            return


def rollout_seed(seed: int, generation: int, rank: int) -> int:
    """The sampling seed of one generation batch on one rank."""
    return (seed * 1_000_003 + generation * 7919 + rank * 104_729 + 17) % (2**31)


def make_rollout_source(
    model: nn.Module,
    tokenizer,
    reward_funcs: list[tuple[str, Callable]],
    args: OnlineArgs,
    reference: Optional[TokenLogpsFn] = None,
) -> Callable[..., Iterator[dict]]:
    """A batch iterator with ``iterate_batches``' signature whose batches are fresh rollouts."""
    eos_ids = eos_ids_of(tokenizer)
    names = [name for name, _ in reward_funcs]
    G, mu = args.num_generations, args.num_iterations
    temperature = args.sampling.temperature if args.sampling.temperature > 0 else 1.0

    def score(chunk: list[Prompt], completions: list[Completion]) -> np.ndarray:
        return score_rollouts(tokenizer, reward_funcs, chunk, completions, eos_ids)

    def micro_batch(chunk: list[Prompt], comps: list[Completion], adv: np.ndarray, keep_old: bool) -> dict:
        rows = [(chunk[c.prompt_index].ids + list(c.token_ids), len(chunk[c.prompt_index].ids)) for c in comps]
        pad_id = tokenizer.eos_token_id or 0
        batch = pad_batch([(r,) for r in rows], pad_id=pad_id, pad_multiple=args.pad_multiple)
        # Rows are random prompts, not length-grouped: a coarse start bounds the compiled step's traces.
        batch["logits_from"] = batch["logits_from"] // args.pad_multiple * args.pad_multiple
        if args.share_prefix:  # the G completions of a prompt are consecutive and share it
            local = {i: n for n, i in enumerate(dict.fromkeys(c.prompt_index for c in comps))}
            shared = shared_prefix_fields(rows, [local[c.prompt_index] for c in comps], pad_id, args.pad_multiple)
            if shared is not None:
                batch = with_shared_prefix(batch, shared)
        if args.mask_truncated_completions:
            keep = mx.array([1.0 if c.finished else 0.0 for c in comps])[:, None]
            for key in ("mask", "suffix_mask"):
                if key in batch:
                    batch[key] = batch[key] * keep
        batch["advantages"] = mx.array(adv.astype(np.float32))
        if keep_old:  # the policy that sampled (dropout off, as when sampling), frozen for the mu steps
            training = model.training
            model.eval()
            old = sequence_token_logps(model, batch, temperature, chunk_size=args.chunk_size)[0]
            batch["old_logps"] = mx.stop_gradient(old)
            mx.eval(batch["old_logps"])
            model.train(training)
        if args.beta != 0.0 and reference is not None:
            batch["ref_logps"] = reference(batch)
        mx.eval({k: v for k, v in batch.items() if isinstance(v, mx.array)})
        return batch

    def iterate(
        prompts: Sequence[Prompt],
        batch_size: int,
        loop: bool = False,
        seed: int = 0,
        comm_group: Optional[mx.distributed.Group] = None,
        shuffle: bool = True,
        drop_last: bool = True,
        skip: int = 0,
        **_ignored,
    ) -> Iterator[dict]:
        rank, world = process_ranks(comm_group, batch_size)
        accum = args.grad_accumulation_steps if loop else 1
        reuse = mu if loop else 1
        per_generation = batch_size * accum  # prompts over all ranks
        if drop_last and len(prompts) < per_generation:
            raise ValueError(f"{len(prompts)} prompts, fewer than one generation batch ({per_generation})")
        steps_per_generation = accum * reuse
        if skip % steps_per_generation:
            raise ValueError(f"cannot resume at step {skip}: not a multiple of {steps_per_generation} (a generation batch)")
        generations = sampled_generations(model, prompts, per_generation, G, args.sampling, eos_ids, seed, shuffle,
                                          drop_last, loop, skip // steps_per_generation, rank, world)
        for _, mine, chunk, comps, rollout_s in generations:
            # Every rank takes part in every collective below, in the same order, even with
            # no prompts (a short last evaluation batch) or a failed reward function.
            failure = None
            try:
                rewards = score(chunk, comps) if chunk else np.zeros((0, len(names)))
            except RolloutError as e:
                failure, rewards = e, np.zeros((0, len(names)))
            raise_if_any_failed(failure, comm_group)
            combined = combine_rewards(rewards, args.reward_weights)
            batch_std = _global_std(combined, comm_group) if args.scale_rewards == "batch" else None
            kept = [len(c.token_ids) for c in comps if c.finished or not args.mask_truncated_completions]
            tokens = float(sum(kept))
            normalizer = _all_sum(np.array([tokens]), comm_group)[0] / (world * accum)
            if not chunk:
                continue
            adv, stats = group_advantages(combined, G, args.scale_rewards, batch_std)
            stats.update(_stats(comps, rewards, names, rollout_s))
            per_step = -(-len(chunk) // accum)
            batches = []
            for s in range(0, len(chunk), per_step):
                sel = [k for k, c in enumerate(comps) if s <= c.prompt_index < s + per_step]
                b = micro_batch(chunk, [comps[k] for k in sel], adv[sel], reuse > 1)
                b["normalizer"] = mx.array(normalizer, mx.float32)
                b["stats"] = {k: mx.array(v, mx.float32) for k, v in stats.items()}
                # Summed over a report window: counted once per generation batch.
                b["stats"]["time/rollout"] = mx.array(rollout_s if s == 0 else 0.0, mx.float32)
                b["stats"]["count/completion_tokens"] = mx.array(tokens if s == 0 else 0.0, mx.float32)
                b["index"] = mx.array(np.asarray(mine, dtype=np.int32)[s : s + per_step])
                batches.append(b)
            yield from batches
            once = {"time/rollout": mx.array(0.0), "count/completion_tokens": mx.array(0.0)}
            for _ in range(reuse - 1):  # mu > 1: the same rows again, their sampling cost already counted
                yield from ({**b, "stats": {**b["stats"], **once}} for b in batches)

    return iterate


def _all_sum(values: np.ndarray, group: Optional[mx.distributed.Group]) -> np.ndarray:
    """Element-wise sum over all ranks (the values themselves on one)."""
    values = np.asarray(values, dtype=np.float64)
    if group is None or group.size() == 1:
        return values
    return np.array(mx.distributed.all_sum(mx.array(values.astype(np.float32)), group=group, stream=mx.cpu), np.float64)


def _global_std(rewards: np.ndarray, group: Optional[mx.distributed.Group]) -> float:
    """Std (Bessel) of the valid rewards over all ranks (``scale_rewards: batch``), in two passes:
    the mean first, then the squared deviations, so float32 sums keep their precision."""
    ok = rewards[~np.isnan(rewards)]
    n, total = _all_sum(np.array([ok.size, ok.sum()]), group)
    if n < 2:
        return float("nan")
    mean = total / n
    squares = _all_sum(np.array([((ok - mean) ** 2).sum()]), group)[0]
    return float(np.sqrt(squares / (n - 1)))


def make_online_loss(args: OnlineArgs, epsilon: float, epsilon_high: Optional[float], importance_sampling_level: str,
                     max_completion_length: int) -> Callable[[nn.Module, dict], tuple[mx.array, dict]]:
    """``loss_fn(model, batch)`` for rollout batches: per-token log-probs, then ``grpo_loss``."""
    temperature = args.sampling.temperature if args.sampling.temperature > 0 else 1.0

    def loss_fn(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
        logps, entropy, mask = sequence_token_logps(model, batch, temperature, True, args.chunk_size)
        loss, metrics = grpo_loss(
            logps, batch["advantages"], mask, batch.get("old_logps"), batch.get("ref_logps"),
            beta=args.beta, epsilon=epsilon, epsilon_high=epsilon_high, loss_type=args.loss_type,
            importance_sampling_level=importance_sampling_level, max_completion_length=max_completion_length,
            normalizer=batch.get("normalizer"),
        )
        metrics["entropy"] = (entropy * mask).sum() / mx.maximum(mask.sum(), 1.0)
        n = mx.array(logps.shape[0], mx.float32)
        ntoks = batch["lengths"].sum().astype(mx.float32)
        return loss, {**metrics, **batch["stats"], "weight": n, "count": n, "ntoks": ntoks}

    return loss_fn
