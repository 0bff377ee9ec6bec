"""Iterative DPO (``rounds``): best/worst pairing, the pairs written per round and checked against
their rewards, the per-round reference against an independent pass, exact resume, one-line errors."""

import json
import os
import signal

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load

from mlx_dpo.compute.batching import iterate_batches
from mlx_dpo.compute.forward import sequence_logps
from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.data import DataError
from mlx_dpo.lora import run
from mlx_dpo.online.iterative import best_worst, pairs_dataset
from mlx_dpo.toy import write_jsonl
from mlx_dpo.train.checkpoint import STATE, load_training_state
from mlx_dpo.train.trainer import TrainingInterrupted
from tests.support import review_prompts

LOW = 256
REWARDS = f'''
def low_ids(completion_ids, **kwargs):
    return [sum(t < {LOW} for t in ids) / len(ids) for ids in completion_ids]

def constant(completions, **kwargs):
    return [1.0 for _ in completions]

CALLS = [0]

def low_then_constant(completion_ids, **kwargs):
    CALLS[0] += 1  # round 1 scores train (2 batches) and valid (1): then every sample scores the same
    return low_ids(completion_ids) if CALLS[0] <= 3 else [1.0 for _ in completion_ids]

def low_ids_stop(completion_ids, **kwargs):
    import os
    marker = os.environ["STOP_MARKER"]
    if os.path.exists(marker) and open(marker).read() == "round 2":
        os.remove(marker)
        raise KeyboardInterrupt  # as Ctrl-C while round 2 samples
    return low_ids(completion_ids)
'''


def test_best_worst_pairs_and_ties():
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [0.7, 0.2, 0.7], [np.nan, 0.4, 0.1], [0.5, 0.2, 0.2]])
    assert best_worst(scores) == [(1, 0), None, (0, 1), (1, 0), (0, 2)]


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    rows = review_prompts()
    for split in ("train", "valid", "test"):
        write_jsonl(root / "data" / f"{split}.jsonl", rows[: 8 if split == "train" else 4])
    (root / "rewards.py").write_text(REWARDS)
    return root


def config(root, out, model, **keys):
    text = {"model": str(model), "data": str(root / "data"), "loss_type": "dpo", "rounds": 2, "samples_per_prompt": 3,
            "reward_funcs": ["rewards.low_ids"], "max_completion_length": 6, "batch_size": 4, "iters": 4,
            "learning_rate": 3e-3, "num_layers": -1, "steps_per_report": 2, "steps_per_eval": 4, "val_batches": 1,
            "save_every": 2, "adapter_path": str(out), "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
            "train": True, **keys}
    path = root / f"{out.name}.yaml"
    path.write_text(json.dumps(text))
    return path


