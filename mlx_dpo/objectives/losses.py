"""Preference objectives as pure functions of log-probabilities.

Nothing here sees a model or a batch: each function takes per-sequence summed
log-probs (and hyper-parameters) and returns ``(loss, metrics)``, where
``metrics`` holds batch means under TRL's metric names.

Conventions shared by the paired losses (all inputs have shape ``(B,)``):

* ``policy_chosen`` / ``policy_rejected``: summed response log-probs of the policy;
* ``reference_chosen`` / ``reference_rejected``: the same under the reference
  model (always ``mx.stop_gradient``-ed; ``None`` for reference-free losses);
* ``chosen_tokens`` / ``rejected_tokens``: response token counts (float), for
  the losses that average log-probs over tokens;
* ``label_smoothing`` ε: a Python float or a ``(B,)`` array (per-pair
  ``ε = 1 - confidence``), broadcast per pair;
* rewards are ``β·(log π - log π_ref)`` of summed log-probs unless a loss says
  otherwise, always under ``mx.stop_gradient``; ``rewards/accuracies`` counts
  pairs whose chosen reward is strictly larger;
* ``logps/chosen`` / ``logps/rejected`` are batch means of the policy's summed
  log-probs.

``PAIR_LOSSES`` maps each paired loss name to a function taking only keyword
arguments (the inputs above plus ``beta``, ``label_smoothing`` and the loss's
own hyper-parameters) that ignores the keywords it does not use.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Union

import mlx.core as mx

Smoothing = Union[float, mx.array]
Result = tuple[mx.array, dict[str, mx.array]]


def log_sigmoid(x: mx.array) -> mx.array:
    """``log σ(x) = -log(1 + e^{-x})``, stable for large ``|x|``."""
    return -mx.logaddexp(mx.zeros_like(x), -x)


def _log1mexp(a: mx.array) -> mx.array:
    """``log(1 - e^{a})`` for ``a < 0``, accurate both near 0 and far below it.

    ``log(-expm1(a))`` for ``a > -log 2``, else ``log1p(-exp(a))``. ``a`` is
    clamped to ``≤ -1e-7`` so that an average log-prob that rounds to exactly
    0 in float32 gives a large finite value instead of ``-inf``/NaN.
    """
    a = mx.minimum(a, -1e-7)
    return mx.where(a > -0.6931471805599453, mx.log(-mx.expm1(a)), mx.log1p(-mx.exp(a)))


def _smoothing(label_smoothing: Smoothing, like: mx.array) -> Smoothing:
    """ε as a Python float, or as an array of ``like``'s dtype (per-pair values)."""
    if isinstance(label_smoothing, (int, float)):
        return float(label_smoothing)
    if not isinstance(label_smoothing, mx.array):
        label_smoothing = mx.array(label_smoothing)
    return label_smoothing.astype(like.dtype)


def _smoothed_sigmoid(x: mx.array, eps: Smoothing) -> mx.array:
    """Per-pair ``-(1-ε)·log σ(x) - ε·log σ(-x)``."""
    return -(1.0 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)


def _pair_metrics(
    chosen_rewards: mx.array,
    rejected_rewards: mx.array,
    policy_chosen: mx.array,
    policy_rejected: mx.array,
) -> dict[str, mx.array]:
    chosen_rewards = mx.stop_gradient(chosen_rewards)
    rejected_rewards = mx.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": mx.stop_gradient(policy_chosen).mean(),
        "logps/rejected": mx.stop_gradient(policy_rejected).mean(),
    }


def _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    if reference_chosen is None or reference_rejected is None:
        raise ValueError("this loss compares with a reference model: reference log-probs are required")
    return (
        policy_chosen - mx.stop_gradient(reference_chosen),
        policy_rejected - mx.stop_gradient(reference_rejected),
    )


