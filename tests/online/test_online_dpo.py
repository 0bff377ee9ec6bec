"""Online DPO (``online: true``): pairing by reward, the pair batches, TRL's objective/* metrics
against float64 NumPy (real completion tokens only), exact resume, and one-line errors."""

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlx_dpo.compute.reference import adapters_disabled, make_reference
from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.data import load_prompt_splits
from mlx_dpo.lora import main, run
from mlx_dpo.online.online_dpo import (
    OnlineDPOArgs,
    make_pair_rollout_source,
    pick_pairs,
)
from mlx_dpo.online.rollout import SamplingParams
from mlx_dpo.toy import write_jsonl
from tests.support import ROOT, Recorder, make_loss, review_prompts

LOW = 256
REWARDS = f'''
def low_ids(completion_ids, **kwargs):
    return [sum(t < {LOW} for t in ids) / len(ids) for ids in completion_ids]

def broken(completions, **kwargs):
    raise ValueError("the judge is offline")
'''


def test_pick_pairs_higher_wins_ties_go_first_nan_loses_and_the_eos_penalty():
    scores = np.array([[1.0, 0.5], [0.2, 0.9], [0.3, 0.3], [np.nan, 0.1], [0.4, np.nan], [np.nan, np.nan]])
    finished = np.ones_like(scores, bool)
    chosen, used = pick_pairs(scores, finished)
    assert chosen.tolist() == [0, 1, 0, 1, 0, 0]
    np.testing.assert_array_equal(used, scores)
    finished = np.array([[False, True], [True, True], [True, False], [True, True], [True, True], [True, True]])
    chosen, used = pick_pairs(scores, finished, missing_eos_penalty=1.0)
    assert chosen.tolist() == [1, 1, 0, 1, 0, 0]  # 1.0 - 1 < 0.5; 0.3 beats 0.3 - 1
    np.testing.assert_allclose(used[0], [0.0, 0.5])
    np.testing.assert_allclose(used[2], [0.3, -0.7])


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_dpo")
    rows = review_prompts()
    for split in ("train", "valid", "test"):
        write_jsonl(root / "data" / f"{split}.jsonl", rows)
    (root / "rewards.py").write_text(REWARDS)
    return root


def _low_ids(completion_ids, **kwargs):
    return [sum(t < LOW for t in ids) / len(ids) for ids in completion_ids]


