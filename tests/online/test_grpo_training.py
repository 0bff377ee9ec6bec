"""GRPO end to end through ``mlx_dpo.lora``: it learns from a reward file, logs TRL's metrics,
resumes exactly, and a failing reward function ends in one line after a checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.lora import run
from mlx_dpo.toy import write_jsonl
from mlx_dpo.train.checkpoint import STATE, load_training_state
from mlx_dpo.train.metrics_log import read_metrics
from tests.support import REVIEW_ITEMS, ROOT, review_prompts

BIN = Path(sys.executable).parent
DEMO = ROOT / "examples" / "demo"
LOW = 256  # the tiny model's reward asks for token ids below this (about half of its vocabulary)

REWARDS = f'''
import os

def low_ids(completions, completion_ids, **kwargs):
    return [sum(t < {LOW} for t in ids) / len(ids) for ids in completion_ids]

def short(completion_ids, topic, **kwargs):
    assert len(topic) == len(completion_ids)  # a dataset column arrives, one entry per completion
    return [None if t == "skip" else -len(ids) / 16 for ids, t in zip(completion_ids, topic)]

CALLS = [0]

def breaks_on_third_call(completions, **kwargs):
    CALLS[0] += 1
    if CALLS[0] == 3:
        raise ValueError("the judge is offline")
    return [0.0 for _ in completions]
'''


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    rows = [{**row, "topic": "skip" if i == 3 else it} for i, (row, it) in enumerate(zip(review_prompts(), REVIEW_ITEMS))]
    for split in ("train", "valid", "test"):
        write_jsonl(root / "data" / f"{split}.jsonl", rows)
    (root / "rewards.py").write_text(REWARDS)
    return root


def config(root, out, *extra, **keys):
    text = {"loss_type": "dapo", "reward_funcs": ["rewards.low_ids"], "num_generations": 4,
            "max_completion_length": 6, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.1}, **keys}
    path = root / f"{out.name}.yaml"
    path.write_text(json.dumps(text))  # JSON is YAML; the reward file sits beside the config
    return ["--config", str(path), "--data", str(root / "data"), "--adapter-path", str(out), "--train",
            "--batch-size", "2", "--num-layers", "-1", "--steps-per-report", "1", "--val-batches", "0",
            "--learning-rate", "3e-2", *extra]


def test_learns_from_a_reward_file_and_logs_trl_metrics(tmp_path, monkeypatch):
    """The shipped demo model and its sentiment reward (examples/grpo.yaml, shortened): held-out reviews turn positive."""
    sys.path.insert(0, str(DEMO))
    from evaluate import evaluate

    monkeypatch.chdir(ROOT)
    out = tmp_path / "ad"
    args = load_config(["--config", str(ROOT / "examples" / "grpo.yaml"), "--iters", "16", "--adapter-path", str(out),
                        "--val-batches", "0", "--steps-per-report", "4"])
    args.test = False
    run(args)
    records = [r for r in read_metrics(out) if r["split"] == "train"]
    for key in ("loss", "reward", "reward_std", "rewards/positive/mean", "rewards/positive/std",
                "frac_reward_zero_std", "entropy", "completions/mean_length", "completions/min_length",
                "completions/max_length", "completions/clipped_ratio", "clip_ratio/region_mean", "num_tokens",
                "rollout_seconds", "train_seconds", "rollout_tokens_per_second"):
        assert key in records[-1], key
    assert "kl" not in records[-1]  # beta 0: no reference pass at all
    assert records[-1]["completions/max_length"] <= args.max_completion_length
    base, tuned = evaluate(str(DEMO / "model"), str(out), n=64, seed=1, max_tokens=48)  # mlx-lm loads the adapters
    assert tuned["positive"] > base["positive"] + 0.2, (base, tuned)
    assert tuned["kl_per_token"] > 0


def test_resume_continues_with_the_same_completions_and_weights(tiny_model_path, prompt_data, tmp_path, monkeypatch):
    monkeypatch.chdir(prompt_data)
    extra = ["--model", str(tiny_model_path), "--grad-accumulation-steps", "2", "--save-every", "4"]
    keys = dict(num_iterations=2, reward_funcs=["rewards.low_ids", "rewards.short"], reward_weights=[1.0, 0.5])
    full, split = tmp_path / "full", tmp_path / "split"
    run(load_config(config(prompt_data, full, *extra, "--iters", "12", **keys)))
    run(load_config(config(prompt_data, split, *extra, "--iters", "8", **keys)))
    assert load_training_state(split / STATE)[1] == 8
    run(load_config(config(prompt_data, split, *extra, "--iters", "12", "--resume", **keys)))
    a, b = (mx.load(str(p / "adapters.safetensors")) for p in (full, split))
    assert max(float(mx.abs(v).max()) for k, v in a.items() if "lora_b" in k) > 1e-3
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-4, atol=1e-6)
    same = lambda p: [(r["step"], r["reward"], r["completions/mean_length"]) for r in read_metrics(p) if r["split"] == "train"]
    assert same(full)[8:] == same(split)[8:]  # steps 9-12 sampled the same completions
    train = [r for r in read_metrics(full) if r["split"] == "train"]
    assert all(r["clip_ratio/region_mean"] >= 0 for r in train)
    # mu = 2: the rollout's time is counted once per generation batch, not once per reuse.
    assert all(r["train_seconds"] > 0 and 0 <= r["rollout_share"] < 1 for r in train)
    assert any(r["rollout_share"] > 0 for r in train)


@pytest.mark.parametrize("fine_tune_type", ["lora", "full"])  # reference: adapters bypassed, or a frozen copy
def test_kl_term_sequence_level_and_sampling_filters_run(tiny_model_path, prompt_data, tmp_path, monkeypatch, fine_tune_type):
    monkeypatch.chdir(prompt_data)
    out = tmp_path / "ad"
    run(load_config(config(prompt_data, out, "--model", str(tiny_model_path), "--iters", "4", "--fine-tune-type",
                           fine_tune_type, "--learning-rate", "3e-3" if fine_tune_type == "full" else "3e-2", beta=0.1,
                           loss_type="grpo", importance_sampling_level="sequence", scale_rewards="batch",
                           top_k=20, top_p=0.9, min_p=0.01)))
    last = [r for r in read_metrics(out) if r["split"] == "train"][-1]
    assert last["kl"] > 0 and last["entropy"] > 0 and np.isfinite(last["loss"])


def test_masked_truncated_completions_train_nothing(tiny_model_path, prompt_data, tmp_path, monkeypatch):
    """The random model never draws EOS within 6 tokens: every completion is truncated, so masked out."""
    monkeypatch.chdir(prompt_data)
    out = tmp_path / "ad"
    run(load_config(config(prompt_data, out, "--model", str(tiny_model_path), "--iters", "2", mask_truncated_completions=True)))
    last = [r for r in read_metrics(out) if r["split"] == "train"][-1]
    assert last["completions/clipped_ratio"] == 1.0 and last["entropy"] == 0.0 and last["loss"] == 0.0
    assert all(float(mx.abs(v).max()) == 0 for k, v in mx.load(str(out / "adapters.safetensors")).items() if "lora_b" in k)


def cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "mlx_dpo.lora", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def test_a_failing_reward_function_is_one_line_after_a_checkpoint(tiny_model_path, prompt_data, tmp_path):
    out = tmp_path / "ad"
    res = cli(config(prompt_data, out, "--model", str(tiny_model_path), "--iters", "6", "--save-every", "1",
                     reward_funcs=["rewards.breaks_on_third_call"]), cwd=prompt_data)
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "breaks_on_third_call" in err[0] and "the judge is offline" in err[0], err
    assert load_training_state(out / STATE)[1] == 2  # steps 1 and 2 are kept


def test_a_missing_reward_function_fails_before_training(tiny_model_path, prompt_data, tmp_path, monkeypatch):
    monkeypatch.chdir(prompt_data)
    with pytest.raises(ConfigError, match="rewards.no_such_function"):
        run(load_config(config(prompt_data, tmp_path / "ad", "--model", str(tiny_model_path), "--iters", "2",
                               reward_funcs=["rewards.no_such_function"])))
    with pytest.raises(ConfigError, match="reward_funcs"):
        run(load_config(config(prompt_data, tmp_path / "ad", "--model", str(tiny_model_path), "--iters", "2",
                               reward_funcs=None)))


def test_two_processes_each_sample_their_own_prompts(tiny_model_path, prompt_data, tmp_path):
    """Each rank samples its own prompts; a last validation batch of 3 prompts leaves one rank with
    none, and it still takes part in every collective (no hang)."""
    data = tmp_path / "data"
    rows = [json.loads(x) for x in (prompt_data / "data" / "train.jsonl").read_text().splitlines()]
    for split, part in (("train", rows), ("valid", rows[:3]), ("test", rows[:3])):
        write_jsonl(data / f"{split}.jsonl", part)
    out = tmp_path / "two"
    args = config(prompt_data, out, "--model", str(tiny_model_path), "--iters", "3", scale_rewards="batch")
    args[args.index("--data") + 1] = str(data)
    args[args.index("--val-batches") + 1] = "-1"
    cmd = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", "2", "--python", sys.executable, "-m", "mlx_dpo.lora",
           *args, "--steps-per-eval", "2", "--test"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=prompt_data)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    records = [r for r in read_metrics(out) if r["split"] == "train"]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    assert [r["step"] for r in read_metrics(out) if r["split"] == "eval"] == [0, 1, 2]
    assert json.loads((out / "test_metrics.json").read_text())["num_completions"] == 3 * 4


def test_a_reward_failure_on_one_process_stops_both(tiny_model_path, prompt_data, tmp_path):
    out = tmp_path / "two"
    (tmp_path / "picky.py").write_text(
        "def picky(completions, topic, **kwargs):\n"
        "    if 'the hotel' in topic:\n        raise RuntimeError('no hotels')\n"
        "    return [0.0 for _ in completions]\n"
    )
    cmd = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", "2", "--python", sys.executable, "-m", "mlx_dpo.lora",
           *config(prompt_data, out, "--model", str(tiny_model_path), "--iters", "8", "--batch-size", "8",
                   reward_funcs=["picky.picky"])]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # a hang fails by timeout
    assert "reward function 'picky'" in res.stderr and "no hotels" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
