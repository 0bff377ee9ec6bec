"""Preference objectives as pure functions of log-probabilities.

Nothing here sees a model or a batch: each function takes per-sequence summed
log-probs (and hyper-parameters) and returns ``(loss, metrics)``, where
``metrics`` holds batch means under TRL's metric names.
"""

from __future__ import annotations

import mlx.core as mx


def log_sigmoid(x: mx.array) -> mx.array:
    """``log σ(x) = -log(1 + e^{-x})``, stable for large ``|x|``."""
    return -mx.logaddexp(mx.zeros_like(x), -x)


def dpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Sigmoid DPO (Rafailov et al. 2023); ``label_smoothing`` ε > 0 gives conservative DPO.

    With ``h = (log π_c - log π_ref,c) - (log π_r - log π_ref,r)`` the per-pair loss is
    ``-(1-ε)·log σ(β·h) - ε·log σ(-β·h)``. Rewards are ``β·(log π - log π_ref)``;
    the accuracy counts pairs whose chosen reward is strictly larger.
    """
    reference_chosen = mx.stop_gradient(reference_chosen)
    reference_rejected = mx.stop_gradient(reference_rejected)
    chosen_logratio = policy_chosen - reference_chosen
    rejected_logratio = policy_rejected - reference_rejected
    logits = beta * (chosen_logratio - rejected_logratio)
    losses = -(1.0 - label_smoothing) * log_sigmoid(logits) - label_smoothing * log_sigmoid(-logits)

    chosen_rewards = mx.stop_gradient(beta * chosen_logratio)
    rejected_rewards = mx.stop_gradient(beta * rejected_logratio)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": mx.stop_gradient(policy_chosen).mean(),
        "logps/rejected": mx.stop_gradient(policy_rejected).mean(),
    }
    return losses.mean(), metrics


def sft_loss(logps: mx.array, ntoks: mx.array) -> tuple[mx.array, dict[str, mx.array]]:
    """Mean next-token negative log-likelihood over all masked tokens (as mlx-lm's SFT)."""
    return -logps.sum() / ntoks.sum(), {}
