"""Reward models (``loss_type: reward``): the Bradley-Terry loss and its gradient against float64
NumPy, the score read at each row's last token, a CLI run that learns and tests, and the rules."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load

from mlx_dpo.compute.batching import pad_batch
from mlx_dpo.compute.scores import SCORE, add_score_head, sequence_scores
from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.data import build_pairs
from mlx_dpo.lora import run
from mlx_dpo.objectives.loss import reward_loss_fn
from mlx_dpo.objectives.losses import reward_model_loss
from mlx_dpo.toy import preference_records
from tests.support import Recorder, cli_args


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_reward_loss(c, r, m, k):
    """TRL's RewardTrainer loss, and its gradient with respect to the chosen and rejected scores."""
    d = c - r - m
    loss = -np_log_sigmoid(d).mean() + k * ((c + r) ** 2).mean()
    s = 1.0 / (1.0 + np.exp(d))  # -d/dd log sigmoid(d) = 1 - sigmoid(d) = sigmoid(-d)
    n = len(c)
    return loss, -s / n + 2 * k * (c + r) / n, s / n + 2 * k * (c + r) / n


@pytest.mark.parametrize("margin,center", [(None, 0.0), ([0.5, 0.0, 1.5, -0.2, 2.0], 0.0), (None, 0.01), ([0.3] * 5, 0.1)])
def test_the_loss_and_its_gradient_are_numpys(margin, center):
    rng = np.random.default_rng(3)
    c, r = rng.normal(size=5) * 3, rng.normal(size=5) * 3
    m = np.zeros(5) if margin is None else np.array(margin)
    want, grad_c, grad_r = np_reward_loss(c, r, m, center)

    def f(c_, r_):
        return reward_model_loss(c_, r_, None if margin is None else mx.array(m, mx.float32), center)[0]

    loss = f(mx.array(c, mx.float32), mx.array(r, mx.float32))
    gc, gr = mx.grad(f, argnums=(0, 1))(mx.array(c, mx.float32), mx.array(r, mx.float32))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.array(gc), grad_c, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.array(gr), grad_r, rtol=1e-4, atol=1e-7)
    _, metrics = reward_model_loss(mx.array(c, mx.float32), mx.array(r, mx.float32))
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(c > r))
    assert float(metrics["margin"]) == pytest.approx(np.mean(c - r), rel=1e-5)
    assert float(metrics["min_reward"]) == pytest.approx(min(c.min(), r.min()), rel=1e-5)
    assert float(metrics["max_reward"]) == pytest.approx(max(c.max(), r.max()), rel=1e-5)


def test_scores_and_head_gradient_match_numpy_at_the_last_token(tiny_model_path, tiny_tokenizer):
    """Each row's score is the head applied to its last real token's hidden state; the loss's
    gradient with respect to the head is NumPy's float64 chain rule through those states."""
    model, _ = load(str(tiny_model_path))
    model.freeze()
    add_score_head(model, seed=1)
    examples = build_pairs(preference_records(3, 5), tiny_tokenizer, 128)[0]
    batch = pad_batch(examples[:3], pad_id=0)
    lengths = np.array(batch["lengths"])
    assert len(set(lengths.tolist())) > 1  # rows of different lengths: the padding must be skipped
    hidden = np.array(model.model(batch["tokens"]), np.float64)
    last = hidden[np.arange(len(lengths)), lengths - 1]
    w = np.array(model[SCORE].weight, np.float64)[0]
    np.testing.assert_allclose(np.array(sequence_scores(model, batch["tokens"], batch["lengths"])), last @ w, rtol=1e-4, atol=1e-5)

    margin = np.array([0.2, -0.1, 0.4])
    batch["column.margin"] = mx.array(margin, mx.float32)
    loss_fn = reward_loss_fn(center_coefficient=0.05)
    (loss, metrics), grads = nn.value_and_grad(model, loss_fn)(model, batch)
    s = last @ w
    want, gc, gr = np_reward_loss(s[:3], s[3:], margin, 0.05)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose(np.array(grads[SCORE]["weight"])[0], gc @ last[:3] + gr @ last[3:], rtol=1e-3, atol=1e-6)
    assert [k for k, _ in tree_flatten(grads)] == [f"{SCORE}.weight"]  # the frozen body gets no gradient; only the head trains here
    assert float(metrics["weight"]) == 3


