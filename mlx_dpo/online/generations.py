"""What every on-policy method shares: which prompts a generation batch takes, sampling them
with a seed a resumed run can repeat, scoring the completions, and failing on every process at once.

A batch source here has the signature of ``compute.batching.iterate_batches`` (dataset,
batch_size, loop, seed, comm_group, shuffle, drop_last, skip), so the trainer pulls sampled
batches exactly as it pulls preference batches and never learns where they come from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..compute.batching import BatchSourceError
from ..data.prompts import Prompt
from .rewards import RewardError, score_completions
from .rollout import Completion, SamplingParams, sample_groups

RewardFuncs = list[tuple[str, Callable]]  # (name, function), in config order


class RolloutError(BatchSourceError):
    """A reward function failed; the message names it and the problem."""


@dataclass(frozen=True)
class PromptOrder:
    """Which prompts each generation batch takes: ``per_generation`` of them (over all processes),
    a fresh seeded order each epoch (``shuffle``), the last short batch kept unless ``drop_last``,
    epochs repeated while ``loop``."""

    per_generation: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    loop: bool = False

    def batches(self, n: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(generation, prompt indices)`` for each generation batch, generations counted from 1."""
        generation, epoch = 0, 0
        while True:
            order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
            end = n - self.per_generation + 1 if self.drop_last else n
            for i in range(0, max(end, 0), self.per_generation):
                generation += 1
                yield generation, order[i : i + self.per_generation]
            epoch += 1
            if not self.loop:
                return


@dataclass(frozen=True)
class Sampler:
    """How each prompt is answered: ``per_prompt`` completions drawn with ``params``, ended by ``eos_ids``."""

    params: SamplingParams
    eos_ids: frozenset
    per_prompt: int
    keep: dict = field(default_factory=dict, compare=False, repr=False)  # the decode kernel's packed weights, run to run

    def sample(self, model: nn.Module, prompts: Sequence[Prompt]) -> list[Completion]:
        if not prompts:
            return []
        return sample_groups(model, [p.ids for p in prompts], self.per_prompt, self.params, self.eos_ids, keep=self.keep)


@dataclass
class Generation:
    """One generation batch on this process: its prompts' indices and prompts, their completions."""

    index: int
    picked: np.ndarray
    prompts: list[Prompt]
    completions: list[Completion]
    seconds: float


def rollout_seed(seed: int, generation: int, rank: int) -> int:
    """The sampling seed of one generation batch on one rank."""
    return (seed * 1_000_003 + generation * 7919 + rank * 104_729 + 17) % (2**31)


def sampled_generations(
    model: nn.Module, prompts: Sequence[Prompt], order: PromptOrder, sampler: Sampler, skip: int, rank: int, world: int
) -> Iterator[Generation]:
    """Each generation batch after the first ``skip``, this rank's share sampled; each is seeded
    from (seed, generation, rank), so a resumed run samples what an uninterrupted one would have."""
    for generation, picked in order.batches(len(prompts)):
        if generation <= skip:
            continue
        mine = picked[rank::world]
        chunk = [prompts[j] for j in mine]
        tic = time.perf_counter()
        mx.random.seed(rollout_seed(order.seed, generation, rank))
        comps = sampler.sample(model, chunk)
        yield Generation(generation, mine, chunk, comps, time.perf_counter() - tic)


def completion_text(tokenizer, ids: Sequence[int], eos_ids: frozenset) -> str:
    """A sampled completion as the reward functions read it: decoded, without EOS or special tokens."""
    return tokenizer.decode([t for t in ids if t not in eos_ids], skip_special_tokens=True)


def score_rollouts(
    tokenizer, reward_funcs: RewardFuncs, chunk: Sequence[Prompt], completions: list[Completion], eos_ids: frozenset
) -> np.ndarray:
    """(N, F) rewards of each completion by each function: text (or an assistant message for
    conversational prompts), ids and the prompts' columns go to the functions; a failure is a
    ``RolloutError`` naming the function."""
    prompts = [chunk[c.prompt_index].prompt for c in completions]
    ids = [list(c.token_ids) for c in completions]
    texts = [completion_text(tokenizer, c, eos_ids) for c in ids]
    shown = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for t, p in zip(texts, prompts)]
    keys = sorted({k for p in chunk for k in p.columns})
    columns = {k: [chunk[c.prompt_index].columns.get(k) for c in completions] for k in keys}
    try:
        return score_completions(reward_funcs, prompts, shown, ids, columns)
    except RewardError as e:
        raise RolloutError(str(e)) from None


def all_sum(values: np.ndarray, group: Optional[mx.distributed.Group]) -> np.ndarray:
    """Element-wise sum over all ranks (the values themselves on one)."""
    values = np.asarray(values, dtype=np.float64)
    if group is None or group.size() == 1:
        return values
    return np.array(mx.distributed.all_sum(mx.array(values.astype(np.float32)), group=group, stream=mx.cpu), np.float64)


def raise_if_any_failed(failure: Optional[RolloutError], comm_group: Optional[mx.distributed.Group]) -> None:
    """A collective every rank joins, failed or not: this rank's failure, or one on another rank, is raised."""
    if all_sum(np.array([failure is not None], np.float64), comm_group)[0]:
        raise failure or RolloutError("a reward function failed on another process (see its output)")