def _per_token(x: mx.array, ntoks: mx.array) -> mx.array:
    """``x / n`` with ``n`` clamped to at least one token (as TRL's ``clamp(min=1)``)."""
    return x / mx.maximum(ntoks, 1.0)


def _chosen_nll(policy_chosen: mx.array, chosen_tokens: mx.array) -> mx.array:
    """Mean per-token NLL over all chosen tokens of the batch: ``-Σ log π_c / Σ n_c``."""
    return -policy_chosen.sum() / mx.maximum(chosen_tokens.sum(), 1.0)


# --------------------------------------------------------------------------- reference-based


def dpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
    label_smoothing: Smoothing = 0.0,
) -> Result:
    """Sigmoid DPO (Rafailov et al. 2023); ``label_smoothing`` ε > 0 gives conservative DPO.

    With ``h = (log π_c - log π_ref,c) - (log π_r - log π_ref,r)`` the per-pair loss is
    ``-(1-ε)·log σ(β·h) - ε·log σ(-β·h)``. Rewards are ``β·(log π - log π_ref)``;
    the accuracy counts pairs whose chosen reward is strictly larger.
    """
    chosen, rejected = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    eps = _smoothing(label_smoothing, policy_chosen)
    losses = _smoothed_sigmoid(beta * (chosen - rejected), eps)
    return losses.mean(), _pair_metrics(beta * chosen, beta * rejected, policy_chosen, policy_rejected)


def robust_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
    label_smoothing: Smoothing = 0.0,
) -> Result:
    """Robust DPO, rDPO (Chowdhury et al. 2024, "Provably Robust DPO").

    Unbiased for preference labels flipped with probability ε (``label_smoothing``, < 0.5):
    ``((1-ε)·(-log σ(β·h)) - ε·(-log σ(-β·h))) / (1 - 2ε)``, ``h`` as in :func:`dpo_loss`.
    With ε = 0 it is DPO.
    """
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen, rejected = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    eps = _smoothing(label_smoothing, policy_chosen)
    x = beta * (chosen - rejected)
    losses = ((1.0 - eps) * -log_sigmoid(x) - eps * -log_sigmoid(-x)) / (1.0 - 2.0 * eps)
    return losses.mean(), _pair_metrics(beta * chosen, beta * rejected, policy_chosen, policy_rejected)


def hinge_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
) -> Result:
    """Hinge loss of SLiC (Zhao et al. 2023) on the DPO log-ratio: ``relu(1 - β·h)``."""
    chosen, rejected = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    losses = mx.maximum(1.0 - beta * (chosen - rejected), 0.0)
    return losses.mean(), _pair_metrics(beta * chosen, beta * rejected, policy_chosen, policy_rejected)


