"""The GRPO family's loss: clipped policy-gradient terms on per-token log-probs, pure MLX.

The semantics of TRL's ``GRPOTrainer`` (each choice is a key of the config):

- ratio ``w_t = exp(logp_t - old_t)``; with one optimiser step per generation
  batch (``num_iterations: 1``) there are no old log-probs: ``old = stop_gradient(logp)``,
  so ``w = 1`` and the gradient is REINFORCE with the group baseline.
  ``importance_sampling_level: sequence`` (GSPO) replaces the per-token log-ratio
  by its masked mean over the sequence.
- ``l_t = -min(w_t A, clip(w_t, 1 - epsilon, 1 + epsilon_high) A) + beta KL_t`` with
  the k3 estimator ``KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1``.
- aggregation (``loss_type``): ``grpo`` the mean over sequences of each
  sequence's token mean; ``bnpo`` the token mean of the micro-batch;
  ``dr_grpo`` the token sum over (sequences x max_completion_length);
  ``dapo`` the token sum over ``normalizer``, the completion tokens of the whole
  generation batch (all ranks, all accumulation steps) divided by
  (ranks x accumulation steps), because the trainer averages gradients over both.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

ONLINE_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")  # what advantages are divided by (advantages.group_advantages)


def _masked_mean(x: mx.array, mask: mx.array) -> mx.array:
    return (x * mask).sum() / mx.maximum(mask.sum(), 1.0)


def grpo_loss(
    logps: mx.array,
    advantages: mx.array,
    mask: mx.array,
    old_logps: Optional[mx.array] = None,
    reference_logps: Optional[mx.array] = None,
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None,
    normalizer: Optional[mx.array] = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """The loss of one micro-batch and its metrics (TRL's names).

    ``logps``, ``old_logps``, ``reference_logps`` and ``mask`` are (B, T) over the
    completion positions (``mask`` 1 on completion tokens, EOS included, 0 on
    padding and on masked truncated completions); ``advantages`` is (B,).
    """
    if loss_type not in ONLINE_LOSSES:
        raise ValueError(f"unknown online loss_type {loss_type!r}: choose from {', '.join(ONLINE_LOSSES)}")
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_LEVELS}")
    mask = mask.astype(mx.float32)
    old = mx.stop_gradient(logps) if old_logps is None else old_logps
    log_ratio = logps - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0))[:, None]
    ratio = mx.exp(log_ratio)
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.astype(mx.float32)[:, None]
    per_token = -mx.minimum(ratio * adv, mx.clip(ratio, 1.0 - epsilon, 1.0 + high) * adv)
    metrics: dict[str, mx.array] = {}
    if beta != 0.0:
        if reference_logps is None:
            raise ValueError("beta > 0 needs reference log-probs")
        delta = reference_logps - logps
        kl = mx.exp(delta) - delta - 1.0
        per_token = per_token + beta * kl
        metrics["kl"] = mx.stop_gradient(_masked_mean(kl, mask))

    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)).mean()
    elif loss_type == "bnpo":
        loss = _masked_mean(per_token, mask)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (logps.shape[0] * max_completion_length)
    else:  # dapo
        denom = mask.sum() if normalizer is None else normalizer
        loss = (per_token * mask).sum() / mx.maximum(denom, 1.0)

    # Clip metrics: a token mean, or at sequence level a mean over sequences (as TRL).
    ratio = mx.stop_gradient(ratio)
    low_clip = ((ratio < 1.0 - epsilon) & (adv < 0)).astype(mx.float32)
    high_clip = ((ratio > 1.0 + high) & (adv > 0)).astype(mx.float32)
    region = mx.maximum(low_clip, high_clip)
    if importance_sampling_level == "sequence":
        low_m, high_m, region_m = low_clip.mean(), high_clip.mean(), region.mean()
    else:
        low_m, high_m, region_m = (_masked_mean(x, mask) for x in (low_clip, high_clip, region))
    metrics["clip_ratio/low_mean"] = low_m
    metrics["clip_ratio/high_mean"] = high_m
    metrics["clip_ratio/region_mean"] = region_m
    return loss, metrics