def test_cli_trains_a_reward_model_saves_its_head_and_tests_it(tiny_model_path, tiny_data_path, tmp_path):
    rec = Recorder()
    adapters = tmp_path / "rm"
    args = cli_args(tiny_model_path, tiny_data_path, adapters, "--loss-type", "reward", "--test", "--learning-rate", "1e-3", "--iters", "40")
    metrics = run(load_config(args, overrides={"center_rewards_coefficient": 0.01}), rec)
    assert rec.train[-1]["train_loss"] < rec.train[0]["train_loss"]
    saved, head = mx.load(str(adapters / "adapters.safetensors")), mx.load(str(adapters / "score_head.safetensors"))
    assert list(head) == [f"{SCORE}.weight"] and head[f"{SCORE}.weight"].shape == (1, 64)
    assert saved and all("lora" in k for k in saved)  # the adapters file stays mlx-lm's format
    # The toy pairs are learnable: the tested reward model ranks most held-out pairs right.
    assert metrics["num_pairs"] == 16 and metrics["accuracy"] >= 0.75 and metrics["margin"] > 0
    assert json.loads((adapters / "test_metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    # --test alone reads the head back (loss_type from adapter_config.json) and gives the same numbers.
    again = run(load_config(["--model", str(tiny_model_path), "--data", str(tiny_data_path), "--adapter-path",
                             str(adapters), "--test", "--batch-size", "4", "--max-seq-length", "128"]))
    assert again["accuracy"] == metrics["accuracy"] and again["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
    # mlx-lm's own loader takes the folder (it refuses any key that is not an adapter's).
    model, _ = load(str(tiny_model_path), adapter_path=str(adapters))
    assert SCORE not in model


def test_testing_a_folder_without_a_head_is_one_line(tiny_model_path, tiny_data_path, tmp_path):
    adapters = tmp_path / "dpo"
    run(load_config(cli_args(tiny_model_path, tiny_data_path, adapters, "--iters", "2")))
    with pytest.raises(ConfigError, match="holds no reward model's score head"):
        run(load_config(["--model", str(tiny_model_path), "--data", str(tiny_data_path), "--adapter-path",
                         str(adapters), "--test", "--loss-type", "reward", "--max-seq-length", "128"]))


@pytest.mark.parametrize("overrides,message", [
    ({"loss_type": ["reward", "dpo"]}, "cannot be combined"),
    ({"loss_type": "reward", "online": True}, "turns a paired objective"),
    ({"loss_type": "reward", "rounds": 2}, "'rounds' trains a paired objective"),
    ({"loss_type": "reward", "loss_terms": [{"fn": "x.y"}]}, "'loss_terms' work with"),
    ({"loss_type": "reward", "center_rewards_coefficient": -1}, "center_rewards_coefficient"),
])
def test_rules_are_one_line_errors(tiny_model_path, tiny_data_path, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cli_args(tiny_model_path, tiny_data_path, tmp_path), overrides=overrides)


def test_resume_restores_the_head_exactly(tiny_model_path, tiny_data_path, tmp_path):
    base = cli_args(tiny_model_path, tiny_data_path, tmp_path / "x", "--loss-type", "reward", "--learning-rate", "1e-3",
                    "--save-every", "3")
    run(load_config(base + ["--iters", "6", "--adapter-path", str(tmp_path / "full")]))
    run(load_config(base + ["--iters", "3", "--adapter-path", str(tmp_path / "split")]))
    assert (tmp_path / "split" / "0000003_score_head.safetensors").is_file()
    run(load_config(base + ["--iters", "6", "--adapter-path", str(tmp_path / "split"), "--resume"]))
    for name in ("score_head.safetensors", "adapters.safetensors"):
        full, resumed = mx.load(str(tmp_path / "full" / name)), mx.load(str(tmp_path / "split" / name))
        assert full.keys() == resumed.keys()
        for k in full:
            np.testing.assert_allclose(np.array(resumed[k]), np.array(full[k]), rtol=1e-5, atol=1e-6)
