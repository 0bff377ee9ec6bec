"""From rewards to advantages: GRPO's group baseline, in float64 NumPy.

Rewards never see MLX arrays: each completion's rewards (one column per reward
function, NaN where a function returned None) are combined with
``reward_weights`` and compared with the other completions of the same prompt.
The semantics of TRL's ``GRPOTrainer`` (group mean baseline, Bessel std, ``1e-4`` added).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .policy_losses import SCALE_REWARDS


def combine_rewards(rewards: np.ndarray, weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """Weighted sum over reward functions, skipping None (NaN) entries; NaN where all are None."""
    rewards = np.asarray(rewards, dtype=np.float64)
    w = np.ones(rewards.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    valid = ~np.isnan(rewards)
    total = np.where(valid, rewards * w, 0.0).sum(axis=1)
    return np.where(valid.any(axis=1), total, np.nan)


def group_advantages(
    rewards: np.ndarray, num_generations: int, scale_rewards: str = "group", batch_std: Optional[float] = None
) -> tuple[np.ndarray, dict[str, float]]:
    """``A_i = (r_i - mean of its group) / (std + 1e-4)``, std with Bessel's correction.

    ``rewards`` (N,) holds combined rewards, NaN for completions every function
    abstained on: those get A = 0 and take no part in their group's statistics.
    ``scale_rewards``: ``group`` divides by the group's std, ``batch`` by
    ``batch_std`` (the std over the whole generation batch, all ranks; computed
    here when not given), ``none`` does not divide. A group with equal rewards,
    or with one valid reward, gets A = 0. Returns A and TRL's ``reward``,
    ``reward_std`` (the std of all valid rewards, not a mean of group stds) and
    ``frac_reward_zero_std`` (the share of completions whose dividing std is 0).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}")
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, num_generations)
    valid = ~np.isnan(r)
    n = valid.sum(axis=1, keepdims=True)
    mean = np.where(valid, r, 0.0).sum(axis=1, keepdims=True) / np.maximum(n, 1)
    sq = np.where(valid, (r - mean) ** 2, 0.0).sum(axis=1, keepdims=True)
    group_std = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1)), np.nan)  # undefined below 2 values
    centred = np.where(valid, r - mean, 0.0)
    flat = r[valid]
    if batch_std is None:
        batch_std = float(flat.std(ddof=1)) if flat.size > 1 else float("nan")
    std = np.full_like(group_std, batch_std) if scale_rewards == "batch" else group_std
    adv = centred if scale_rewards == "none" else centred / (np.nan_to_num(std, nan=0.0) + 1e-4)
    zero = np.isclose(np.nan_to_num(std, nan=1.0), 0.0, rtol=0.0, atol=1e-8)
    stats = {
        "reward": float(flat.mean()) if flat.size else 0.0,
        "reward_std": float(flat.std(ddof=1)) if flat.size > 1 else 0.0,
        "frac_reward_zero_std": float(np.broadcast_to(zero, r.shape).mean()),
    }
    return adv.reshape(-1), stats
