"""GRPO's advantages and loss against the independent float64 NumPy reference (tests/online/grpo_reference.py,
written from the formulas and TRL 1.16.0's semantics), plus finite-difference gradients."""

import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dpo.online.advantages import combine_rewards, group_advantages
from mlx_dpo.online.policy_losses import grpo_loss
from tests.online.grpo_reference import (
    fd_grpo_loss_grad,
    ref_advantages,
    ref_grpo_loss,
    ref_grpo_loss_grad,
)


def inputs(seed, B=6, T=7, off_policy=True, beta=0.0):
    rng = np.random.default_rng(seed)
    logps = rng.normal(-2.0, 0.8, (B, T))
    old = logps + rng.normal(0, 0.5, (B, T)) if off_policy else None  # ratios beyond both clip edges
    ref = logps + rng.normal(0, 0.5, (B, T)) if beta else None
    adv = rng.normal(0, 1, B)
    adv[0] = 0.0
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    mask[-1] = 0.0  # a masked truncated completion: a row with no tokens
    return logps, old, ref, adv, mask


CASES = list(itertools.product(("grpo", "bnpo", "dr_grpo", "dapo"), ("token", "sequence"), (0.0, 0.04), (True, False)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("loss_type, level, beta, off_policy", CASES)
def test_loss_gradient_and_metrics_match_the_numpy_reference(loss_type, level, beta, off_policy, seed):
    logps, old, ref, adv, mask = inputs(CASES.index((loss_type, level, beta, off_policy)) * 10 + seed, off_policy=off_policy, beta=beta)
    kw = dict(beta=beta, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, importance_sampling_level=level, max_completion_length=9)
    num_items = mask.sum() * 3  # dapo: the generation batch has more tokens than this micro-batch
    expected, ref_metrics = ref_grpo_loss(logps, old, ref, adv, mask, num_items=num_items, **kw)
    expected_grad = ref_grpo_loss_grad(logps, old, ref, adv, mask, num_items=num_items, **kw)

    args = lambda x: (x, mx.array(adv, mx.float32), mx.array(mask, mx.float32),
                      None if old is None else mx.array(old, mx.float32), None if ref is None else mx.array(ref, mx.float32))
    normalizer = mx.array(num_items, mx.float32)
    loss, metrics = grpo_loss(*args(mx.array(logps, mx.float32)), normalizer=normalizer, **kw)
    grad = mx.grad(lambda x: grpo_loss(*args(x), normalizer=normalizer, **kw)[0])(mx.array(logps, mx.float32))
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(np.array(grad), expected_grad, rtol=2e-4, atol=1e-6)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert float(metrics[key]) == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7), key


def test_both_clip_edges_cut_the_gradient_and_are_counted():
    """Ratio 1.5 with A > 0 (above 1 + 0.28) and 0.5 with A < 0 (below 1 - 0.2): clipped, no gradient."""
    logps = np.log(np.array([[1.5, 1.0], [0.5, 1.0]]))
    old = np.zeros((2, 2))
    adv, mask = np.array([1.0, -1.0]), np.ones((2, 2))
    kw = dict(epsilon=0.2, epsilon_high=0.28, loss_type="bnpo")
    loss, metrics = grpo_loss(mx.array(logps, mx.float32), mx.array(adv, mx.float32), mx.array(mask, mx.float32),
                              mx.array(old, mx.float32), **kw)
    grad = mx.grad(lambda x: grpo_loss(x, mx.array(adv, mx.float32), mx.array(mask, mx.float32), mx.array(old, mx.float32), **kw)[0])(
        mx.array(logps, mx.float32))
    expected, ref_metrics = ref_grpo_loss(logps, old, None, adv, mask, **kw)
    assert float(loss) == pytest.approx(expected, rel=1e-6) == pytest.approx((-1.28 - 1.0 + 0.8 + 1.0) / 4, rel=1e-6)
    np.testing.assert_allclose(np.array(grad), [[0.0, -0.25], [0.0, 0.25]], atol=1e-7)
    assert float(metrics["clip_ratio/high_mean"]) == ref_metrics["clip_ratio/high_mean"] == 0.25
    assert float(metrics["clip_ratio/low_mean"]) == ref_metrics["clip_ratio/low_mean"] == 0.25
    assert float(metrics["clip_ratio/region_mean"]) == 0.5


def test_reference_gradient_agrees_with_finite_differences():
    """The analytic float64 gradient the MLX one is compared with is itself checked by central differences."""
    logps, old, ref, adv, mask = inputs(3, beta=0.1)
    for loss_type in ("grpo", "dapo"):
        kw = dict(beta=0.1, loss_type=loss_type, max_completion_length=9)
        np.testing.assert_allclose(ref_grpo_loss_grad(logps, old, ref, adv, mask, **kw),
                                   fd_grpo_loss_grad(logps, old, ref, adv, mask, **kw), rtol=1e-5, atol=1e-8)


def test_on_policy_ratio_is_one_and_gradient_is_reinforce():
    """mu = 1: no old log-probs; the loss value is -mean(A) per token and d/dlogp = -A / tokens."""
    logps, _, _, adv, mask = inputs(5, off_policy=False)
    m = mx.array(mask, mx.float32)
    grad = mx.grad(lambda x: grpo_loss(x, mx.array(adv, mx.float32), m, loss_type="bnpo")[0])(mx.array(logps, mx.float32))
    np.testing.assert_allclose(np.array(grad), -adv[:, None] * mask / mask.sum(), rtol=1e-5, atol=1e-7)


def rewards_with_nones(seed, groups=5, G=4, F=2):
    rng = np.random.default_rng(seed)
    R = rng.integers(0, 3, (groups * G, F)).astype(np.float64)
    R[rng.random(R.shape) < 0.2] = np.nan
    R[0:G] = 1.0  # a group with all-equal rewards
    R[G] = np.nan  # a completion every function abstained on
    R[2 * G : 2 * G + G - 1] = np.nan  # a group with a single valid reward
    return R


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_and_stats_match_the_numpy_reference(scale):
    for seed in range(20):
        R = rewards_with_nones(seed)
        weights = np.array([1.0, 0.5])
        combined = combine_rewards(R, weights)
        adv, stats = group_advantages(combined, 4, scale)
        expected, ref_stats = ref_advantages(R, weights, 4, scale)
        np.testing.assert_allclose(adv, expected, rtol=1e-12, atol=1e-12)
        for key in ("reward", "reward_std", "frac_reward_zero_std"):
            assert stats[key] == pytest.approx(ref_stats[key], rel=1e-12), key
        assert np.all(adv[0:4] == 0.0) and adv[4] == 0.0 and np.all(adv[8:12] == 0.0)


def test_two_completions_with_different_rewards_get_plus_minus_one_over_root_two():
    adv, stats = group_advantages(np.array([1.0, 0.0]), 2)
    np.testing.assert_allclose(adv, [0.5 / (2**-0.5 + 1e-4), -0.5 / (2**-0.5 + 1e-4)], rtol=1e-12)
    assert stats["frac_reward_zero_std"] == 0.0
    adv, stats = group_advantages(np.array([3.0, 3.0, 0.0, 1.0]), 2)
    assert list(adv[:2]) == [0.0, 0.0] and stats["frac_reward_zero_std"] == 0.5


def test_token_logps_are_tempered_log_softmax_chunked_or_not(tiny_model_path):
    """Per-token log-probs and entropies at temperature T against float64 NumPy on the model's own logits."""
    from mlx_lm.utils import load

    from mlx_dpo.compute.logps import get_token_logps

    model, _ = load(str(tiny_model_path))
    tokens = mx.array(np.random.default_rng(0).integers(3, 500, (3, 21)).astype(np.int32))
    logits = np.array(model(tokens[:, :-1]).astype(mx.float32)).astype(np.float64) / 0.7
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = np.take_along_axis(logits, np.array(tokens)[:, 1:, None], -1)[..., 0] - logz
    p = np.exp(logits - logz[..., None])
    want_entropy = -(p * np.log(p)).sum(-1)
    for start, chunk in ((0, 0), (8, 0), (8, 5), (0, 4)):
        logps, entropy = get_token_logps(model, tokens, start, 0.7, with_entropy=True, chunk_size=chunk)
        np.testing.assert_allclose(np.array(logps), want[:, start:], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array(entropy), want_entropy[:, start:], rtol=1e-4, atol=1e-4)
    # The chunked path's gradient equals the plain one's.
    from mlx.utils import tree_flatten

    def grads(chunk):
        f = lambda m: get_token_logps(m, tokens, 8, 0.7, chunk_size=chunk)[0].sum()
        return dict(tree_flatten(nn.value_and_grad(model, f)(model)[1]))

    a, b = grads(0), grads(5)
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-3, atol=1e-5)
