"""The frontier command: the evaluation's reward and KL against float64 NumPy, the envelope, a small
sweep of two methods end to end (table, picture), and a resumed sweep that redoes nothing."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlx_dpo.config import ConfigError
from mlx_dpo.data import load_prompt_splits
from mlx_dpo.frontier import evaluate_policy, main, sweep, upper_envelope
from mlx_dpo.reference import adapters_disabled
from mlx_dpo.rollout import SamplingParams, sample_groups
from mlx_dpo.toy import preference_records, write_jsonl

LOW = 256


def low_ids(completion_ids, **kwargs):
    return [sum(t < LOW for t in ids) / len(ids) for ids in completion_ids]


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    items = ["the film", "this book", "the hotel", "our dinner", "the concert", "the phone", "this game", "the park"]
    for split in ("train", "valid", "test"):
        write_jsonl(root / "prompts" / f"{split}.jsonl", [{"prompt": f"Write a review of {it}."} for it in items])
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
