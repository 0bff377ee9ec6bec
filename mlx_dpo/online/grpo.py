"""GRPO as a batch source: prompts -> rollouts -> rewards -> advantages -> batches, and its loss.

The trainer pulls batches from ``iterate(prompts, batch_size, ...)`` exactly as it pulls
preference batches, and never learns that these are sampled by the policy it is training. One
*generation batch* is ``batch_size`` prompts (over all ranks) times ``grad_accumulation_steps``,
with ``num_generations`` completions each: it is sampled once, scored once by every reward
function, then yielded as micro-batches ``num_iterations`` times (GRPO's mu). Old-policy
log-probs are computed only when mu > 1; reference log-probs only when ``beta > 0``. A resumed
run starts at a generation boundary and samples what an uninterrupted run would have sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..compute.batching import pad_batch, process_ranks
from ..compute.forward import PLAIN, Forward, eval_mode, sequence_token_logps
from ..compute.prefix import shared_prefix_fields, with_shared_prefix
from ..compute.reference import TokenReferenceFn
from ..data.prompts import Prompt
from .advantages import (
    combine_rewards,
    group_advantages,
    group_centred,
    moments,
    reinforce_pp_advantages,
    rloo_advantages,
    rloo_raw,
)
from .generations import (
    Generation,
    PromptOrder,
    RewardFuncs,
    RolloutError,
    Sampler,
    all_sum,
    raise_if_any_failed,
    sampled_generations,
    score_rollouts,
)
from .policy_losses import grpo_loss
from .rollout import Completion, SamplingParams, eos_ids_of


@dataclass
class GRPOArgs:
    """What a generation batch is, how it becomes training rows, and the loss (TRL's names)."""

    num_generations: int = 8
    num_iterations: int = 1
    grad_accumulation_steps: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    reward_weights: Optional[Sequence[float]] = None
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    beta: float = 0.0
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    importance_sampling_level: str = "token"
    advantage_estimator: str = "group"  # group (GRPO), rloo, reinforce_pp: see advantages.py
    normalize_advantages: bool = False  # rloo: whiten the advantages over the batch (TRL's RLOOConfig)
    kl_in_reward: bool = False  # beta x the sequence's summed log-ratio to the reference comes off its reward
    pad_multiple: int = 32  # methods.sampled_padding: 1 for an uncompiled step, 32+ for a compiled one
    share_prefix: bool = False  # each prompt runs once for its G completions (see compute/prefix.py)

    @property
    def temperature(self) -> float:
        """The temperature log-probs are taken at: the sampling one (1 for greedy sampling)."""
        return self.sampling.temperature if self.sampling.temperature > 0 else 1.0


def _stats(completions: list[Completion], rewards: np.ndarray, names: list[str]) -> dict[str, float]:
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
        out[f"rewards/{name}/unscored"] = float(np.isnan(col).mean())  # the share it gave None (a judge: no grade found)
    return out


def advantages_of(combined: np.ndarray, token_counts: np.ndarray, args: GRPOArgs,
                  group: Optional[mx.distributed.Group]) -> tuple[np.ndarray, dict]:
    """This rank's advantages under ``args.advantage_estimator``; batch statistics span all ranks
    (every rank calls this, with or without completions)."""
    g, reduce = args.num_generations, partial(all_sum, group=group)
    if args.advantage_estimator == "rloo":
        batch = moments(rloo_raw(combined, g), reduce=reduce) if args.normalize_advantages else None
        advantages = partial(rloo_advantages, combined, g, args.normalize_advantages, batch)
    elif args.advantage_estimator == "reinforce_pp":
        batch = moments(group_centred(combined, g), token_counts, bessel=False, reduce=reduce)
        advantages = partial(reinforce_pp_advantages, combined, g, token_counts, batch)
    else:
        batch_std = moments(combined, reduce=reduce)[1] if args.scale_rewards == "batch" else None
        advantages = partial(group_advantages, combined, g, args.scale_rewards, batch_std)
    return advantages() if combined.size else (combined, {})


def make_rollout_source(
    model: nn.Module,
    tokenizer,
    reward_funcs: RewardFuncs,
    args: GRPOArgs,
    reference: Optional[TokenReferenceFn] = None,
    how: Forward = PLAIN,
) -> Callable[..., Iterator[dict]]:
    """A batch iterator with ``iterate_batches``' signature whose batches are fresh rollouts."""
    eos_ids = eos_ids_of(tokenizer)
    sampler = Sampler(args.sampling, frozenset(eos_ids), args.num_generations)
    rows = RowMaker(model, tokenizer.eos_token_id or 0, args, reference, how)
    names = [name for name, _ in reward_funcs]

    def iterate(prompts: Sequence[Prompt], batch_size: int, *, loop: bool = False, seed: int = 0,
                comm_group: Optional[mx.distributed.Group] = None, shuffle: bool = True, drop_last: bool = True,
                skip: int = 0, **_ignored) -> Iterator[dict]:
        rank, world = process_ranks(comm_group, batch_size)
        accum, reuse = (args.grad_accumulation_steps, args.num_iterations) if loop else (1, 1)
        order = PromptOrder(batch_size * accum, seed, shuffle, drop_last, loop)
        if drop_last and len(prompts) < order.per_generation:
            raise ValueError(f"{len(prompts)} prompts, fewer than one generation batch ({order.per_generation})")
        if skip % (accum * reuse):
            raise ValueError(f"cannot resume at step {skip}: not a multiple of {accum * reuse} (a generation batch)")
        for gen in sampled_generations(model, prompts, order, sampler, skip // (accum * reuse), rank, world):
            # Every rank takes part in every collective below, in the same order, even with
            # no prompts (a short last evaluation batch) or a failed reward function.
            failure, rewards = None, np.zeros((0, len(names)))
            try:
                rewards = score_rollouts(tokenizer, reward_funcs, gen.prompts, gen.completions, eos_ids) if gen.prompts else rewards
            except RolloutError as e:
                failure = e
            raise_if_any_failed(failure, comm_group)
            made = rows.micro_batches(gen, accum, reuse > 1) if gen.prompts else []
            combined = combine_rewards(rewards, args.reward_weights)
            extra = {}
            if args.kl_in_reward:  # RLOO's option: the KL penalty is part of the reward, not of the loss
                kl, per_token = rows.sequence_kl(made, len(gen.completions))
                combined, extra["kl"] = combined - args.beta * kl, per_token
            counts = np.array([float(len(c.token_ids)) if c.finished or not args.mask_truncated_completions else 0.0
                               for c in gen.completions])
            adv, stats = advantages_of(combined, counts, args, comm_group)
            normalizer = all_sum(np.array([counts.sum()]), comm_group)[0] / (world * accum)
            if not gen.prompts:
                continue
            stats.update(extra, **_stats(gen.completions, rewards, names))
            batches = rows.finish(made, gen, adv, stats, float(counts.sum()), normalizer)
            yield from batches
            once = {"time/rollout": mx.array(0.0), "count/completion_tokens": mx.array(0.0)}
            for _ in range(reuse - 1):  # mu > 1: the same rows again, their sampling cost already counted
                yield from ({**b, "stats": {**b["stats"], **once}} for b in batches)

    return iterate


class RowMaker:
    """A generation batch's training rows: padded (and prompt-shared), advantages, old-policy and
    reference log-probs, cut into one micro-batch per accumulation step."""

    def __init__(self, model: nn.Module, pad_id: int, args: GRPOArgs, reference: Optional[TokenReferenceFn], how: Forward):
        self.model, self.pad_id, self.args, self.reference, self.how = model, pad_id, args, reference, how

    def micro_batches(self, gen: Generation, accum: int, keep_old: bool) -> list[tuple[dict, list[int], Optional[mx.array]]]:
        """``(rows, completion indices, summed log-ratio to the reference or None)`` per accumulation step."""
        comps, per_step = gen.completions, -(-len(gen.prompts) // accum)
        made = []
        for s in range(0, len(gen.prompts), per_step):
            sel = [k for k, c in enumerate(comps) if s <= c.prompt_index < s + per_step]
            batch, kl = self.rows(gen.prompts, [comps[k] for k in sel], keep_old)
            batch["index"] = mx.array(np.asarray(gen.picked, dtype=np.int32)[s : s + per_step])
            made.append((batch, sel, kl))
        return made

    @staticmethod
    def sequence_kl(made: list, n: int) -> tuple[np.ndarray, float]:
        """(N,) each completion's summed ``old - reference`` log-probs, and their mean per token (TRL's RLOO ``kl``)."""
        kl, tokens = np.zeros(n), 0.0
        for _, sel, (summed, count) in made:
            kl[sel] = np.array(summed, np.float64)
            tokens += float(count.sum())
        return kl, float(kl.sum() / max(tokens, 1.0))

    @staticmethod
    def finish(made: list, gen: Generation, adv: np.ndarray, stats: dict, tokens: float, normalizer: float) -> list[dict]:
        """The rows with their advantages, the dapo normalizer and the sampling statistics."""
        batches = []
        for i, (b, sel, _) in enumerate(made):
            b["advantages"] = mx.array(adv[sel].astype(np.float32))
            b["normalizer"] = mx.array(normalizer, mx.float32)
            b["stats"] = {k: mx.array(v, mx.float32) for k, v in stats.items()}
            # Summed over a report window: counted once per generation batch.
            b["stats"]["time/rollout"] = mx.array(gen.seconds if i == 0 else 0.0, mx.float32)
            b["stats"]["count/completion_tokens"] = mx.array(tokens if i == 0 else 0.0, mx.float32)
            batches.append(b)
        return batches

    def rows(self, chunk: list[Prompt], comps: list[Completion], keep_old: bool) -> tuple[dict, Optional[tuple]]:
        args = self.args
        seqs = [(chunk[c.prompt_index].ids + list(c.token_ids), len(chunk[c.prompt_index].ids)) for c in comps]
        batch = pad_batch([(r,) for r in seqs], pad_id=self.pad_id, pad_multiple=args.pad_multiple)
        if args.share_prefix:  # the G completions of a prompt are consecutive and share it
            local = {i: n for n, i in enumerate(dict.fromkeys(c.prompt_index for c in comps))}
            shared = shared_prefix_fields(seqs, [local[c.prompt_index] for c in comps], self.pad_id, args.pad_multiple)
            if shared is not None:
                batch = with_shared_prefix(batch, shared)
        if args.mask_truncated_completions:
            keep = mx.array([1.0 if c.finished else 0.0 for c in comps])[:, None]
            for key in ("mask", "suffix_mask"):
                if key in batch:
                    batch[key] = batch[key] * keep
        kl = None
        if keep_old or args.kl_in_reward:  # the policy that sampled (dropout off, as when sampling)
            with eval_mode(self.model):
                old, _, mask = sequence_token_logps(self.model, batch, self.how, args.temperature)
            old = mx.stop_gradient(old)
            if keep_old:  # frozen for the mu steps
                batch["old_logps"] = old
        if args.beta != 0.0 and self.reference is not None:
            reference = self.reference(batch)
            if args.kl_in_reward:  # TRL's RLOO: the first-order estimate, summed over the completion
                mask = mask.astype(mx.float32)
                kl = (((old - reference) * mask).sum(-1), mask.sum(-1))
            else:
                batch["reference_logps"] = reference
        mx.eval({k: v for k, v in batch.items() if isinstance(v, mx.array)}, kl)
        return batch, kl


def make_grpo_loss(args: GRPOArgs, how: Forward = PLAIN) -> Callable[[nn.Module, dict], tuple[mx.array, dict]]:
    """``loss_fn(model, batch)`` for rollout batches: per-token log-probs, then ``grpo_loss``."""

    def loss_fn(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
        logps, entropy, mask = sequence_token_logps(model, batch, how, args.temperature, True)
        loss, metrics = grpo_loss(
            logps, batch["advantages"], mask, batch.get("old_logps"), batch.get("reference_logps"),
            beta=0.0 if args.kl_in_reward else args.beta, epsilon=args.epsilon, epsilon_high=args.epsilon_high, loss_type=args.loss_type,
            importance_sampling_level=args.importance_sampling_level, max_completion_length=args.sampling.max_tokens,
            normalizer=batch.get("normalizer"),
        )
        metrics["entropy"] = (entropy * mask).sum() / mx.maximum(mask.sum(), 1.0)
        n = mx.array(logps.shape[0], mx.float32)
        ntoks = batch["lengths"].sum().astype(mx.float32)
        return loss, {**metrics, **batch["stats"], "weight": n, "count": n, "ntoks": ntoks}

    return loss_fn