def test_pair_batches_and_metrics_match_numpy(tiny_model_path, prompt_data):
    model, tok = load(str(tiny_model_path))
    model.freeze()
    mx.random.seed(0)  # lora_a's initial values: the same samples whatever ran before
    linear_to_lora_layers(model, -1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    rng = np.random.default_rng(0)
    from mlx.utils import tree_flatten

    model.load_weights([(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")], strict=False)
    prompts = load_prompt_splits(str(prompt_data / "data"), tok, 64, splits=("train",))["train"]
    args = OnlineDPOArgs(sampling=SamplingParams(temperature=1.0, max_tokens=8), missing_eos_penalty=0.5, pad_multiple=1)
    source = make_pair_rollout_source(model, tok, [("low_ids", _low_ids)], args)
    batch = next(source(prompts, 4, shuffle=False))
    tokens, mask, lengths = np.array(batch["tokens"]), np.array(batch["mask"]), np.array(batch["lengths"])
    b = 4
    eos = tok.eos_token_id
    comps, finished = [], []
    for r in range(2 * b):
        prompt_len = len(prompts[r % b].ids)
        assert tokens[r, :prompt_len].tolist() == prompts[r % b].ids
        comp = tokens[r, prompt_len : lengths[r]].tolist()
        assert mask[r].sum() == len(comp) and mask[r, prompt_len - 1 : lengths[r] - 1].all()  # completion only
        comps.append(comp)
        finished.append(comp[-1] == eos)
    raw = np.array(_low_ids(comps))
    score = raw - 0.5 * ~np.array(finished)
    assert (score[:b] >= score[b:]).all()  # the chosen row scores at least its rejected row
    stats = {k: v.item() for k, v in batch["stats"].items()}
    assert stats["objective/scores"] == pytest.approx(score.mean(), abs=1e-6)
    assert stats["objective/scores_margin"] == pytest.approx((score[:b] - score[b:]).mean(), abs=1e-6)
    assert stats["val/contain_eos_token"] == pytest.approx(np.mean(finished))
    assert stats["count/completion_tokens"] == sum(len(c) for c in comps)
    assert any(len(c) < max(len(c) for c in comps) for c in comps)  # padding after EOS exists to be left out

    loss, metrics = make_loss("dpo", make_reference(model), beta=0.1, sampled=True)(model, batch)

    def summed(m):  # float64 log-softmax over real completion tokens only
        z = np.array(m(batch["tokens"][:, :-1]), np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
        return (picked * mask).sum(-1)

    policy = summed(model)
    with adapters_disabled(model):
        reference = summed(model)
    kl = (policy - reference).mean()
    assert abs(kl) > 1e-3  # the adapters move the policy: the check can fail
    assert metrics["objective/kl"].item() == pytest.approx(kl, rel=1e-4, abs=1e-5)
    assert metrics["objective/entropy"].item() == pytest.approx(-policy.mean(), rel=1e-5)
    assert metrics["objective/non_score_reward"].item() == pytest.approx(-0.1 * kl, rel=1e-4, abs=1e-6)
    assert metrics["objective/rlhf_reward"].item() == pytest.approx(score.mean() - 0.1 * kl, rel=1e-4, abs=1e-5)
    h = (policy[:b] - reference[:b]) - (policy[b:] - reference[b:])
    want = -np.log(1 / (1 + np.exp(-0.1 * h))).mean()
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_a_skipped_source_samples_what_an_uninterrupted_one_would(tiny_model_path, prompt_data):
    model, tok = load(str(tiny_model_path))
    prompts = load_prompt_splits(str(prompt_data / "data"), tok, 64, splits=("train",))["train"]
    source = make_pair_rollout_source(model, tok, [("low_ids", _low_ids)], OnlineDPOArgs(sampling=SamplingParams(max_tokens=6)))
    full = source(prompts, 4, loop=True, seed=3)
    batches = [next(full) for _ in range(3)]
    resumed = next(source(prompts, 4, loop=True, seed=3, skip=2))
    np.testing.assert_array_equal(np.array(resumed["tokens"]), np.array(batches[2]["tokens"]))
    assert not np.array_equal(np.array(batches[1]["tokens"]), np.array(batches[2]["tokens"]))


def write_config(root: Path, out: Path, **keys) -> Path:
    text = {"model": None, "data": str(root / "data"), "loss_type": "dpo", "online": True, "reward_funcs": ["rewards.low_ids"],
            "max_completion_length": 6, "batch_size": 4, "iters": 8, "learning_rate": 3e-3, "num_layers": -1,
            "steps_per_report": 4, "steps_per_eval": 4, "val_batches": 1, "save_every": 4, "adapter_path": str(out),
            "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}, "train": True, **keys}
    path = root / f"{out.name}.yaml"
    path.write_text(json.dumps(text))  # JSON is YAML
    return path


def test_cli_run_logs_trls_online_metrics(tiny_model_path, prompt_data, tmp_path):
    cfg = write_config(prompt_data, tmp_path / "ad", model=str(tiny_model_path), test=True, test_batches=1)
    rec = Recorder()
    metrics = run(load_config(["--config", str(cfg)]), rec)
    last = rec.train[-1]
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/scores_margin",
                "objective/rlhf_reward", "objective/non_score_reward", "val/contain_eos_token",
                "rewards/chosen", "rewards/margins", "logps/chosen"):
        assert key in last and math.isfinite(last[key]), key
    assert last["objective/scores_margin"] >= 0
    assert "objective/kl" in metrics and metrics["num_pairs"] == 4
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["online"] is True


@pytest.mark.parametrize("keys, message", [
    ({"loss_type": "kto"}, "'online: true' turns a paired objective"),
    ({"precompute_reference": True}, "cannot be precomputed"),
])
def test_online_config_errors(prompt_data, tmp_path, keys, message):
    cfg = write_config(prompt_data, tmp_path / "ad", model="m", **keys)
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(cfg)])


def test_no_reward_functions_and_a_failing_one_are_one_line(tiny_model_path, prompt_data, tmp_path, capsys):
    cfg = write_config(prompt_data, tmp_path / "a", model=str(tiny_model_path), reward_funcs=None)
    with pytest.raises(ConfigError, match="online: true learns from rewards: set 'reward_funcs'"):
        run(load_config(["--config", str(cfg)]))
    cfg = write_config(prompt_data, tmp_path / "b", model=str(tiny_model_path), reward_funcs=["rewards.broken"])
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(cfg)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken" in err[0] and "the judge is offline" in err[0], err


@pytest.mark.parametrize("name, keys", [("online_dpo", ["--iters", "30"]), ("iterative_dpo", ["--iters", "12"])])
def test_the_shipped_demo_configs_turn_reviews_positive(tmp_path, monkeypatch, name, keys):
    """examples/online_dpo.yaml and examples/iterative_dpo.yaml, shortened, on the demo model and its reward."""
    import sys

    root = ROOT
    sys.path.insert(0, str(root / "examples" / "demo"))
    from evaluate import evaluate

    monkeypatch.chdir(root)
    out = tmp_path / name
    args = load_config(["--config", str(root / "examples" / f"{name}.yaml"), *keys, "--adapter-path", str(out), "--val-batches", "0"])
    args.test = False
    run(args)
    base, tuned = evaluate(str(root / "examples" / "demo" / "model"), str(out), n=64, seed=1, max_tokens=48)
    assert tuned["positive"] > base["positive"] + 0.2, (base, tuned)
