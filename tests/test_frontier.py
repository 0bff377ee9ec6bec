"""The frontier command: the evaluation's reward and KL against float64 NumPy, the envelope, a small
sweep of two methods end to end (table, picture), a resumed sweep that redoes nothing, and stops and
failures (Ctrl-C while evaluating or training, a failing reward function, NaN) that end in one line
and resume."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlx_dpo import methods
from mlx_dpo.compute.reference import adapters_disabled
from mlx_dpo import lora
from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.data import load_prompt_splits
from mlx_dpo.frontier import (
    evaluate_policy,
    main,
    read_sweep,
    run_config,
    sweep,
    upper_envelope,
)
from mlx_dpo.online.reward_model import load_reward_model
from mlx_dpo.online.rollout import SamplingParams, sample_groups
from mlx_dpo.toy import preference_records, write_jsonl
from tests.support import ROOT, review_prompts

LOW = 256


def low_ids(completion_ids, **kwargs):
    return [sum(t < LOW for t in ids) / len(ids) for ids in completion_ids]


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    for split in ("train", "valid", "test"):
        write_jsonl(root / "prompts" / f"{split}.jsonl", review_prompts())
        write_jsonl(root / "pairs" / f"{split}.jsonl", preference_records(16, {"train": 0, "valid": 1, "test": 2}[split]))
    (root / "rewards.py").write_text(f"def low_ids(completion_ids, **kwargs):\n    return [sum(t < {LOW} for t in ids) / len(ids) for ids in completion_ids]\n")
    return root


def test_upper_envelope():
    pts = [(0.5, 0.2), (0.1, 0.3), (0.2, 0.25), (0.3, 0.6), (0.3, 0.5), (0.9, 0.55), (1.0, 0.9)]
    assert upper_envelope(pts) == [(0.1, 0.3), (0.3, 0.6), (1.0, 0.9)]


def test_evaluation_matches_numpy(tiny_model_path, sweep_data):
    model, tok = load(str(tiny_model_path))
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, -1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(0)
    model.load_weights([(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")], strict=False)
    prompts = load_prompt_splits(str(sweep_data / "prompts"), tok, 64, splits=("test",))["test"]
    sampling = SamplingParams(temperature=1.0, max_tokens=6)

    class Bypass:  # the reference: the same model with its adapters off
        def __call__(self, x, **kw):
            with adapters_disabled(model):
                return model(x, **kw)

        layers = model.layers

    got = evaluate_policy(model, Bypass(), tok, prompts, [("low_ids", low_ids)], 12, sampling, seed=5)
    chosen = [prompts[i % len(prompts)] for i in range(12)]
    mx.random.seed(5)
    comps = [list(c.token_ids) for c in sample_groups(model, [p.ids for p in chosen], 1, sampling, {tok.eos_token_id})]

    def summed(fn):
        total = []
        for p, c in zip(chosen, comps):
            z = np.array(fn(mx.array([p.ids + c])[:, :-1])[0], np.float64)
            z -= z.max(-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            ids = p.ids + c
            total.append(sum(logp[len(p.ids) - 1 + j, ids[len(p.ids) + j]] for j in range(len(c))))
        return np.array(total)

    kl = summed(model) - summed(Bypass())
    assert abs(kl.mean()) > 1e-3
    assert got["kl"] == pytest.approx(kl.mean(), rel=1e-4, abs=1e-5)
    assert got["reward"] == pytest.approx(np.mean(low_ids(comps)), abs=1e-9)
    assert got["length"] == pytest.approx(np.mean([len(c) for c in comps]))


def write_sweep(root, model, out):
    spec = {
        "output": str(out),
        "eval": {"data": str(root / "prompts"), "reward_funcs": ["rewards.low_ids"], "samples": 8, "max_tokens": 6, "every": 2},
        "runs": [
            {"name": "dpo", "method": "offline DPO", "model": str(model), "data": str(root / "pairs"), "iters": 4,
             "batch_size": 4, "learning_rate": 3e-3, "num_layers": -1, "val_batches": 0},
            {"name": "online", "method": "online DPO", "model": str(model), "data": str(root / "prompts"), "iters": 4,
             "batch_size": 4, "learning_rate": 3e-3, "num_layers": -1, "val_batches": 0, "online": True,
             "reward_funcs": ["rewards.low_ids"], "max_completion_length": 6},
        ],
    }
    path = root / f"{out.name}.yaml"
    path.write_text(json.dumps(spec))
    return path


def test_a_sweep_draws_the_frontier_and_a_second_call_redoes_nothing(tiny_model_path, sweep_data, tmp_path, monkeypatch):
    monkeypatch.chdir(sweep_data)  # the online run's reward file is beside the sweep
    out = tmp_path / "sweep"
    rows = sweep(write_sweep(sweep_data, tiny_model_path, out))
    assert sorted((r["run"], r["step"]) for r in rows) == [("dpo", 0), ("dpo", 2), ("dpo", 4), ("online", 0), ("online", 2), ("online", 4)]
    assert all(r["kl"] == 0.0 for r in rows if r["step"] == 0)  # the base against itself
    assert any(abs(r["kl"]) > 1e-4 for r in rows if r["step"] == 4)
    assert (out / "frontier.png").stat().st_size > 1000 and "| online | online DPO | 4 |" in (out / "frontier.md").read_text()
    before = (out / "frontier.jsonl").read_text()

    def no_training(args):
        raise AssertionError("a finished run was trained again")

    sweep(write_sweep(sweep_data, tiny_model_path, out), train=no_training)
    assert (out / "frontier.jsonl").read_text() == before


def test_a_bad_sweep_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({"runs": [{"name": "a"}], "eval": {"data": "x"}}))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path)])
    assert exit_.value.code == 2 and "eval.reward_funcs is required" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="run names must be distinct"):
        path.write_text(json.dumps({"runs": [{"name": "a"}, {"name": "a"}], "eval": {"data": "x", "reward_funcs": ["r.f"]}}))
        sweep(path)


def test_a_stop_while_evaluating_is_one_line_and_the_sweep_resumes(tiny_model_path, sweep_data, tmp_path, monkeypatch, capsys):
    import mlx_dpo.frontier as frontier

    monkeypatch.chdir(sweep_data)
    out = tmp_path / "stopped"
    path = write_sweep(sweep_data, tiny_model_path, out)
    real, calls = frontier.evaluate_policy, []

    def stopped_at_the_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(frontier, "evaluate_policy", stopped_at_the_third)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 130 and len(err.splitlines()) == 1
    assert "points evaluated so far are kept" in err and "--config" in err
    kept = frontier.read_results(out / "frontier.jsonl")
    assert [(r["run"], r["step"]) for r in kept] == [("dpo", 0), ("dpo", 2)]
    # a stop in the middle of writing a point leaves half a line: it is dropped and evaluated again
    with open(out / "frontier.jsonl", "a") as f:
        f.write('{"run": "dpo", "st')
    assert frontier.read_results(out / "frontier.jsonl") == kept
    monkeypatch.setattr(frontier, "evaluate_policy", real)
    trained = []

    def train_online_only(args):
        trained.append(args.adapter_path)
        from mlx_dpo.lora import run

        return run(args)

    rows = sweep(path, train=train_online_only)
    assert trained == [str(out / "online")]  # the finished run is not trained again
    assert sorted((r["run"], r["step"]) for r in rows) == [("dpo", 0), ("dpo", 2), ("dpo", 4), ("online", 0), ("online", 2), ("online", 4)]
    assert rows[:2] == kept


def test_a_stop_or_failure_while_training_is_one_line_naming_the_run(tiny_model_path, sweep_data, tmp_path, monkeypatch, capsys):
    import mlx_dpo.lora as lora
    from mlx_dpo.online.generations import RolloutError
    from mlx_dpo.train.trainer import NonFiniteError, TrainingInterrupted

    monkeypatch.chdir(sweep_data)
    path = write_sweep(sweep_data, tiny_model_path, tmp_path / "t")

    def interrupted(args):
        raise TrainingInterrupted(2, 2, tmp_path / "t" / "dpo" / "adapters.safetensors")

    monkeypatch.setattr(lora, "run", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 130 and len(err.splitlines()) == 1 and "after step 2" in err and "resume" in err

    def failed(args):
        raise RolloutError("reward function 'f' raised ZeroDivisionError: division by zero")

    monkeypatch.setattr(lora, "run", failed)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert err == "mlx_dpo.frontier: error: training dpo: reward function 'f' raised ZeroDivisionError: division by zero"

    def diverged(args):
        raise NonFiniteError(3, [0, 1], None)

    monkeypatch.setattr(lora, "run", diverged)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 3 and len(err.splitlines()) == 1 and "non-finite loss or gradient at step 3" in err


def test_ctrl_c_in_a_real_sweep_ends_in_one_line_and_the_same_command_resumes(tiny_model_path, sweep_data, tmp_path):
    """A real SIGINT while the second run trains (or loads): exit 130, one line, no traceback; the
    same command then finishes the sweep without training the first run again."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    out = tmp_path / "ctrl_c"
    path = write_sweep(sweep_data, tiny_model_path, out)
    cmd = [sys.executable, "-m", "mlx_dpo.frontier", "--config", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=sweep_data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even where pytest ignores SIGINT
    watchdog = threading.Timer(300, proc.kill)  # a child that never prints the line fails the test, not hangs it
    watchdog.start()
    try:
        for line in proc.stdout:
            if "[frontier] training online" in line:
                proc.send_signal(signal.SIGINT)  # at once: the tiny run could finish within a second
                break
        rest, err = proc.communicate(timeout=300)
    finally:
        watchdog.cancel()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("mlx_dpo.frontier: stopped")
    again = subprocess.run(cmd, cwd=sweep_data, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "training dpo" not in again.stdout
    rows = [json.loads(x) for x in (out / "frontier.jsonl").read_text().splitlines()]
    assert sorted((r["run"], r["step"]) for r in rows) == [("dpo", 0), ("dpo", 2), ("dpo", 4), ("online", 0), ("online", 2), ("online", 4)]


def test_a_reward_function_failing_in_evaluation_is_one_line_and_keeps_the_training(tiny_model_path, sweep_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(sweep_data)
    (sweep_data / "broken.py").write_text("def reward(completions, **kwargs):\n    return [1 / 0 for _ in completions]\n")
    out = tmp_path / "broken"
    path = write_sweep(sweep_data, tiny_model_path, out)
    spec = json.loads(path.read_text())
    spec["eval"]["reward_funcs"] = ["broken.reward"]
    spec["runs"] = spec["runs"][:1]
    path.write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("mlx_dpo.frontier: error:") and "evaluating dpo at step 0: reward function 'reward' raised ZeroDivisionError" in err
    assert (out / "dpo" / "0000004_adapters.safetensors").is_file()  # the trained run stays for the next call


@pytest.mark.parametrize("sweep_file", ["examples/frontier_demo.yaml", "examples/real/frontier.yaml"])
def test_the_shipped_sweeps_validate_and_each_run_trains_the_method_it_names(sweep_file, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the sweeps name their configs and data from the repository root
    path = ROOT / sweep_file
    spec, runs, ev = read_sweep(path)
    named = {"offline DPO": "offline_dpo", "online DPO": "online_dpo", "GRPO": "grpo"}
    for r in runs:
        args = run_config(path, spec.get("base"), r, tmp_path / r["name"], ev["every"], resume=False)
        assert methods.choose(args).name == named[r["method"]], r["name"]


def test_a_proxy_reward_model_is_scored_on_the_same_samples(tiny_model_path, tiny_data_path, sweep_data, tmp_path, monkeypatch):
    """eval.proxy_reward_model: each point also holds the reward model's mean score of the very
    samples the gold reward scored; the table and the picture get the proxy."""
    rm = tmp_path / "rm"
    lora.run(load_config(["--model", str(tiny_model_path), "--data", str(tiny_data_path), "--adapter-path", str(rm),
                          "--train", "--loss-type", "reward", "--iters", "4", "--batch-size", "4", "--num-layers", "-1"]))
    monkeypatch.chdir(sweep_data)
    path, out = write_sweep(sweep_data, tiny_model_path, tmp_path / "proxy"), tmp_path / "proxy"
    spec = json.loads(path.read_text())
    spec["eval"]["proxy_reward_model"] = str(rm)
    spec["runs"] = spec["runs"][:1]
    path.write_text(json.dumps(spec))
    seen = []

    def gold(completions, **kw):  # records what the gold reward saw
        seen.append(list(completions))
        return [0.0] * len(completions)

    monkeypatch.setattr("mlx_dpo.frontier.load_reward_funcs", lambda names, dirs: [("gold", gold)])
    rows = sweep(path)
    scorer = load_reward_model(str(rm))
    prompts = [p.prompt for p in load_prompt_splits(str(sweep_data / "prompts"), scorer.tokenizer, 512, splits=("test",))["test"]]
    for row, completions in zip(sorted(rows, key=lambda r: r["step"]), seen):
        want = np.mean(scorer(prompts=[prompts[i % len(prompts)] for i in range(len(completions))], completions=completions))
        assert row["proxy"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert "mean proxy reward" in (out / "frontier.md").read_text() and (out / "frontier.png").stat().st_size > 1000
