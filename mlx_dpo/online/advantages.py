"""From rewards to advantages, in float64 NumPy: GRPO's group baseline, RLOO's leave-one-out
baseline and REINFORCE++'s global batch normalisation (``advantage_estimator``).

Rewards never see MLX arrays: each completion's rewards (one column per reward
function, NaN where a function returned None) are combined with
``reward_weights`` and compared with the other completions of the same prompt.

- ``group``: TRL's ``GRPOTrainer`` (group mean baseline, Bessel std, ``1e-4`` added).
- ``rloo``: TRL's ``RLOOTrainer``: ``A_i = r_i - mean of the other scorable completions of
  its prompt``; with ``normalize_advantages``, ``(A - mean) / (std + 1e-4)`` over the batch
  (Bessel std). A prompt with one scorable completion gives it A = 0.
- ``reinforce_pp``: REINFORCE++ with a baseline (Hu et al. 2025; OpenRLHF's
  ``reinforce_baseline``): ``A_i = r_i - group mean``, then whitened over every completion token of
  the batch (each token carries its completion's A): ``(A - mean) / sqrt(max(var, 1e-8))`` with the
  token-weighted mean and population variance.

Completions every reward abstained on get A = 0 and take no part in any statistic.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from .policy_losses import SCALE_REWARDS

ADVANTAGE_ESTIMATORS = ("group", "rloo", "reinforce_pp")


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
    return adv.reshape(-1), _reward_stats(r, zero)


def _reward_stats(r: np.ndarray, zero_std: np.ndarray) -> dict[str, float]:
    flat = r[~np.isnan(r)]
    return {
        "reward": float(flat.mean()) if flat.size else 0.0,
        "reward_std": float(flat.std(ddof=1)) if flat.size > 1 else 0.0,
        "frac_reward_zero_std": float(np.broadcast_to(zero_std, r.shape).mean()),
    }


def _group_parts(rewards: np.ndarray, num_generations: int):
    """(grouped rewards, valid, scorable count, nan-aware sum, group std is zero) of each prompt."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, num_generations)
    valid = ~np.isnan(r)
    n = valid.sum(axis=1, keepdims=True)
    total = np.where(valid, r, 0.0).sum(axis=1, keepdims=True)
    mean = total / np.maximum(n, 1)
    sq = np.where(valid, (r - mean) ** 2, 0.0).sum(axis=1, keepdims=True)
    zero = (n >= 2) & np.isclose(sq, 0.0, rtol=0.0, atol=1e-12)  # TRL: an undefined std is not zero
    return r, valid, n, total, zero


def rloo_raw(rewards: np.ndarray, num_generations: int) -> np.ndarray:
    """(N,) leave-one-out advantages before any normalisation, NaN where undefined (an unscorable
    completion, or the only scorable one of its prompt)."""
    r, valid, n, total, _ = _group_parts(rewards, num_generations)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid & (n > 1), r - (total - r) / (n - 1), np.nan).reshape(-1)


def group_centred(rewards: np.ndarray, num_generations: int) -> np.ndarray:
    """(N,) ``r_i - mean of its prompt's scorable rewards``, NaN where unscorable."""
    r, valid, n, total, _ = _group_parts(rewards, num_generations)
    return np.where(valid, r - total / np.maximum(n, 1), np.nan).reshape(-1)


def rloo_advantages(rewards: np.ndarray, num_generations: int, normalize: bool = False,
                    batch_moments: Optional[tuple[float, float]] = None) -> tuple[np.ndarray, dict[str, float]]:
    """RLOO's leave-one-out advantages (see the module text); ``batch_moments`` ``(mean, std)`` of
    ``rloo_raw`` over all ranks, computed here when not given."""
    r, _, _, _, zero = _group_parts(rewards, num_generations)
    adv = rloo_raw(rewards, num_generations)
    if normalize:
        mean, std = batch_moments if batch_moments is not None else moments(adv)
        adv = (adv - mean) / (std + 1e-4)
    return np.nan_to_num(adv, nan=0.0), _reward_stats(r, zero)


def reinforce_pp_advantages(rewards: np.ndarray, num_generations: int, token_counts: np.ndarray,
                            batch_moments: Optional[tuple[float, float]] = None) -> tuple[np.ndarray, dict[str, float]]:
    """REINFORCE++-baseline advantages (see the module text); ``token_counts`` (N,) are the
    completions' trained tokens, ``batch_moments`` the token-weighted ``(mean, std)`` of
    ``group_centred`` over all ranks, computed here when not given."""
    r, _, _, _, zero = _group_parts(rewards, num_generations)
    centred = group_centred(rewards, num_generations)
    mean, std = batch_moments if batch_moments is not None else moments(centred, token_counts, bessel=False)
    adv = (centred - mean) / np.sqrt(np.fmax(std**2, 1e-8))
    return np.nan_to_num(adv, nan=0.0), _reward_stats(r, zero)


def moments(values: np.ndarray, weights: Optional[np.ndarray] = None, bessel: bool = True,
            reduce: Callable[[np.ndarray], np.ndarray] = np.asarray) -> tuple[float, float]:
    """Weighted mean and std of the non-NaN values (unit weights by default): Bessel's std, or the
    population std. ``reduce`` sums a vector of partial sums over all ranks (one rank: as it is);
    two passes, the mean first and then the squared deviations, so float32 sums keep their
    precision. The std is NaN below two values (Bessel) or without weight."""
    ok = ~np.isnan(values)
    v = values[ok]
    w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)[ok]
    n, wsum, total = reduce(np.array([v.size, w.sum(), (w * v).sum()], np.float64))
    if wsum <= 0 or (bessel and n < 2):
        return 0.0, float("nan")
    mean = total / wsum
    squares = reduce(np.array([(w * (v - mean) ** 2).sum()], np.float64))[0]
    return float(mean), float(np.sqrt(squares / (n - 1 if bessel else wsum)))
