"""A trained reward model as a reward (``reward_model: PATH``): it scores a completion exactly as
it scored that response in training, learned the preference, and drives GRPO and online DPO
beside reward functions, weighted in the documented order."""

import json

import numpy as np
import pytest

from mlx_dpo.compute.batching import pad_batch
from mlx_dpo.compute.scores import sequence_scores
from mlx_dpo import methods
from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.data import build_pairs
from mlx_dpo.lora import run
from mlx_dpo.online.reward_model import load_reward_model
from mlx_dpo.toy import preference_records, write_jsonl
from mlx_dpo.train.metrics_log import read_metrics
from tests.support import cli_args, review_prompts


@pytest.fixture(scope="module")
def reward_folder(tiny_model_path, tiny_data_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm") / "review_rm"
    run(load_config(cli_args(tiny_model_path, tiny_data_path, folder, "--loss-type", "reward",
                             "--learning-rate", "1e-3", "--iters", "40")))
    return folder


def test_it_scores_completions_as_training_scored_responses(reward_folder, tiny_tokenizer):
    scorer = load_reward_model(str(reward_folder), batch_size=3)
    records = preference_records(6, seed=11)
    examples = build_pairs(records, tiny_tokenizer, 128)[0]
    batch = pad_batch(examples, pad_id=0)
    trained = np.array(sequence_scores(scorer.model, batch["tokens"], batch["lengths"]))
    prompts = [r["prompt"] for r in records] * 2
    completions = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    np.testing.assert_allclose(scorer(prompts=prompts, completions=completions), trained, rtol=1e-4, atol=1e-5)
    assert (trained[:6] > trained[6:]).mean() >= 5 / 6  # it learned: praise scores above complaint
    assert scorer(prompts=["Write a review of the park.", "Write a review of the park."],
                  completions=["", "A lovely park."])[0] is None  # an empty completion: no opinion


def test_a_folder_that_is_not_a_reward_model_is_one_line(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(Exception, match="is not a reward model's folder"):
        load_reward_model(str(tmp_path))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_prompts")
    for split in ("train", "valid", "test"):
        write_jsonl(root / "data" / f"{split}.jsonl", review_prompts())
    (root / "rewards.py").write_text("def length(completion_ids, **kw):\n    return [len(i) / 8 for i in completion_ids]\n")
    return root


def sampling_run(root, model, out, **keys):
    path = root / f"{out.name}.yaml"
    path.write_text(json.dumps({"max_completion_length": 6, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
                                **keys}))
    return ["--config", str(path), "--model", str(model), "--data", str(root / "data"), "--adapter-path", str(out),
            "--train", "--batch-size", "2", "--num-layers", "-1", "--steps-per-report", "1", "--val-batches", "0",
            "--iters", "2", "--learning-rate", "1e-3"]


@pytest.mark.parametrize("method", [{"loss_type": "dapo", "num_generations": 4}, {"loss_type": "dpo", "online": True}])
def test_grpo_and_online_dpo_take_a_reward_model_beside_a_function(tiny_model_path, prompts, reward_folder, tmp_path, method):
    out = tmp_path / "policy"
    run(load_config(sampling_run(prompts, tiny_model_path, out, reward_funcs=["rewards.length"],
                                 reward_model=str(reward_folder), reward_weights=[0.0, 1.0], **method)))
    last = [r for r in read_metrics(out) if r["split"] == "train"][-1]
    if "num_generations" in method:  # GRPO logs each reward; the total is the weighted sum: the model's alone
        assert last["reward"] == pytest.approx(last["rewards/review_rm/mean"], abs=1e-5)
        assert last["rewards/length/mean"] > 0
    else:
        assert "objective/scores" in last


def test_weights_must_count_functions_then_models(tiny_model_path, prompts, reward_folder, tmp_path):
    args = sampling_run(prompts, tiny_model_path, tmp_path / "x", loss_type="dapo", reward_funcs=["rewards.length"],
                        reward_model=[str(reward_folder)], reward_weights=[1.0])
    with pytest.raises(ConfigError, match="1 weights for 1 reward functions, 1 reward models and 0 judge"):
        load_config(args)
    with pytest.raises(ConfigError, match="'reward_model' \\(a folder trained with loss_type: reward\\) or a 'judge'"):
        run(load_config(sampling_run(prompts, tiny_model_path, tmp_path / "y", loss_type="dapo")))
    with pytest.raises(ConfigError, match="is not a reward model's folder"):
        run(load_config(sampling_run(prompts, tiny_model_path, tmp_path / "z", loss_type="dapo", reward_model=str(prompts))))


def test_rewards_sharing_a_name_are_told_apart(tiny_model_path, prompts, reward_folder, tmp_path):
    """The same reward model twice, beside a function: each gets its own metric name (_2 for the repeat)."""
    args = load_config(sampling_run(prompts, tiny_model_path, tmp_path / "x", loss_type="dapo", reward_funcs=["rewards.length"],
                                    reward_model=[str(reward_folder), str(reward_folder)]))
    funcs = methods.find_reward_funcs(methods.choose(args), args)
    assert [name for name, _ in funcs] == ["length", "review_rm", "review_rm_2"]
