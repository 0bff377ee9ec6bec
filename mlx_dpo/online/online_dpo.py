"""Online DPO as a batch source: prompts -> two samples each -> rewards -> a pair batch.

With ``online: true`` a paired objective (dpo, ipo, hinge, robust, ...) trains on the policy's
own samples (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): each
step samples two completions per prompt from the current policy, the reward functions score
them, the higher score is chosen (ties go to the first sample; ``missing_eos_penalty`` is
subtracted from completions that did not end), and the batch that comes out is an ordinary pair
batch, chosen rows then rejected rows, so the paired loss runs unchanged. The scores ride along
in ``batch["stats"]``; the loss adds TRL's ``objective/*`` metrics
(``objectives.loss.sampled_pair_metrics``). A resumed run samples what an uninterrupted one
would have: each step's seed is (seed, step, rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..compute.batching import pad_batch, process_ranks
from ..data.prompts import Prompt
from .advantages import combine_rewards
from .generations import (
    Generation,
    PromptOrder,
    RewardFuncs,
    RolloutError,
    Sampler,
    raise_if_any_failed,
    sampled_generations,
    score_rollouts,
)
from .rollout import SamplingParams, eos_ids_of


@dataclass
class OnlineDPOArgs:
    """How prompts become pairs (TRL's OnlineDPOConfig names)."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    reward_weights: Optional[Sequence[float]] = None
    missing_eos_penalty: Optional[float] = None
    pad_multiple: int = 32  # methods.sampled_padding: 1 for an uncompiled step, 32+ for a compiled one
    share_prefix: bool = False  # each prompt runs once for its two completions (see compute/prefix.py)


def pick_pairs(scores: np.ndarray, finished: np.ndarray, missing_eos_penalty: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """For scores (N, 2) of two samples per prompt: which sample is chosen (0 or 1) and the
    scores used, after ``missing_eos_penalty`` is taken from unfinished samples. The higher
    score is chosen, ties go to the first sample, and a sample no function scored (NaN)
    loses to one that was scored."""
    scores = np.array(scores, dtype=np.float64)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~np.asarray(finished, bool))
    ranked = np.where(np.isnan(scores), -np.inf, scores)
    chosen = np.where(ranked[:, 0] >= ranked[:, 1], 0, 1)
    return chosen, scores


def _pair_stats(scores: np.ndarray, chosen: np.ndarray, finished: np.ndarray, gen: Generation) -> dict:
    rows = np.arange(len(chosen))
    margin = scores[rows, chosen] - scores[rows, 1 - chosen]
    lengths = np.array([len(c.token_ids) for c in gen.completions], np.float64)
    return {
        "objective/scores": np.nanmean(scores) if np.isfinite(scores).any() else 0.0,
        "objective/scores_margin": np.nanmean(margin) if np.isfinite(margin).any() else 0.0,
        "val/contain_eos_token": finished.mean(),
        "completions/mean_length": lengths.mean(),
        "time/rollout": gen.seconds,
        "count/completion_tokens": lengths.sum(),
    }


def make_pair_rollout_source(
    model: nn.Module, tokenizer, reward_funcs: RewardFuncs, args: OnlineDPOArgs
) -> Callable[..., Iterator[dict]]:
    """A batch iterator with ``iterate_batches``' signature whose pairs are fresh samples."""
    eos_ids = eos_ids_of(tokenizer)
    pad_id = tokenizer.eos_token_id or 0
    sampler = Sampler(args.sampling, frozenset(eos_ids), 2)

    def pair_batch(gen: Generation) -> dict:
        comps = gen.completions
        rewards = score_rollouts(tokenizer, reward_funcs, gen.prompts, comps, eos_ids)
        combined = combine_rewards(rewards, args.reward_weights).reshape(-1, 2)
        finished = np.array([c.finished for c in comps]).reshape(-1, 2)
        chosen, scores = pick_pairs(combined, finished, args.missing_eos_penalty)
        examples = []
        for i, prompt in enumerate(gen.prompts):
            first, second = comps[2 * i], comps[2 * i + 1]
            good, bad = (first, second) if chosen[i] == 0 else (second, first)
            p = len(prompt.ids)
            examples.append(((prompt.ids + list(good.token_ids), p), (prompt.ids + list(bad.token_ids), p)))
        batch = pad_batch(examples, pad_id, args.pad_multiple, args.share_prefix)
        stats = _pair_stats(scores, chosen, finished, gen)
        stats.update({f"rewards/{name}/unscored": np.isnan(rewards[:, j]).mean() for j, (name, _) in enumerate(reward_funcs)})
        batch["stats"] = {k: mx.array(float(v), mx.float32) for k, v in stats.items()}
        batch["index"] = mx.array(np.asarray(gen.picked, dtype=np.int32))
        return batch

    def iterate(prompts: Sequence[Prompt], batch_size: int, *, loop: bool = False, seed: int = 0,
                comm_group: Optional[mx.distributed.Group] = None, shuffle: bool = True, drop_last: bool = True,
                skip: int = 0, **_ignored) -> Iterator[dict]:
        rank, world = process_ranks(comm_group, batch_size)
        if drop_last and len(prompts) < batch_size:
            raise ValueError(f"{len(prompts)} prompts, fewer than one batch ({batch_size})")
        order = PromptOrder(batch_size, seed, shuffle, drop_last, loop)
        for gen in sampled_generations(model, prompts, order, sampler, skip, rank, world):
            # Every rank takes part in the collective, even one whose reward function failed.
            failure, batch = None, None
            try:
                batch = pair_batch(gen) if gen.prompts else None
            except RolloutError as e:
                failure = e
            raise_if_any_failed(failure, comm_group)
            if batch is None:
                continue
            mx.eval({k: v for k, v in batch.items() if isinstance(v, mx.array)})
            yield batch

    return iterate
