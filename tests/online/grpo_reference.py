"""Independent float64 NumPy reference for GRPO advantages, loss, gradient and metrics.

Written from the formulas (GRPO / DAPO / Dr. GRPO / GSPO papers and the semantics
of TRL's GRPOTrainer as of TRL 1.16.0), not from any implementation's code. Plain
NumPy, float64, no MLX: tests compare the MLX code against these functions.

Notation
--------
N completions, contiguous groups of G = num_generations (completions of one prompt).
F reward functions, rewards R (N, F) with NaN where a function returned None.
B sequences x T completion positions in a loss call; mask m (B, T) is 1 on
completion tokens (EOS included) and 0 on padding / masked-truncated rows.

Advantages (ref_advantages)
    r_i   = sum_f w_f R_if over the non-NaN entries        (nansum; partial None just drops terms)
    r_i   = NaN if every R_if is NaN ("unscorable")        -> excluded from its group's statistics
    mu_g  = mean of the valid r in group g
    sd    = "group": sample std (ddof=1) of the valid r in the group
            "batch": sample std (ddof=1) of all valid r in the whole batch (mean stays per group)
            "none" : no division (the group std is still computed for frac_reward_zero_std)
    A_i   = (r_i - mu_g) / (sd + 1e-4)     ("none": A_i = r_i - mu_g)
    A_i   = 0 for unscorable completions, and wherever the statistic is undefined
            (NaN: a group with fewer than 2 valid rewards under "group" scaling);
            A_i = 0 exactly for groups whose valid rewards are all equal.
    stats["reward"]               = mean of the valid r over the whole batch
    stats["reward_std"]           = sample std (ddof=1) of the valid r over the WHOLE batch
                                    (this is TRL's definition: not a mean of group stds)
    stats["frac_reward_zero_std"] = fraction of completions whose scaling std is 0
                                    (|sd| <= 1e-8; NaN counts as not zero). Under "group"/"none"
                                    it is the fraction of completions in zero-std groups; under
                                    "batch" the std is the batch one, so it is 0.0 or 1.0.

Loss (ref_grpo_loss)
    log-ratio     d_it = logp_it - old_it   (old = logp detached when old_logps is None, so d = 0)
    token level   w_it = exp(d_it)
    sequence lvl  w_i  = exp( sum_t m_it d_it / max(sum_t m_it, 1) )   (GSPO), broadcast over t
    policy term   p    = -min(w A, clip(w, 1 - eps, 1 + eps_high) A)
    KL (k3)       k_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1      (only when beta != 0)
    per token     l_it = p + beta k_it
    aggregation   grpo    : (1/B) sum_i [ sum_t m_it l_it / max(n_i, 1) ]     (B counts all rows,
                                                                                fully masked ones too)
                  bnpo    : sum m l / max(sum m, 1)
                  dr_grpo : sum m l / (B * max_completion_length)
                  dapo    : sum m l / max(num_items, 1), num_items = completion tokens of the whole
                            generation batch (all processes, all accumulation micro-batches)
    For grpo/bnpo/dr_grpo TRL additionally divides each micro-batch loss by the gradient
    accumulation steps (the optimizer then sums micro-batches); dapo is not divided (its
    denominator is already global). This reference returns the undivided micro-batch value,
    i.e. what TRL logs as the policy loss of that micro-batch.

Gradient (ref_grpo_loss_grad): analytic, with respect to logp only (old, ref, A constants).
    Write loss = sum_it c_it l_it with c_it = m_it / D (D as in the aggregation; for grpo
    c_it = m_it / (B max(n_i, 1))). The min/clip branch is "active" (gradient flows) unless the
    clipped branch was strictly chosen: active iff (A > 0 and w <= 1+eps_high) or
    (A < 0 and w >= 1-eps); A = 0 gives no policy gradient. (At exact ties PyTorch's
    min/clamp also pass the full gradient, so this matches autograd.)
      token:    dL/dlogp_it = c_it [ -A_i w_it 1{active_it} + beta (1 - exp(ref_it - logp_it)) ]
      sequence: dL/dlogp_it = (sum_s c_is) (-A_i w_i 1{active_i}) m_it / max(n_i, 1)
                              + beta c_it (1 - exp(ref_it - logp_it))
    The __main__ block checks it against central finite differences.

Worked examples (hand-computed; also asserted in __main__)
---------------------------------------------------------
1. One group, G = 2, one reward function, r = [1, 0]:
   mean 0.5, sample std sqrt((0.25 + 0.25) / 1) = 1/sqrt(2) = 0.70710678,
   A = +-0.5 / (0.70710678 + 1e-4) = +-0.70700680. In general for G = 2 and r1 != r2:
   A = +-(|r1 - r2| / 2) / (|r1 - r2| / sqrt(2) + 1e-4) ~ +-1/sqrt(2).
   reward = 0.5, reward_std = 0.70710678, frac_reward_zero_std = 0.
2. Two functions, weights [1, 0.5], R = [[1, NaN], [0, 2]] (G = 2):
   r = [1 + 0, 0 + 0.5 * 2] = [1, 1] -> equal -> A = [0, 0], frac_reward_zero_std = 1.
3. G = 3, R = [[2], [0], [NaN]]: the unscorable third completion is left out:
   valid [2, 0], mean 1, std sqrt(2), A = [1/(sqrt(2)+1e-4), -1/(sqrt(2)+1e-4), 0]
   = [0.70705683, -0.70705683, 0]; reward = 1, reward_std = sqrt(2).
4. "batch" scaling, groups [0, 1] and [0, 0] (G = 2): batch std of [0, 1, 0, 0] is
   sqrt(0.75 / 3) = 0.5, group means 0.5 and 0:
   A = [-0.5, 0.5, 0, 0] / (0.5 + 1e-4) = [-0.99980004, 0.99980004, 0, 0];
   frac_reward_zero_std = 0 (the batch std is not 0) although group 2 has zero std.
5. On-policy loss (old_logps None -> w = 1), B = 1, T = 3, mask [1, 1, 0], A = 1, beta 0:
   l = [-1, -1], dapo = grpo = bnpo = -2/2 = -1, gradient [-0.5, -0.5, 0];
   dr_grpo with max_completion_length 4: -2/(1*4) = -0.5, gradient [-0.25, -0.25, 0].
6. Clipping, one token, d = log 1.5 (w = 1.5), eps 0.2:
   A = +1: min(1.5, 1.2) = 1.2 -> l = -1.2, gradient 0, clip_ratio/high_mean = 1.
   A = -1: min(-1.5, -1.2) = -1.5 -> l = 1.5, gradient +1.5 (unclipped), no clip counted.
7. GSPO, one sequence, d = [0.2, -0.1, 0.5], mask [1, 1, 0], A = 1:
   w = exp((0.2 - 0.1) / 2) = exp(0.05) = 1.05127110 (inside [0.8, 1.2]);
   dapo: loss = -(w * 2) / 2 = -1.05127110 (the sequence term is broadcast over its 2 tokens),
   gradient = C (-A w) m_t / 2 with C = 2/2 = 1 -> [-0.52563555, -0.52563555, 0].
"""

