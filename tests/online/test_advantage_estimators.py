"""RLOO's leave-one-out baseline (with its batch normalisation and KL-in-reward option) and
REINFORCE++'s global batch normalisation, against float64 NumPy written from the formulas
(loops over groups, not the package's vectorised code), and through a real rollout batch."""

import math
import random

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load

from mlx_dpo.compute.reference import token_reference
from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.data.prompts import Prompt
from mlx_dpo.online.advantages import combine_rewards, reinforce_pp_advantages, rloo_advantages
from mlx_dpo.online.grpo import GRPOArgs, make_rollout_source
from mlx_dpo.online.rollout import SamplingParams
from tests.support import adapted_model, cli_args


def rewards_with_nones(seed, groups=6, G=4):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=groups * G)
    r[[1, 6, 7, 9, 10, 11]] = np.nan  # group 1 keeps 2 of 4, group 2 one scorable completion (8)
    r[12:16] = 0.5  # a group with equal rewards
    return r


def np_rloo(r, G, normalize):
    adv = np.full(len(r), np.nan)
    for g in range(len(r) // G):
        idx = [g * G + k for k in range(G) if not math.isnan(r[g * G + k])]
        for i in idx:
            others = [r[j] for j in idx if j != i]
            if others:
                adv[i] = r[i] - sum(others) / len(others)
    if normalize:
        ok = adv[~np.isnan(adv)]
        mean = ok.sum() / len(ok)
        std = math.sqrt(((ok - mean) ** 2).sum() / (len(ok) - 1))
        adv = (adv - mean) / (std + 1e-4)
    return np.where(np.isnan(adv), 0.0, adv)


def np_reinforce_pp(r, G, tokens):
    centred = np.full(len(r), np.nan)
    for g in range(len(r) // G):
        idx = [g * G + k for k in range(G) if not math.isnan(r[g * G + k])]
        for i in idx:
            centred[i] = r[i] - sum(r[j] for j in idx) / len(idx)
    per_token = [centred[i] for i in range(len(r)) if not math.isnan(centred[i]) for _ in range(int(tokens[i]))]
    mean = sum(per_token) / len(per_token)
    var = sum((a - mean) ** 2 for a in per_token) / len(per_token)
    return np.where(np.isnan(centred), 0.0, (centred - mean) / math.sqrt(max(var, 1e-8)))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_matches_numpy(seed, normalize):
    r = rewards_with_nones(seed)
    adv, stats = rloo_advantages(r, 4, normalize)
    np.testing.assert_allclose(adv, np_rloo(r, 4, normalize), rtol=1e-12, atol=1e-12)
    assert adv[8] == 0.0 and adv[9] == 0.0  # the only scorable completion of its prompt, and an unscorable one
    assert stats["frac_reward_zero_std"] == pytest.approx(4 / 24)  # the equal group; a single reward's std is undefined


def test_rloo_two_completions_get_the_difference():
    adv, _ = rloo_advantages(np.array([1.0, 0.0]), 2)
    np.testing.assert_array_equal(adv, [1.0, -1.0])


@pytest.mark.parametrize("seed", [0, 3])
def test_reinforce_pp_matches_numpy_token_weighted(seed):
    r = rewards_with_nones(seed)
    tokens = np.random.default_rng(seed + 10).integers(1, 9, size=len(r)).astype(float)
    adv, _ = reinforce_pp_advantages(r, 4, tokens)
    np.testing.assert_allclose(adv, np_reinforce_pp(r, 4, tokens), rtol=1e-10, atol=1e-12)
    ok = ~np.isnan(r)
    w = tokens[ok]
    assert abs((w * adv[ok]).sum() / w.sum()) < 1e-12  # whitened over tokens: mean 0, variance 1
    assert (w * adv[ok] ** 2).sum() / w.sum() == pytest.approx(1.0, rel=1e-9)


def np_token_logps(model, tokens):
    logits = np.array(model(mx.array(tokens))[:, :-1].astype(mx.float32), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.array(tokens)[:, 1:, None], axis=-1)[..., 0]


@pytest.mark.parametrize("estimator,normalize", [("rloo", False), ("rloo", True), ("reinforce_pp", False)])
def test_a_rollout_batch_carries_numpys_advantages_with_kl_in_the_reward(tiny_model_path, tiny_tokenizer, estimator, normalize):
    model, tok = adapted_model(tiny_model_path), tiny_tokenizer
    base, _ = load(str(tiny_model_path))
    rng = random.Random(0)
    prompts = [Prompt(ids=tok.encode(f"Write a review of item {rng.randint(0, 99)}."), prompt="p") for _ in range(2)]

    def reward(completion_ids, **_):
        return [float(sum(t % 3 == 0 for t in ids)) for ids in completion_ids]

    beta = 0.2
    args = GRPOArgs(num_generations=4, sampling=SamplingParams(temperature=1.0, max_tokens=6), beta=beta, loss_type="grpo",
                    advantage_estimator=estimator, normalize_advantages=normalize, kl_in_reward=True, pad_multiple=1)
    batch = next(make_rollout_source(model, tok, [("r", reward)], args, token_reference(model, None, 1.0))(prompts, 2, loop=True, seed=1))
    assert "reference_logps" not in batch  # the KL went into the reward: the loss has no KL term
    tokens, mask = np.array(batch["tokens"]), np.array(batch["mask"], np.float64)
    kl = ((np_token_logps(model, tokens) - np_token_logps(base, tokens)) * mask).sum(-1)
    completions = [[int(t) for t, m in zip(row[1:], keep) if m] for row, keep in zip(tokens, mask)]
    r = combine_rewards(np.array(reward(completions))[:, None]) - beta * kl
    want = np_rloo(r, 4, normalize) if estimator == "rloo" else np_reinforce_pp(r, 4, mask.sum(-1))
    np.testing.assert_allclose(np.array(batch["advantages"]), want, rtol=2e-4, atol=2e-5)
    assert np.abs(kl).max() > 1e-3  # the KL is not trivially zero
    assert float(batch["stats"]["kl"]) == pytest.approx(kl.sum() / mask.sum(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("overrides,message", [
    ({"loss_type": "grpo", "kl_in_reward": True}, "set beta > 0"),
    ({"loss_type": "grpo", "normalize_advantages": True}, "RLOO's option"),
    ({"loss_type": "grpo", "advantage_estimator": "ppo"}, "advantage_estimator"),
])
def test_rules_are_one_line(tiny_model_path, tiny_data_path, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cli_args(tiny_model_path, tiny_data_path, tmp_path), overrides={"reward_funcs": ["completion_length"], **overrides})