def ipo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    chosen_tokens: mx.array,
    rejected_tokens: mx.array,
    beta: float = 0.1,
) -> Result:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences").

    On log-ratios averaged over response tokens (as TRL),
    ``h_avg = (log π_c - log π_ref,c)/n_c - (log π_r - log π_ref,r)/n_r``, the loss is
    ``(h_avg - 1/(2β))²``; β plays the paper's τ. Rewards are ``β·`` the summed log-ratios.
    """
    chosen, rejected = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    h = _per_token(chosen, chosen_tokens) - _per_token(rejected, rejected_tokens)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses.mean(), _pair_metrics(beta * chosen, beta * rejected, policy_chosen, policy_rejected)


def exo_pair_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
    label_smoothing: Smoothing = 0.0,
) -> Result:
    """EXO for pairs (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment").

    The reverse KL from the smoothed target ``(1-ε, ε)`` to the model's preference
    ``(σ(β·h), σ(-β·h))``:
    ``σ(β·h)·(log σ(β·h) - log(1-ε)) + σ(-β·h)·(log σ(-β·h) - log ε)``.
    ε = 0 would be infinite, so (as TRL) ε = 0 is replaced by 1e-3, per pair.
    """
    chosen, rejected = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    eps = _smoothing(label_smoothing, policy_chosen)
    if isinstance(eps, float):
        eps = eps if eps != 0.0 else 1e-3
        log_keep, log_eps = math.log(1.0 - eps), math.log(eps)
    else:
        eps = mx.where(eps == 0, 1e-3, eps)
        log_keep, log_eps = mx.log(1.0 - eps), mx.log(eps)
    x = beta * (chosen - rejected)
    losses = mx.sigmoid(x) * (log_sigmoid(x) - log_keep) + mx.sigmoid(-x) * (log_sigmoid(-x) - log_eps)
    return losses.mean(), _pair_metrics(beta * chosen, beta * rejected, policy_chosen, policy_rejected)


def nca_pair_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
) -> Result:
    """NCA for pairs (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards").

    With ``r_c = β·(log π_c - log π_ref,c)``, ``r_r = β·(log π_r - log π_ref,r)``:
    ``-log σ(r_c) - ½·log σ(-r_c) - ½·log σ(-r_r)``.
    """
    chosen, rejected = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    r_c, r_r = beta * chosen, beta * rejected
    losses = -log_sigmoid(r_c) - 0.5 * log_sigmoid(-r_c) - 0.5 * log_sigmoid(-r_r)
    return losses.mean(), _pair_metrics(r_c, r_r, policy_chosen, policy_rejected)


def bco_pair_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
) -> Result:
    """BCO for pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment").

    With rewards ``r = β·(log π - log π_ref)`` and ``δ`` the mean of all 2B rewards
    ``[r_c, r_r]`` of *this batch* (stop-gradient), the loss is
    ``-log σ(r_c - δ) - log σ(-(r_r - δ))``. TRL keeps a running mean of the
    rewards across batches for ``δ`` instead; here it is the batch mean, so the
    function stays pure. Extra metric ``delta``.
    """
    chosen, rejected = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    r_c, r_r = beta * chosen, beta * rejected
    delta = mx.stop_gradient(mx.concatenate([r_c, r_r]).mean())
    losses = -log_sigmoid(r_c - delta) - log_sigmoid(-(r_r - delta))
    metrics = _pair_metrics(r_c, r_r, policy_chosen, policy_rejected)
    metrics["delta"] = delta
    return losses.mean(), metrics


def sppo_hard_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
) -> Result:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment").

    With ``a = log π_c - log π_ref,c`` and ``b = log π_r - log π_ref,r``:
    ``(a - 1/(2β))² + (b + 1/(2β))²`` (winner probability 1, loser 0).
    """
    a, b = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    half = 1.0 / (2.0 * beta)
    losses = (a - half) ** 2 + (b + half) ** 2
    return losses.mean(), _pair_metrics(beta * a, beta * b, policy_chosen, policy_rejected)


def apo_zero_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
) -> Result:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions").

    Pushes chosen likelihood up and rejected down, each anchored at the reference:
    ``(1 - σ(r_c)) + σ(r_r)`` with ``r = β·(log π - log π_ref)``.
    """
    chosen, rejected = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    r_c, r_r = beta * chosen, beta * rejected
    losses = (1.0 - mx.sigmoid(r_c)) + mx.sigmoid(r_r)
    return losses.mean(), _pair_metrics(r_c, r_r, policy_chosen, policy_rejected)


def apo_down_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
) -> Result:
    """APO-down (D'Oosterlinck et al. 2024): both likelihoods down, rejected more.

    ``σ(r_c) + (1 - σ(β·h))`` with ``r_c = β·(log π_c - log π_ref,c)`` and ``h`` as in DPO.
    """
    chosen, rejected = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    losses = mx.sigmoid(beta * chosen) + (1.0 - mx.sigmoid(beta * (chosen - rejected)))
    return losses.mean(), _pair_metrics(beta * chosen, beta * rejected, policy_chosen, policy_rejected)


def discopop_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
    tau: float = 0.05,
) -> Result:
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms").

    With ``x = β·h`` and ``m = σ(x/τ)``: ``(-log σ(x))·(1 - m) + exp(-x)·m``, a
    logistic loss for negative margins blended into an exponential one for
    positive margins. ``exp(-x)·m`` is computed as ``exp(-x + log σ(x/τ))``, the
    same value without ``inf·0`` for very negative ``x``.
    """
    chosen, rejected = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    x = beta * (chosen - rejected)
    m = mx.sigmoid(x / tau)
    losses = -log_sigmoid(x) * (1.0 - m) + mx.exp(-x + log_sigmoid(x / tau))
    return losses.mean(), _pair_metrics(beta * chosen, beta * rejected, policy_chosen, policy_rejected)


def sigmoid_norm_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    chosen_tokens: mx.array,
    rejected_tokens: mx.array,
    beta: float = 0.1,
    label_smoothing: Smoothing = 0.0,
) -> Result:
    """Sigmoid DPO on length-normalised log-ratios (TRL's ``sigmoid_norm``).

    ``h_norm = (log π_c - log π_ref,c)/n_c - (log π_r - log π_ref,r)/n_r``, per-pair loss
    ``-(1-ε)·log σ(β·h_norm) - ε·log σ(-β·h_norm)``. TRL's version has no label
    smoothing (it is this with ε = 0, the default); ε is kept here so per-pair
    confidences work. Rewards are ``β·`` the summed log-ratios, as in TRL.
    """
    chosen, rejected = _logratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    eps = _smoothing(label_smoothing, policy_chosen)
    h = _per_token(chosen, chosen_tokens) - _per_token(rejected, rejected_tokens)
    losses = _smoothed_sigmoid(beta * h, eps)
    return losses.mean(), _pair_metrics(beta * chosen, beta * rejected, policy_chosen, policy_rejected)


# --------------------------------------------------------------------------- reference-free


def simpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    chosen_tokens: mx.array,
    rejected_tokens: mx.array,
    beta: float = 0.1,
    label_smoothing: Smoothing = 0.0,
    gamma: float = 0.5,
) -> Result:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward").

    Reference-free. With average log-probs ``a_c = log π_c/n_c``, ``a_r = log π_r/n_r``
    and the target margin ``γ`` (``gamma``, in reward units):
    ``x = β·(a_c - a_r) - γ``, per-pair loss ``-(1-ε)·log σ(x) - ε·log σ(-x)``.
    Rewards are ``β·a_c`` and ``β·a_r``. (TRL writes ``β·(a_c - a_r - γ/β)``, the
    same thing; the paper's settings use a much larger β, about 2 to 10, than DPO.)
    """
    eps = _smoothing(label_smoothing, policy_chosen)
    a_c = _per_token(policy_chosen, chosen_tokens)
    a_r = _per_token(policy_rejected, rejected_tokens)
    losses = _smoothed_sigmoid(beta * (a_c - a_r) - gamma, eps)
    return losses.mean(), _pair_metrics(beta * a_c, beta * a_r, policy_chosen, policy_rejected)


def orpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    chosen_tokens: mx.array,
    rejected_tokens: mx.array,
    beta: float = 0.1,
) -> Result:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model").

    Reference-free; ``beta`` is the paper's λ. With average log-probs ``a_c, a_r``,
    ``log_odds = (a_c - a_r) - (log(1 - e^{a_c}) - log(1 - e^{a_r}))`` and the chosen
    NLL ``-Σ log π_c / Σ n_c`` (per token, over the batch), the loss is
    ``NLL - λ·mean(log σ(log_odds))``. Rewards are ``β·a_c``, ``β·a_r``. Extra
    metrics ``nll_loss``, ``log_odds_ratio`` (mean ``log σ(log_odds)``) and
    ``log_odds_chosen`` (mean ``log_odds``).
    """
    a_c = _per_token(policy_chosen, chosen_tokens)
    a_r = _per_token(policy_rejected, rejected_tokens)
    log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
    # One node for the mean, shared by the loss and the metric: a metric computed
    # again as ``stop_gradient(ratio).mean()`` is an identical node that mx.compile
    # (MLX 0.32) merges away, and an output merged away crashes it (``_Map_base::at``).
    ratio_mean = log_sigmoid(log_odds).mean()
    nll = _chosen_nll(policy_chosen, chosen_tokens)
    loss = nll - beta * ratio_mean
    metrics = _pair_metrics(beta * a_c, beta * a_r, policy_chosen, policy_rejected)
    metrics["nll_loss"] = mx.stop_gradient(nll)
    metrics["log_odds_ratio"] = mx.stop_gradient(ratio_mean)
    metrics["log_odds_chosen"] = mx.stop_gradient(log_odds).mean()
    return loss, metrics


def cpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    chosen_tokens: mx.array,
    rejected_tokens: mx.array,
    beta: float = 0.1,
    label_smoothing: Smoothing = 0.0,
    alpha: float = 1.0,
) -> Result:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization").

    Reference-free. With ``x = β·(log π_c - log π_r)`` (summed log-probs):
    ``mean(-(1-ε)·log σ(x) - ε·log σ(-x)) + α·NLL``, the NLL of the chosen
    responses per token as in :func:`orpo_loss`, ``α`` = ``alpha``. Rewards are
    ``β·log π_c``, ``β·log π_r``. Extra metric ``nll_loss``.
    ``rejected_tokens`` is unused (kept for a uniform signature).
    """
    eps = _smoothing(label_smoothing, policy_chosen)
    losses = _smoothed_sigmoid(beta * (policy_chosen - policy_rejected), eps)
    nll = _chosen_nll(policy_chosen, chosen_tokens)
    metrics = _pair_metrics(beta * policy_chosen, beta * policy_rejected, policy_chosen, policy_rejected)
    metrics["nll_loss"] = mx.stop_gradient(nll)
    return losses.mean() + alpha * nll, metrics


# --------------------------------------------------------------------------- unpaired / SFT


def kto_loss(
    policy_logps: mx.array,
    reference_logps: mx.array,
    labels: mx.array,
    policy_kl_logps: mx.array,
    reference_kl_logps: mx.array,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Result:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization").

    Unpaired: each example is desirable (``labels`` true / 1) or undesirable.
    With the KL baseline ``z0 = max(0, mean(log π_KL - log π_ref,KL))`` over
    mismatched completions (stop-gradient) and ``r = log π - log π_ref``:
    desirable ``w_d·(1 - σ(β·(r - z0)))``, undesirable ``w_u·(1 - σ(β·(z0 - r)))``;
    the loss is the mean over all examples.

    Metrics (means over the examples of each kind, 0 where a batch has none):
    ``rewards/chosen``, ``rewards/rejected`` (``β·r``), ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected``, plus ``kl`` (= z0), ``count/desirable``
    and ``count/undesirable``.
    """
    logratio = policy_logps - mx.stop_gradient(reference_logps)
    kl = mx.stop_gradient(policy_kl_logps - reference_kl_logps).mean()
    z0 = mx.maximum(kl, 0.0)
    desirable = (labels if isinstance(labels, mx.array) else mx.array(labels)).astype(mx.bool_)
    losses = mx.where(
        desirable,
        desirable_weight * (1.0 - mx.sigmoid(beta * (logratio - z0))),
        undesirable_weight * (1.0 - mx.sigmoid(beta * (z0 - logratio))),
    )

    d = desirable.astype(policy_logps.dtype)
    u = 1.0 - d
    n_d, n_u = d.sum(), u.sum()
    rewards = mx.stop_gradient(beta * logratio)
    logps = mx.stop_gradient(policy_logps)
    chosen_rewards = (rewards * d).sum() / mx.maximum(n_d, 1.0)
    rejected_rewards = (rewards * u).sum() / mx.maximum(n_u, 1.0)
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": (logps * d).sum() / mx.maximum(n_d, 1.0),
        "logps/rejected": (logps * u).sum() / mx.maximum(n_u, 1.0),
        "kl": z0,
        "count/desirable": n_d,
        "count/undesirable": n_u,
    }
    return losses.mean(), metrics