from __future__ import annotations

import numpy as np

STD_EPS = 1e-4  # added to the std before dividing
ZERO_STD_ATOL = 1e-8  # "std is zero" test (torch.isclose(std, 0) default atol)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# ----------------------------------------------------------------------------- advantages


def _sample_std(values: np.ndarray) -> float:
    """Std with Bessel's correction over the non-NaN values; NaN when fewer than 2."""
    v = values[~np.isnan(values)]
    if v.size < 2:
        return float("nan")
    return float(np.sqrt(np.sum((v - v.mean()) ** 2) / (v.size - 1)))


def ref_advantages(
    rewards: np.ndarray, weights: np.ndarray, num_generations: int, scale_rewards: str = "group"
) -> tuple[np.ndarray, dict]:
    """GRPO advantages, "sum_then_normalize" aggregation.

    rewards (N, F) with NaN for None, N = groups*G contiguous by group; weights (F,)
    (pass np.ones(F) for the default). scale_rewards: "group" | "batch" | "none"
    (True -> "group", False -> "none"). Returns A (N,) float64 and the stats
    {"reward", "reward_std", "frac_reward_zero_std"} defined in the module docstring.
    Completions whose rewards are all NaN get A = 0 and are excluded from their
    group's mean/std and from the stats.
    """
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    R = np.asarray(rewards, dtype=np.float64)
    if R.ndim == 1:
        R = R[:, None]
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    N, F = R.shape
    G = int(num_generations)
    if w.shape != (F,):
        raise ValueError(f"weights must have shape ({F},), got {w.shape}")
    if G < 1 or N % G:
        raise ValueError(f"N={N} is not a multiple of num_generations={G}")

    # Combined reward: weighted sum of the available rewards; NaN if none available.
    unscorable = np.all(np.isnan(R), axis=1)
    r = np.zeros(N)
    for f in range(F):
        ok = ~np.isnan(R[:, f])
        r[ok] += w[f] * R[ok, f]
    r[unscorable] = np.nan

    batch_std = _sample_std(r)
    A = np.zeros(N)
    std_used = np.full(N, np.nan)  # the std each completion is scaled by (for frac_reward_zero_std)
    for g in range(N // G):
        idx = np.arange(g * G, (g + 1) * G)
        rg = r[idx]
        valid = ~np.isnan(rg)
        if not valid.any():
            continue  # whole group unscorable: A stays 0, std stays NaN
        mean = rg[valid].mean()
        group_std = _sample_std(rg)
        std_used[idx] = batch_std if scale == "batch" else group_std
        all_equal = np.all(rg[valid] == rg[valid][0])
        for j in np.flatnonzero(valid):
            if all_equal:
                A[idx[j]] = 0.0
            elif scale == "none":
                A[idx[j]] = rg[j] - mean
            else:
                A[idx[j]] = (rg[j] - mean) / (std_used[idx[j]] + STD_EPS)
    A = np.where(np.isnan(A), 0.0, A)  # undefined std (e.g. a single valid reward) -> no signal
    if scale == "batch" and N < 2:
        std_used[:] = 0.0  # TRL: a one-element batch counts as zero std

    valid_r = r[~np.isnan(r)]
    zero_std = np.zeros(N, dtype=bool)
    finite = ~np.isnan(std_used)
    zero_std[finite] = np.abs(std_used[finite]) <= ZERO_STD_ATOL
    stats = {
        "reward": float(valid_r.mean()) if valid_r.size else float("nan"),
        "reward_std": batch_std,
        "frac_reward_zero_std": float(zero_std.mean()),
    }
    return A, stats


# ----------------------------------------------------------------------------- loss


def _prepare(logps, old_logps, ref_logps, advantages, mask, beta):
    s = np.asarray(logps, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError("logps must be (B, T)")
    m = np.asarray(mask, dtype=np.float64)
    if m.shape != s.shape:
        raise ValueError(f"mask shape {m.shape} != logps shape {s.shape}")
    o = s.copy() if old_logps is None else np.asarray(old_logps, dtype=np.float64)
    A = np.asarray(advantages, dtype=np.float64).reshape(-1)
    if A.shape != (s.shape[0],):
        raise ValueError("advantages must be (B,)")
    on = m > 0
    # Padding positions may hold anything: zero them so they can't produce inf/NaN.
    d = np.where(on, s - o, 0.0)  # log-ratio
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("ref_logps is required when beta != 0")
        ref = np.asarray(ref_logps, dtype=np.float64)
        x = np.where(on, ref - s, 0.0)  # ref - logp
    else:
        x = np.zeros_like(s)
    return s, m, on, d, x, A


def _token_weights(m, loss_type, max_completion_length, num_items):
    """c_it such that loss = sum_it c_it l_it (c is 0 off the mask)."""
    B = m.shape[0]
    n = m.sum(axis=1)
    if loss_type == "grpo":
        return m / (B * np.maximum(n, 1.0))[:, None]
    if loss_type == "bnpo":
        return m / max(m.sum(), 1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        return m / (B * float(max_completion_length))
    if loss_type == "dapo":
        total = m.sum() if num_items is None else float(num_items)
        return m / max(total, 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def _ratios(d, m, level):
    """Importance weight w: (B, T) for "token", (B, 1) for "sequence" (GSPO)."""
    if level == "token":
        return np.exp(d)
    if level == "sequence":
        n = np.maximum(m.sum(axis=1), 1.0)
        return np.exp((d * m).sum(axis=1) / n)[:, None]
    raise ValueError(f"unknown importance_sampling_level {level!r}")


def ref_grpo_loss(
    logps,
    old_logps,
    ref_logps,
    advantages,
    mask,
    *,
    beta=0.0,
    epsilon=0.2,
    epsilon_high=None,
    loss_type="dapo",
    importance_sampling_level="token",
    max_completion_length=None,
    num_items=None,
) -> tuple[float, dict]:
    """GRPO loss value and metrics (see the module docstring for every formula).

    logps/old_logps/ref_logps: (B, T) per-token log-probs of the completion tokens
    (ref_logps may be None when beta == 0; old_logps None means old = logps detached,
    i.e. ratio 1). advantages (B,); mask (B, T) 0/1. num_items: completion tokens of
    the whole generation batch (dapo; default mask.sum()).

    Metrics: "kl" (only if beta != 0) = masked token mean of k3; "clip_ratio/low_mean",
    "clip_ratio/high_mean", "clip_ratio/region_mean" = masked token mean of
    [w < 1-eps and A < 0], [w > 1+eps_high and A > 0] and their union (at sequence
    level: plain mean over the B sequences, fully masked rows included, as TRL does);
    "clip_ratio/low_min" / "clip_ratio/high_max" = min / max over sequences with at
    least one token of the per-sequence masked mean of the low / high indicator.
    """
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    s, m, _, d, x, A = _prepare(logps, old_logps, ref_logps, advantages, mask, beta)
    B, T = s.shape
    Ac = A[:, None]

    w = _ratios(d, m, importance_sampling_level)  # (B, T) or (B, 1)
    w_clip = np.clip(w, 1.0 - eps_low, 1.0 + eps_high)
    policy = -np.minimum(w * Ac, w_clip * Ac)  # (B, T) or (B, 1)
    kl = np.exp(x) - x - 1.0  # (B, T), 0 off the mask and when beta == 0
    per_token = np.broadcast_to(policy, (B, T)) + beta * kl

    c = _token_weights(m, loss_type, max_completion_length, num_items)
    loss = float(np.sum(c * per_token))

    def masked_mean(v):
        return float((v * m).sum() / max(m.sum(), 1.0))

    low = ((w < 1.0 - eps_low) & (Ac < 0)).astype(np.float64)
    high = ((w > 1.0 + eps_high) & (Ac > 0)).astype(np.float64)
    region = np.maximum(low, high)
    n = m.sum(axis=1)
    if importance_sampling_level == "sequence":
        metrics = {
            "clip_ratio/low_mean": float(low.mean()),
            "clip_ratio/high_mean": float(high.mean()),
            "clip_ratio/region_mean": float(region.mean()),
        }
        low_seq, high_seq = low[:, 0], high[:, 0]
    else:
        metrics = {
            "clip_ratio/low_mean": masked_mean(low),
            "clip_ratio/high_mean": masked_mean(high),
            "clip_ratio/region_mean": masked_mean(region),
        }
        with np.errstate(invalid="ignore", divide="ignore"):
            low_seq = (low * m).sum(axis=1) / n
            high_seq = (high * m).sum(axis=1) / n
    low_seq, high_seq = low_seq[~np.isnan(low_seq)], high_seq[~np.isnan(high_seq)]
    metrics["clip_ratio/low_min"] = float(low_seq.min()) if low_seq.size else float("nan")
    metrics["clip_ratio/high_max"] = float(high_seq.max()) if high_seq.size else float("nan")
    if beta != 0.0:
        metrics["kl"] = masked_mean(kl)
    return loss, metrics


def ref_grpo_loss_grad(
    logps,
    old_logps,
    ref_logps,
    advantages,
    mask,
    *,
    beta=0.0,
    epsilon=0.2,
    epsilon_high=None,
    loss_type="dapo",
    importance_sampling_level="token",
    max_completion_length=None,
    num_items=None,
) -> np.ndarray:
    """Analytic d loss / d logps, (B, T) float64. old_logps/ref_logps/advantages are
    constants; old_logps None means old = stop_gradient(logps) (the ratio is 1 but its
    derivative w.r.t. logps is 1). Zero on masked positions."""
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    _, m, on, d, x, A = _prepare(logps, old_logps, ref_logps, advantages, mask, beta)
    Ac = A[:, None]
    c = _token_weights(m, loss_type, max_completion_length, num_items)

    w = _ratios(d, m, importance_sampling_level)
    # Gradient flows through w unless the clipped branch was strictly selected.
    active = ((Ac > 0) & (w <= 1.0 + eps_high)) | ((Ac < 0) & (w >= 1.0 - eps_low))
    dpolicy_dlogw = np.where(active, -Ac * w, 0.0)  # d(policy term)/d(log w)

    if importance_sampling_level == "token":
        grad = c * dpolicy_dlogw
    else:  # log w_i = sum_t m_it d_it / max(n_i, 1): every token of the row feeds it
        n = np.maximum(m.sum(axis=1, keepdims=True), 1.0)
        C = c.sum(axis=1, keepdims=True)  # total aggregation weight of the row
        grad = C * dpolicy_dlogw * m / n
    if beta != 0.0:
        grad = grad + beta * c * (1.0 - np.exp(x))  # d k3 / d logp = 1 - exp(ref - logp)
    return np.where(on, grad, 0.0)


def fd_grpo_loss_grad(logps, old_logps, ref_logps, advantages, mask, h=1e-6, **kw) -> np.ndarray:
    """Central finite differences of ref_grpo_loss w.r.t. logps (old_logps None is
    treated as a constant copy of logps, i.e. the detached value)."""
    s = np.asarray(logps, dtype=np.float64)
    old = s.copy() if old_logps is None else old_logps
    g = np.zeros_like(s)
    for idx in np.ndindex(*s.shape):
        sp, sm = s.copy(), s.copy()
        sp[idx] += h
        sm[idx] -= h
        lp = ref_grpo_loss(sp, old, ref_logps, advantages, mask, **kw)[0]
        lm = ref_grpo_loss(sm, old, ref_logps, advantages, mask, **kw)[0]
        g[idx] = (lp - lm) / (2 * h)
    return g


# ----------------------------------------------------------------------------- self-check

if __name__ == "__main__":
    close = np.testing.assert_allclose
    nan = np.nan

    # Worked examples 1-4 (advantages).
    A, st = ref_advantages(np.array([[1.0], [0.0]]), np.ones(1), 2)
    close(A, [0.5 / (2**-0.5 + 1e-4), -0.5 / (2**-0.5 + 1e-4)], rtol=1e-12)
    close(A, [0.70700680, -0.70700680], atol=1e-8)
    assert st == {"reward": 0.5, "reward_std": st["reward_std"], "frac_reward_zero_std": 0.0}
    close(st["reward_std"], 2**-0.5, rtol=1e-12)
    A, st = ref_advantages(np.array([[1.0, nan], [0.0, 2.0]]), np.array([1.0, 0.5]), 2)
    assert np.all(A == 0) and st["frac_reward_zero_std"] == 1.0 and st["reward"] == 1.0
    A, st = ref_advantages(np.array([[2.0], [0.0], [nan]]), np.ones(1), 3)
    close(A, [1 / (2**0.5 + 1e-4), -1 / (2**0.5 + 1e-4), 0.0], rtol=1e-12)
    close(A[:2], [0.70705683, -0.70705683], atol=1e-8)
    close([st["reward"], st["reward_std"]], [1.0, 2**0.5], rtol=1e-12)
    A, st = ref_advantages(np.array([[0.0], [1.0], [0.0], [0.0]]), np.ones(1), 2, "batch")
    close(A, np.array([-0.5, 0.5, 0.0, 0.0]) / 0.5001, rtol=1e-12)
    assert st["frac_reward_zero_std"] == 0.0
    A, st = ref_advantages(np.array([[0.0], [1.0], [0.0], [0.0]]), np.ones(1), 2, "group")
    assert st["frac_reward_zero_std"] == 0.5 and A[2] == A[3] == 0.0
    A, _ = ref_advantages(np.array([[0.0], [1.0], [3.0], [3.0]]), np.ones(1), 2, "none")
    close(A, [-0.5, 0.5, 0.0, 0.0])
    A, st = ref_advantages(np.array([[1.0], [nan], [nan], [nan]]), np.ones(1), 2)
    assert np.all(A == 0) and st["reward"] == 1.0 and np.isnan(st["reward_std"])

    # Worked examples 5-7 (loss).
    lp = np.log(np.array([[0.5, 0.25, 0.9]]))
    mk = np.array([[1.0, 1.0, 0.0]])
    for lt in ("dapo", "grpo", "bnpo"):
        loss, _ = ref_grpo_loss(lp, None, None, np.array([1.0]), mk, loss_type=lt)
        close(loss, -1.0)
        close(ref_grpo_loss_grad(lp, None, None, np.array([1.0]), mk, loss_type=lt), [[-0.5, -0.5, 0]])
    kw = dict(loss_type="dr_grpo", max_completion_length=4)
    close(ref_grpo_loss(lp, None, None, np.array([1.0]), mk, **kw)[0], -0.5)
    close(ref_grpo_loss_grad(lp, None, None, np.array([1.0]), mk, **kw), [[-0.25, -0.25, 0]])
    one = np.ones((1, 1))
    for a, want_loss, want_grad, want_high in ((1.0, -1.2, 0.0, 1.0), (-1.0, 1.5, 1.5, 0.0)):
        loss, met = ref_grpo_loss(np.log(1.5) * one, 0 * one, None, np.array([a]), one)
        close(loss, want_loss)
        close(ref_grpo_loss_grad(np.log(1.5) * one, 0 * one, None, np.array([a]), one), [[want_grad]])
        assert met["clip_ratio/high_mean"] == want_high and met["clip_ratio/low_mean"] == 0.0
    d = np.array([[0.2, -0.1, 0.5]])
    gspo = dict(importance_sampling_level="sequence")
    loss, _ = ref_grpo_loss(d, np.zeros_like(d), None, np.array([1.0]), mk, **gspo)
    close(loss, -np.exp(0.05), rtol=1e-12)
    g = ref_grpo_loss_grad(d, np.zeros_like(d), None, np.array([1.0]), mk, **gspo)
    close(g, [[-np.exp(0.05) / 2, -np.exp(0.05) / 2, 0.0]], rtol=1e-12)

    # Analytic gradient vs central finite differences on small random cases. Log-ratios
    # are drawn away from the clip boundaries so the finite differences stay smooth.
    rng = np.random.default_rng(0)
    B, T = 4, 5
    mask = (np.arange(T)[None, :] < np.array([5, 3, 1, 4])[:, None]).astype(float)
    mask[3] = 0.0  # a masked-truncated row
    checked = 0
    for trial in range(6):
        logps = rng.normal(-2.0, 0.5, (B, T))
        sign = rng.choice([-1.0, 1.0], (B, T))
        mag = rng.choice([0.05, 0.1, 0.4, 0.6], (B, T))  # |log w| away from log(0.8), log(1.2)
        old = logps - sign * mag
        ref = logps + rng.normal(0, 0.3, (B, T))
        adv = rng.normal(0, 1, B)
        for lt in LOSS_TYPES:
            for level in ("token", "sequence"):
                for beta in (0.0, 0.04):
                    for o in (old, None):
                        kw = dict(beta=beta, epsilon=0.2, epsilon_high=0.28 if trial % 2 else None,
                                  loss_type=lt, importance_sampling_level=level,
                                  max_completion_length=8, num_items=30 if trial % 3 == 0 else None)
                        if level == "sequence":  # keep the sequence ratio off the clip boundaries too
                            n = np.maximum(mask.sum(1), 1)
                            sd = (((logps - (logps if o is None else o)) * mask).sum(1)) / n
                            lw = np.log([0.8, 1.2 if trial % 2 == 0 else 1.28])
                            if np.any(np.min(np.abs(sd[:, None] - lw[None, :]), axis=1) < 1e-3):
                                continue
                        ga = ref_grpo_loss_grad(logps, o, ref, adv, mask, **kw)
                        gf = fd_grpo_loss_grad(logps, o, ref, adv, mask, **kw)
                        close(ga, gf, rtol=1e-6, atol=1e-8)
                        checked += 1
    print(f"grpo_reference self-check OK ({checked} gradient cases vs finite differences)")
