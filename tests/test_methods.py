"""The one decision: each configuration names one method, with the records it reads, whether a
reference runs and what its test counts; the rules that depend on the method are one line each."""

import pytest

from mlx_dpo import methods
from mlx_dpo.config import ConfigError, load_config


@pytest.mark.parametrize("keys, name, data, reference, unit", [
    ({"loss_type": "sft"}, "sft", "sft", False, "examples"),
    ({"loss_type": "dpo"}, "offline_dpo", "pairs", True, "pairs"),
    ({"loss_type": "simpo"}, "offline_dpo", "pairs", False, "pairs"),
    ({"loss_type": ["dpo", "sft"], "loss_weights": [1.0, 0.5]}, "offline_dpo", "pairs", True, "pairs"),
    ({"loss_type": "kto"}, "kto", "kto", True, "examples"),
    ({"rl": "kto"}, "kto", "kto", True, "examples"),
    ({"loss_type": "coh"}, "coh", "coh", False, "examples"),
    ({"loss_type": "dapo"}, "grpo", "prompts", False, "completions"),
    ({"rl": "grpo", "beta": 0.04}, "grpo", "prompts", True, "completions"),
    ({"loss_type": "ipo", "online": True}, "online_dpo", "prompts", True, "pairs"),
    ({"loss_type": "dpo", "rounds": 2}, "iterative_dpo", "prompts", True, "pairs"),
])
def test_each_configuration_names_one_method(keys, name, data, reference, unit):
    args = load_config(["--model", "m", "--data", "d"], overrides=keys)
    method = methods.choose(args)
    assert (method.name, method.data, method.reference, method.unit) == (name, data, reference, unit)
    assert method.samples == (data == "prompts")
    assert method.name in methods.METHODS


def test_grpo_defaults_to_beta_0_and_the_others_keep_theirs():
    assert load_config(["--model", "m", "--data", "d"], overrides={"loss_type": "grpo"}).beta == 0.0
    assert load_config(["--model", "m", "--data", "d"], overrides={"loss_type": "dpo"}).beta == 0.1


@pytest.mark.parametrize("keys, message", [
    ({"rl": "grpo", "loss_type": "dpo"}, "'rl: grpo' contradicts 'loss_type: dpo'"),
    ({"loss_type": ["dapo", "dpo"]}, "cannot be combined"),
    ({"loss_type": "kto", "online": True}, "'online: true' turns a paired objective"),
    ({"loss_type": "simpo", "rounds": 2}, "'rounds' trains a paired objective with a reference"),
    ({"loss_type": "dapo", "loss_terms": [{"fn": "m.f"}]}, "'loss_terms' work with the paired objectives"),
    ({"loss_type": "dpo", "beta": 0}, "invalid value for 'beta': 0"),
])
def test_rules_that_depend_on_the_method_are_one_line_errors(keys, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(["--model", "m", "--data", "d"], overrides=keys)
    assert "\n" not in str(e.value)


def test_iterative_dpo_runs_in_one_process():
    args = load_config(["--model", "m", "--data", "d"], overrides={"rounds": 2})
    with pytest.raises(ConfigError, match="runs in one process"):
        methods.choose(args, processes=2)
    assert methods.choose(args, processes=1).name == "iterative_dpo"


def test_a_method_that_samples_needs_reward_functions_found_before_loading(tmp_path):
    args = load_config(["--model", "m", "--data", "d"], overrides={"online": True})
    with pytest.raises(ConfigError, match="online: true learns from rewards: set 'reward_funcs'"):
        methods.find_reward_funcs(methods.choose(args), args)
    args = load_config(["--model", "m", "--data", "d"], overrides={"loss_type": "dpo"})
    assert methods.find_reward_funcs(methods.choose(args), args) == []