def nll_loss(policy_chosen: mx.array, chosen_tokens: mx.array) -> Result:
    """Per-token NLL of the chosen responses, ``-Σ log π_c / Σ n_c``.

    Added to DPO it gives RPO (Pang et al. 2024, ``loss_type: [dpo, sft]``).
    """
    loss = _chosen_nll(policy_chosen, chosen_tokens)
    return loss, {"nll_loss": mx.stop_gradient(loss)}


def sft_loss(logps: mx.array, ntoks: mx.array) -> Result:
    """Mean next-token negative log-likelihood over all masked tokens (as mlx-lm's SFT)."""
    return -logps.sum() / ntoks.sum(), {}


def reward_model_loss(chosen: mx.array, rejected: mx.array, margin=None, center_coefficient: float = 0.0) -> Result:
    """Bradley-Terry loss of a reward model's scalar scores (``(B,)`` each), TRL's ``RewardTrainer``:
    ``-mean log σ(r_c - r_r - m)`` with an optional per-pair ``margin`` m, plus
    ``center_coefficient * mean((r_c + r_r)²)`` (Eisenstein et al. 2023) to keep rewards near 0."""
    diff = chosen - rejected
    loss = -log_sigmoid(diff if margin is None else diff - margin).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    every, diff = mx.stop_gradient(mx.concatenate([chosen, rejected])), mx.stop_gradient(diff)
    return loss, {
        "accuracy": (diff > 0).astype(mx.float32).mean(),
        "margin": diff.mean(),
        "mean_reward": every.mean(),
        "min_reward": every.min(),
        "max_reward": every.max(),
        "rewards/chosen": mx.stop_gradient(chosen).mean(),
        "rewards/rejected": mx.stop_gradient(rejected).mean(),
    }