def read_pairs(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rounds_write_pairs_that_match_their_rewards(tiny_model_path, prompt_data, tmp_path):
    out = tmp_path / "ad"
    metrics = run(load_config(["--config", str(config(prompt_data, out, tiny_model_path, test=True, test_batches=1))]))
    _, tok = load(str(tiny_model_path))
    for k in (1, 2):
        pairs = read_pairs(out / f"round_{k}" / "pairs.jsonl")
        assert 0 < len(pairs) <= 8
        for p in pairs:
            low = [sum(t < LOW for t in p[f"{s}_ids"]) / len(p[f"{s}_ids"]) for s in ("chosen", "rejected")]
            assert p["score_chosen"] == pytest.approx(low[0]) and p["score_rejected"] == pytest.approx(low[1])
            assert p["score_chosen"] > p["score_rejected"]
            assert p["chosen"] == tok.decode([t for t in p["chosen_ids"] if t != tok.eos_token_id], skip_special_tokens=True)
            assert p["prompt"].startswith("Write a review of")
        assert (out / f"round_{k}" / "valid_pairs.jsonl").is_file()
    assert read_pairs(out / "round_1" / "pairs.jsonl") != read_pairs(out / "round_2" / "pairs.jsonl")
    assert load_training_state(out / STATE)[1] == 8  # steps are counted over both rounds
    assert (out / "test" / "test_pairs.jsonl").is_file() and metrics["num_pairs"] > 0
    assert json.loads((out / "adapter_config.json").read_text())["rounds"] == 2


@pytest.mark.parametrize("update", ["base", "per_round"])
def test_each_rounds_reference_is_the_base_or_the_policy_that_started_it(tiny_model_path, prompt_data, tmp_path, update):
    out = tmp_path / update
    run(load_config(["--config", str(config(prompt_data, out, tiny_model_path, reference_update=update))]))
    dataset = pairs_dataset(read_pairs(out / "round_2" / "pairs.jsonl"), 2048)
    saved = np.array(mx.load(str(out / "round_2" / "train_reference.safetensors"))["reference_logps"])
    # An independent pass: the base model, or the model with round 1's last checkpoint (step 4).
    if update == "per_round":
        (out / "after1").mkdir()
        (out / "after1" / "adapters.safetensors").write_bytes((out / "0000004_adapters.safetensors").read_bytes())
        (out / "after1" / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
        model, _ = load(str(tiny_model_path), adapter_path=str(out / "after1"))
    else:
        model, _ = load(str(tiny_model_path))
    want = np.zeros_like(saved)
    for batch in iterate_batches(dataset, 4, shuffle=False, drop_last=False):
        idx = np.array(batch["index"])
        want[idx] = np.array(sequence_logps(model, batch)[0]).reshape(2, -1).T
    np.testing.assert_allclose(saved, want, rtol=1e-4, atol=1e-4)
    base, _ = load(str(tiny_model_path))
    base_logps = np.zeros_like(saved)
    for batch in iterate_batches(dataset, 4, shuffle=False, drop_last=False):
        base_logps[np.array(batch["index"])] = np.array(sequence_logps(base, batch)[0]).reshape(2, -1).T
    assert np.allclose(saved, base_logps, atol=1e-4) == (update == "base")  # the two settings really differ


class StopAt:
    """A callback that sends SIGINT once the report of ``step`` is in (as Ctrl-C would)."""

    def __init__(self, step):
        self.step = step

    def on_train_loss_report(self, info):
        if info["iteration"] == self.step:
            os.kill(os.getpid(), signal.SIGINT)

    def on_val_loss_report(self, info):
        pass


def test_a_stopped_run_resumes_at_its_round_and_step(tiny_model_path, prompt_data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    run(load_config(["--config", str(config(prompt_data, full, tiny_model_path, reference_update="per_round"))]))
    cfg = config(prompt_data, split, tiny_model_path, reference_update="per_round")
    with pytest.raises(TrainingInterrupted) as stopped:
        run(load_config(["--config", str(cfg)]), StopAt(6))
    assert 4 < stopped.value.step < 8  # inside round 2
    pairs = (split / "round_2" / "pairs.jsonl").read_text()
    run(load_config(["--config", str(cfg), "--resume"]))
    assert (split / "round_2" / "pairs.jsonl").read_text() == pairs  # the round's pairs are reused, not resampled
    assert pairs == (full / "round_2" / "pairs.jsonl").read_text()
    a, b = (mx.load(str(p / "adapters.safetensors")) for p in (full, split))
    assert max(float(mx.abs(v).max()) for k, v in a.items() if "lora_b" in k) > 1e-3
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("keys, message", [
    ({"loss_type": "simpo"}, "'rounds' trains a paired objective with a reference"),
    ({"loss_type": "kto"}, "'rounds' trains a paired objective with a reference"),
    ({"online": True}, "choose one"),
    ({"samples_per_prompt": 1}, "invalid value for 'samples_per_prompt'"),
    ({"reference_update": "ema"}, "invalid value for 'reference_update'"),
    ({"temperature": 0}, "greedy sampling draws the same completion twice"),
    ({"grad_accumulation_steps": 3}, "invalid value for 'iters': 4 \\(must be a multiple of grad_accumulation_steps=3"),
    ({"reward_weights": [1.0, -5.0]}, "2 weights for 1 reward functions"),
    ({"prompts_per_round": 2}, "fewer than batch_size=4"),
    ({"reference_update": "per_round", "loss_terms": [{"fn": "constraints.no_chosen_drop"}]}, "per_round' is not supported"),
    ({"rounds": None, "online": True, "temperature": 0}, "greedy sampling"),
    ({"rounds": None, "online": True, "reward_weights": [1.0, 2.0]}, "2 weights for 1 reward functions"),
])
def test_rounds_config_errors(prompt_data, tmp_path, keys, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(config(prompt_data, tmp_path / "ad", "m", **keys))])


def test_a_reward_that_never_separates_samples_is_one_line(tiny_model_path, prompt_data, tmp_path):
    out = tmp_path / "ad"
    with pytest.raises(ValueError, match="round 1: every prompt's samples scored the same"):
        run(load_config(["--config", str(config(prompt_data, out, tiny_model_path, reward_funcs=["rewards.constant"]))]))
    assert (out / "round_1" / "pairs.jsonl").read_text() == ""  # written, so a person can see why


def test_epochs_per_round_caps_a_small_rounds_steps(tiny_model_path, prompt_data, tmp_path):
    from mlx_dpo.train.metrics_log import read_metrics

    out = tmp_path / "ad"
    run(load_config(["--config", str(config(prompt_data, out, tiny_model_path, iters=10, steps_per_report=1,
                                            epochs_per_round=1, save_every=10))]))
    trained = sorted({r["step"] for r in read_metrics(out) if r["split"] == "train"})
    for k in (1, 2):
        n = len(read_pairs(out / f"round_{k}" / "pairs.jsonl"))
        in_round = [s for s in trained if (k - 1) * 10 < s <= k * 10]
        assert in_round == list(range((k - 1) * 10 + 1, (k - 1) * 10 + 1 + n // 4))  # one pass over n pairs
    assert load_training_state(out / STATE)[1] == 20  # each round ends at its nominal last step
    assert (out / "0000010_adapters.safetensors").is_file()


def test_a_fresh_run_never_reuses_an_earlier_runs_pairs(tiny_model_path, prompt_data, tmp_path):
    out = tmp_path / "ad"
    (out / "round_1").mkdir(parents=True)
    stale = {"prompt": "stale", "chosen": "x", "rejected": "y", "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}
    (out / "round_1" / "pairs.jsonl").write_text(json.dumps(stale) + "\n")
    run(load_config(["--config", str(config(prompt_data, out, tiny_model_path, rounds=1))]))
    assert all(p["prompt"] != "stale" for p in read_pairs(out / "round_1" / "pairs.jsonl"))


def test_ctrl_c_while_a_round_samples_resumes_from_the_last_round(tiny_model_path, prompt_data, tmp_path, monkeypatch):
    full, split = tmp_path / "full", tmp_path / "split"
    run(load_config(["--config", str(config(prompt_data, full, tiny_model_path))]))
    marker = tmp_path / "marker"
    monkeypatch.setenv("STOP_MARKER", str(marker))
    cfg = config(prompt_data, split, tiny_model_path, reward_funcs=["rewards.low_ids_stop"])

    class Arm:  # arms the marker once round 1 has trained, so the interrupt lands in round 2's sampling
        def on_train_loss_report(self, info):
            if info["iteration"] == 4:
                marker.write_text("round 2")

        def on_val_loss_report(self, info):
            pass

    with pytest.raises(TrainingInterrupted) as stopped:
        run(load_config(["--config", str(cfg)]), Arm())
    assert stopped.value.step == 4 and not (split / "round_2" / "pairs.jsonl").exists()
    run(load_config(["--config", str(cfg), "--resume"]))
    assert (split / "round_2" / "pairs.jsonl").read_text() == (full / "round_2" / "pairs.jsonl").read_text()
    a, b = (mx.load(str(p / "adapters.safetensors")) for p in (full, split))
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-4, atol=1e-6)


def test_a_later_round_without_pairs_trains_nothing_and_the_run_goes_on(tiny_model_path, prompt_data, tmp_path, capsys):
    out = tmp_path / "ad"
    with pytest.raises(DataError, match="no test pairs"):  # the test prompts cannot be paired either
        run(load_config(["--config", str(config(prompt_data, out, tiny_model_path, reward_funcs=["rewards.low_then_constant"],
                                                test=True))]))
    assert read_pairs(out / "round_1" / "pairs.jsonl") and (out / "round_2" / "pairs.jsonl").read_text() == ""
    assert "[INFO] round 2: 0 pairs" in capsys.readouterr().out
    assert load_training_state(out / STATE)[1] == 8  # round 2 ended at its step, nothing lost
