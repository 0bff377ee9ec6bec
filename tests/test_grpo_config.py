"""GRPO's config keys: TRL's names and defaults, axolotl's ``rl:`` and ``trl:`` forms, one-line errors."""

import pytest

from mlx_dpo.config import ConfigError, load_config


def cfg(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\ndata: d\n" + text)
    return load_config(["--config", str(p)])


def test_trl_defaults_and_beta_zero_for_online(tmp_path):
    args = cfg(tmp_path, "loss_type: grpo\nreward_funcs: [rewards.r]\n")
    assert (args.num_generations, args.num_iterations, args.epsilon, args.epsilon_high) == (8, 1, 0.2, None)
    assert (args.temperature, args.top_p, args.top_k, args.min_p) == (1.0, 1.0, 0, None)
    assert (args.max_completion_length, args.scale_rewards, args.importance_sampling_level) == (256, "group", "token")
    assert args.beta == 0.0 and args.mask_truncated_completions is False
    # An offline loss keeps beta 0.1, and rejects 0.
    assert cfg(tmp_path, "loss_type: dpo\n").beta == 0.1
    with pytest.raises(ConfigError, match="'beta'"):
        cfg(tmp_path, "loss_type: dpo\nbeta: 0\n")


def test_axolotl_rl_and_trl_block(tmp_path):
    args = cfg(tmp_path, "rl: grpo\ntrl:\n  beta: 0.04\n  num_generations: 4\n  reward_funcs: [rewards.a, rewards.b]\n  reward_weights: [1.0, 0.5]\n")
    assert args.loss_type == "dapo" and args.beta == 0.04 and args.num_generations == 4
    assert args.reward_funcs == ["rewards.a", "rewards.b"] and args.reward_weights == [1.0, 0.5]
    assert cfg(tmp_path, "rl: grpo\nloss_type: dr_grpo\n").loss_type == "dr_grpo"
    with pytest.raises(ConfigError, match="contradicts"):
        cfg(tmp_path, "rl: grpo\nloss_type: dpo\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trl.num_generation'.*num_generations"):
        cfg(tmp_path, "rl: grpo\ntrl:\n  num_generation: 4\n")
    with pytest.raises(ConfigError, match="both at the top level and under 'trl:'"):
        cfg(tmp_path, "rl: grpo\nbeta: 0.1\ntrl:\n  beta: 0.2\n")


@pytest.mark.parametrize(
    "text, key",
    [
        ("loss_type: grpo\nnum_generations: 1\n", "num_generations"),
        ("loss_type: grpo\nscale_rewards: yes_please\n", "scale_rewards"),
        ("loss_type: grpo\nimportance_sampling_level: word\n", "importance_sampling_level"),
        ("loss_type: grpo\nreward_funcs: rewards.r\n", "reward_funcs"),
        ("loss_type: grpo\nreward_funcs: [a.b, c.d]\nreward_weights: [1.0]\n", "reward_weights"),
        ("loss_type: grpo\nnum_iterations: 2\nsave_every: 3\n", "save_every"),
        ("loss_type: grpo\ntop_p: 0\n", "top_p"),
        ("loss_type: [grpo, sft]\n", "loss_type"),
    ],
)
def test_bad_online_values_are_one_line_errors(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        cfg(tmp_path, text)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_axolotl_grpo_with_beta_zero_loads(tmp_path):
    args = cfg(tmp_path, "rl: grpo\nbeta: 0\ntrl:\n  num_generations: 4\n")
    assert args.loss_type == "dapo" and args.beta == 0
    args = cfg(tmp_path, "rl: grpo\ntrl:\n  beta: 0.0\n")
    assert args.beta == 0.0


def test_iters_must_end_a_generation_batch(tmp_path):
    with pytest.raises(ConfigError, match="'iters': 30 .*= 4"):
        cfg(tmp_path, "loss_type: grpo\nnum_iterations: 2\ngrad_accumulation_steps: 2\nsave_every: 4\niters: 30\n")