# --------------------------------------------------------------------------- registry


def _keywords_only(fn: Callable[..., Result]) -> Callable[..., Result]:
    """``fn`` called with keywords only, dropping the ones ``fn`` does not take."""
    names = frozenset(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def call(**kwargs) -> Result:
        return fn(**{k: v for k, v in kwargs.items() if k in names})

    return call


PAIR_LOSSES: dict[str, Callable[..., Result]] = {
    name: _keywords_only(fn)
    for name, fn in {
        "dpo": dpo_loss,
        "ipo": ipo_loss,
        "hinge": hinge_loss,
        "robust": robust_loss,
        "exo_pair": exo_pair_loss,
        "nca_pair": nca_pair_loss,
        "bco_pair": bco_pair_loss,
        "sppo_hard": sppo_hard_loss,
        "apo_zero": apo_zero_loss,
        "apo_down": apo_down_loss,
        "discopop": discopop_loss,
        "sigmoid_norm": sigmoid_norm_loss,
        "simpo": simpo_loss,
        "orpo": orpo_loss,
        "cpo": cpo_loss,
    }.items()
}
"""Paired losses by name; call with keywords (``policy_chosen``, ..., ``beta``, ``label_smoothing``, ``gamma``, ``tau``, ``alpha``)."""

REFERENCE_FREE = frozenset({"simpo", "orpo", "cpo"})
"""Paired losses that use no reference model (their reference arguments may be ``None``)."""

USES_LABEL_SMOOTHING = frozenset({"dpo", "robust", "exo_pair", "sigmoid_norm", "simpo", "cpo"})
"""Paired losses whose value depends on ``label_smoothing`` (so per-pair confidences act on them)."""
